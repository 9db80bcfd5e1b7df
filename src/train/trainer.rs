//! The training loop, on any backend, shared by the two stages: [`run_steps`] owns the data order over
//! epochs, gradient accumulation, clipping, the schedule, the optimizer update on f32 masters,
//! non-finite steps and a clean stop between (or inside) steps when asked to; a [`Stage`] owns what a
//! micro-batch computes and which tensors it trains. [`DpoStage`] (here: policy forward, DPO loss,
//! hand-written backward into the LoRA weights) and `super::sft::SftStage` (full-parameter
//! cross-entropy on the answers) are the two. Checkpoints are the caller's (`on_step`).
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use super::adapter::LoraWeights;
use super::backward::{pair_backward, pair_forward, LoraGrads, PassOptions};
use super::dpo::{dpo_loss, DpoConfig, PairLogps, RunningMean};
use super::optim::{clip_grad_norm, update, OptimConfig, ParamState, Schedule};
use crate::backend::{Backend, BufState};
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

/// The settings of the step loop, shared by every stage.
#[derive(Clone, Debug)]
pub struct LoopConfig {
    pub optim: OptimConfig,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_ratio: f64,
    /// 0 = no clipping
    pub max_grad_norm: f64,
    /// examples per micro-batch
    pub batch_size: usize,
    pub grad_accum: usize,
    /// optimizer steps
    pub steps: usize,
    /// data order (and the stage's own draws, e.g. LoRA-dropout masks)
    pub seed: u64,
    /// For a stage that updates its tensors on the backend (DPO's LoRA): every how many steps their
    /// host copies (the stage's weights, `TrainState::optim`) are brought up to date before
    /// `on_step` sees them, e.g. the checkpoint interval; 1 = every step, 0 = only when the run
    /// returns (finished or stopped). Stages that update on the host keep them current anyway.
    pub sync_every: usize,
}

/// A DPO run: the loss, how the policy pass runs, and the loop.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub dpo: DpoConfig,
    pub pass: PassOptions,
    pub run: LoopConfig,
}

/// Per optimizer step: the loop's metrics around the stage's own (`X`, flattened into the same JSON
/// object, so a metrics.jsonl line reads `step, loss, <stage metrics>, lr, grad_norm, ...`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepMetrics<X = DpoMetrics> {
    pub step: usize,
    pub loss: f64,
    #[serde(flatten)]
    pub stage: X,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub step_time_s: f64,
    /// the part of `step_time_s` after the backward: the gradient norm, clipping, the optimizer
    /// update, the weights into the model (`bench --task train` reports it; not logged, as
    /// the logs of a resumed run must equal the uninterrupted one's but for the timings they drop)
    #[serde(skip)]
    pub update_time_s: f64,
    /// the update was skipped: the loss or the gradient was not finite
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

/// DPO's metrics of a step, with TRL's names.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct DpoMetrics {
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
}

/// Everything besides the trained weights that the next step depends on: with it (and the weights) a
/// run continues bit for bit. The data order of epoch e is a shuffle seeded by (seed, e), so only the
/// position in it is state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainState {
    /// optimizer steps done
    pub step: usize,
    pub epoch: usize,
    /// examples of the current epoch already used
    pub cursor: usize,
    /// the running mean some DPO losses carry (robust, bco_pair); unused by SFT
    pub running: RunningMean,
    /// the optimizer state of every trained tensor, in the stage's slot order (DPO: A then B of each
    /// LoRA module, in `LoraWeights::modules` order)
    pub optim: Vec<ParamState>,
    /// consecutive steps skipped for a non-finite loss or gradient
    pub bad_steps: usize,
}

/// Consecutive non-finite steps that stop a run.
pub const MAX_BAD_STEPS: usize = 3;

/// The order of the examples in epoch `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(
        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ));
    order
}

/// How a call to [`train`] or [`run_steps`] ended.
#[derive(Debug)]
pub struct TrainOutcome<X = DpoMetrics> {
    /// metrics of the steps done by this call
    pub history: Vec<StepMetrics<X>>,
    /// `stop` was raised: the state is that of the last finished step (a step in progress was
    /// abandoned and will be redone, identically, on resume)
    pub interrupted: bool,
}

