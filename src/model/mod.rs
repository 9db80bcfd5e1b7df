//! Checkpoint loading and the model's forward passes.
pub mod clip;
pub mod config;
pub mod llama;
pub mod llava;
pub mod lora;
pub mod random;
pub mod weights;

use crate::error::{Error, Result};
use weights::WeightStore;

/// Tensor-name prefixes of the three parts of a LLaVA checkpoint. llava-hf checkpoints written by
/// transformers 4 use `language_model.model.*`, `language_model.lm_head`, `vision_tower.vision_model.*`;
/// transformers 5 writes `model.language_model.*`, `lm_head`, `model.vision_tower.*` (and mixes exist).
#[derive(Clone, Debug)]
pub struct Prefixes {
    pub decoder: String,
    pub lm_head: String,
    pub vision: String,
    pub projector: String,
}

impl Prefixes {
    pub fn detect(w: &WeightStore) -> Result<Self> {
        let find = |cands: &[&str], probe: &str, what: &str| -> Result<String> {
            cands
                .iter()
                .find(|c| w.contains(&format!("{c}{probe}")))
                .map(|c| c.to_string())
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}: no {what} found (looked for `{}`)",
                        w.source().display(),
                        cands
                            .iter()
                            .map(|c| format!("{c}{probe}"))
                            .collect::<Vec<_>>()
                            .join("`, `")
                    ))
                })
        };
        let decoder = find(
            &["language_model.model.", "model.language_model."],
            "embed_tokens.weight",
            "LLaMA decoder",
        )?;
        let vision = find(
            &[
                "vision_tower.vision_model.",
                "vision_tower.",
                "model.vision_tower.vision_model.",
                "model.vision_tower.",
            ],
            "embeddings.class_embedding",
            "CLIP vision tower",
        )?;
        let projector = find(
            &["multi_modal_projector.", "model.multi_modal_projector."],
            "linear_1.weight",
            "multi-modal projector",
        )?;
        let lm_head = ["language_model.lm_head.weight", "lm_head.weight"]
            .iter()
            .find(|n| w.contains(n))
            .map(|n| n.to_string())
            .unwrap_or_default(); // empty: tied to the embeddings (checked by the decoder loader)
        Ok(Prefixes {
            decoder,
            lm_head,
            vision: vision.trim_end_matches('.').to_string(),
            projector,
        })
    }
}
