//! DPO losses over per-sequence log-probs (TRL's formulas), their gradients with respect to the
//! policy's log-probs, and the TRL metrics of a batch. The backward pass through the model starts from
//! these gradients.
use std::fmt;
use std::str::FromStr;

/// TRL's `loss_type`s that work on pairs of sequence log-probs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossType {
    /// −log σ(βΔ)·(1−ε) − log σ(−βΔ)·ε (DPO; ε = label smoothing)
    #[default]
    Sigmoid,
    /// relu(1 − βΔ) (SLiC)
    Hinge,
    /// (Δ − 1/(2β))² with per-token averaged log-probs (IPO)
    Ipo,
    /// (−log σ(βΔ)·(1−ε) + log σ(−βΔ)·ε) / (1−2ε) (robust DPO)
    Robust,
    /// −log σ(β·c − δ) − log σ(−(β·r − δ)), δ a running mean of the rewards (BCO, paired)
    BcoPair,
    /// (c − 1/(2β))² + (r + 1/(2β))² (SPPO, hard labels)
    SppoHard,
    /// −log σ(βc) − ½ log σ(−βc) − ½ log σ(−βr) (NCA, paired)
    NcaPair,
}

impl LossType {
    pub const ALL: [LossType; 7] = [
        LossType::Sigmoid,
        LossType::Hinge,
        LossType::Ipo,
        LossType::Robust,
        LossType::BcoPair,
        LossType::SppoHard,
        LossType::NcaPair,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Hinge => "hinge",
            LossType::Ipo => "ipo",
            LossType::Robust => "robust",
            LossType::BcoPair => "bco_pair",
            LossType::SppoHard => "sppo_hard",
            LossType::NcaPair => "nca_pair",
        }
    }
}

impl fmt::Display for LossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LossType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        LossType::ALL.into_iter().find(|l| l.name() == s).ok_or_else(|| {
            let names: Vec<&str> = LossType::ALL.iter().map(|l| l.name()).collect();
            format!("unknown loss `{s}` (expected one of {})", names.join(", "))
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct DpoConfig {
    pub loss: LossType,
    pub beta: f64,
    pub label_smoothing: f64,
    /// weight of the NLL of the chosen answers (MIA-DPO's gamma); 0 = plain DPO
    pub sft_weight: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            loss: LossType::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            sft_weight: 0.0,
        }
    }
}

/// Summed log-probs of one pair's responses (EOS included) and their token counts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairLogps {
    pub policy_chosen: f64,
    pub policy_rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
}

/// TRL's `RunningMoments` mean, the δ of `bco_pair` (updated once per batch with the mean reward).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunningMean {
    pub mean: f64,
    pub count: f64,
}

impl Default for RunningMean {
    fn default() -> Self {
        RunningMean {
            mean: 0.0,
            count: 1e-24,
        }
    }
}

impl RunningMean {
    fn update(&mut self, x: f64) {
        let total = self.count + 1.0;
        self.mean += (x - self.mean) / total;
        self.count = total;
    }
}

/// Loss, gradients and TRL metrics of one batch.
#[derive(Clone, Debug, PartialEq)]
pub struct DpoOutput {
    /// per pair, before averaging (without the SFT term)
    pub losses: Vec<f64>,
    /// mean over the batch + sft_weight · NLL(chosen)
    pub loss: f64,
    /// ∂loss/∂(summed policy log-prob) of each chosen / rejected response
    pub grad_chosen: Vec<f64>,
    pub grad_rejected: Vec<f64>,
    /// β·(π − ref) per pair
    pub rewards_chosen: Vec<f64>,
    pub rewards_rejected: Vec<f64>,
}

impl DpoOutput {
    fn mean(v: &[f64]) -> f64 {
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }
    pub fn rewards_chosen_mean(&self) -> f64 {
        Self::mean(&self.rewards_chosen)
    }
    pub fn rewards_rejected_mean(&self) -> f64 {
        Self::mean(&self.rewards_rejected)
    }
    /// share of pairs whose chosen reward beats the rejected one
    pub fn accuracy(&self) -> f64 {
        let wins = self
            .rewards_chosen
            .iter()
            .zip(&self.rewards_rejected)
            .filter(|(c, r)| c > r)
            .count();
        wins as f64 / self.rewards_chosen.len().max(1) as f64
    }
    pub fn margin(&self) -> f64 {
        self.rewards_chosen_mean() - self.rewards_rejected_mean()
    }
}

