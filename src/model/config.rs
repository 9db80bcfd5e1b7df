//! `config.json` of an HF llava-hf checkpoint, parsed once into typed structs and enums.
//!
//! Keys that a real checkpoint leaves out take the defaults of the HF config classes
//! (`LlamaConfig`, `CLIPVisionConfig`, `LlavaConfig`): llava-hf/llava-1.5-7b-hf's `text_config` lists only
//! a handful of keys and relies on them. Both transformers 4 (`rope_theta`, `image_token_index`) and 5
//! (`rope_parameters`, `image_token_id`) spellings are read.
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// Activation functions that appear in LLaVA-1.5 checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// x * sigmoid(1.702 x) (OpenAI CLIP)
    QuickGelu,
    /// exact GELU, 0.5 x (1 + erf(x / sqrt 2))
    Gelu,
    /// tanh approximation of GELU
    GeluTanh,
    /// x * sigmoid(x)
    Silu,
}

impl Activation {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }
}

/// Which vision-tower tokens feed the projector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureSelect {
    /// drop the CLS token (LLaVA-1.5)
    Default,
    /// keep every token, CLS included
    Full,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub act: Activation,
    pub layer_norm_eps: f32,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// Patches per side of the square input.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub act: Activation,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlavaConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub image_token_id: u32,
    pub projector_act: Activation,
    pub projector_bias: bool,
    /// Index into the vision tower's hidden states (0 = pre-layernormed embeddings), made non-negative.
    pub vision_feature_layer: usize,
    pub feature_select: FeatureSelect,
    /// Tokens one `<image>` expands to.
    pub image_seq_length: usize,
}

// ---- raw serde mirrors (every field optional; defaults applied in `resolve`)

