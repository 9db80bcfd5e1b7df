//! The supervised fine-tuning stage (`miadpo train --stage sft`): full-parameter training of the
//! projector (both linears and their biases) and the whole LLaMA decoder (every linear, the norms, the
//! final norm, the LM head, the embedding table) with cross-entropy on the answer tokens; the vision
//! tower stays frozen, so its features are computed once per sample. The step loop, optimizer,
//! clipping, schedule, checkpoints and metrics are the DPO trainer's ([`super::trainer::run_steps`]).
//!
//! Data: LLaVA conversation records (`[{"id", "image", "conversations": [{"from": "human", ...},
//! {"from": "gpt", ...}]}]`, a JSON list or JSONL); the first question and its answer are one sample,
//! laid out as `score` and DPO lay out a pair: `[BOS] + template(question)` then `tokens(answer) +
//! [EOS]`, the loss on the answer tokens and EOS only. As LLaVA's preprocessing does, a one-image
//! question has its `<image>` moved to the front (`<image>\n` + the rest).
//!
//! The trained weights are f32 masters; after each optimizer step they are written back into the
//! model through the backend (`Backend::matrix` / `Backend::vector` of an in-memory f32 tensor), and a
//! finished run is saved as a llava-hf checkpoint folder: the input model's tensor names, the trained
//! tensors in f32, the frozen vision tower in its stored dtype, config.json with `torch_dtype`
//! float32, tokenizer and preprocessor files copied.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;

use super::backward::{backward_full, forward, FullGrads, LoraGrads, PassOptions};
use super::dpo::RunningMean;
use super::trainer::{MicroAt, Stage, StepGrads, TrainState};
use crate::augment::llava_json::sample_head;
use crate::backend::Backend;
use crate::data::{read_json_list, resolve_image};
use crate::model::llava::Llava;
use crate::model::lora::Proj;
use crate::model::weights::{DType, Tensor, WeightStore};
use crate::model::Prefixes;
use crate::text::Template;
use crate::vision::preprocess::AspectMode;
use crate::{Error, Result};

/// One question and its answer, ready for training.
#[derive(Clone, Debug)]
pub struct SftSample {
    pub id: String,
    /// `[BOS] + template(question)`, each `<image>` expanded
    pub prompt: Vec<u32>,
    /// `tokens(answer) + [EOS]`: the tokens the loss is taken on
    pub answer: Vec<u32>,
    /// the frozen vision tower's features of the sample's images (rows, vision hidden)
    pub vision: Vec<f32>,
    /// image-feature rows: images · image_seq_length (0 for a text-only sample)
    pub rows: usize,
}

/// Samples ready for training, those that could not be used (id, reason), and how many records had
/// turns after the first answer (not trained).
#[derive(Clone, Debug, Default)]
pub struct SftData {
    pub samples: Vec<SftSample>,
    pub skipped: Vec<(String, String)>,
    pub later_turns: usize,
}

/// One record of the input as read: id, image paths, the first question and answer, and whether
/// more turns follow. `Err` holds the reason a record cannot be used.
struct Record {
    id: String,
    images: Vec<String>,
    turns: std::result::Result<(String, String), String>,
    later_turns: bool,
}

/// Reads LLaVA conversation records (JSON list, or JSONL): anything that is not conversation data is
/// an error naming the file and the sample.
fn read_records(path: &Path) -> Result<Vec<Record>> {
    let what = "LLaVA conversations (`[{\"id\", \"image\", \"conversations\"}, ...]`)";
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let list: Vec<Value> = if text.trim_start().starts_with('[') {
        read_json_list(path, what)?
    } else {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            out.push(
                serde_json::from_str(line)
                    .map_err(|e| Error::file(path, format!("line {}: not valid JSON: {e}", i + 1)))?,
            );
        }
        out
    };
    if list.is_empty() {
        return Err(Error::file(path, format!("holds no samples: expected {what}")));
    }
    let mut records = Vec::with_capacity(list.len());
    for (index, r) in list.iter().enumerate() {
        let bad = |id: &str, msg: String| Error::file(path, format!("sample `{id}`: {msg}"));
        let (obj, id, conversations) = sample_head(path, index, r)?;
        let images = match obj.get("image") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
                a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()
            }
            Some(other) => {
                return Err(bad(
                    &id,
                    format!("`image` must be a path or a list of paths, found {other}"),
                ))
            }
        };
        let turns = match conversations.as_slice() {
            [q, a, ..] if q.from == "human" && a.from == "gpt" => {
                if a.value.trim().is_empty() {
                    Err("empty answer".to_string())
                } else {
                    Ok((q.value.clone(), a.value.clone()))
                }
            }
            _ => Err("no human question followed by a gpt answer".to_string()),
        };
        records.push(Record {
            id,
            images,
            turns,
            later_turns: conversations.len() > 2,
        });
    }
    Ok(records)
}

