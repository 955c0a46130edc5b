//! α-DPO, adaptive reward margin (Wu et al., 2024, arXiv 2410.10148; official code
//! `junkangwu/alpha-DPO`, `scripts/dpo_trainer.py`): SimPO's length-normalised logistic loss
//! whose margin adapts per pair to how far the policy has moved from the reference on it,
//! normalised by running batch statistics and held constant (stop-gradient).
//!
//! Per micro-batch, as the official code computes it:
//! 1. `M_i = (lw/|y_w| − ll/|y_l|) − (rw/|y_w| − rl/|y_l|)`;
//! 2. running estimates `μ ← 0.9·μ + 0.1·mean(M)`, `σ ← 0.9·σ + 0.1·std(M)` (sample standard
//!    deviation; both start at 0 with no bias correction, as in the official code, so the
//!    first batches' normalised margins are large);
//! 3. `z_i = β·(lw/|y_w| − ll/|y_l|) − γ − α·β·(M_i − μ)/σ`, `γ = γ_ratio·β`, the last term a
//!    constant; loss `−log σ(z_i)` averaged over the pairs.
//!
//! The statistics are updated by training batches only (the official code also updates them
//! on evaluation batches, where this harness never evaluates the objective). A micro-batch
//! needs at least two pairs (a standard deviation); where `σ` is 0 the normalised margin is
//! taken as 0 (the official code would divide by zero).

use crate::math::{mean, sample_std, sigmoid, softplus};
use crate::method::{non_negative, positive};
use crate::{batch_stats, check_lengths, Error, ObjectiveOutput, PairLogps};

/// The momentum of α-DPO's running estimates (fixed in the official code).
pub const ALPHA_DPO_MOMENTUM: f64 = 0.9;

/// α-DPO's hyper-parameters and running estimates `(μ, σ)` of the margin `M`.
#[derive(Debug, Clone, PartialEq)]
pub struct AlphaDpo {
    beta: f64,
    gamma_ratio: f64,
    alpha: f64,
    mean: f64,
    std: f64,
}

impl AlphaDpo {
    /// α-DPO with `β > 0`, `γ/β ≥ 0` and `α ≥ 0` (α = 0 is SimPO with a reference-free loss).
    pub fn new(beta: f64, gamma_ratio: f64, alpha: f64) -> Result<Self, Error> {
        positive("beta", beta)?;
        non_negative("gamma_ratio", gamma_ratio)?;
        non_negative("alpha", alpha)?;
        Ok(Self {
            beta,
            gamma_ratio,
            alpha,
            mean: 0.0,
            std: 0.0,
        })
    }

    /// β.
    pub fn beta(&self) -> f64 {
        self.beta
    }

    /// The running estimates `(μ, σ)`.
    pub fn estimates(&self) -> (f64, f64) {
        (self.mean, self.std)
    }

    /// One micro-batch: updates `(μ, σ)` from its margins, then returns its losses and
    /// derivatives, with the statistics of every objective (rewards `β·lw/|y_w|`,
    /// `β·ll/|y_l|`) and `alpha_dpo/mean`, `alpha_dpo/std`.
    pub fn step(
        &mut self,
        logps: &PairLogps<'_>,
        chosen_lengths: &[usize],
        rejected_lengths: &[usize],
    ) -> Result<ObjectiveOutput, Error> {
        logps.check()?;
        let n = logps.len();
        check_lengths("chosen_lengths", chosen_lengths, n)?;
        check_lengths("rejected_lengths", rejected_lengths, n)?;
        if n < 2 {
            return Err(Error::Input {
                name: "policy_chosen",
                index: 0,
                value: n as f64,
                message: "α-DPO's batch statistics need at least two pairs per micro-batch",
            });
        }
        let (mut pw, mut pl, mut margins) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        for i in 0..n {
            let (lw, ll) = (chosen_lengths[i] as f64, rejected_lengths[i] as f64);
            pw[i] = logps.policy_chosen[i] / lw;
            pl[i] = logps.policy_rejected[i] / ll;
            margins[i] = (pw[i] - pl[i])
                - (logps.reference_chosen[i] / lw - logps.reference_rejected[i] / ll);
        }
        let m = ALPHA_DPO_MOMENTUM;
        self.mean = m * self.mean + (1.0 - m) * mean(&margins);
        self.std = m * self.std + (1.0 - m) * sample_std(&margins);
        let gamma = self.gamma_ratio * self.beta;
        let (mut losses, mut grad_chosen, mut grad_rejected) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for i in 0..n {
            let normalised = if self.std > 0.0 {
                (margins[i] - self.mean) / self.std
            } else {
                0.0
            };
            let z = self.beta * (pw[i] - pl[i]) - gamma - self.alpha * self.beta * normalised;
            let push = sigmoid(-z) / n as f64;
            losses.push(softplus(-z));
            grad_chosen.push(-push * self.beta / chosen_lengths[i] as f64);
            grad_rejected.push(push * self.beta / rejected_lengths[i] as f64);
        }
        let rewards_chosen: Vec<f64> = pw.iter().map(|p| self.beta * p).collect();
        let rewards_rejected: Vec<f64> = pl.iter().map(|p| self.beta * p).collect();
        let betas = vec![self.beta; n];
        let mut stats = batch_stats(logps, &rewards_chosen, &rewards_rejected, &betas);
        stats.push(("alpha_dpo/mean", self.mean));
        stats.push(("alpha_dpo/std", self.std));
        Ok(ObjectiveOutput {
            losses,
            grad_policy_chosen: grad_chosen,
            grad_policy_rejected: grad_rejected,
            grad_sequence_kl: None,
            betas,
            stats,
        })
    }
}
