//! Optimizers (PyTorch's AdamW and SGD update rules, f32 master weights and state), gradient-norm
//! clipping, and HF's learning-rate schedules.
use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OptimizerKind {
    #[default]
    AdamW,
    Sgd,
}

impl FromStr for OptimizerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "adamw" => Ok(OptimizerKind::AdamW),
            "sgd" => Ok(OptimizerKind::Sgd),
            _ => Err(format!("unknown optimizer `{s}` (expected adamw or sgd)")),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct OptimConfig {
    pub kind: OptimizerKind,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            kind: OptimizerKind::AdamW,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// Per-tensor optimizer state (AdamW's moments; empty for SGD).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParamState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub step: u64,
}

/// One update of `p` from `g` at learning rate `lr`, in PyTorch's order of operations:
/// AdamW — decoupled decay p ← p·(1 − lr·wd), moments, p ← p − (lr / bc1) · m / (√v / √bc2 + eps);
/// SGD — g ← g + wd·p, p ← p − lr·g.
pub fn update(cfg: &OptimConfig, p: &mut [f32], g: &[f32], st: &mut ParamState, lr: f32) {
    assert_eq!(p.len(), g.len(), "parameter and gradient sizes");
    match cfg.kind {
        OptimizerKind::Sgd => {
            for (p, g) in p.iter_mut().zip(g) {
                *p -= lr * (g + cfg.weight_decay * *p);
            }
        }
        OptimizerKind::AdamW => {
            if st.m.len() != p.len() {
                st.m = vec![0.0; p.len()];
                st.v = vec![0.0; p.len()];
            }
            st.step += 1;
            let bc1 = 1.0 - cfg.beta1.powi(st.step as i32);
            let bc2 = 1.0 - cfg.beta2.powi(st.step as i32);
            let step_size = lr / bc1;
            let bc2_sqrt = bc2.sqrt();
            let (b1, b2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
            let decay = 1.0 - lr * cfg.weight_decay;
            // element by element in the same order of operations as the scalar loop (so the same
            // bits), in chunks over the cores: a large tensor (an embedding table) is not one
            // thread's work
            const CHUNK: usize = 1 << 14;
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(st.m.par_chunks_mut(CHUNK))
                .zip(st.v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                        *p *= decay;
                        *m = b1 * *m + (1.0 - b1) * g;
                        *v = b2 * *v + (1.0 - b2) * g * g;
                        let denom = v.sqrt() / bc2_sqrt + eps;
                        *p -= step_size * *m / denom;
                    }
                });
        }
    }
}

/// PyTorch's `clip_grad_norm_`: the global L2 norm over every gradient (in f64), and when it exceeds
/// `max_norm` (> 0) every gradient scaled by max_norm / (norm + 1e-6). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            grads
                .iter_mut()
                .for_each(|g| g.iter_mut().for_each(|x| *x = (*x as f64 * coef) as f32));
        }
    }
    norm
}

/// HF transformers' schedulers (`get_scheduler`), as a multiplier of the base learning rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Schedule {
    /// warmup, then linear decay to 0 at the last step (MIA-DPO)
    #[default]
    Linear,
    /// warmup, then half a cosine to 0
    Cosine,
    /// warmup, then constant
    Constant,
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            "constant" => Ok(Schedule::Constant),
            _ => Err(format!(
                "unknown schedule `{s}` (expected linear, cosine or constant)"
            )),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
            Schedule::Constant => "constant",
        })
    }
}

impl Schedule {
    /// Warmup steps as HF computes them from a ratio: ceil(total · ratio).
    pub fn warmup_steps(total: usize, ratio: f64) -> usize {
        (total as f64 * ratio).ceil() as usize
    }

    /// The multiplier at optimizer step `step` (0-based) of `total`, with `warmup` warmup steps.
    pub fn factor(self, step: usize, total: usize, warmup: usize) -> f64 {
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Schedule::Linear => {
                ((total.saturating_sub(step)) as f64 / (total.saturating_sub(warmup)).max(1) as f64).max(0.0)
            }
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
            Schedule::Constant => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_first_steps_follow_pytorch() {
        // PyTorch: the first AdamW step moves each parameter by lr·sign(g) (m̂/√v̂ = ±1) after decay
        let cfg = OptimConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut p = vec![1.0f32, -2.0];
        let mut st = ParamState::default();
        update(&cfg, &mut p, &[0.5, -3.0], &mut st, 0.01);
        let want = [
            1.0 * (1.0 - 0.001) - 0.01 * 0.5 / (0.5 + 1e-8),
            -2.0 * (1.0 - 0.001) + 0.01 * 3.0 / (3.0 + 1e-8),
        ];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b as f32).abs() < 1e-6, "{a} vs {b}");
        }
        assert_eq!(st.step, 1);
    }

    #[test]
    fn adamw_in_chunks_equals_the_scalar_loop_bit_for_bit() {
        let cfg = OptimConfig {
            weight_decay: 0.05,
            ..Default::default()
        };
        let n = 3 * (1 << 14) + 77; // several chunks and a ragged end
        let g = |k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7 + k * 13) % 101) as f32 / 37.0 - 1.3)
                .collect()
        };
        let mut p: Vec<f32> = (0..n).map(|i| (i % 19) as f32 / 9.0 - 1.0).collect();
        let (mut want, mut m, mut v) = (p.clone(), vec![0f32; n], vec![0f32; n]);
        let mut st = ParamState::default();
        for step in 1..=3u64 {
            let (lr, gs) = (1e-3 * step as f32, g(step as usize));
            update(&cfg, &mut p, &gs, &mut st, lr);
            let bc1 = 1.0 - cfg.beta1.powi(step as i32);
            let bc2_sqrt = (1.0 - cfg.beta2.powi(step as i32)).sqrt();
            for i in 0..n {
                want[i] *= 1.0 - lr * cfg.weight_decay;
                m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * gs[i];
                v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * gs[i] * gs[i];
                want[i] -= lr / bc1 * m[i] / (v[i].sqrt() / bc2_sqrt + cfg.eps);
            }
        }
        assert!(p.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(st.m.iter().zip(&m).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn sgd_is_minus_lr_times_gradient() {
        let mut p = vec![1.0f32, 2.0];
        update(
            &OptimConfig {
                kind: OptimizerKind::Sgd,
                ..Default::default()
            },
            &mut p,
            &[0.5, -1.0],
            &mut ParamState::default(),
            0.1,
        );
        assert_eq!(p, [0.95, 2.1]);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let (mut a, mut b) = (vec![3.0f32], vec![4.0f32]);
        let n = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
        assert_eq!(n, 5.0);
        assert!((a[0] - 0.6).abs() < 1e-6 && (b[0] - 0.8).abs() < 1e-6);
        let n = clip_grad_norm(&mut [&mut a, &mut b], 0.0);
        assert!(
            (n - 1.0).abs() < 1e-6,
            "0 turns clipping off but still reports the norm"
        );
    }

    #[test]
    fn schedules_match_hf() {
        let w = Schedule::warmup_steps(100, 0.1);
        assert_eq!(w, 10);
        assert_eq!(Schedule::Linear.factor(5, 100, w), 0.5);
        assert_eq!(Schedule::Linear.factor(10, 100, w), 1.0);
        assert_eq!(Schedule::Linear.factor(55, 100, w), 0.5);
        assert_eq!(Schedule::Linear.factor(100, 100, w), 0.0);
        assert!((Schedule::Cosine.factor(55, 100, w) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::Constant.factor(99, 100, w), 1.0);
    }
}
