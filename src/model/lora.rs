//! PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`), applied unmerged to the
//! decoder's linear layers: y = x Wᵀ + (alpha / r) · (x Aᵀ) Bᵀ.
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use super::weights::{Tensor, WeightStore};
use crate::{Error, Result};

/// The decoder linears LoRA can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    /// (out, in) features of this linear in a decoder of config `t` (the LoRA B and A shapes follow).
    pub fn shape(self, t: &crate::model::config::TextConfig) -> (usize, usize) {
        match self {
            Proj::Gate | Proj::Up => (t.intermediate_size, t.hidden_size),
            Proj::Down => (t.hidden_size, t.intermediate_size),
            Proj::K | Proj::V => (t.num_kv_heads * t.head_dim, t.hidden_size),
            Proj::Q => (t.num_heads * t.head_dim, t.hidden_size),
            Proj::O => (t.hidden_size, t.num_heads * t.head_dim),
        }
    }

    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// PEFT module path below a decoder layer, e.g. `self_attn.q_proj`.
    pub fn path(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Proj::ALL.into_iter().find(|p| p.path() == s)
    }
}

/// One adapted linear: decoder layer, which projection, and its A (r, in) and B (out, r).
pub struct LoraModule {
    pub layer: usize,
    pub proj: Proj,
    pub a: Tensor,
    pub b: Tensor,
    pub a_name: String,
}

/// A module's tensors while the adapter file is read.
struct Partial {
    layer: usize,
    proj: Proj,
    module: String,
    a: Option<(String, Tensor)>,
    b: Option<Tensor>,
}

pub struct LoraAdapter {
    pub dir: PathBuf,
    pub file: PathBuf,
    pub r: usize,
    pub alpha: f64,
    /// alpha / r (or alpha / sqrt(r) with `use_rslora`)
    pub scale: f32,
    pub modules: Vec<LoraModule>,
}

/// How `target_modules` selects modules (PEFT `check_target_module_exists`).
enum Targets {
    /// a module matches when its name equals an entry or ends with `.entry`
    List(Vec<String>),
    /// the module name must match the whole pattern (Python's `re.fullmatch`): compiled as `^(?:pat)$`
    Regex(Regex),
}

impl Targets {
    fn matches(&self, module: &str) -> bool {
        match self {
            Targets::List(l) => l
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
            Targets::Regex(r) => r.is_match(module),
        }
    }
}

#[derive(Deserialize)]
struct RawConfig {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    target_modules: Option<Value>,
    use_rslora: Option<bool>,
    use_dora: Option<bool>,
    fan_in_fan_out: Option<bool>,
    bias: Option<String>,
    modules_to_save: Option<Value>,
    rank_pattern: Option<Value>,
    alpha_pattern: Option<Value>,
}

fn non_empty(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    }
}

