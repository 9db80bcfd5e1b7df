//! The `augment` stage end to end: read, validate, plan, compose in parallel, write atomically.
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::Value;

use super::compose::{compose_grid, compose_pip, grid_shape};
use super::llava_json::{load_llava_json, Mia, Record, Skipped, SourceSample};
use super::plan::{
    pick_companions, pick_weighted, rng_for, Companions, Kind, Pools, GRID_WEIGHTS, SEQUENCE_WEIGHTS,
};
use super::prompt::{rewrite, sequence_header, IMAGE};
use crate::data::resolve_image;
use crate::vision::preprocess::load_image;
use crate::{Error, Result};

/// The 93 centre-referring phrases of MIA-DPO's pic-in-pic prompts.
pub const PIP_PHRASES: &str = include_str!("../../assets/pip_phrases.txt");

pub fn pip_phrases() -> Vec<&'static str> {
    PIP_PHRASES
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

#[derive(Clone, Debug)]
pub struct AugmentOptions {
    pub data: PathBuf,
    pub image_roots: Vec<PathBuf>,
    pub out: PathBuf,
    pub kinds: Vec<Kind>,
    /// at most this many records per kind (the first samples in input order)
    pub per_kind: Option<usize>,
    pub seed: u64,
    pub companions: Companions,
    pub jpeg_quality: u8,
    /// skip samples whose image is missing or undecodable (listed in skipped.jsonl) instead of failing
    pub skip_bad: bool,
    /// replace the results of an earlier run in `out`
    pub overwrite: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub samples_read: usize,
    /// samples with a usable image (the others are in `skipped`)
    pub samples_used: usize,
    pub records: BTreeMap<Kind, usize>,
    pub skipped: Vec<Skipped>,
    /// records whose companions (or background) came from other datasets because the source's own
    /// dataset holds too few images (`--companions same` only)
    pub companion_fallbacks: usize,
}

impl Summary {
    /// Skip reasons (samples, or single records under `skip_bad`) with their counts, most frequent first.
    pub fn skip_reasons(&self) -> Vec<(String, usize)> {
        let mut m: HashMap<String, usize> = HashMap::new();
        for s in &self.skipped {
            let key = s.reason.split(':').next().unwrap_or(&s.reason).to_string();
            *m.entry(key).or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }
}

/// One output record to produce.
enum Job<'a> {
    Sequence {
        s: &'a SourceSample,
        images: Vec<String>,
        target: usize,
    },
    Grid {
        s: &'a SourceSample,
        sources: Vec<String>,
        target: usize,
        rows: u32,
        cols: u32,
    },
    Pip {
        s: &'a SourceSample,
        background: String,
        phrase: &'static str,
    },
}

/// The files an earlier run leaves in the output folder.
const RESULTS: [&str; 5] = [
    "sequence.json",
    "grid.json",
    "pip.json",
    "skipped.jsonl",
    "images",
];

