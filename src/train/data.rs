//! Training pairs: MIA-DPO DPO data (as `score` reads it and `select` writes it) tokenized, image
//! features computed, and reference log-probs (base model, adapter off) taken once per pair and
//! cached next to the run, so that training runs only the policy.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::backward::{pair_forward, PassOptions};
use super::checkpoint::Fnv;
use super::trainer::TrainPair;
use crate::backend::Backend;
use crate::data::{load_pairs, pair_inputs, resolve_image};
use crate::model::llava::Llava;
use crate::text::Template;
use crate::vision::preprocess::AspectMode;
use crate::{Error, Result};

/// Pairs ready for training, and those that could not be used with the reason per id.
#[derive(Clone, Debug, Default)]
pub struct Prepared {
    pub pairs: Vec<TrainPair>,
    pub skipped: Vec<(String, String)>,
    /// reference log-probs taken from the cache instead of computed
    pub cached: usize,
}

/// Where the reference log-probs of a run are kept: `OUT/reference_logps.json`.
pub fn cache_path(out: &Path) -> PathBuf {
    out.join("reference_logps.json")
}

/// The reference cache: log-probs of (chosen, rejected) per pair fingerprint. A pair's fingerprint
/// covers its token ids (so the template and tokenizer) and its image bytes; the file's `model`
/// covers the base checkpoint and the image preprocessing. Another model invalidates the whole file.
#[derive(Serialize, Deserialize, Default)]
struct RefCache {
    model: String,
    pairs: BTreeMap<String, (f64, f64)>,
}

/// Reads, checks and prepares every pair. `max_length` caps prompt + longer answer (tokens): a pair
/// that does not fit is skipped (image tokens are never cut). `base` is the base checkpoint's
/// fingerprint; with `cache`, reference log-probs found there are reused and new ones added. The
/// reference pass takes `layout.prefix_sharing` from the training run (dropout is off).
#[allow(clippy::too_many_arguments)]
pub fn prepare_pairs<B: Backend>(
    m: &Llava<B>,
    data: &Path,
    roots: &[PathBuf],
    template: Template,
    aspect: AspectMode,
    max_length: usize,
    base: &str,
    layout: PassOptions,
    cache: Option<&Path>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Prepared> {
    if m.decoder.has_lora() {
        return Err(Error::Invalid(
            "reference log-probs need the base model: load the adapter after preparing the pairs".into(),
        ));
    }
    let raw = load_pairs(data)?;
    // the runtime's version too: another version may round the reference differently
    let layout = PassOptions {
        lora_dropout: 0.0,
        ..layout
    };
    let model_key = format!(
        "{base}/{aspect:?}/prefix sharing {}/miadpo {}",
        layout.prefix_sharing,
        env!("CARGO_PKG_VERSION")
    );
    let mut store: RefCache = cache
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|c: &RefCache| c.model == model_key)
        .unwrap_or_else(|| RefCache {
            model: model_key.clone(),
            ..Default::default()
        });
    let mut out = Prepared::default();
    for (i, p) in raw.iter().enumerate() {
        progress(i, raw.len());
        let bad = |why: &str| (p.id.clone(), why.to_string());
        if p.chosen.trim().is_empty() || p.rejected.trim().is_empty() {
            out.skipped.push(bad("empty chosen or rejected answer"));
            continue;
        }
        if p.chosen.trim() == p.rejected.trim() {
            out.skipped.push(bad("chosen equals rejected"));
            continue;
        }
        let inputs = match pair_inputs(m, p, roots, template, aspect) {
            Ok(x) => x,
            Err(e) => {
                out.skipped.push(bad(&e.to_string()));
                continue;
            }
        };
        let (prompt, chosen, rejected) = (inputs.prompt.ids, inputs.chosen, inputs.rejected);
        if prompt.len() + chosen.len().max(rejected.len()) > max_length {
            out.skipped.push(bad(&format!(
                "{} prompt + {} answer tokens exceed --max-length {max_length} (image tokens are never cut)",
                prompt.len(),
                chosen.len().max(rejected.len())
            )));
            continue;
        }
        let key = pair_fingerprint(&prompt, &chosen, &rejected, &p.images, roots, &p.id)?;
        let (ref_chosen, ref_rejected) = match store.pairs.get(&key) {
            Some(&v) => {
                out.cached += 1;
                v
            }
            None => {
                // the policy's own forward and layout, adapter off: a fresh adapter (B = 0) then
                // starts from exactly the reference's bits
                let f = pair_forward(m, &prompt, &chosen, &rejected, &inputs.features, layout, 0)?;
                let v = f.logps();
                store.pairs.insert(key, v);
                v
            }
        };
        out.pairs.push(TrainPair {
            id: p.id.clone(),
            prompt,
            features: m.be.download(&inputs.features),
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
        });
    }
    progress(raw.len(), raw.len());
    if let Some(path) = cache {
        if out.cached < out.pairs.len() {
            let bytes = serde_json::to_vec(&store).expect("cache serializes");
            crate::augment::run::write_atomic(path, &bytes)?;
        }
    }
    Ok(out)
}

/// Token ids of the pair and the bytes of its images.
fn pair_fingerprint(
    prompt: &[u32],
    chosen: &[u32],
    rejected: &[u32],
    images: &[String],
    roots: &[PathBuf],
    id: &str,
) -> Result<String> {
    let mut h = Fnv::default();
    for ids in [prompt, chosen, rejected] {
        h.eat(&(ids.len() as u64).to_le_bytes());
        h.eat(bytemuck::cast_slice(ids));
    }
    for im in images {
        let path = resolve_image(im, roots, id)?;
        h.eat(&std::fs::read(&path).map_err(|e| Error::io(&path, e))?);
    }
    Ok(h.hex())
}
