//! Checkpoints that resume bit for bit: OUT/checkpoint-STEP/ holds the trained weights (DPO: the
//! adapter in PEFT format; SFT: the whole model in llava-hf format, `model/`), the optimizer state
//! (f32 safetensors) and the loop state (JSON). Written into a hidden temporary folder, synced, then
//! renamed, so a kill mid-write leaves the previous checkpoint as the newest complete one.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::adapter::LoraWeights;
use super::dpo::RunningMean;
use super::optim::ParamState;
use super::trainer::TrainState;
use crate::augment::run::write_atomic;
use crate::model::lora::LoraAdapter;
use crate::model::weights::WeightStore;
use crate::{Error, Result};

#[derive(Serialize, Deserialize)]
struct StateFile {
    step: usize,
    epoch: usize,
    cursor: usize,
    running_mean: f64,
    running_count: f64,
    /// DPO: AdamW step counters of A and B per LoRA module
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    optim_steps: Vec<(u64, u64)>,
    /// SFT: AdamW step counter per trained tensor, in the order of `Slots::Named`
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    param_steps: Vec<u64>,
    /// identifies the base model the adapter belongs to
    base: String,
    #[serde(default)]
    bad_steps: usize,
    /// the command-line settings the numbers depend on (flag -> value)
    #[serde(default)]
    run: BTreeMap<String, String>,
}

/// The settings of a run that its numbers depend on, flag -> value: a resume with other values would
/// not continue the same run, so it is refused.
pub type RunSettings = BTreeMap<String, String>;