/// Where a micro-batch sits in the run: draws keyed by it (LoRA-dropout masks) are what the
/// uninterrupted run would draw, so a resumed run continues bit for bit.
#[derive(Clone, Copy, Debug)]
pub struct MicroAt {
    /// 0-based optimizer step
    pub step: usize,
    /// micro-batch within the step
    pub micro: usize,
    pub grad_accum: usize,
    pub seed: u64,
}

/// Where a step's gradients are when it ends (`Stage::end_step`).
pub enum StepGrads {
    /// copied to the host, one per slot: [`run_steps`] clips them and updates the stage's host
    /// masters (`Stage::params`), then the stage writes them into the model (`Stage::apply`)
    Host(Vec<Vec<f32>>),
    /// left on the backend, with Σ g² over all of them: the stage updates its tensors there
    /// (`Stage::update_on_backend`) and copies them to the host when asked (`Stage::sync_host`)
    Backend { sum_squares: f64 },
}

/// One kind of training: what a micro-batch computes and which tensors it trains. [`run_steps`] does
/// the rest. Gradients are those of the step's loss, the mean of its micro-batches' losses.
pub trait Stage<B: Backend> {
    /// one training example (a preference pair, an SFT sample)
    type Item;
    /// the stage's own metrics of a step
    type Metrics: Serialize + Clone + fmt::Debug + PartialEq;
    /// Puts the trained weights on the model, before the first step; `state` holds the optimizer
    /// state to continue from (one per slot, default before the first update).
    fn attach(&mut self, m: &mut Llava<B>, state: &TrainState) -> Result<()>;
    /// The number of trained tensors (optimizer slots).
    fn slots(&self) -> usize;
    /// Starts a step: gradient and metric accumulators from zero.
    fn begin_step(&mut self);
    /// Forward, loss and backward of one micro-batch: adds the gradient of its loss / grad_accum to
    /// the step's accumulators. Returns the sequence rows the forward ran over, or None when `stop`
    /// was raised (checked between sequences; the step is then abandoned).
    fn micro_batch(
        &mut self,
        m: &Llava<B>,
        batch: &[&Self::Item],
        at: MicroAt,
        running: &mut RunningMean,
        stop: &AtomicBool,
    ) -> Result<Option<usize>>;
    /// Ends the step: its loss, its metrics, and where its gradients are.
    fn end_step(&mut self, m: &Llava<B>) -> Result<(f64, Self::Metrics, StepGrads)>;
    /// `StepGrads::Host`: the trained tensors' f32 masters, one per slot (in the order of
    /// `end_step`'s gradients).
    fn params(&mut self) -> Vec<&mut [f32]>;
    /// `StepGrads::Host`: writes the updated masters into the model.
    fn apply(&mut self, m: &mut Llava<B>) -> Result<()>;
    /// `StepGrads::Backend`: one optimizer update of every trained tensor on the backend, each
    /// gradient scaled by `gscale` (the clipping, 1 for none), and the model's weights refreshed.
    fn update_on_backend(
        &mut self,
        _m: &mut Llava<B>,
        _optim: &OptimConfig,
        _lr: f32,
        _gscale: f64,
    ) -> Result<()> {
        Err(Error::Invalid(
            "this stage updates its tensors on the host".into(),
        ))
    }
    /// `StepGrads::Backend`: copies the trained tensors to the stage's host weights and their
    /// optimizer states into `optim`.
    fn sync_host(&mut self, _m: &Llava<B>, _optim: &mut [ParamState]) -> Result<()> {
        Ok(())
    }
}

/// What [`run_steps`] calls after each step: the step's metrics, the state, the stage.
pub type OnStep<'a, B, S> =
    dyn FnMut(&StepMetrics<<S as Stage<B>>::Metrics>, &TrainState, &S) -> Result<()> + 'a;

