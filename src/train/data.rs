//! Training pairs: MIA-DPO DPO data (as `score` reads it and `select` writes it) tokenized, image
//! features computed, reference log-probs taken once with the adapter off.
use std::path::PathBuf;

use super::trainer::TrainPair;
use crate::backend::cpu::CpuBackend;
use crate::data::{load_pairs, resolve_image};
use crate::model::llava::Llava;
use crate::text::Template;
use crate::vision::preprocess::AspectMode;
use crate::{Error, Result};

/// Pairs that could not be used, with the reason per id.
#[derive(Clone, Debug, Default)]
pub struct Prepared {
    pub pairs: Vec<TrainPair>,
    pub skipped: Vec<(String, String)>,
}

/// Reads, checks and prepares every pair; `max_length` caps prompt + longer answer (tokens): a pair
/// that does not fit is skipped (image tokens are never cut).
pub fn prepare_pairs(
    m: &Llava<CpuBackend>,
    data: &std::path::Path,
    roots: &[PathBuf],
    template: Template,
    aspect: AspectMode,
    max_length: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Prepared> {
    let raw = load_pairs(data)?;
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
        let paths = match p
            .images
            .iter()
            .map(|im| resolve_image(im, roots, &p.id))
            .collect::<Result<Vec<_>>>()
        {
            Ok(ps) => ps,
            Err(e) => {
                out.skipped.push(bad(&e.to_string()));
                continue;
            }
        };
        let prompt = m.prompt(template, &p.prompt, paths.len(), &p.id)?;
        let chosen = m.tokenizer.response(&p.chosen)?;
        let rejected = m.tokenizer.response(&p.rejected)?;
        if prompt.ids.len() + chosen.len().max(rejected.len()) > max_length {
            out.skipped
                .push(bad(&format!("longer than --max-length {max_length}")));
            continue;
        }
        let pixels = paths
            .iter()
            .map(|path| m.pixels(path, aspect))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| Error::sample(&p.id, e.to_string()))?;
        let features = m.image_features(&pixels);
        let refs = m.sequence_logps(&prompt, &features, &[chosen.clone(), rejected.clone()], false)?;
        out.pairs.push(TrainPair {
            id: p.id.clone(),
            prompt: prompt.ids,
            features,
            chosen,
            rejected,
            ref_chosen: refs[0],
            ref_rejected: refs[1],
        });
    }
    progress(raw.len(), raw.len());
    Ok(out)
}
