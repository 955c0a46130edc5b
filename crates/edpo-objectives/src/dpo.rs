//! Direct Preference Optimization (Rafailov et al., 2023; TRL `loss_type="sigmoid"`) and the
//! variants that only reshape its logistic loss in `β·Δ`: conservative DPO (Mitchell, 2023;
//! TRL's `label_smoothing`), robust DPO (Chowdhury et al., 2024; TRL `loss_type="robust"`)
//! and length-regularised R-DPO (Park et al., 2024).
//!
//! Every one of them is reference-based and rewards pairs with `β·(lw − rw)`, `β·(ll − rl)`.

use crate::math::{log_sigmoid, sigmoid, softplus};
use crate::term::PairTerm;
use crate::{reward_stats, Error, ObjectiveOutput, PairLogps};

/// DPO with a per-pair coefficient: `L = mean_i −log σ(β_i·Δ_i)`.
/// `∂L/∂lw_i = −β_i·σ(−β_i·Δ_i)/N` and `∂L/∂ll_i` its negative.
pub(crate) fn dpo_with_betas(logps: &PairLogps<'_>, betas: Vec<f64>) -> ObjectiveOutput {
    let n = logps.len();
    let mut losses = Vec::with_capacity(n);
    let mut grad_chosen = Vec::with_capacity(n);
    for (i, &beta) in betas.iter().enumerate() {
        let z = beta * logps.delta(i);
        losses.push(-log_sigmoid(z));
        grad_chosen.push(-beta * sigmoid(-z) / n as f64);
    }
    let grad_rejected = grad_chosen.iter().map(|g| -g).collect();
    let stats = reward_stats(logps, &betas);
    ObjectiveOutput {
        losses,
        grad_policy_chosen: grad_chosen,
        grad_policy_rejected: grad_rejected,
        grad_sequence_kl: None,
        betas,
        stats,
    }
}

/// DPO: `L = mean_i −log σ(β·Δ_i)`, `Δ = (lw − rw) − (ll − rl)`.
pub fn dpo(logps: &PairLogps<'_>, beta: f64) -> Result<ObjectiveOutput, Error> {
    logps.check()?;
    if !(beta > 0.0 && beta.is_finite()) {
        return Err(Error::Parameter {
            name: "beta",
            value: beta,
            message: "must be positive and finite",
        });
    }
    Ok(dpo_with_betas(logps, vec![beta; logps.len()]))
}

/// A reference-based pair term whose loss depends on `lw − ll` only through a scalar `x_i`,
/// given as `(loss(x), dloss/dx)`; `∂x/∂lw = −∂x/∂ll = dx_dlw`.
fn logit_terms(
    logps: &PairLogps<'_>,
    beta: f64,
    pair: impl Fn(usize) -> (f64, f64, f64),
) -> Vec<PairTerm> {
    (0..logps.len())
        .map(|i| {
            let (loss, dloss_dx, dx_dlw) = pair(i);
            PairTerm {
                loss,
                d_chosen: dloss_dx * dx_dlw,
                d_rejected: -dloss_dx * dx_dlw,
                reward_chosen: beta * (logps.policy_chosen[i] - logps.reference_chosen[i]),
                reward_rejected: beta * (logps.policy_rejected[i] - logps.reference_rejected[i]),
            }
        })
        .collect()
}

/// DPO per pair: `ℓ = −log σ(β·Δ)`; `∂ℓ/∂lw = −β·σ(−β·Δ) = −∂ℓ/∂ll`.
pub(crate) fn dpo_terms(logps: &PairLogps<'_>, beta: f64) -> Vec<PairTerm> {
    logit_terms(logps, beta, |i| {
        let x = beta * logps.delta(i);
        (softplus(-x), -sigmoid(-x), beta)
    })
}

/// Conservative DPO: `ℓ = −(1−ℓ_s)·log σ(x) − ℓ_s·log σ(−x)`, `x = β·Δ`;
/// `∂ℓ/∂x = −(1−ℓ_s)·σ(−x) + ℓ_s·σ(x)`, `∂x/∂lw = β = −∂x/∂ll`.
pub(crate) fn cdpo(logps: &PairLogps<'_>, beta: f64, label_smoothing: f64) -> Vec<PairTerm> {
    let ls = label_smoothing;
    logit_terms(logps, beta, |i| {
        let x = beta * logps.delta(i);
        let loss = (1.0 - ls) * softplus(-x) + ls * softplus(x);
        (loss, -(1.0 - ls) * sigmoid(-x) + ls * sigmoid(x), beta)
    })
}

/// Robust DPO (noisy labels): `ℓ = [−(1−ℓ_s)·log σ(x) + ℓ_s·log σ(−x)] / (1 − 2ℓ_s)`,
/// `x = β·Δ`; `∂ℓ/∂x = [−(1−ℓ_s)·σ(−x) − ℓ_s·σ(x)] / (1 − 2ℓ_s)`.
pub(crate) fn rdpo(logps: &PairLogps<'_>, beta: f64, label_smoothing: f64) -> Vec<PairTerm> {
    let ls = label_smoothing;
    let scale = 1.0 - 2.0 * ls;
    logit_terms(logps, beta, |i| {
        let x = beta * logps.delta(i);
        let loss = ((1.0 - ls) * softplus(-x) - ls * softplus(x)) / scale;
        let dloss_dx = (-(1.0 - ls) * sigmoid(-x) - ls * sigmoid(x)) / scale;
        (loss, dloss_dx, beta)
    })
}

/// R-DPO (length-regularised), as the R-DPO paper and the SimPO paper's table write it:
/// `ℓ = −log σ(β·Δ + α·|y_w| − α·|y_l|)`; `∂ℓ/∂lw = −β·σ(−x) = −∂ℓ/∂ll`. A positive α lowers
/// the loss, and so the push, of pairs whose chosen response is the longer one.
pub(crate) fn rdpo_len(
    logps: &PairLogps<'_>,
    chosen_lengths: &[usize],
    rejected_lengths: &[usize],
    beta: f64,
    alpha: f64,
) -> Vec<PairTerm> {
    logit_terms(logps, beta, |i| {
        let x = beta * logps.delta(i) + alpha * chosen_lengths[i] as f64
            - alpha * rejected_lengths[i] as f64;
        (softplus(-x), -sigmoid(-x), beta)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences() -> Result<(), Error> {
        let lw = [-10.0, -3.0];
        let ll = [-11.0, -2.0];
        let rw = [-10.5, -3.2];
        let rl = [-10.2, -2.5];
        let logps = PairLogps {
            policy_chosen: &lw,
            policy_rejected: &ll,
            reference_chosen: &rw,
            reference_rejected: &rl,
        };
        let out = dpo(&logps, 0.3)?;
        let h = 1e-6;
        for i in 0..2 {
            let mut lw2 = lw;
            lw2[i] += h;
            let up = dpo(
                &PairLogps {
                    policy_chosen: &lw2,
                    ..logps
                },
                0.3,
            )?
            .loss();
            assert!(((up - out.loss()) / h - out.grad_policy_chosen[i]).abs() < 1e-6);
        }
        Ok(())
    }
}