/// Runs optimizer steps from `state.step` to `cfg.steps` over `items`, updating the stage's weights,
/// `state` and the model in place. After each step `on_step` sees its metrics, the state and the stage
/// (to checkpoint them). When `stop` is raised, returns between sequences with the state of the last
/// finished step.
pub fn run_steps<B: Backend, S: Stage<B>>(
    m: &mut Llava<B>,
    stage: &mut S,
    state: &mut TrainState,
    items: &[S::Item],
    cfg: &LoopConfig,
    stop: &AtomicBool,
    on_step: &mut OnStep<B, S>,
) -> Result<TrainOutcome<S::Metrics>> {
    if items.is_empty() || cfg.batch_size == 0 || cfg.grad_accum == 0 {
        return Err(Error::Invalid(
            "training needs examples, --batch-size >= 1 and --grad-accum >= 1".into(),
        ));
    }
    let warmup = Schedule::warmup_steps(cfg.steps, cfg.warmup_ratio);
    if state.optim.len() != stage.slots() {
        state.optim = vec![Default::default(); stage.slots()];
    }
    stage.attach(m, state)?;
    let mut order = epoch_order(items.len(), cfg.seed, state.epoch);
    let mut history = Vec::with_capacity(cfg.steps.saturating_sub(state.step));
    // a run returns with the host copies of backend-updated tensors up to date
    let stopped = |history, m: &Llava<B>, stage: &mut S, state: &mut TrainState| {
        stage.sync_host(m, &mut state.optim)?;
        Ok(TrainOutcome {
            history,
            interrupted: true,
        })
    };
    while state.step < cfg.steps {
        if stop.load(Ordering::Relaxed) {
            return stopped(history, m, stage, state);
        }
        let step = state.step;
        // restored if the step is abandoned (the optimizer state changes only at the update)
        let before = (state.epoch, state.cursor, state.running);
        let t0 = Instant::now();
        stage.begin_step();
        let mut tokens = 0usize;
        for micro in 0..cfg.grad_accum {
            let mut batch = Vec::with_capacity(cfg.batch_size);
            while batch.len() < cfg.batch_size {
                if state.cursor == order.len() {
                    state.epoch += 1;
                    state.cursor = 0;
                    order = epoch_order(items.len(), cfg.seed, state.epoch);
                }
                batch.push(&items[order[state.cursor]]);
                state.cursor += 1;
            }
            let at = MicroAt {
                step,
                micro,
                grad_accum: cfg.grad_accum,
                seed: cfg.seed,
            };
            match stage.micro_batch(m, &batch, at, &mut state.running, stop)? {
                Some(rows) => tokens += rows,
                None => {
                    (state.epoch, state.cursor, state.running) = before;
                    return stopped(history, m, stage, state);
                }
            }
        }
        // clip over every tensor, then one optimizer update per tensor (the backend's queue drained
        // first and after, so that the update's time is its own: a GPU runs the backward's kernels
        // after their launches return)
        m.be.synchronize();
        let t_update = Instant::now();
        let (loss, stage_metrics, grads) = stage.end_step(m)?;
        let (grad_norm, mut grads) = match grads {
            StepGrads::Host(mut grads) => {
                if grads.len() != state.optim.len() {
                    return Err(Error::Invalid(format!(
                        "the stage gave {} gradients for {} trained tensors",
                        grads.len(),
                        state.optim.len()
                    )));
                }
                let mut refs: Vec<&mut [f32]> = grads.iter_mut().map(Vec::as_mut_slice).collect();
                (clip_grad_norm(&mut refs, cfg.max_grad_norm), Some(grads))
            }
            StepGrads::Backend { sum_squares } => (sum_squares.sqrt(), None),
        };
        let lr = cfg.lr * cfg.schedule.factor(step, cfg.steps, warmup);
        // a NaN/Inf loss or gradient skips the update; three in a row stop the run
        let skipped = !loss.is_finite() || !grad_norm.is_finite();
        if skipped {
            state.bad_steps += 1;
            if state.bad_steps >= MAX_BAD_STEPS {
                // the host copies hold the last good update, as they would after a stop
                stage.sync_host(m, &mut state.optim)?;
                return Err(Error::Invalid(format!(
                    "step {}: loss or gradient not finite for {MAX_BAD_STEPS} steps in a row (loss {loss}, gradient norm {grad_norm}); stopping",
                    step + 1
                )));
            }
        } else {
            state.bad_steps = 0;
            if let Some(grads) = grads.as_mut() {
                // every tensor on its own: in parallel, with the bits of one at a time
                let params = stage.params();
                params
                    .into_par_iter()
                    .zip(grads.par_iter())
                    .zip(state.optim.par_iter_mut())
                    .for_each(|((p, g), st)| update(&cfg.optim, p, g, st, lr as f32));
                stage.apply(m)?;
            } else {
                // clip_grad_norm's factor, applied by the update
                let coef = if cfg.max_grad_norm > 0.0 {
                    cfg.max_grad_norm / (grad_norm + 1e-6)
                } else {
                    1.0
                };
                stage.update_on_backend(m, &cfg.optim, lr as f32, coef.min(1.0))?;
            }
        }
        m.be.synchronize();
        let (step_time_s, update_time_s) = (t0.elapsed().as_secs_f64(), t_update.elapsed().as_secs_f64());
        let metrics = StepMetrics {
            step: step + 1,
            loss,
            stage: stage_metrics,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / step_time_s,
            step_time_s,
            update_time_s,
            skipped,
        };
        state.step += 1;
        if cfg.sync_every > 0 && state.step.is_multiple_of(cfg.sync_every) {
            stage.sync_host(m, &mut state.optim)?;
        }
        on_step(&metrics, state, stage)?;
        history.push(metrics);
    }
    stage.sync_host(m, &mut state.optim)?;
    Ok(TrainOutcome {
        history,
        interrupted: false,
    })
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

/// DPO with LoRA: the policy forward of both answers of every pair, the DPO loss against the cached
/// reference log-probs, the backward into every LoRA A and B, the optimizer on the backend (its
/// gradients never leave it: on a GPU, a LoRA of LLaVA-1.5-7B's size is ~300 M parameters, whose
/// gradients, host update and upload would take longer than the step's forward and backward).
pub struct DpoStage<'a, B: Backend> {
    /// the host copy of the trained weights: up to date after `sync_host`
    pub w: &'a mut LoraWeights,
    pub dpo: &'a DpoConfig,
    pub pass: PassOptions,
    grads: LoraGrads<B>,
    /// the f32 masters on the backend, A then B of each module in `w.modules` order (the slots)
    masters: Vec<B::Buf>,
    /// their optimizer states
    states: Vec<BufState<B::Buf>>,
    /// loss, rewards chosen / rejected, accuracy, log-probs chosen / rejected: sums over micro-batches / k
    sums: [f64; 6],
}