/// Reads, checks and prepares every record of `data`: the first question and answer tokenized with
/// `template`, the images resolved against `roots` and run through the (frozen) vision tower. A
/// record that cannot be used (no question/answer, empty answer, missing or unreadable image,
/// placeholder count that does not match its images, prompt + answer longer than `max_length`) is
/// skipped with its reason.
pub fn prepare_samples<B: Backend>(
    m: &Llava<B>,
    data: &Path,
    roots: &[PathBuf],
    template: Template,
    aspect: AspectMode,
    max_length: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SftData> {
    let records = read_records(data)?;
    let mut out = SftData::default();
    for (i, r) in records.iter().enumerate() {
        progress(i, records.len());
        let (question, answer) = match &r.turns {
            Ok(t) => t,
            Err(why) => {
                out.skipped.push((r.id.clone(), why.clone()));
                continue;
            }
        };
        let prepared = (|| -> Result<SftSample> {
            let paths = r
                .images
                .iter()
                .map(|im| resolve_image(im, roots, &r.id))
                .collect::<Result<Vec<_>>>()?;
            // LLaVA's own preprocessing puts a single image first: `<image>\n` + the question
            let placeholder = crate::text::tokenizer::IMAGE_PLACEHOLDER;
            let question = if paths.len() == 1 && question.matches(placeholder).count() == 1 {
                format!("{placeholder}\n{}", question.replace(placeholder, "").trim())
            } else {
                question.clone()
            };
            let prompt = m.prompt(template, &question, paths.len(), &r.id)?.ids;
            let answer = m.tokenizer.response(answer.trim())?;
            if prompt.len() + answer.len() > max_length {
                return Err(Error::sample(
                    &r.id,
                    format!(
                        "{} prompt + {} answer tokens exceed --max-length {max_length} (image tokens are never cut)",
                        prompt.len(),
                        answer.len()
                    ),
                ));
            }
            let pixels = paths
                .iter()
                .map(|p| m.pixels(p, aspect))
                .collect::<Result<Vec<_>>>()
                .map_err(|e| Error::sample(&r.id, e.to_string()))?;
            let (vision, rows) = if pixels.is_empty() {
                (Vec::new(), 0)
            } else {
                let v = m.vision_features(&pixels);
                (m.be.download(&v), pixels.len() * m.vision.tokens_per_image())
            };
            Ok(SftSample {
                id: r.id.clone(),
                prompt,
                answer,
                vision,
                rows,
            })
        })();
        match prepared {
            Ok(s) => {
                out.later_turns += r.later_turns as usize;
                out.samples.push(s);
            }
            Err(e) => {
                let msg = match e {
                    Error::Sample { msg, .. } => msg,
                    other => other.to_string(),
                };
                out.skipped.push((r.id.clone(), msg));
            }
        }
    }
    progress(records.len(), records.len());
    Ok(out)
}

/// Where a trained tensor lives in the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// the projector: 1 or 2, weight (false) or bias (true)
    Projector(u8, bool),
    Embed,
    LmHead,
    FinalNorm,
    /// (layer, 0 = input_layernorm / 1 = post_attention_layernorm)
    Norm(usize, u8),
    Linear(usize, Proj),
    Bias(usize, Proj),
}

/// A trained tensor: its name in the checkpoint, shape, place in the model and f32 master.
struct Param {
    name: String,
    shape: Vec<usize>,
    target: Target,
    master: Vec<f32>,
}

/// The SFT stage's metrics of a step (besides the loss, the mean cross-entropy per answer token).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct SftMetrics {
    /// share of the answer tokens that are the model's greedy choice (TRL's name)
    pub mean_token_accuracy: f64,
    /// answer tokens (EOS included) the loss was taken on
    pub answer_tokens: usize,
}

/// Full-parameter SFT of the projector and decoder: the [`Stage`] that `run_steps` drives.
pub struct SftStage<B: Backend> {
    params: Vec<Param>,
    /// the LM head is the embedding table (`tie_word_embeddings`): one tensor, both gradients
    tied: bool,
    pass: PassOptions,
    lora: LoraGrads<B>,
    full: FullGrads<B>,
    /// dW1, db1, dW2, db2 of the projector, summed over the step's samples
    proj: Option<[B::Buf; 4]>,
    loss: f64,
    hits: usize,
    tokens: usize,
}

