//! Random llava-hf checkpoints of a chosen size, written in the HF layout (config.json,
//! model.safetensors in f16, preprocessor_config.json, tokenizer.json), for benchmarks: HF transformers
//! loads the same folder, so both runtimes are timed on identical weights.
use std::collections::HashMap;
use std::path::Path;

use half::f16;
use serde_json::json;

use crate::{Error, Result};

/// Sizes of a random LLaVA (CLIP vision tower + LLaMA decoder).
#[derive(Clone, Debug)]
pub struct RandomSpec {
    pub v_layers: usize,
    pub v_hidden: usize,
    pub v_heads: usize,
    pub v_inter: usize,
    pub image_size: usize,
    pub patch: usize,
    pub t_layers: usize,
    pub t_hidden: usize,
    pub t_heads: usize,
    pub t_kv_heads: usize,
    pub t_inter: usize,
    pub vocab: usize,
}

impl RandomSpec {
    /// The benchmark's "small" LLaVA: CLIP-B/14 at 224 px (256 image tokens), a 12-layer decoder of
    /// width 1024 with LLaVA-1.5's vocabulary (32064).
    pub fn small() -> Self {
        RandomSpec {
            v_layers: 12,
            v_hidden: 768,
            v_heads: 12,
            v_inter: 3072,
            image_size: 224,
            patch: 14,
            t_layers: 12,
            t_hidden: 1024,
            t_heads: 16,
            t_kv_heads: 16,
            t_inter: 2816,
            vocab: 32064,
        }
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "small" => Ok(Self::small()),
            "tiny" => Ok(RandomSpec {
                v_layers: 3,
                v_hidden: 32,
                v_heads: 2,
                v_inter: 64,
                image_size: 56,
                patch: 14,
                t_layers: 2,
                t_hidden: 64,
                t_heads: 4,
                t_kv_heads: 4,
                t_inter: 128,
                vocab: 32064,
            }),
            // the demo's model: small enough to fine-tune on two CPU cores in minutes, with the
            // real LLaMA vocabulary; 112 px pictures give 64 image tokens
            "demo" => Ok(RandomSpec {
                v_layers: 3,
                v_hidden: 128,
                v_heads: 4,
                v_inter: 512,
                image_size: 112,
                patch: 14,
                t_layers: 4,
                t_hidden: 256,
                t_heads: 8,
                t_kv_heads: 8,
                t_inter: 688,
                vocab: 32064,
            }),
            _ => Err(Error::Invalid(format!(
                "unknown preset `{name}` (expected small, demo or tiny)"
            ))),
        }
    }

    pub fn image_tokens(&self) -> usize {
        (self.image_size / self.patch).pow(2)
    }

    /// Every tensor as (name, shape), in transformers-4 llava-hf naming (the names of the released
    /// llava-hf checkpoints).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (vh, vi, th, ti) = (self.v_hidden, self.v_inter, self.t_hidden, self.t_inter);
        let hd = th / self.t_heads;
        let kvd = self.t_kv_heads * hd;
        let mut t = Vec::new();
        let v = "vision_tower.vision_model";
        t.push((format!("{v}.embeddings.class_embedding"), vec![vh]));
        t.push((
            format!("{v}.embeddings.patch_embedding.weight"),
            vec![vh, 3, self.patch, self.patch],
        ));
        t.push((
            format!("{v}.embeddings.position_embedding.weight"),
            vec![self.image_tokens() + 1, vh],
        ));
        for n in ["pre_layrnorm", "post_layernorm"] {
            t.push((format!("{v}.{n}.weight"), vec![vh]));
            t.push((format!("{v}.{n}.bias"), vec![vh]));
        }
        for l in 0..self.v_layers {
            let p = format!("{v}.encoder.layers.{l}");
            for (n, o, i) in [
                ("self_attn.q_proj", vh, vh),
                ("self_attn.k_proj", vh, vh),
                ("self_attn.v_proj", vh, vh),
                ("self_attn.out_proj", vh, vh),
                ("mlp.fc1", vi, vh),
                ("mlp.fc2", vh, vi),
            ] {
                t.push((format!("{p}.{n}.weight"), vec![o, i]));
                t.push((format!("{p}.{n}.bias"), vec![o]));
            }
            for n in ["layer_norm1", "layer_norm2"] {
                t.push((format!("{p}.{n}.weight"), vec![vh]));
                t.push((format!("{p}.{n}.bias"), vec![vh]));
            }
        }
        t.push(("multi_modal_projector.linear_1.weight".into(), vec![th, vh]));
        t.push(("multi_modal_projector.linear_1.bias".into(), vec![th]));
        t.push(("multi_modal_projector.linear_2.weight".into(), vec![th, th]));
        t.push(("multi_modal_projector.linear_2.bias".into(), vec![th]));
        let d = "language_model.model";
        t.push((format!("{d}.embed_tokens.weight"), vec![self.vocab, th]));
        t.push((format!("{d}.norm.weight"), vec![th]));
        t.push(("language_model.lm_head.weight".into(), vec![self.vocab, th]));
        for l in 0..self.t_layers {
            let p = format!("{d}.layers.{l}");
            for (n, o, i) in [
                ("self_attn.q_proj", th, th),
                ("self_attn.k_proj", kvd, th),
                ("self_attn.v_proj", kvd, th),
                ("self_attn.o_proj", th, th),
                ("mlp.gate_proj", ti, th),
                ("mlp.up_proj", ti, th),
                ("mlp.down_proj", th, ti),
            ] {
                t.push((format!("{p}.{n}.weight"), vec![o, i]));
            }
            t.push((format!("{p}.input_layernorm.weight"), vec![th]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![th]));
        }
        t
    }

    pub fn config_json(&self) -> serde_json::Value {
        json!({
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": 32000,
            "image_seq_length": self.image_tokens(),
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": true,
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "tie_word_embeddings": false,
            "torch_dtype": "float16",
            "text_config": {
                "model_type": "llama", "hidden_size": self.t_hidden, "intermediate_size": self.t_inter,
                "num_hidden_layers": self.t_layers, "num_attention_heads": self.t_heads,
                "num_key_value_heads": self.t_kv_heads, "vocab_size": self.vocab, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "max_position_embeddings": 4096, "hidden_act": "silu",
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001, "tie_word_embeddings": false
            },
            "vision_config": {
                "model_type": "clip_vision_model", "hidden_size": self.v_hidden,
                "intermediate_size": self.v_inter, "num_hidden_layers": self.v_layers,
                "num_attention_heads": self.v_heads, "image_size": self.image_size, "patch_size": self.patch,
                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": self.v_hidden
            }
        })
    }
}