impl LoraAdapter {
    /// Loads a PEFT LoRA adapter folder and checks it against the decoder's layer count.
    pub fn load(dir: &Path, num_layers: usize) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let raw: RawConfig = serde_json::from_str(&text)
            .map_err(|e| Error::file(&cfg_path, format!("not a PEFT adapter_config.json: {e}")))?;
        let bad = |msg: String| Error::file(&cfg_path, msg);
        match raw.peft_type.as_deref() {
            Some("LORA") => {}
            other => {
                return Err(bad(format!(
                    "peft_type is {other:?}; only LORA adapters are supported"
                )))
            }
        }
        let r = raw
            .r
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("`r` is missing or zero".into()))?;
        let alpha = raw.lora_alpha.unwrap_or(8.0);
        if raw.use_dora.unwrap_or(false) {
            return Err(bad("DoRA adapters (use_dora) are not supported".into()));
        }
        if raw.fan_in_fan_out.unwrap_or(false) {
            return Err(bad("fan_in_fan_out adapters are not supported".into()));
        }
        if raw.bias.as_deref().is_some_and(|b| b != "none") {
            return Err(bad(format!(
                "bias `{}` is not supported (only `none`)",
                raw.bias.unwrap_or_default()
            )));
        }
        for (key, v) in [
            ("modules_to_save", &raw.modules_to_save),
            ("rank_pattern", &raw.rank_pattern),
            ("alpha_pattern", &raw.alpha_pattern),
        ] {
            if non_empty(v) {
                return Err(bad(format!("`{key}` is not supported")));
            }
        }
        let targets = match &raw.target_modules {
            Some(Value::String(s)) => Targets::Regex(
                Regex::new(&format!("^(?:{s})$"))
                    .map_err(|e| bad(format!("target_modules is not a valid regex: {e}")))?,
            ),
            Some(Value::Array(a)) => Targets::List(
                a.iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad(format!("target_modules entry {v} is not a string")))
                    })
                    .collect::<Result<_>>()?,
            ),
            other => {
                return Err(bad(format!(
                    "target_modules must be a list or a regex string, found {other:?}"
                )))
            }
        };
        let scale = if raw.use_rslora.unwrap_or(false) {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        } as f32;

        let file = dir.join("adapter_model.safetensors");
        if !file.exists() {
            let hint = if dir.join("adapter_model.bin").exists() {
                " (found adapter_model.bin: pickle weights are refused; re-save with safe_serialization=True)"
            } else {
                ""
            };
            return Err(Error::file(&file, format!("adapter weights not found{hint}")));
        }
        let store = WeightStore::open_files(std::slice::from_ref(&file))?;
        // base_model.model.<module>.lora_{A,B}.weight, the module under transformers 4 or 5 naming
        let re = Regex::new(
            r"^base_model\.model\.((?:model\.language_model|language_model\.model)\.layers\.(\d+)\.((?:self_attn|mlp)\.[a-z_]+))\.lora_([AB])\.weight$",
        )
        .expect("static regex");
        let mut found: std::collections::BTreeMap<(usize, usize), Partial> = Default::default();
        for name in store.names() {
            let caps = re.captures(name).ok_or_else(|| {
                Error::tensor(&file, name, "not a LoRA weight of a decoder linear (only q/k/v/o/gate/up/down projections of the language model are supported)")
            })?;
            let module = caps[1].to_string();
            let layer: usize = caps[2]
                .parse()
                .map_err(|_| Error::tensor(&file, name, "bad layer index"))?;
            let proj =
                Proj::parse(&caps[3]).ok_or_else(|| Error::tensor(&file, name, "unsupported module"))?;
            if layer >= num_layers {
                return Err(Error::tensor(
                    &file,
                    name,
                    format!("layer {layer} but the model has {num_layers}"),
                ));
            }
            if !targets.matches(&module) {
                return Err(Error::tensor(
                    &file,
                    name,
                    format!(
                        "module `{module}` is not matched by target_modules in {}",
                        cfg_path.display()
                    ),
                ));
            }
            let t = store.get(name)?.clone();
            let entry = found.entry((layer, proj as usize)).or_insert_with(|| Partial {
                layer,
                proj,
                module: module.clone(),
                a: None,
                b: None,
            });
            if &caps[4] == "A" {
                entry.a = Some((name.to_string(), t));
            } else {
                entry.b = Some(t);
            }
        }
        if found.is_empty() {
            return Err(Error::file(&file, "the adapter holds no LoRA weights"));
        }
        let mut modules = Vec::new();
        for (_, p) in found {
            let missing = |which: &str, other: &str| {
                Error::tensor(
                    &file,
                    format!("base_model.model.{}.lora_{which}.weight", p.module),
                    format!("missing (its lora_{other} is present)"),
                )
            };
            let (a_name, a) = p.a.clone().ok_or_else(|| missing("A", "B"))?;
            let b = p.b.clone().ok_or_else(|| missing("B", "A"))?;
            modules.push(LoraModule {
                layer: p.layer,
                proj: p.proj,
                a,
                b,
                a_name,
            });
        }
        modules.sort_by_key(|m| (m.layer, m.proj as usize));
        Ok(LoraAdapter {
            dir: dir.to_path_buf(),
            file,
            r,
            alpha,
            scale,
            modules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_modules_follow_peft_matching() {
        let l = Targets::List(vec!["q_proj".into(), "v_proj".into()]);
        assert!(l.matches("model.language_model.layers.0.self_attn.q_proj"));
        assert!(!l.matches("model.language_model.layers.0.self_attn.k_proj"));
        let r = Targets::Regex(Regex::new(r"^(?:.*language_model.*\.(q_proj|v_proj))$").unwrap());
        assert!(r.matches("language_model.model.layers.3.self_attn.v_proj"));
        assert!(!r.matches("vision_tower.encoder.layers.0.self_attn.q_proj.x"));
    }
}
