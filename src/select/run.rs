//! The `select` stage: greedy answers with attention statistics for augmented records, the keep rule,
//! post-selection, resumable JSONL output, sharding.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use super::filters::{decide, PostSelect};
use super::ratio::{default_threshold, RatioSpec};
use crate::augment::llava_json::{Mia, Record};
use crate::backend::Backend;
use crate::data::{read_json_list, resolve_image, sample_id};
use crate::model::config::FeatureSelect;
use crate::model::llava::{GenerateItem, GenerateOptions, Llava};
use crate::text::Template;
use crate::vision::preprocess::AspectMode;
use crate::{Error, Result};

/// `--shard I/N`: this process takes the records whose index (over all --data files, in order) is I mod N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("--shard `{s}`: expected I/N with 0 <= I < N (e.g. 0/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

#[derive(Clone, Debug)]
pub struct SelectOptions {
    pub data: Vec<PathBuf>,
    pub image_roots: Vec<PathBuf>,
    pub out: PathBuf,
    pub template: Template,
    pub aspect: AspectMode,
    pub generate: GenerateOptions,
    /// overrides MIA-DPO's per-kind thresholds
    pub ratio_threshold: Option<f64>,
    pub ppl_threshold: f64,
    /// None: `--no-post-select`
    pub post: Option<PostSelect>,
    pub max_gt_chars: usize,
    pub batch_size: usize,
    pub shard: Shard,
    /// skip (and count) malformed records and records with missing images instead of failing
    pub skip_bad: bool,
}

#[derive(Clone, Debug, Default)]
pub struct SelectSummary {
    /// records of this shard
    pub seen: usize,
    /// decided by an earlier run on the same --out
    pub resumed: usize,
    /// not answered, per reason
    pub skipped: BTreeMap<String, usize>,
    /// kept pairs per (kind, number of images)
    pub kept: BTreeMap<(String, usize), usize>,
    /// answered but dropped, per reason
    pub dropped: BTreeMap<String, usize>,
    pub answers: usize,
    pub tokens: usize,
    pub seconds: f64,
}

/// Live counters for a progress display.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
    pub tokens: usize,
    pub kept: usize,
}

/// One record to answer.
struct Task {
    id: String,
    images: Vec<String>,
    paths: Vec<PathBuf>,
    question: String,
    gt: String,
    mia: Mia,
    mia_value: Value,
}

#[derive(Serialize)]
struct PairLine<'a> {
    id: &'a str,
    image: &'a [String],
    prompt: &'a str,
    chosen: &'a str,
    rejected: &'a str,
    gt: &'a str,
    mia: Value,
}

#[derive(Serialize)]
struct DroppedLine<'a> {
    id: &'a str,
    reason: &'a str,
    answer: &'a str,
    ratio: Option<f64>,
    ppl: f64,
}

/// The sidecar of decided-but-dropped ids next to `out` (`pairs.jsonl` -> `pairs.dropped.jsonl`).
pub fn dropped_path(out: &Path) -> PathBuf {
    out.with_extension("dropped.jsonl")
}

