//! The DPO training loop, on any backend: policy forward, DPO loss, hand-written backward into the
//! LoRA weights, gradient accumulation and clipping, optimizer and schedule, and a clean stop between
//! (or inside) steps when asked to. Checkpoints are the caller's (`on_step`).
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::adapter::LoraWeights;
use super::backward::{pair_backward, pair_forward, LoraGrads, PassOptions};
use super::dpo::{dpo_loss, DpoConfig, PairLogps, RunningMean};
use super::optim::{clip_grad_norm, update, OptimConfig, ParamState, Schedule};
use crate::backend::Backend;
use crate::model::llama::LoraPair;
use crate::model::llava::Llava;
use crate::model::weights::Tensor;
use crate::{Error, Result};

/// Puts in-memory LoRA weights on the model's decoder (replacing any adapter), unmerged.
pub fn set_lora<B: Backend>(m: &mut Llava<B>, w: &LoraWeights) -> Result<()> {
    m.decoder.detach_lora();
    let scale = (w.alpha / w.r as f64) as f32;
    let origin = Path::new("<training LoRA>");
    for mw in &w.modules {
        let name_a = LoraWeights::tensor_name(mw.layer, mw.proj, 'A');
        let name_b = LoraWeights::tensor_name(mw.layer, mw.proj, 'B');
        let a = Tensor::from_f32(&name_a, vec![w.r, mw.in_features], &mw.a, origin)?;
        let b = Tensor::from_f32(&name_b, vec![mw.out_features, w.r], &mw.b, origin)?;
        let layer = m
            .decoder
            .layers
            .get_mut(mw.layer)
            .ok_or_else(|| Error::tensor(origin, &name_a, "layer out of range"))?;
        let be = &m.be;
        layer.proj_mut(mw.proj).lora = Some(LoraPair {
            a: be.matrix(&a)?,
            b: be.matrix(&b)?,
            scale,
        });
    }
    Ok(())
}

/// One preference pair ready for training: the prompt, its image features, both responses (EOS
/// included) and their reference log-probs (adapter off), computed once.
#[derive(Clone, Debug)]
pub struct TrainPair {
    pub id: String,
    pub prompt: Vec<u32>,
    pub features: Vec<f32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
}

#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub dpo: DpoConfig,
    pub optim: OptimConfig,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_ratio: f64,
    /// 0 = no clipping
    pub max_grad_norm: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// optimizer steps
    pub steps: usize,
    /// data order and LoRA-dropout masks
    pub seed: u64,
    pub pass: PassOptions,
}

/// TRL's metric names, per optimizer step.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    #[serde(rename = "rewards/accuracies")]
    pub accuracies: f64,
    #[serde(rename = "rewards/margins")]
    pub margins: f64,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub step_time_s: f64,
    /// the update was skipped: the loss or the gradient was not finite
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// Everything besides the LoRA weights that the next step depends on: with it (and the weights) a run
/// continues bit for bit. The data order of epoch e is a shuffle seeded by (seed, e), so only the
/// position in it is state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainState {
    /// optimizer steps done
    pub step: usize,
    pub epoch: usize,
    /// pairs of the current epoch already used
    pub cursor: usize,
    pub running: RunningMean,
    /// per LoRA module (in `LoraWeights::modules` order): A's and B's optimizer state
    pub optim: Vec<(ParamState, ParamState)>,
    /// consecutive steps skipped for a non-finite loss or gradient
    pub bad_steps: usize,
}

/// Consecutive non-finite steps that stop a run.
pub const MAX_BAD_STEPS: usize = 3;

/// The order of the pairs in epoch `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(
        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ));
    order
}

/// How a call to [`train`] ended.
#[derive(Debug)]
pub struct TrainOutcome {
    /// metrics of the steps done by this call
    pub history: Vec<StepMetrics>,
    /// `stop` was raised: the state is that of the last finished step (a step in progress was
    /// abandoned and will be redone, identically, on resume)
    pub interrupted: bool,
}