#[derive(Deserialize, Default)]
struct RawRope {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawText {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<usize>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
    pretraining_tp: Option<usize>,
}

#[derive(Deserialize, Default)]
struct RawVision {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_channels: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f32>,
}

#[derive(Deserialize)]
struct RawLlava {
    model_type: Option<String>,
    text_config: Option<RawText>,
    vision_config: Option<RawVision>,
    image_token_index: Option<u32>,
    image_token_id: Option<u32>,
    projector_hidden_act: Option<String>,
    multimodal_projector_bias: Option<bool>,
    vision_feature_layer: Option<Value>,
    vision_feature_select_strategy: Option<String>,
    image_seq_length: Option<usize>,
    tie_word_embeddings: Option<bool>,
}

impl LlavaConfig {
    /// Reads and validates `config.json`; every error names the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|msg| Error::file(path, msg))
    }

    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let raw: RawLlava =
            serde_json::from_str(text).map_err(|e| format!("not a LLaVA config.json: {e}"))?;
        if let Some(mt) = &raw.model_type {
            if mt != "llava" {
                return Err(format!(
                    "model_type is `{mt}`; only `llava` (LlavaForConditionalGeneration) is supported"
                ));
            }
        }
        let t = raw.text_config.unwrap_or_default();
        if let Some(mt) = &t.model_type {
            if mt != "llama" {
                return Err(format!(
                    "text_config.model_type is `{mt}`; only `llama` decoders are supported"
                ));
            }
        }
        if let Some(rs) = &t.rope_scaling {
            if !rs.is_null() {
                return Err(format!("text_config.rope_scaling {rs} is not supported"));
            }
        }
        if let Some(rt) = t.rope_parameters.as_ref().and_then(|r| r.rope_type.as_deref()) {
            if rt != "default" {
                return Err(format!("rope_type `{rt}` is not supported (only `default`)"));
            }
        }
        if t.pretraining_tp.unwrap_or(1) != 1 {
            return Err("pretraining_tp != 1 is not supported".into());
        }
        let act = |name: Option<&str>, default: Activation, key: &str| match name {
            None => Ok(default),
            Some(s) => Activation::parse(s).ok_or(format!("{key} `{s}` is not supported")),
        };
        let hidden = t.hidden_size.unwrap_or(4096);
        let heads = t.num_attention_heads.unwrap_or(32);
        let eos = match &t.eos_token_id {
            None => 2,
            Some(Value::Number(n)) => n.as_u64().ok_or("bad eos_token_id")? as u32,
            Some(Value::Array(a)) => a.first().and_then(|v| v.as_u64()).ok_or("bad eos_token_id")? as u32,
            Some(v) => return Err(format!("bad eos_token_id {v}")),
        };
        let text_cfg = TextConfig {
            hidden_size: hidden,
            intermediate_size: t.intermediate_size.unwrap_or(11008),
            num_layers: t.num_hidden_layers.unwrap_or(32),
            num_heads: heads,
            num_kv_heads: t.num_key_value_heads.unwrap_or(heads),
            head_dim: t.head_dim.unwrap_or(hidden / heads.max(1)),
            vocab_size: t.vocab_size.unwrap_or(32000),
            rms_norm_eps: t.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: t
                .rope_parameters
                .as_ref()
                .and_then(|r| r.rope_theta)
                .or(t.rope_theta)
                .unwrap_or(10000.0),
            max_position_embeddings: t.max_position_embeddings.unwrap_or(2048),
            act: act(
                t.hidden_act.as_deref(),
                Activation::Silu,
                "text_config.hidden_act",
            )?,
            attention_bias: t.attention_bias.unwrap_or(false),
            mlp_bias: t.mlp_bias.unwrap_or(false),
            tie_word_embeddings: t.tie_word_embeddings.or(raw.tie_word_embeddings).unwrap_or(false),
            bos_token_id: t.bos_token_id.unwrap_or(1),
            eos_token_id: eos,
        };
        let v = raw.vision_config.unwrap_or_default();
        if let Some(mt) = &v.model_type {
            if mt != "clip_vision_model" {
                return Err(format!(
                    "vision_config.model_type is `{mt}`; only `clip_vision_model` is supported"
                ));
            }
        }
        let vision = VisionConfig {
            hidden_size: v.hidden_size.unwrap_or(768),
            intermediate_size: v.intermediate_size.unwrap_or(3072),
            num_layers: v.num_hidden_layers.unwrap_or(12),
            num_heads: v.num_attention_heads.unwrap_or(12),
            num_channels: v.num_channels.unwrap_or(3),
            image_size: v.image_size.unwrap_or(224),
            patch_size: v.patch_size.unwrap_or(32),
            act: act(
                v.hidden_act.as_deref(),
                Activation::QuickGelu,
                "vision_config.hidden_act",
            )?,
            layer_norm_eps: v.layer_norm_eps.unwrap_or(1e-5),
        };
        let feature_layer = match &raw.vision_feature_layer {
            None => -2i64,
            Some(Value::Number(n)) => n.as_i64().ok_or("bad vision_feature_layer")?,
            Some(v) => {
                return Err(format!(
                    "vision_feature_layer {v} is not supported (only a single layer index)"
                ))
            }
        };
        let n_states = vision.num_layers as i64 + 1;
        let idx = if feature_layer < 0 {
            n_states + feature_layer
        } else {
            feature_layer
        };
        if !(0..n_states).contains(&idx) {
            return Err(format!(
                "vision_feature_layer {feature_layer} is out of range for {} vision layers",
                vision.num_layers
            ));
        }
        let feature_select = match raw.vision_feature_select_strategy.as_deref() {
            None | Some("default") => FeatureSelect::Default,
            Some("full") => FeatureSelect::Full,
            Some(s) => return Err(format!("vision_feature_select_strategy `{s}` is not supported")),
        };
        let tokens_per_image = vision.num_patches()
            + match feature_select {
                FeatureSelect::Default => 0,
                FeatureSelect::Full => 1,
            };
        let image_seq_length = raw.image_seq_length.unwrap_or(tokens_per_image);
        if image_seq_length != tokens_per_image {
            return Err(format!(
                "image_seq_length {image_seq_length} does not match the vision tower's {tokens_per_image} tokens per image"
            ));
        }
        let cfg = LlavaConfig {
            vision,
            text: text_cfg,
            image_token_id: raw.image_token_id.or(raw.image_token_index).unwrap_or(32000),
            projector_act: act(
                raw.projector_hidden_act.as_deref(),
                Activation::Gelu,
                "projector_hidden_act",
            )?,
            projector_bias: raw.multimodal_projector_bias.unwrap_or(true),
            vision_feature_layer: idx as usize,
            feature_select,
            image_seq_length,
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let (t, v) = (&self.text, &self.vision);
        let nonzero = [
            ("text hidden_size", t.hidden_size),
            ("text num_attention_heads", t.num_heads),
            ("text num_key_value_heads", t.num_kv_heads),
            ("text num_hidden_layers", t.num_layers),
            ("text head_dim", t.head_dim),
            ("vision hidden_size", v.hidden_size),
            ("vision num_attention_heads", v.num_heads),
            ("vision patch_size", v.patch_size),
        ];
        for (k, n) in nonzero {
            if n == 0 {
                return Err(format!("{k} must be > 0"));
            }
        }
        if t.num_heads % t.num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_heads, t.num_kv_heads
            ));
        }
        if t.head_dim % 2 != 0 {
            return Err(format!("head_dim {} must be even for RoPE", t.head_dim));
        }
        if v.hidden_size % v.num_heads != 0 {
            return Err("vision hidden_size is not a multiple of its heads".into());
        }
        if v.image_size % v.patch_size != 0 {
            return Err("vision image_size is not a multiple of patch_size".into());
        }
        if self.image_token_id as usize >= t.vocab_size {
            return Err(format!(
                "image token id {} is outside the vocabulary ({})",
                self.image_token_id, t.vocab_size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llava_15_7b_style_config_uses_hf_defaults() {
        // text_config as llava-hf/llava-1.5-7b-hf ships it: almost everything defaulted.
        let cfg = LlavaConfig::from_json_str(
            r#"{"model_type":"llava","image_token_index":32000,
                "text_config":{"model_type":"llama","vocab_size":32064,"rms_norm_eps":1e-05,"max_position_embeddings":4096},
                "vision_config":{"hidden_size":1024,"image_size":336,"intermediate_size":4096,"model_type":"clip_vision_model",
                                 "num_attention_heads":16,"num_hidden_layers":24,"patch_size":14,"projection_dim":768}}"#,
        )
        .unwrap();
        assert_eq!(cfg.text.hidden_size, 4096);
        assert_eq!(cfg.text.num_kv_heads, 32);
        assert_eq!(cfg.text.head_dim, 128);
        assert_eq!(cfg.image_seq_length, 576);
        assert_eq!(cfg.vision_feature_layer, 23);
        assert_eq!(cfg.vision.act, Activation::QuickGelu);
        assert_eq!(cfg.projector_act, Activation::Gelu);
    }

    #[test]
    fn unsupported_values_are_named() {
        let e = LlavaConfig::from_json_str(r#"{"model_type":"llava","text_config":{"hidden_act":"relu6"}}"#)
            .unwrap_err();
        assert!(e.contains("relu6"), "{e}");
        let e = LlavaConfig::from_json_str(r#"{"model_type":"qwen2_vl"}"#).unwrap_err();
        assert!(e.contains("qwen2_vl"), "{e}");
    }
}
