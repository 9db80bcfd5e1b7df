//! Checkpoints that resume bit for bit: OUT/checkpoint-STEP/ holds the adapter (PEFT), the optimizer
//! state (f32 safetensors) and the loop state (JSON). Written into a hidden temporary folder, synced,
//! then renamed, so a kill mid-write leaves the previous checkpoint as the newest complete one.
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
    /// AdamW step counters of A and B per module
    optim_steps: Vec<(u64, u64)>,
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

/// Writes OUT/checkpoint-STEP atomically; returns its path.
pub fn save(out: &Path, w: &LoraWeights, st: &TrainState, base: &str, run: &RunSettings) -> Result<PathBuf> {
    let dir = out.join(format!("checkpoint-{}", st.step));
    let tmp = out.join(format!(".checkpoint-{}.partial", st.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    w.save_peft(&tmp.join("adapter"), base)?;
    let mut tensors: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for (i, (a, b)) in st.optim.iter().enumerate() {
        for (which, p) in [("a", a), ("b", b)] {
            for (kind, v) in [("m", &p.m), ("v", &p.v)] {
                tensors.push((
                    format!("{i}.{which}.{kind}"),
                    bytemuck::cast_slice(v).to_vec(),
                    v.len(),
                ));
            }
        }
    }
    let views = tensors
        .iter()
        .map(|(n, b, len)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*len], b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::tensor(&tmp, n, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None::<HashMap<String, String>>)
        .map_err(|e| Error::file(&tmp, e.to_string()))?;
    write_atomic(&tmp.join("optimizer.safetensors"), &bytes)?;
    let state = StateFile {
        step: st.step,
        epoch: st.epoch,
        cursor: st.cursor,
        running_mean: st.running.mean,
        running_count: st.running.count,
        optim_steps: st.optim.iter().map(|(a, b)| (a.step, b.step)).collect(),
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

/// The newest complete checkpoint in `out` (one with its state.json), if any.
pub fn latest(out: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(out).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().join("state.json").is_file().then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p)
}

/// Loads a checkpoint; `base` must be the base model it was trained on and `run` its settings.
pub fn load(
    dir: &Path,
    num_layers: usize,
    base: &str,
    run: &RunSettings,
) -> Result<(LoraWeights, TrainState)> {
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
    let w = LoraWeights::from_adapter(&LoraAdapter::load(&dir.join("adapter"), num_layers)?)?;
    if s.optim_steps.len() != w.modules.len() {
        return Err(Error::file(
            &sp,
            "optimizer state does not match the adapter's modules",
        ));
    }
    let store = WeightStore::open_files(&[dir.join("optimizer.safetensors")])?;
    let get = |n: String| -> Result<Vec<f32>> { Ok(store.get(&n)?.to_f32()) };
    let mut optim = Vec::with_capacity(w.modules.len());
    for (i, &(sa, sb)) in s.optim_steps.iter().enumerate() {
        let pa = ParamState {
            m: get(format!("{i}.a.m"))?,
            v: get(format!("{i}.a.v"))?,
            step: sa,
        };
        let pb = ParamState {
            m: get(format!("{i}.b.m"))?,
            v: get(format!("{i}.b.v"))?,
            step: sb,
        };
        optim.push((pa, pb));
    }
    let st = TrainState {
        step: s.step,
        epoch: s.epoch,
        cursor: s.cursor,
        running: RunningMean {
            mean: s.running_mean,
            count: s.running_count,
        },
        optim,
        bad_steps: s.bad_steps,
    };
    Ok((w, st))
}
