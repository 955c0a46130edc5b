//! Direct Preference Optimization (Rafailov et al., 2023; TRL `loss_type="sigmoid"`).

use crate::math::{log_sigmoid, sigmoid};
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