pub fn run(o: &AugmentOptions, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Summary> {
    prepare_out(&o.out, o.overwrite)?;
    let (samples, mut skipped) = load_llava_json(&o.data)?;
    let samples_read = samples.len() + skipped.len();

    // every sample's image must resolve and show a readable header (cheap: no pixel decoding)
    let checked: Vec<Result<PathBuf>> = samples
        .par_iter()
        .map(|s| {
            let p = resolve_image(&s.image, &o.image_roots, &s.id)?;
            image::ImageReader::open(&p)
                .and_then(|r| r.with_guessed_format())
                .map_err(|e| Error::sample(&s.id, format!("image `{}`: {e}", p.display())))?
                .into_dimensions()
                .map_err(|e| {
                    Error::sample(&s.id, format!("image `{}` cannot be decoded: {e}", p.display()))
                })?;
            Ok(p)
        })
        .collect();
    let mut good = Vec::new();
    let mut resolved: HashMap<&str, PathBuf> = HashMap::new();
    for (s, r) in samples.iter().zip(checked) {
        match r {
            Ok(p) => {
                resolved.insert(&s.image, p);
                good.push(s);
            }
            Err(e) if o.skip_bad => skipped.push(Skipped {
                id: s.id.clone(),
                image: Some(s.image.clone()),
                reason: bad_reason(&e),
            }),
            Err(e) => return Err(in_data(&o.data, e)),
        }
    }
    let pools = Pools::new(good.iter().map(|s| s.image.as_str()));
    let phrases = pip_phrases();

    let (mut jobs, mut companion_fallbacks) = (Vec::new(), 0);
    for &kind in &o.kinds {
        let take = o.per_kind.unwrap_or(usize::MAX);
        for s in good.iter().take(take) {
            let (job, fell_back) = plan(kind, s, &pools, o, &phrases).map_err(|e| in_data(&o.data, e))?;
            companion_fallbacks += usize::from(fell_back);
            jobs.push(job);
        }
    }

    let images_dir = o.out.join("images");
    if jobs.iter().any(|j| !matches!(j, Job::Sequence { .. })) {
        std::fs::create_dir_all(&images_dir).map_err(|e| Error::io(&images_dir, e))?;
    }
    let total = jobs.len() as u64;
    let done = std::sync::atomic::AtomicU64::new(0);
    let results: Vec<(Kind, Result<Record>)> = jobs
        .par_iter()
        .map(|j| {
            let r = (kind_of(j), execute(j, &resolved, o));
            progress(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1, total);
            r
        })
        .collect();

    let mut by_kind: BTreeMap<Kind, Vec<Record>> = o.kinds.iter().map(|&k| (k, Vec::new())).collect();
    for (kind, r) in results {
        match r {
            Ok(rec) => by_kind.entry(kind).or_default().push(rec),
            Err(Error::Sample { id, msg }) if o.skip_bad => skipped.push(Skipped {
                id,
                image: None,
                reason: format!("{kind} record not made: {msg}"),
            }),
            Err(e) => return Err(in_data(&o.data, e)),
        }
    }
    let mut records = BTreeMap::new();
    for (kind, recs) in &by_kind {
        let mut text = serde_json::to_vec_pretty(recs).expect("records serialize");
        text.push(b'\n');
        write_atomic(&o.out.join(format!("{kind}.json")), &text)?;
        records.insert(*kind, recs.len());
    }
    if !skipped.is_empty() {
        let mut text = Vec::new();
        for s in &skipped {
            serde_json::to_writer(&mut text, s).expect("skip serializes");
            text.push(b'\n');
        }
        write_atomic(&o.out.join("skipped.jsonl"), &text)?;
    }
    Ok(Summary {
        samples_read,
        samples_used: good.len(),
        records,
        skipped,
        companion_fallbacks,
    })
}

fn kind_of(j: &Job) -> Kind {
    match j {
        Job::Sequence { .. } => Kind::Sequence,
        Job::Grid { .. } => Kind::Grid,
        Job::Pip { .. } => Kind::Pip,
    }
}

/// "missing image" / "undecodable image" plus the detail, for skipped.jsonl.
fn bad_reason(e: &Error) -> String {
    let msg = match e {
        Error::Sample { msg, .. } => msg.clone(),
        other => other.to_string(),
    };
    if msg.contains("not found") || msg.contains("does not exist") {
        format!("missing image: {msg}")
    } else {
        format!("undecodable image: {msg}")
    }
}

fn in_data(data: &Path, e: Error) -> Error {
    match e {
        Error::Sample { id, msg } => Error::file(data, format!("sample `{id}`: {msg}")),
        other => other,
    }
}

/// The random decisions for one record, and whether its companions had to come from other datasets
/// (the source's dataset holds too few images for it).
fn plan<'a>(
    kind: Kind,
    s: &'a SourceSample,
    pools: &Pools,
    o: &AugmentOptions,
    phrases: &[&'static str],
) -> Result<(Job<'a>, bool)> {
    let mut rng = rng_for(o.seed, kind, s.index);
    let mut fell_back = false;
    // `count` distinct companions from the chosen pool, falling back to every dataset when the
    // source's own is too small; an input too small altogether is an error.
    let mut companions = |rng: &mut ChaCha8Rng, count: usize| -> Result<Vec<String>> {
        let too_few = |have: usize| {
            Error::sample(
                &s.id,
                format!(
                    "a {kind} record needs {count} image(s) besides the sample's own, but the input has only {have} other distinct image(s)"
                ),
            )
        };
        match pick_companions(rng, pools.pool(&s.image, o.companions), &s.image, count) {
            Ok(c) => Ok(c),
            Err(_) if o.companions == Companions::Same => {
                fell_back = true;
                pick_companions(rng, pools.pool(&s.image, Companions::Any), &s.image, count).map_err(too_few)
            }
            Err(have) => Err(too_few(have)),
        }
    };
    // n images with the source at a random position k (1-based)
    let mut with_source = |rng: &mut ChaCha8Rng, n: usize| -> Result<(Vec<String>, usize)> {
        let mut imgs = companions(rng, n - 1)?;
        let k = rng.random_range(0..n);
        imgs.insert(k, s.image.clone());
        Ok((imgs, k + 1))
    };
    let job = match kind {
        Kind::Sequence => {
            let n = pick_weighted(&mut rng, &SEQUENCE_WEIGHTS);
            let (images, target) = with_source(&mut rng, n)?;
            Job::Sequence { s, images, target }
        }
        Kind::Grid => {
            let n = pick_weighted(&mut rng, &GRID_WEIGHTS);
            let (rows, cols) = grid_shape(n).expect("grid weights use supported counts");
            let (sources, target) = with_source(&mut rng, n)?;
            Job::Grid {
                s,
                sources,
                target,
                rows,
                cols,
            }
        }
        Kind::Pip => {
            let (mut imgs, _) = with_source(&mut rng, 2)?;
            imgs.retain(|p| p != &s.image);
            let phrase = phrases[rng.random_range(0..phrases.len())];
            Job::Pip {
                s,
                background: imgs.remove(0),
                phrase,
            }
        }
    };
    Ok((job, fell_back))
}

/// Composes (grid, pip) and writes the image, and builds the record.
fn execute(j: &Job, resolved: &HashMap<&str, PathBuf>, o: &AugmentOptions) -> Result<Record> {
    let decode = |id: &str, img: &str| -> Result<image::RgbImage> {
        let p = &resolved[img];
        load_image(p).map_err(|e| Error::sample(id, format!("image `{img}`: {e}")))
    };
    match j {
        Job::Sequence { s, images, target } => Ok(Record {
            id: format!("{}_sequence", s.id),
            image: Value::Array(images.iter().map(|p| Value::String(p.clone())).collect()),
            conversations: rewrite(
                &s.conversations,
                &sequence_header(images.len()),
                &format!("In Image{target}, "),
            ),
            mia: Mia::Sequence {
                target: *target,
                n_images: images.len(),
                source_id: s.id.clone(),
            },
        }),
        Job::Grid {
            s,
            sources,
            target,
            rows,
            cols,
        } => {
            let imgs = sources
                .iter()
                .map(|p| decode(&s.id, p))
                .collect::<Result<Vec<_>>>()?;
            let canvas = compose_grid(&imgs.iter().collect::<Vec<_>>())?;
            let name = format!("images/grid_{:07}.jpg", s.index);
            write_jpeg(&o.out.join(&name), &canvas, o.jpeg_quality)?;
            Ok(Record {
                id: format!("{}_grid", s.id),
                image: Value::String(name),
                conversations: rewrite(
                    &s.conversations,
                    &format!("{IMAGE}\n"),
                    &format!("In Image{target}, "),
                ),
                mia: Mia::Grid {
                    target: *target,
                    n_images: sources.len(),
                    rows: *rows,
                    cols: *cols,
                    sources: sources.clone(),
                    source_id: s.id.clone(),
                },
            })
        }
        Job::Pip {
            s,
            background,
            phrase,
        } => {
            let (bg, fg) = (decode(&s.id, background)?, decode(&s.id, &s.image)?);
            let name = format!("images/pip_{:07}.jpg", s.index);
            write_jpeg(&o.out.join(&name), &compose_pip(&bg, &fg), o.jpeg_quality)?;
            Ok(Record {
                id: format!("{}_pip", s.id),
                image: Value::String(name),
                conversations: rewrite(&s.conversations, &format!("{IMAGE}\n"), &format!("{phrase}, ")),
                mia: Mia::Pip {
                    background: background.clone(),
                    foreground: s.image.clone(),
                    source_id: s.id.clone(),
                },
            })
        }
    }
}

/// Refuses a folder that already holds results, unless `overwrite` (then they are removed first).
fn prepare_out(out: &Path, overwrite: bool) -> Result<()> {
    let existing: Vec<&str> = RESULTS.iter().copied().filter(|f| out.join(f).exists()).collect();
    if !existing.is_empty() {
        if !overwrite {
            return Err(Error::file(
                out,
                format!(
                    "already holds results ({}); pass --overwrite to replace them",
                    existing.join(", ")
                ),
            ));
        }
        for f in existing {
            let p = out.join(f);
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(|e| Error::io(&p, e))?;
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))
}

fn write_jpeg(path: &Path, img: &image::RgbImage, quality: u8) -> Result<()> {
    let bytes =
        encode_jpeg(img, quality).map_err(|e| Error::file(path, format!("cannot encode JPEG: {e}")))?;
    write_atomic(path, &bytes)
}

/// Baseline JPEG (4:2:0) through `jpeg-encoder`, whose AVX2 path is ~9x faster than the `image` crate's
/// encoder here — with it, composing rather than encoding dominates a collage's cost.
pub fn encode_jpeg(img: &image::RgbImage, quality: u8) -> std::result::Result<Vec<u8>, String> {
    let (w, h) = img.dimensions();
    let (w16, h16) = (u16::try_from(w), u16::try_from(h));
    let (Ok(w16), Ok(h16)) = (w16, h16) else {
        return Err(format!("{w}x{h} is larger than JPEG's 65535 px limit"));
    };
    let mut buf = Vec::new();
    jpeg_encoder::Encoder::new(&mut buf, quality)
        .encode(img.as_raw(), w16, h16, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Writes to a hidden temporary file beside `path`, then renames it over `path`: a killed run leaves
/// either the old file or the whole new one, never a truncated one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.partial"));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