const ORIGIN: &str = "<SFT weights>";

impl<B: Backend> SftStage<B> {
    /// The trained tensors of `m`, their masters read from the checkpoint folder `weights` (the base
    /// model, or a checkpoint's `model/` when resuming). Only gradient checkpointing is taken from
    /// `pass` (no LoRA, one answer per sequence).
    pub fn new(m: &Llava<B>, weights: &Path, pass: PassOptions) -> Result<Self> {
        let store = WeightStore::open_dir(weights)?;
        let p = Prefixes::detect(&store)?;
        let (c, t) = (&m.cfg, &m.cfg.text);
        let mut spec: Vec<(String, Target)> = Vec::new();
        for (i, lin) in [(1u8, "linear_1"), (2, "linear_2")] {
            spec.push((
                format!("{}{lin}.weight", p.projector),
                Target::Projector(i, false),
            ));
            if c.projector_bias {
                spec.push((format!("{}{lin}.bias", p.projector), Target::Projector(i, true)));
            }
        }
        let d = &p.decoder;
        spec.push((format!("{d}embed_tokens.weight"), Target::Embed));
        for l in 0..t.num_layers {
            spec.push((
                format!("{d}layers.{l}.input_layernorm.weight"),
                Target::Norm(l, 0),
            ));
            spec.push((
                format!("{d}layers.{l}.post_attention_layernorm.weight"),
                Target::Norm(l, 1),
            ));
            for proj in Proj::ALL {
                spec.push((
                    format!("{d}layers.{l}.{}.weight", proj.path()),
                    Target::Linear(l, proj),
                ));
                let bias = match proj {
                    Proj::Gate | Proj::Up | Proj::Down => t.mlp_bias,
                    _ => t.attention_bias,
                };
                if bias {
                    spec.push((
                        format!("{d}layers.{l}.{}.bias", proj.path()),
                        Target::Bias(l, proj),
                    ));
                }
            }
        }
        spec.push((format!("{d}norm.weight"), Target::FinalNorm));
        let tied = p.lm_head.is_empty();
        if !tied {
            spec.push((p.lm_head.clone(), Target::LmHead));
        }
        let params = spec
            .into_iter()
            .map(|(name, target)| {
                let t = store.get(&name)?;
                Ok(Param {
                    shape: t.shape().to_vec(),
                    master: t.to_f32(),
                    name,
                    target,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SftStage {
            params,
            tied,
            pass: PassOptions {
                lora_dropout: 0.0,
                prefix_sharing: false,
                ..pass
            },
            lora: LoraGrads::default(),
            full: FullGrads::default(),
            proj: None,
            loss: 0.0,
            hits: 0,
            tokens: 0,
        })
    }

    /// The checkpoint names of the trained tensors, in slot order.
    pub fn names(&self) -> Vec<String> {
        self.params.iter().map(|p| p.name.clone()).collect()
    }

    /// Trained parameters (elements).
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.master.len()).sum()
    }

    /// The f32 master of the tensor named `name`.
    pub fn master(&self, name: &str) -> Option<&[f32]> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.master.as_slice())
    }

    /// Mutable access to the f32 master of `name` (call [`Stage::apply`] to put it on the model).
    pub fn master_mut(&mut self, name: &str) -> Option<&mut Vec<f32>> {
        self.params
            .iter_mut()
            .find(|p| p.name == name)
            .map(|p| &mut p.master)
    }

    /// Writes a llava-hf checkpoint folder into `dir` (created; it should be new or empty): every
    /// tensor of `base` under its own name, the trained ones from the masters in f32 and the others
    /// (the frozen vision tower) as stored; config.json with `torch_dtype` float32; every other
    /// file of `base` but weights (tokenizer, preprocessor and generation configs) copied.
    pub fn write_model(&self, base: &Path, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let store = WeightStore::open_dir(base)?;
        let trained: HashMap<&str, &Param> = self.params.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut names: Vec<&str> = store.names().collect();
        names.sort_unstable();
        let views = names
            .iter()
            .map(|&name| {
                let view = match trained.get(name) {
                    Some(p) => safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        p.shape.clone(),
                        bytemuck::cast_slice(&p.master),
                    ),
                    None => {
                        let t = store.get(name)?;
                        let dtype = match t.dtype() {
                            DType::F16 => safetensors::Dtype::F16,
                            DType::BF16 => safetensors::Dtype::BF16,
                            DType::F32 => safetensors::Dtype::F32,
                        };
                        safetensors::tensor::TensorView::new(dtype, t.shape().to_vec(), t.bytes())
                    }
                };
                view.map(|v| (name.to_string(), v))
                    .map_err(|e| Error::tensor(dir, name, e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let path = dir.join("model.safetensors");
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(meta), &path)
            .map_err(|e| Error::file(&path, format!("cannot write: {e}")))?;
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&path, e))?;
        // config.json: the trained tensors are f32 now
        let cfg_path = base.join("config.json");
        let mut cfg: Value =
            serde_json::from_slice(&std::fs::read(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?)
                .map_err(|e| Error::file(&cfg_path, format!("not valid JSON: {e}")))?;
        for sub in [None, Some("text_config"), Some("vision_config")] {
            let obj = match sub {
                None => cfg.as_object_mut(),
                Some(k) => cfg.get_mut(k).and_then(Value::as_object_mut),
            };
            if let Some(obj) = obj {
                for key in ["torch_dtype", "dtype"] {
                    if obj.contains_key(key) {
                        obj.insert(key.into(), Value::String("float32".into()));
                    }
                }
            }
        }
        crate::augment::run::write_atomic(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&cfg).expect("json").as_bytes(),
        )?;
        for entry in std::fs::read_dir(base).map_err(|e| Error::io(base, e))? {
            let entry = entry.map_err(|e| Error::io(base, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let weights = [
                ".safetensors",
                ".safetensors.index.json",
                ".bin",
                ".pt",
                ".pth",
                ".ckpt",
                ".h5",
                ".msgpack",
                ".gguf",
            ];
            if name == "config.json"
                || name.starts_with('.')
                || name.starts_with("adapter_")
                || weights.iter().any(|w| name.ends_with(w))
                || !entry.path().is_file()
            {
                continue;
            }
            let dst = dir.join(&name);
            std::fs::copy(entry.path(), &dst).map_err(|e| Error::io(&dst, e))?;
        }
        Ok(())
    }

    /// [`Self::write_model`] into a hidden temporary folder beside `dst`, then renamed to `dst`
    /// (replacing it), so a kill mid-write never leaves a half-written model under `dst`.
    pub fn save_model(&self, base: &Path, dst: &Path) -> Result<()> {
        let name = dst
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let tmp = dst.with_file_name(format!(".{name}.partial"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        self.write_model(base, &tmp)?;
        if dst.exists() {
            std::fs::remove_dir_all(dst).map_err(|e| Error::io(dst, e))?;
        }
        std::fs::rename(&tmp, dst).map_err(|e| Error::io(dst, e))
    }

    /// The step's gradient of one trained tensor, on the host.
    fn gradient(&self, m: &Llava<B>, i: usize) -> Result<Vec<f32>> {
        let be = &m.be;
        let p = &self.params[i];
        let missing = || Error::Invalid(format!("SFT: no gradient for `{}`", p.name));
        fn find<K: PartialEq, T>(list: &[(K, T)], key: K) -> Option<&T> {
            list.iter().find(|(k, _)| *k == key).map(|(_, g)| g)
        }
        let opt = |g: Option<&B::Buf>| g.map(|g| be.download(g)).ok_or_else(missing);
        Ok(match p.target {
            Target::Projector(which, bias) => match &self.proj {
                // no image in this step: the projector had no part in the loss
                None => vec![0.0; p.master.len()],
                Some(g) => be.download(&g[(which as usize - 1) * 2 + bias as usize]),
            },
            Target::Embed => {
                let mut g = opt(self.full.embed.as_ref())?;
                if self.tied {
                    let head = opt(self.full.lm_head.as_ref())?;
                    g.iter_mut().zip(head).for_each(|(a, b)| *a += b);
                }
                g
            }
            Target::LmHead => opt(self.full.lm_head.as_ref())?,
            Target::FinalNorm => opt(self.full.final_norm.as_ref())?,
            Target::Norm(l, w) => opt(find(&self.full.norms, (l, w)))?,
            Target::Linear(l, proj) => opt(find(&self.full.linears, (l, proj)))?,
            Target::Bias(l, proj) => opt(find(&self.full.biases, (l, proj)))?,
        })
    }
}

impl<B: Backend> Stage<B> for SftStage<B> {
    type Item = SftSample;
    type Metrics = SftMetrics;

    fn attach(&mut self, m: &mut Llava<B>, _state: &TrainState) -> Result<()> {
        if m.decoder.has_lora() {
            return Err(Error::Invalid(
                "SFT trains the base weights: no LoRA adapter may be attached (merge it into the model first)"
                    .into(),
            ));
        }
        // the model runs on the masters from the first step on, resumed or not
        self.apply(m)
    }

    fn slots(&self) -> usize {
        self.params.len()
    }

    fn begin_step(&mut self) {
        self.lora = LoraGrads::default();
        self.full = FullGrads::default();
        self.proj = None;
        (self.loss, self.hits, self.tokens) = (0.0, 0, 0);
    }

    fn micro_batch(
        &mut self,
        m: &Llava<B>,
        batch: &[&SftSample],
        at: MicroAt,
        _running: &mut RunningMean,
        stop: &AtomicBool,
    ) -> Result<Option<usize>> {
        let be = &m.be;
        // the micro-batch's loss: mean over its answer tokens of -log p; the step's: the mean over
        // its micro-batches
        let n: usize = batch.iter().map(|s| s.answer.len()).sum();
        let k = at.grad_accum as f64;
        let scale = -1.0 / (n as f64 * k);
        let mut rows = 0;
        for s in batch {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let vision = be.upload(&s.vision); // (rows, vision hidden)
            let features = if s.rows > 0 {
                m.project(&vision, s.rows)
            } else {
                be.upload(&[])
            };
            let f = forward(m, &s.prompt, &[&s.answer], &features, self.pass, 0)?;
            backward_full(m, &f, &[scale], self.pass, &mut self.lora, &mut self.full);
            // this sample's image-feature gradient continues into the projector
            if let Some(dfeat) = self.full.features.take() {
                let g = m.projector_backward(&vision, s.rows, &dfeat);
                match &mut self.proj {
                    None => self.proj = Some(g),
                    Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, g)| be.add(a, g)),
                }
            }
            self.loss += -f.logps[0] / n as f64 / k;
            self.hits += f.greedy_hits(m)[0];
            self.tokens += s.answer.len();
            rows += f.tokens();
        }
        Ok(Some(rows))
    }

    fn end_step(&mut self, m: &Llava<B>) -> Result<(f64, SftMetrics, StepGrads)> {
        let grads = (0..self.params.len())
            .map(|i| self.gradient(m, i))
            .collect::<Result<Vec<_>>>()?;
        let metrics = SftMetrics {
            mean_token_accuracy: self.hits as f64 / self.tokens.max(1) as f64,
            answer_tokens: self.tokens,
        };
        Ok((self.loss, metrics, StepGrads::Host(grads)))
    }

    fn params(&mut self) -> Vec<&mut [f32]> {
        self.params.iter_mut().map(|p| p.master.as_mut_slice()).collect()
    }

    fn apply(&mut self, m: &mut Llava<B>) -> Result<()> {
        let origin = Path::new(ORIGIN);
        // the host copies in parallel, then the backend's matrices one by one
        let tensors = self
            .params
            .par_iter()
            .map(|p| Tensor::from_f32(&p.name, p.shape.clone(), &p.master, origin))
            .collect::<Result<Vec<_>>>()?;
        for (p, t) in self.params.iter().zip(tensors) {
            let be = &m.be;
            match p.target {
                Target::Projector(which, bias) => {
                    let proj = if which == 1 { &mut m.proj1 } else { &mut m.proj2 };
                    if bias {
                        proj.1 = Some(be.vector(&t)?);
                    } else {
                        proj.0 = be.matrix(&t)?;
                    }
                }
                Target::Embed => {
                    m.decoder.embed = be.matrix(&t)?;
                    if self.tied {
                        m.decoder.lm_head = be.matrix(&t)?;
                    }
                }
                Target::LmHead => m.decoder.lm_head = be.matrix(&t)?,
                Target::FinalNorm => m.decoder.norm = be.vector(&t)?,
                Target::Norm(l, 0) => m.decoder.layers[l].input_norm = be.vector(&t)?,
                Target::Norm(l, _) => m.decoder.layers[l].post_norm = be.vector(&t)?,
                Target::Linear(l, proj) => m.decoder.layers[l].proj_mut(proj).w = be.matrix(&t)?,
                Target::Bias(l, proj) => m.decoder.layers[l].proj_mut(proj).bias = Some(be.vector(&t)?),
            }
        }
        Ok(())
    }
}