/// log σ(x), stable for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Losses and gradients of a batch. `running` is `bco_pair`'s reward mean, carried across steps (and
/// saved in checkpoints); the other losses leave it alone.
pub fn dpo_loss(cfg: &DpoConfig, pairs: &[PairLogps], running: &mut RunningMean) -> DpoOutput {
    let (b, ls, n) = (cfg.beta, cfg.label_smoothing, pairs.len() as f64);
    if cfg.loss == LossType::BcoPair && !pairs.is_empty() {
        let total: f64 = pairs
            .iter()
            .map(|p| b * (p.policy_chosen - p.ref_chosen) + b * (p.policy_rejected - p.ref_rejected))
            .sum();
        running.update(total / (2.0 * n));
    }
    let delta = running.mean;
    let (mut losses, mut gc, mut gr) = (Vec::new(), Vec::new(), Vec::new());
    for p in pairs {
        let c = p.policy_chosen - p.ref_chosen; // chosen log-ratio
        let r = p.policy_rejected - p.ref_rejected; // rejected log-ratio
        let d = c - r;
        // (loss, ∂loss/∂c, ∂loss/∂r) of this pair
        let (l, dc, dr) = match cfg.loss {
            LossType::Sigmoid => {
                let l = -log_sigmoid(b * d) * (1.0 - ls) - log_sigmoid(-b * d) * ls;
                let g = -b * (1.0 - ls) * sigmoid(-b * d) + b * ls * sigmoid(b * d);
                (l, g, -g)
            }
            LossType::Robust => {
                let l = (-log_sigmoid(b * d) * (1.0 - ls) + log_sigmoid(-b * d) * ls) / (1.0 - 2.0 * ls);
                let g = (-b * (1.0 - ls) * sigmoid(-b * d) - b * ls * sigmoid(b * d)) / (1.0 - 2.0 * ls);
                (l, g, -g)
            }
            LossType::Hinge => {
                let m = 1.0 - b * d;
                if m > 0.0 {
                    (m, -b, b)
                } else {
                    (0.0, 0.0, 0.0)
                }
            }
            LossType::Ipo => {
                // log-probs averaged per token: Δ = (c_sum / n_c) − (r_sum / n_r)
                let (nc, nr) = (p.chosen_tokens.max(1) as f64, p.rejected_tokens.max(1) as f64);
                let da = c / nc - r / nr;
                let e = da - 1.0 / (2.0 * b);
                (e * e, 2.0 * e / nc, -2.0 * e / nr)
            }
            LossType::BcoPair => {
                let (x, y) = (b * c - delta, -(b * r - delta));
                (
                    -log_sigmoid(x) - log_sigmoid(y),
                    -b * sigmoid(-x),
                    b * sigmoid(-y),
                )
            }
            LossType::SppoHard => {
                let (x, y) = (c - 0.5 / b, r + 0.5 / b);
                (x * x + y * y, 2.0 * x, 2.0 * y)
            }
            LossType::NcaPair => {
                let (x, y) = (b * c, b * r);
                let l = -log_sigmoid(x) - 0.5 * log_sigmoid(-x) - 0.5 * log_sigmoid(-y);
                (l, -b * sigmoid(-x) + 0.5 * b * sigmoid(x), 0.5 * b * sigmoid(y))
            }
        };
        losses.push(l);
        gc.push(dc / n);
        gr.push(dr / n);
    }
    let mut loss = DpoOutput::mean(&losses);
    if cfg.sft_weight != 0.0 && !pairs.is_empty() {
        // NLL of the chosen answers: mean over every chosen token of the batch (cross-entropy mean)
        let tokens: usize = pairs.iter().map(|p| p.chosen_tokens).sum::<usize>().max(1);
        loss += cfg.sft_weight * -pairs.iter().map(|p| p.policy_chosen).sum::<f64>() / tokens as f64;
        gc.iter_mut().for_each(|g| *g -= cfg.sft_weight / tokens as f64);
    }
    DpoOutput {
        losses,
        loss,
        grad_chosen: gc,
        grad_rejected: gr,
        rewards_chosen: pairs
            .iter()
            .map(|p| b * (p.policy_chosen - p.ref_chosen))
            .collect(),
        rewards_rejected: pairs
            .iter()
            .map(|p| b * (p.policy_rejected - p.ref_rejected))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs() -> Vec<PairLogps> {
        vec![
            PairLogps {
                policy_chosen: -12.0,
                policy_rejected: -15.5,
                ref_chosen: -13.0,
                ref_rejected: -14.0,
                chosen_tokens: 7,
                rejected_tokens: 9,
            },
            PairLogps {
                policy_chosen: -30.0,
                policy_rejected: -20.0,
                ref_chosen: -29.0,
                ref_rejected: -21.5,
                chosen_tokens: 12,
                rejected_tokens: 5,
            },
        ]
    }

    /// Every loss's analytic gradient against central differences of its loss.
    #[test]
    fn gradients_match_finite_differences() {
        // bco_pair's δ moves with the policy in this forward (TRL detaches it): its own test below
        for loss in LossType::ALL.into_iter().filter(|&l| l != LossType::BcoPair) {
            for (ls, sft) in [(0.0, 0.0), (0.1, 0.5)] {
                if ls > 0.0 && !matches!(loss, LossType::Sigmoid | LossType::Robust) {
                    continue;
                }
                let cfg = DpoConfig {
                    loss,
                    beta: 0.3,
                    label_smoothing: ls,
                    sft_weight: sft,
                };
                let ps = pairs();
                let out = dpo_loss(
                    &cfg,
                    &ps,
                    &mut RunningMean {
                        mean: 0.05,
                        count: 3.0,
                    },
                );
                let h = 1e-6;
                for i in 0..ps.len() {
                    for which in 0..2 {
                        let eval = |dx: f64| {
                            let mut q = ps.clone();
                            if which == 0 {
                                q[i].policy_chosen += dx
                            } else {
                                q[i].policy_rejected += dx
                            }
                            dpo_loss(
                                &cfg,
                                &q,
                                &mut RunningMean {
                                    mean: 0.05,
                                    count: 3.0,
                                },
                            )
                            .loss
                        };
                        let fd = (eval(h) - eval(-h)) / (2.0 * h);
                        let an = if which == 0 {
                            out.grad_chosen[i]
                        } else {
                            out.grad_rejected[i]
                        };
                        assert!(
                            (fd - an).abs() < 1e-6 * (1.0 + an.abs()),
                            "{loss} ls={ls} pair {i} which {which}: fd {fd} vs {an}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bco_pair_gradient_with_delta_held() {
        let cfg = DpoConfig {
            loss: LossType::BcoPair,
            beta: 0.3,
            ..Default::default()
        };
        let ps = pairs();
        // a huge count keeps δ where it is, as TRL's detach does for the gradient
        let held = RunningMean {
            mean: 0.05,
            count: 1e30,
        };
        let out = dpo_loss(&cfg, &ps, &mut held.clone());
        let h = 1e-6;
        let eval = |dx: f64| {
            let mut q = ps.clone();
            q[0].policy_rejected += dx;
            dpo_loss(&cfg, &q, &mut held.clone()).loss
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h);
        assert!(
            (fd - out.grad_rejected[0]).abs() < 1e-6,
            "{fd} vs {}",
            out.grad_rejected[0]
        );
    }

    #[test]
    fn zero_logit_gives_ln2() {
        let p = PairLogps {
            policy_chosen: -3.0,
            policy_rejected: -4.0,
            ref_chosen: -3.0,
            ref_rejected: -4.0,
            chosen_tokens: 2,
            rejected_tokens: 2,
        };
        let out = dpo_loss(&DpoConfig::default(), &[p], &mut RunningMean::default());
        assert!((out.loss - std::f64::consts::LN_2).abs() < 1e-15);
        assert_eq!(out.accuracy(), 0.0);
    }

    #[test]
    fn loss_names_round_trip() {
        for l in LossType::ALL {
            assert_eq!(l.name().parse::<LossType>().unwrap(), l);
        }
        assert!("kto".parse::<LossType>().unwrap_err().contains("sigmoid"));
    }
}