pub fn run<B: Backend>(
    m: &Llava<B>,
    o: &SelectOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<SelectSummary> {
    if o.batch_size == 0 {
        return Err(Error::Invalid("--batch-size must be at least 1".into()));
    }
    let mut summary = SelectSummary::default();
    let mut seen_ids = HashMap::new();
    let mut tasks = Vec::new();
    let mut global = 0usize;
    for file in &o.data {
        for (id, rec) in read_records(file)? {
            let index = global;
            global += 1;
            if let Some(prev) = seen_ids.insert(id.clone(), file.clone()) {
                return Err(Error::file(
                    file,
                    format!(
                        "record `{id}` appears twice (also in {}); ids must be unique",
                        prev.display()
                    ),
                ));
            }
            if index % o.shard.count != o.shard.index {
                continue;
            }
            summary.seen += 1;
            match rec.and_then(|r| task_of(&id, r, o)) {
                Ok(Some(t)) => tasks.push(t),
                Ok(None) => {
                    *summary
                        .skipped
                        .entry(format!("ground truth longer than {} chars", o.max_gt_chars))
                        .or_default() += 1
                }
                Err(msg) if o.skip_bad => {
                    *summary
                        .skipped
                        .entry(format!("bad record: {}", first_words(&msg)))
                        .or_default() += 1
                }
                Err(msg) => return Err(Error::file(file, format!("record `{id}`: {msg}"))),
            }
        }
    }
    let decided = decided_ids(&o.out)?;
    let before = tasks.len();
    tasks.retain(|t| !decided.contains(&t.id));
    summary.resumed = before - tasks.len();

    // every image must resolve before hours of decoding start
    let mut ready = Vec::with_capacity(tasks.len());
    for mut t in tasks {
        match t
            .images
            .iter()
            .map(|p| resolve_image(p, &o.image_roots, &t.id))
            .collect::<Result<Vec<_>>>()
        {
            Ok(paths) => {
                t.paths = paths;
                ready.push(t);
            }
            Err(_) if o.skip_bad => *summary.skipped.entry("image not found".into()).or_default() += 1,
            Err(e) => return Err(e),
        }
    }
    if let Some(dir) = o.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut out = append_file(&o.out)?;
    let mut dropped = append_file(&dropped_path(&o.out))?;
    let start = Instant::now();
    let mut prog = Progress {
        total: ready.len(),
        ..Default::default()
    };
    progress(prog);
    for batch in ready.chunks(o.batch_size) {
        let (kept_lines, dropped_lines) = answer_batch(m, o, batch, &mut summary, &mut |k| {
            prog.tokens += k;
            progress(prog);
        })?;
        write_lines(&mut out, &o.out, &kept_lines)?;
        write_lines(&mut dropped, &dropped_path(&o.out), &dropped_lines)?;
        prog.done += batch.len();
        prog.kept += kept_lines.len();
        progress(prog);
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Answers one batch; returns the JSONL lines of kept pairs and of dropped records.
fn answer_batch<B: Backend>(
    m: &Llava<B>,
    o: &SelectOptions,
    batch: &[Task],
    summary: &mut SelectSummary,
    on_step: &mut dyn FnMut(usize),
) -> Result<(Vec<String>, Vec<String>)> {
    let g = m.cfg.vision.grid();
    let pixels: Vec<Vec<Vec<f32>>> = batch
        .par_iter()
        .map(|t| {
            t.paths
                .iter()
                .map(|p| {
                    m.pixels(p, o.aspect)
                        .map_err(|e| Error::sample(&t.id, e.to_string()))
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    let mut prompts = Vec::with_capacity(batch.len());
    let mut specs = Vec::with_capacity(batch.len());
    for t in batch {
        let p = m.prompt(o.template, &t.question, t.images.len(), &t.id)?;
        let spec = match &t.mia {
            Mia::Sequence { target, .. } => RatioSpec::sequence(&p.image_spans, *target),
            Mia::Grid {
                rows, cols, target, ..
            } => RatioSpec::grid(
                patch_span(m, &p.image_spans, &t.id)?,
                g,
                *rows as usize,
                *cols as usize,
                *target,
            ),
            Mia::Pip { .. } => RatioSpec::pip(patch_span(m, &p.image_spans, &t.id)?, g),
        }
        .map_err(|e| Error::sample(&t.id, e.to_string()))?;
        prompts.push(p);
        specs.push(spec);
    }
    let feats: Vec<B::Buf> = pixels.iter().map(|px| m.image_features(px)).collect();
    let items: Vec<GenerateItem<B>> = prompts
        .iter()
        .zip(&feats)
        .zip(&specs)
        .map(|((p, f), s)| GenerateItem {
            prompt: p,
            features: f,
            groups: Some(&s.groups),
        })
        .collect();
    let gens = m.generate_batch(&items, &o.generate, on_step)?;
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    for ((t, gen), spec) in batch.iter().zip(gens).zip(&specs) {
        summary.answers += 1;
        summary.tokens += gen.token_ids.len();
        let ratio = spec.ratio(&gen.attention_rows);
        let threshold = o.ratio_threshold.unwrap_or_else(|| default_threshold(&t.mia));
        let verdict = decide(
            &gen.text,
            &t.gt,
            ratio,
            gen.max_softmax_ppl,
            threshold,
            o.ppl_threshold,
            o.post.as_ref(),
        );
        match verdict {
            None => {
                let n = n_images(&t.mia);
                let mut mia = t.mia_value.clone();
                if let Value::Object(obj) = &mut mia {
                    obj.insert("ratio".into(), ratio.into());
                    obj.insert("ppl".into(), gen.max_softmax_ppl.into());
                    obj.insert("n_images".into(), n.into());
                }
                let line = PairLine {
                    id: &t.id,
                    image: &t.images,
                    prompt: &t.question,
                    chosen: &t.gt,
                    rejected: &gen.text,
                    gt: &t.gt,
                    mia,
                };
                kept.push(serde_json::to_string(&line).expect("pair serializes"));
                *summary
                    .kept
                    .entry((kind_name(&t.mia).to_string(), n))
                    .or_default() += 1;
            }
            Some(reason) => {
                let line = DroppedLine {
                    id: &t.id,
                    reason: &reason,
                    answer: &gen.text,
                    ratio,
                    ppl: gen.max_softmax_ppl,
                };
                dropped.push(serde_json::to_string(&line).expect("drop serializes"));
                *summary.dropped.entry(reason).or_default() += 1;
            }
        }
    }
    Ok((kept, dropped))
}

/// The one image span of a grid or pic-in-pic prompt, checked to be the g×g patch grid.
fn patch_span<B: Backend>(m: &Llava<B>, spans: &[(usize, usize)], id: &str) -> Result<(usize, usize)> {
    if m.cfg.feature_select != FeatureSelect::Default {
        return Err(Error::sample(
            id,
            "grid and pic-in-pic ratios need vision_feature_select_strategy `default`",
        ));
    }
    match spans {
        [s] => Ok(*s),
        _ => Err(Error::sample(
            id,
            format!(
                "a grid or pic-in-pic prompt needs one image, found {}",
                spans.len()
            ),
        )),
    }
}

fn kind_name(m: &Mia) -> &'static str {
    match m {
        Mia::Sequence { .. } => "sequence",
        Mia::Grid { .. } => "grid",
        Mia::Pip { .. } => "pip",
    }
}

/// Images the model compares: the sequence's images, the collage's cells, background + foreground.
fn n_images(m: &Mia) -> usize {
    match m {
        Mia::Sequence { n_images, .. } | Mia::Grid { n_images, .. } => *n_images,
        Mia::Pip { .. } => 2,
    }
}

/// The records of one data file: (id, parsed record or why it is malformed).
fn read_records(file: &Path) -> Result<Vec<(String, std::result::Result<Record, String>)>> {
    let list = read_json_list(file, "records (the output of `miadpo augment`)")?;
    Ok(list
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let id = sample_id(r).ok().flatten().unwrap_or_else(|| format!("#{i}"));
            let rec = if r.get("mia").is_none() {
                Err("has no `mia` metadata (is it the output of `miadpo augment`?)".to_string())
            } else {
                serde_json::from_value::<Record>(r.clone()).map_err(|e| e.to_string())
            };
            (id, rec)
        })
        .collect())
}

/// Checks a record and makes its task; Ok(None): ground truth too long.
fn task_of(id: &str, r: Record, o: &SelectOptions) -> std::result::Result<Option<Task>, String> {
    let images: Vec<String> = match &r.image {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or("`image` entries must be strings")
            })
            .collect::<std::result::Result<_, _>>()?,
        _ => return Err("`image` must be a path or a list of paths".into()),
    };
    let question = r
        .conversations
        .iter()
        .find(|t| t.from == "human")
        .map(|t| t.value.clone())
        .ok_or("no human turn")?;
    let gt = r
        .conversations
        .iter()
        .find(|t| t.from == "gpt")
        .map(|t| t.value.clone())
        .ok_or("no gpt turn")?;
    let placeholders = question.matches("<image>").count();
    match &r.mia {
        Mia::Sequence { target, n_images, .. } => {
            if !(1..=*n_images).contains(target) {
                return Err(format!("target {target} is outside 1..={n_images}"));
            }
            if images.len() != *n_images {
                return Err(format!(
                    "mia says {n_images} images, `image` lists {}",
                    images.len()
                ));
            }
        }
        Mia::Grid {
            target, rows, cols, ..
        } => {
            let cells = (rows * cols) as usize;
            if cells == 0 || !(1..=cells).contains(target) {
                return Err(format!(
                    "target {target} is outside 1..={cells} ({rows}x{cols} grid)"
                ));
            }
            if images.len() != 1 {
                return Err(format!(
                    "a grid record has one composed image, `image` lists {}",
                    images.len()
                ));
            }
        }
        Mia::Pip { .. } => {
            if images.len() != 1 {
                return Err(format!(
                    "a pic-in-pic record has one composed image, `image` lists {}",
                    images.len()
                ));
            }
        }
    }
    if placeholders != images.len() {
        return Err(format!(
            "the prompt has {placeholders} `<image>` placeholder(s) for {} image(s)",
            images.len()
        ));
    }
    if gt.chars().count() > o.max_gt_chars {
        return Ok(None);
    }
    let mia_value = serde_json::to_value(&r.mia).expect("mia serializes");
    Ok(Some(Task {
        id: id.to_string(),
        images,
        paths: Vec::new(),
        question,
        gt,
        mia: r.mia,
        mia_value,
    }))
}

fn first_words(msg: &str) -> String {
    msg.split(['(', ':']).next().unwrap_or(msg).trim().to_string()
}

/// Ids already decided in `out` (kept) and its sidecar (dropped). A line cut by a killed run is
/// removed from the file so appending continues on a line boundary.
fn decided_ids(out: &Path) -> Result<HashSet<String>> {
    let mut ids = HashSet::new();
    for p in [out.to_path_buf(), dropped_path(out)] {
        if !p.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let complete = match text.rfind('\n') {
            Some(i) => i + 1,
            None => 0,
        };
        if complete < text.len() {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|e| Error::io(&p, e))?;
            f.set_len(complete as u64).map_err(|e| Error::io(&p, e))?;
        }
        for (n, line) in text[..complete].lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| {
                Error::file(
                    &p,
                    format!("line {}: not JSON ({e}); is this a `select` output?", n + 1),
                )
            })?;
            let id = v
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| Error::file(&p, format!("line {} has no id", n + 1)))?;
            ids.insert(id.to_string());
        }
    }
    Ok(ids)
}

fn append_file(p: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map_err(|e| Error::io(p, e))
}

/// Appends whole lines in one write and syncs, so a kill loses at most the batch in flight.
fn write_lines(f: &mut std::fs::File, p: &Path, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut buf = lines.join("\n");
    buf.push('\n');
    f.write_all(buf.as_bytes())
        .and_then(|_| f.sync_data())
        .map_err(|e| Error::io(p, e))
}