/// The LoRA-dropout key of one pair: a function of the seed and the sequence's place in the run,
/// so a resumed run draws the masks the uninterrupted one would have.
fn sequence_key(seed: u64, step: usize, micro: usize, pair: usize) -> u64 {
    let mut k = seed ^ 0x6D69_6164_706F_0001; // "miadpo"
    for v in [step, micro, pair] {
        k = (k ^ v as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
    k
}

/// Runs optimizer steps from `state.step` to `cfg.steps` over `pairs`, updating `w`, `state` and the
/// model's LoRA in place. After each step `on_step` sees its metrics and the state (to checkpoint it).
/// When `stop` is raised, returns between sequences with the state of the last finished step.
pub fn train<B: Backend>(
    m: &mut Llava<B>,
    w: &mut LoraWeights,
    state: &mut TrainState,
    pairs: &[TrainPair],
    cfg: &TrainConfig,
    stop: &AtomicBool,
    on_step: &mut dyn FnMut(&StepMetrics, &TrainState, &LoraWeights) -> Result<()>,
) -> Result<TrainOutcome> {
    if pairs.is_empty() || cfg.batch_size == 0 || cfg.grad_accum == 0 {
        return Err(Error::Invalid(
            "training needs pairs, --batch-size >= 1 and --grad-accum >= 1".into(),
        ));
    }
    set_lora(m, w)?;
    let warmup = Schedule::warmup_steps(cfg.steps, cfg.warmup_ratio);
    if state.optim.len() != w.modules.len() {
        state.optim = vec![Default::default(); w.modules.len()];
    }
    let mut order = epoch_order(pairs.len(), cfg.seed, state.epoch);
    let mut history = Vec::with_capacity(cfg.steps.saturating_sub(state.step));
    let stopped = |history: Vec<StepMetrics>| TrainOutcome {
        history,
        interrupted: true,
    };
    while state.step < cfg.steps {
        if stop.load(Ordering::Relaxed) {
            return Ok(stopped(history));
        }
        let step = state.step;
        // restored if the step is abandoned (the optimizer state changes only at the update)
        let before = (state.epoch, state.cursor, state.running);
        let t0 = Instant::now();
        let mut grads = LoraGrads::<B>::default();
        let (mut loss, mut rc, mut rr, mut acc, mut lpc, mut lpr, mut tokens) =
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0usize);
        for micro in 0..cfg.grad_accum {
            let mut batch = Vec::with_capacity(cfg.batch_size);
            while batch.len() < cfg.batch_size {
                if state.cursor == order.len() {
                    state.epoch += 1;
                    state.cursor = 0;
                    order = epoch_order(pairs.len(), cfg.seed, state.epoch);
                }
                batch.push(&pairs[order[state.cursor]]);
                state.cursor += 1;
            }
            // policy forward of both answers of every pair (kept for the backward)
            let mut fwds = Vec::with_capacity(batch.len());
            let mut logps = Vec::with_capacity(batch.len());
            for (i, p) in batch.iter().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    (state.epoch, state.cursor, state.running) = before;
                    return Ok(stopped(history));
                }
                let features = m.be.upload(&p.features);
                let key = sequence_key(cfg.seed, step, micro, i);
                let f = pair_forward(m, &p.prompt, &p.chosen, &p.rejected, &features, cfg.pass, key)?;
                let (policy_chosen, policy_rejected) = f.logps();
                logps.push(PairLogps {
                    policy_chosen,
                    policy_rejected,
                    ref_chosen: p.ref_chosen,
                    ref_rejected: p.ref_rejected,
                    chosen_tokens: p.chosen.len(),
                    rejected_tokens: p.rejected.len(),
                });
                fwds.push(f);
            }
            let out = dpo_loss(&cfg.dpo, &logps, &mut state.running);
            // backward of the mean loss of this micro-batch, averaged over the accumulation steps
            let k = cfg.grad_accum as f64;
            for (i, f) in fwds.iter().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    (state.epoch, state.cursor, state.running) = before;
                    return Ok(stopped(history));
                }
                let (gc, gr) = (out.grad_chosen[i] / k, out.grad_rejected[i] / k);
                pair_backward(m, f, gc, gr, cfg.pass, &mut grads);
                tokens += f.tokens();
            }
            loss += out.loss / k;
            rc += out.rewards_chosen_mean() / k;
            rr += out.rewards_rejected_mean() / k;
            acc += out.accuracy() / k;
            lpc += logps.iter().map(|l| l.policy_chosen).sum::<f64>() / logps.len() as f64 / k;
            lpr += logps.iter().map(|l| l.policy_rejected).sum::<f64>() / logps.len() as f64 / k;
        }
        // clip over every tensor, then one optimizer update per tensor
        let mut host: Vec<(usize, crate::model::lora::Proj, Vec<f32>, Vec<f32>)> = grads
            .modules
            .iter()
            .map(|g| (g.layer, g.proj, m.be.download(&g.da), m.be.download(&g.db)))
            .collect();
        let mut refs: Vec<&mut [f32]> = host
            .iter_mut()
            .flat_map(|(_, _, da, db)| [da.as_mut_slice(), db.as_mut_slice()])
            .collect();
        let grad_norm = clip_grad_norm(&mut refs, cfg.max_grad_norm);
        let lr = cfg.lr * cfg.schedule.factor(step, cfg.steps, warmup);
        // a NaN/Inf loss or gradient skips the update; three in a row stop the run
        let skipped = !loss.is_finite() || !grad_norm.is_finite();
        if skipped {
            state.bad_steps += 1;
            if state.bad_steps >= MAX_BAD_STEPS {
                return Err(Error::Invalid(format!(
                    "step {}: loss or gradient not finite for {MAX_BAD_STEPS} steps in a row (loss {loss}, gradient norm {grad_norm}); stopping",
                    step + 1
                )));
            }
        } else {
            state.bad_steps = 0;
            for (mw, (sa, sb)) in w.modules.iter_mut().zip(state.optim.iter_mut()) {
                let (_, _, da, db) = host
                    .iter()
                    .find(|(l, p, _, _)| (*l, *p) == (mw.layer, mw.proj))
                    .ok_or_else(|| {
                        Error::Invalid(format!("no gradient for layer {} {:?}", mw.layer, mw.proj))
                    })?;
                update(&cfg.optim, &mut mw.a, da, sa, lr as f32);
                update(&cfg.optim, &mut mw.b, db, sb, lr as f32);
            }
            set_lora(m, w)?;
        }
        let step_time_s = t0.elapsed().as_secs_f64();
        let metrics = StepMetrics {
            step: step + 1,
            loss,
            rewards_chosen: rc,
            rewards_rejected: rr,
            accuracies: acc,
            margins: rc - rr,
            logps_chosen: lpc,
            logps_rejected: lpr,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / step_time_s,
            step_time_s,
            skipped,
        };
        state.step += 1;
        on_step(&metrics, state, w)?;
        history.push(metrics);
    }
    Ok(TrainOutcome {
        history,
        interrupted: false,
    })
}