/// splitmix64: a tiny deterministic generator, enough for benchmark weights.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// uniform in [0, 1)
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// standard normal (Box-Muller)
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(f64::MIN_POSITIVE);
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * self.uniform()).cos()
    }
}

/// Writes a random checkpoint of `spec` into `dir` (created if needed); `tokenizer` is copied in as
/// tokenizer.json (any llava-hf tokenizer with `<image>` = 32000).
pub fn write_random_checkpoint(dir: &Path, spec: &RandomSpec, seed: u64, tokenizer: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut rng = Rng::new(seed);
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape) in spec.tensors() {
        let n: usize = shape.iter().product();
        let fan_in = if shape.len() >= 2 {
            shape[1..].iter().product::<usize>()
        } else {
            1
        };
        let vals: Vec<f16> = (0..n)
            .map(|_| {
                let x = rng.normal();
                let v = if name.contains("norm") && name.ends_with("weight") {
                    1.0 + 0.1 * x
                } else if shape.len() >= 2 && !name.contains("embed") {
                    x / (fan_in as f64).sqrt()
                } else {
                    0.1 * x
                };
                f16::from_f64(v)
            })
            .collect();
        data.push((name, shape, bytemuck::cast_slice(&vals).to_vec()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Invalid(format!("tensor {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let path = dir.join("model.safetensors");
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &path)
        .map_err(|e| Error::file(&path, format!("cannot write: {e}")))?;
    let write = |name: &str, v: serde_json::Value| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(&v).expect("json")).map_err(|e| Error::io(&p, e))
    };
    write("config.json", spec.config_json())?;
    write(
        "preprocessor_config.json",
        json!({
            "image_processor_type": "CLIPImageProcessor", "do_resize": true,
            "size": {"shortest_edge": spec.image_size}, "do_center_crop": true,
            "crop_size": {"height": spec.image_size, "width": spec.image_size}, "resample": 3,
            "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_convert_rgb": true
        }),
    )?;
    write(
        "tokenizer_config.json",
        json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "tokenizer_class": "LlamaTokenizerFast", "add_bos_token": true, "add_eos_token": false}),
    )?;
    let dst = dir.join("tokenizer.json");
    std::fs::copy(tokenizer, &dst).map_err(|e| Error::io(tokenizer, e))?;
    Ok(())
}
