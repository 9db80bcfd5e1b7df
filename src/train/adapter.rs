//! Trainable LoRA weights in f32: PEFT's initialisation, and saving as a PEFT adapter folder
//! (`adapter_config.json` + `adapter_model.safetensors`) that PEFT and `miadpo --adapter` load.
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::augment::run::write_atomic;
use crate::model::lora::{LoraAdapter, Proj};
use crate::{Error, Result};

/// One module's trainable matrices.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraModuleWeights {
    pub layer: usize,
    pub proj: Proj,
    /// (r, in)
    pub a: Vec<f32>,
    /// (out, r)
    pub b: Vec<f32>,
    pub in_features: usize,
    pub out_features: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoraWeights {
    pub r: usize,
    pub alpha: f64,
    pub modules: Vec<LoraModuleWeights>,
}

impl LoraWeights {
    /// PEFT's default init: A ~ kaiming_uniform(a=√5), i.e. U(−1/√in, 1/√in); B = 0 (so the adapter
    /// starts as the identity and the first DPO loss is ln 2). `dims(layer, proj)` = (out, in).
    pub fn init(
        layers: usize,
        targets: &[Proj],
        r: usize,
        alpha: f64,
        seed: u64,
        dims: impl Fn(usize, Proj) -> (usize, usize),
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut modules = Vec::new();
        for layer in 0..layers {
            for &proj in targets {
                let (out, inp) = dims(layer, proj);
                let bound = 1.0 / (inp as f32).sqrt();
                let a = (0..r * inp).map(|_| rng.random_range(-bound..bound)).collect();
                modules.push(LoraModuleWeights {
                    layer,
                    proj,
                    a,
                    b: vec![0.0; out * r],
                    in_features: inp,
                    out_features: out,
                });
            }
        }
        // the order adapters are read back in (checkpoints index optimizer state by it)
        modules.sort_by_key(|m| (m.layer, m.proj as usize));
        LoraWeights { r, alpha, modules }
    }

    /// The weights of a loaded PEFT adapter (to continue training from it).
    pub fn from_adapter(a: &LoraAdapter) -> Result<Self> {
        let modules = a
            .modules
            .iter()
            .map(|m| {
                let (r, inp) = (m.a.shape()[0], m.a.shape()[1]);
                if r != a.r {
                    return Err(Error::tensor(
                        &a.file,
                        &m.a_name,
                        format!("rank {r} but adapter_config.json says {}", a.r),
                    ));
                }
                Ok(LoraModuleWeights {
                    layer: m.layer,
                    proj: m.proj,
                    a: m.a.to_f32(),
                    b: m.b.to_f32(),
                    in_features: inp,
                    out_features: m.b.shape()[0],
                })
            })
            .collect::<Result<_>>()?;
        Ok(LoraWeights {
            r: a.r,
            alpha: a.alpha,
            modules,
        })
    }

    /// PEFT tensor name of a module's A or B (transformers-5 module paths, as PEFT 0.21 writes them).
    pub fn tensor_name(layer: usize, proj: Proj, which: char) -> String {
        format!(
            "base_model.model.model.language_model.layers.{layer}.{}.lora_{which}.weight",
            proj.path()
        )
    }

    /// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (f32), each atomically.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut targets: Vec<&str> = Vec::new();
        for m in &self.modules {
            let name = m.proj.path().rsplit('.').next().expect("module path");
            if !targets.contains(&name) {
                targets.push(name);
            }
        }
        let cfg = json!({
            "peft_type": "LORA", "task_type": null, "base_model_name_or_path": base_model,
            "r": self.r, "lora_alpha": self.alpha, "lora_dropout": 0.0, "target_modules": targets,
            "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
            "use_rslora": false, "use_dora": false, "modules_to_save": null, "rank_pattern": {},
            "alpha_pattern": {}, "layers_to_transform": null, "layers_pattern": null, "revision": null
        });
        write_atomic(
            &dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&cfg).expect("json").as_bytes(),
        )?;
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .modules
            .iter()
            .flat_map(|m| {
                [
                    (
                        Self::tensor_name(m.layer, m.proj, 'A'),
                        vec![self.r, m.in_features],
                        bytemuck::cast_slice(&m.a).to_vec(),
                    ),
                    (
                        Self::tensor_name(m.layer, m.proj, 'B'),
                        vec![m.out_features, self.r],
                        bytemuck::cast_slice(&m.b).to_vec(),
                    ),
                ]
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(n, s, b)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::tensor(dir, n, e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let data = safetensors::serialize(views, Some(meta)).map_err(|e| Error::file(dir, e.to_string()))?;
        write_atomic(&dir.join("adapter_model.safetensors"), &data)
    }
}