impl<'a, B: Backend> DpoStage<'a, B> {
    pub fn new(w: &'a mut LoraWeights, dpo: &'a DpoConfig, pass: PassOptions) -> Self {
        DpoStage {
            w,
            dpo,
            pass,
            grads: LoraGrads::default(),
            masters: Vec::new(),
            states: Vec::new(),
            sums: [0.0; 6],
        }
    }
}

impl<B: Backend> Stage<B> for DpoStage<'_, B> {
    type Item = TrainPair;
    type Metrics = DpoMetrics;

    fn attach(&mut self, m: &mut Llava<B>, state: &TrainState) -> Result<()> {
        set_lora(m, self.w)?;
        let be = &m.be;
        self.masters = self
            .w
            .modules
            .iter()
            .flat_map(|mw| [be.upload(&mw.a), be.upload(&mw.b)])
            .collect();
        let up = |v: &Vec<f32>| (!v.is_empty()).then(|| be.upload(v));
        self.states = state
            .optim
            .iter()
            .map(|st| BufState {
                m: up(&st.m),
                v: up(&st.v),
                step: st.step,
            })
            .collect();
        Ok(())
    }

    fn slots(&self) -> usize {
        2 * self.w.modules.len()
    }

    fn begin_step(&mut self) {
        self.grads = LoraGrads::default();
        self.sums = [0.0; 6];
    }

    fn micro_batch(
        &mut self,
        m: &Llava<B>,
        batch: &[&TrainPair],
        at: MicroAt,
        running: &mut RunningMean,
        stop: &AtomicBool,
    ) -> Result<Option<usize>> {
        // policy forward of both answers of every pair (kept for the backward)
        let mut fwds = Vec::with_capacity(batch.len());
        let mut logps = Vec::with_capacity(batch.len());
        for (i, p) in batch.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let features = m.be.upload(&p.features);
            let key = sequence_key(at.seed, at.step, at.micro, i);
            let f = pair_forward(m, &p.prompt, &p.chosen, &p.rejected, &features, self.pass, key)?;
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
        let out = dpo_loss(self.dpo, &logps, running);
        // backward of the mean loss of this micro-batch, averaged over the accumulation steps
        let k = at.grad_accum as f64;
        let mut tokens = 0;
        for (i, f) in fwds.iter().enumerate() {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let (gc, gr) = (out.grad_chosen[i] / k, out.grad_rejected[i] / k);
            pair_backward(m, f, gc, gr, self.pass, &mut self.grads);
            tokens += f.tokens();
        }
        let n = logps.len() as f64;
        for (sum, v) in self.sums.iter_mut().zip([
            out.loss,
            out.rewards_chosen_mean(),
            out.rewards_rejected_mean(),
            out.accuracy(),
            logps.iter().map(|l| l.policy_chosen).sum::<f64>() / n,
            logps.iter().map(|l| l.policy_rejected).sum::<f64>() / n,
        ]) {
            *sum += v / k;
        }
        Ok(Some(tokens))
    }

    fn end_step(&mut self, m: &Llava<B>) -> Result<(f64, DpoMetrics, StepGrads)> {
        let mut grads = Vec::with_capacity(2 * self.w.modules.len());
        for mw in &self.w.modules {
            let g = self.grads.module(mw.layer, mw.proj)?;
            grads.push(&g.da);
            grads.push(&g.db);
        }
        let sum_squares = m.be.sum_squares(&grads);
        let [loss, rc, rr, acc, lpc, lpr] = self.sums;
        let metrics = DpoMetrics {
            rewards_chosen: rc,
            rewards_rejected: rr,
            accuracies: acc,
            margins: rc - rr,
            logps_chosen: lpc,
            logps_rejected: lpr,
        };
        Ok((loss, metrics, StepGrads::Backend { sum_squares }))
    }

    fn params(&mut self) -> Vec<&mut [f32]> {
        Vec::new() // updated on the backend
    }

    fn apply(&mut self, _m: &mut Llava<B>) -> Result<()> {
        Ok(())
    }

    fn update_on_backend(
        &mut self,
        m: &mut Llava<B>,
        optim: &OptimConfig,
        lr: f32,
        gscale: f64,
    ) -> Result<()> {
        let scale = (self.w.alpha / self.w.r as f64) as f32;
        let r = self.w.r;
        for (i, mw) in self.w.modules.iter().enumerate() {
            let g = self.grads.module_mut(mw.layer, mw.proj)?;
            let (pa, pb) = self.masters.split_at_mut(2 * i + 1);
            let (sa, sb) = self.states.split_at_mut(2 * i + 1);
            let be = &m.be;
            be.optim_update(optim, &mut pa[2 * i], &mut g.da, gscale, &mut sa[2 * i], lr);
            be.optim_update(optim, &mut pb[0], &mut g.db, gscale, &mut sb[0], lr);
            let pair = LoraPair {
                a: be.to_mat(&pa[2 * i], r, mw.in_features)?,
                b: be.to_mat(&pb[0], mw.out_features, r)?,
                scale,
            };
            let layer = m
                .decoder
                .layers
                .get_mut(mw.layer)
                .ok_or_else(|| Error::Invalid(format!("LoRA of layer {}: no such layer", mw.layer)))?;
            layer.proj_mut(mw.proj).lora = Some(pair);
        }
        Ok(())
    }

    fn sync_host(&mut self, m: &Llava<B>, optim: &mut [ParamState]) -> Result<()> {
        let be = &m.be;
        for (i, mw) in self.w.modules.iter_mut().enumerate() {
            mw.a = be.download(&self.masters[2 * i]);
            mw.b = be.download(&self.masters[2 * i + 1]);
        }
        for (host, st) in optim.iter_mut().zip(&self.states) {
            let down = |v: &Option<B::Buf>| v.as_ref().map_or_else(Vec::new, |v| be.download(v));
            *host = ParamState {
                m: down(&st.m),
                v: down(&st.v),
                step: st.step,
            };
        }
        Ok(())
    }
}

/// DPO with LoRA: runs optimizer steps from `state.step` to `cfg.run.steps` over `pairs`, updating
/// `w`, `state` and the model's LoRA in place. After each step `on_step` sees its metrics and the
/// state (to checkpoint it). When `stop` is raised, returns between sequences with the state of the
/// last finished step.
pub fn train<B: Backend>(
    m: &mut Llava<B>,
    w: &mut LoraWeights,
    state: &mut TrainState,
    pairs: &[TrainPair],
    cfg: &TrainConfig,
    stop: &AtomicBool,
    on_step: &mut dyn FnMut(&StepMetrics, &TrainState, &LoraWeights) -> Result<()>,
) -> Result<TrainOutcome> {
    let mut stage = DpoStage::new(w, &cfg.dpo, cfg.pass);
    run_steps(
        m,
        &mut stage,
        state,
        pairs,
        &cfg.run,
        stop,
        &mut |s, st, stage| on_step(s, st, &*stage.w),
    )
}
