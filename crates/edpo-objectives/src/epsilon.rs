//! ε-DPO: KL penalty control by perturbing β, per pair (Lee et al., 2025, arXiv 2502.13177;
//! the authors' trainer is built on TRL 0.13's `DPOTrainer`).
//!
//! For each pair three preference log-ratios are compared: `h` under the policy, `h⁺` under
//! the policy estimated for the relaxed penalty `β/(1+ε)` (logits `(1+ε)·z − ε·r`), and `h⁻`
//! for the stronger penalty `β/(1−ε)` (logits `(1−ε)·z + ε·r`). Monotone confidence gives the
//! pair a step: `h⁺ > h > h⁻` → +1, `h⁻ > h > h⁺` → −1, otherwise 0 (strict comparisons), and
//! `β_i = β/(1 + ε·step)`. After each optimizer step the base β moves: `β ← β/(1 + ε·s̄)`.

use crate::dpo::dpo_with_betas;
use crate::{Error, ObjectiveOutput, PairLogps};

/// The three preference log-ratios of one pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerturbedRatios {
    /// `h = log π(y_w) − log π(y_l)` under the policy.
    pub h: f64,
    /// `h⁺` under the relaxed-penalty estimate.
    pub h_relaxed: f64,
    /// `h⁻` under the stronger-penalty estimate.
    pub h_stronger: f64,
}

/// The step of one pair: +1 (relax), −1 (strengthen) or 0 (not monotone). Ties give 0.
pub fn step_decision(r: &PerturbedRatios) -> i8 {
    if r.h_relaxed > r.h && r.h > r.h_stronger {
        1
    } else if r.h_stronger > r.h && r.h > r.h_relaxed {
        -1
    } else {
        0
    }
}

/// ε-DPO's loss for one batch at base coefficient `beta`: DPO with `β_i = β/(1 + ε·step_i)`.
/// Returns the output and the per-pair steps. Statistics follow the authors' trainer:
/// `kl/beta` (the base β used), `kl/avg_steps`, `kl/p_epsilon_steps`, `kl/n_epsilon_steps`.
pub fn epsilon_dpo(
    logps: &PairLogps<'_>,
    ratios: &[PerturbedRatios],
    beta: f64,
    epsilon: f64,
) -> Result<(ObjectiveOutput, Vec<i8>), Error> {
    logps.check()?;
    if ratios.len() != logps.len() {
        return Err(Error::Length {
            name: "ratios",
            found: ratios.len(),
            expected: logps.len(),
        });
    }
    check_parameters(beta, epsilon)?;
    let steps: Vec<i8> = ratios.iter().map(step_decision).collect();
    let betas = steps
        .iter()
        .map(|&s| beta / (1.0 + epsilon * f64::from(s)))
        .collect();
    let mut out = dpo_with_betas(logps, betas);
    let n = steps.len() as f64;
    let count = |v: i8| steps.iter().filter(|&&s| s == v).count() as f64 / n;
    out.stats.extend([
        ("kl/beta", beta),
        (
            "kl/avg_steps",
            steps.iter().map(|&s| f64::from(s)).sum::<f64>() / n,
        ),
        ("kl/p_epsilon_steps", count(1)),
        ("kl/n_epsilon_steps", count(-1)),
    ]);
    Ok((out, steps))
}

fn check_parameters(beta: f64, epsilon: f64) -> Result<(), Error> {
    if !(beta > 0.0 && beta.is_finite()) {
        return Err(Error::Parameter {
            name: "beta",
            value: beta,
            message: "must be positive and finite",
        });
    }
    if !(epsilon > 0.0 && epsilon < 1.0) {
        return Err(Error::Parameter {
            name: "epsilon",
            value: epsilon,
            message: "must lie in (0, 1)",
        });
    }
    Ok(())
}

/// ε-DPO's base coefficient and the steps seen since the last optimizer step.
///
/// Record the steps of every micro-batch with [`EpsilonBeta::record`]; after the optimizer
/// step call [`EpsilonBeta::update`], which applies `β ← β/(1 + ε·s̄)` with `s̄` the mean step
/// over every pair of that optimizer step (accumulation-aware), and starts a new window.
#[derive(Debug, Clone, PartialEq)]
pub struct EpsilonBeta {
    beta: f64,
    epsilon: f64,
    step_sum: f64,
    pairs: usize,
}

impl EpsilonBeta {
    /// Starts at base coefficient `beta`.
    pub fn new(beta: f64, epsilon: f64) -> Result<Self, Error> {
        check_parameters(beta, epsilon)?;
        Ok(Self {
            beta,
            epsilon,
            step_sum: 0.0,
            pairs: 0,
        })
    }

    /// The current base β.
    pub fn beta(&self) -> f64 {
        self.beta
    }

    /// The perturbation size ε.
    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// Adds one micro-batch's steps to the current optimizer step.
    pub fn record(&mut self, steps: &[i8]) {
        self.step_sum += steps.iter().map(|&s| f64::from(s)).sum::<f64>();
        self.pairs += steps.len();
    }

    /// Applies the update for the optimizer step just taken; returns `s̄`.
    pub fn update(&mut self) -> f64 {
        let mean_step = if self.pairs == 0 {
            0.0
        } else {
            self.step_sum / self.pairs as f64
        };
        self.beta /= 1.0 + self.epsilon * mean_step;
        self.step_sum = 0.0;
        self.pairs = 0;
        mean_step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_strict() {
        let r = |h_relaxed, h, h_stronger| PerturbedRatios {
            h,
            h_relaxed,
            h_stronger,
        };
        assert_eq!(step_decision(&r(2.0, 1.0, 0.0)), 1);
        assert_eq!(step_decision(&r(0.0, 1.0, 2.0)), -1);
        assert_eq!(step_decision(&r(1.0, 1.0, 0.0)), 0);
        assert_eq!(step_decision(&r(2.0, 1.0, 3.0)), 0);
    }

    #[test]
    fn base_beta_update_is_accumulation_aware() -> Result<(), Error> {
        let mut b = EpsilonBeta::new(0.1, 0.5)?;
        b.record(&[1, 1]);
        b.record(&[-1, 0]);
        assert_eq!(b.update(), 0.25);
        assert!((b.beta() - 0.1 / 1.125).abs() < 1e-15);
        assert_eq!(b.update(), 0.0);
        Ok(())
    }
}