/// A fingerprint of a base checkpoint folder: FNV-1a over config.json and, for every safetensors file,
/// its name, size and header (the tensor table), so another base is told apart without reading
/// gigabytes of weights.
pub fn base_fingerprint(model: &Path) -> Result<String> {
    let mut h = Fnv::default();
    let mut eat = |bytes: &[u8]| h.eat(bytes);
    let cfg = model.join("config.json");
    eat(&std::fs::read(&cfg).map_err(|e| Error::io(&cfg, e))?);
    let mut files: Vec<PathBuf> = std::fs::read_dir(model)
        .map_err(|e| Error::io(model, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    for f in files {
        use std::io::Read;
        let mut head = vec![0u8; 1 << 20];
        let mut file = std::fs::File::open(&f).map_err(|e| Error::io(&f, e))?;
        let n = file.read(&mut head).map_err(|e| Error::io(&f, e))?;
        eat(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        eat(&file.metadata().map_err(|e| Error::io(&f, e))?.len().to_le_bytes());
        eat(&head[..n]);
    }
    Ok(h.hex())
}

/// FNV-1a, 64 bits: fingerprints of files and token sequences (not a cryptographic hash: it tells
/// apart inputs that differ by accident, which is all a cache key needs).
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn eat(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// How a checkpoint names its optimizer slots (one per trained tensor, `TrainState::optim` order).
#[derive(Clone, Copy, Debug)]
pub enum Slots<'a> {
    /// DPO: A and B of each LoRA module, stored as `{i}.a.*` and `{i}.b.*`
    LoraPairs,
    /// one slot per tensor, stored under its name (SFT: the checkpoint's tensor names)
    Named(&'a [String]),
}

impl Slots<'_> {
    fn names(self, n: usize) -> Vec<String> {
        match self {
            Slots::LoraPairs => (0..n)
                .map(|i| format!("{}.{}", i / 2, if i % 2 == 0 { "a" } else { "b" }))
                .collect(),
            Slots::Named(names) => names.to_vec(),
        }
    }
}

/// Writes OUT/checkpoint-STEP (DPO: the adapter) atomically; returns its path.
pub fn save(out: &Path, w: &LoraWeights, st: &TrainState, base: &str, run: &RunSettings) -> Result<PathBuf> {
    save_with(out, st, Slots::LoraPairs, base, run, &mut |tmp| {
        w.save_peft(&tmp.join("adapter"), base)
    })
}

/// Writes OUT/checkpoint-STEP atomically: `write_weights` puts the trained weights into the
/// (temporary) folder, then the optimizer state and state.json are added. Returns its path.
pub fn save_with(
    out: &Path,
    st: &TrainState,
    slots: Slots,
    base: &str,
    run: &RunSettings,
    write_weights: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dir = out.join(format!("checkpoint-{}", st.step));
    let tmp = out.join(format!(".checkpoint-{}.partial", st.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    write_weights(&tmp)?;
    let names = slots.names(st.optim.len());
    if names.len() != st.optim.len() {
        return Err(Error::Invalid(format!(
            "{} optimizer slots for {} names",
            st.optim.len(),
            names.len()
        )));
    }
    let mut tensors: Vec<(String, &[f32])> = Vec::new();
    for (name, p) in names.iter().zip(&st.optim) {
        for (kind, v) in [("m", &p.m), ("v", &p.v)] {
            tensors.push((format!("{name}.{kind}"), v));
        }
    }
    let views = tensors
        .iter()
        .map(|(n, v)| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![v.len()],
                bytemuck::cast_slice(v),
            )
            .map(|t| (n.clone(), t))
            .map_err(|e| Error::tensor(&tmp, n, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let opt_path = tmp.join("optimizer.safetensors");
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, &opt_path)
        .map_err(|e| Error::file(&opt_path, e.to_string()))?;
    std::fs::File::open(&opt_path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&opt_path, e))?;
    let steps = st.optim.iter().map(|p| p.step);
    let (optim_steps, param_steps) = match slots {
        Slots::LoraPairs => {
            let s: Vec<u64> = steps.collect();
            (s.chunks(2).map(|c| (c[0], c[1])).collect(), Vec::new())
        }
        Slots::Named(_) => (Vec::new(), steps.collect()),
    };
    let state = StateFile {
        step: st.step,
        epoch: st.epoch,
        cursor: st.cursor,
        running_mean: st.running.mean,
        running_count: st.running.count,
        optim_steps,
        param_steps,
        base: base.to_string(),
        bad_steps: st.bad_steps,
        run: run.clone(),
    };
    write_atomic(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(&state)
            .expect("state json")
            .as_bytes(),
    )?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    if let Ok(f) = std::fs::File::open(out) {
        let _ = f.sync_all(); // the rename itself reaches the disk
    }
    Ok(dir)
}

/// Removes the oldest complete checkpoints of `out` so that at most `keep` remain (0 keeps all).
pub fn prune(out: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let mut all = complete(out);
    all.sort_by_key(|(s, _)| std::cmp::Reverse(*s));
    let mut removed = Vec::new();
    for (_, p) in all.into_iter().skip(keep) {
        std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        removed.push(p);
    }
    Ok(removed)
}

/// Every complete checkpoint of `out` (one with its state.json) with its step.
fn complete(out: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join("state.json").is_file().then_some((step, e.path()))
        })
        .collect()
}

/// The newest complete checkpoint in `out` (one with its state.json), if any.
pub fn latest(out: &Path) -> Option<PathBuf> {
    complete(out).into_iter().max_by_key(|(s, _)| *s).map(|(_, p)| p)
}

/// Loads a DPO checkpoint (adapter and state); `base` must be the base model it was trained on and
/// `run` its settings.
pub fn load(
    dir: &Path,
    num_layers: usize,
    base: &str,
    run: &RunSettings,
) -> Result<(LoraWeights, TrainState)> {
    let s = read_state(dir, base, run)?;
    let w = LoraWeights::from_adapter(&LoraAdapter::load(&dir.join("adapter"), num_layers)?)?;
    if s.optim_steps.len() != w.modules.len() {
        return Err(Error::file(
            dir.join("state.json"),
            "optimizer state does not match the adapter's modules",
        ));
    }
    let steps: Vec<u64> = s.optim_steps.iter().flat_map(|&(a, b)| [a, b]).collect();
    let st = train_state(dir, &s, Slots::LoraPairs, &steps)?;
    Ok((w, st))
}

/// Loads the loop and optimizer state of a checkpoint whose slots are `names` (SFT); `base` must be
/// the base model it was trained on and `run` its settings. The weights are the caller's to read.
pub fn load_named(dir: &Path, names: &[String], base: &str, run: &RunSettings) -> Result<TrainState> {
    let s = read_state(dir, base, run)?;
    if s.param_steps.len() != names.len() {
        return Err(Error::file(
            dir.join("state.json"),
            format!(
                "optimizer state of {} tensors, the model trains {}",
                s.param_steps.len(),
                names.len()
            ),
        ));
    }
    train_state(dir, &s, Slots::Named(names), &s.param_steps)
}

/// Checks a checkpoint's state.json against the base model and the run's settings (the error says
/// what changed), before its weights are read.
pub fn verify(dir: &Path, base: &str, run: &RunSettings) -> Result<()> {
    read_state(dir, base, run).map(|_| ())
}

/// state.json, checked against the base model and the run's settings.
fn read_state(dir: &Path, base: &str, run: &RunSettings) -> Result<StateFile> {
    let sp = dir.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    let s: StateFile =
        serde_json::from_str(&text).map_err(|e| Error::file(&sp, format!("not a checkpoint state: {e}")))?;
    if s.base != base {
        return Err(Error::file(
            &sp,
            format!(
                "this run was trained on base `{}`, not `{base}`: resuming is refused",
                s.base
            ),
        ));
    }
    let changed: Vec<String> = s
        .run
        .iter()
        .filter_map(|(k, was)| {
            let now = run.get(k).map_or("(unset)", String::as_str);
            (now != was).then(|| format!("{k} was {was}, now {now}"))
        })
        .collect();
    if !changed.is_empty() {
        return Err(Error::file(
            &sp,
            format!(
                "resuming needs the run's own settings ({}): repeat the original command with --resume",
                changed.join("; ")
            ),
        ));
    }
    Ok(s)
}

/// The loop state of `s` with the optimizer moments of every slot from optimizer.safetensors.
fn train_state(dir: &Path, s: &StateFile, slots: Slots, steps: &[u64]) -> Result<TrainState> {
    let store = WeightStore::open_files(&[dir.join("optimizer.safetensors")])?;
    let get = |n: String| -> Result<Vec<f32>> { Ok(store.get(&n)?.to_f32()) };
    let optim = slots
        .names(steps.len())
        .into_iter()
        .zip(steps)
        .map(|(name, &step)| {
            Ok(ParamState {
                m: get(format!("{name}.m"))?,
                v: get(format!("{name}.v"))?,
                step,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(TrainState {
        step: s.step,
        epoch: s.epoch,
        cursor: s.cursor,
        running: RunningMean {
            mean: s.running_mean,
            count: s.running_count,
        },
        optim,
        bad_steps: s.bad_steps,
    })
}
