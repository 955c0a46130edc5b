//! KTO, Kahneman-Tversky Optimisation (Ethayarajh et al., 2024; TRL's `KTOTrainer`), on paired
//! data: every chosen response is a desirable example and every rejected one undesirable.
//!
//! The reference point `z₀` is TRL's batch KL estimate: the mean policy-minus-reference
//! log-ratio of mismatched prompt/completion pairs, clamped at 0 and treated as a constant.

use crate::math::{mean, sigmoid};
use crate::term::PairTerm;
use crate::PairLogps;

/// Paired KTO: `ℓ = ½·[w_d·(1 − σ(β·(lw − rw − z₀))) + w_u·(1 − σ(β·(z₀ − ll + rl)))]`,
/// `z₀ = max(0, mean(kl_logratios))`, so the batch mean is the mean over the 2N terms;
/// `∂ℓ/∂lw = −½·w_d·β·σ(x_w)·σ(−x_w)`, `∂ℓ/∂ll = ½·w_u·β·σ(x_l)·σ(−x_l)` with `x_w`, `x_l`
/// the two arguments. Rewards `β·(lw − rw)`, `β·(ll − rl)`. Returns the terms and `z₀`.
pub(crate) fn kto(
    logps: &PairLogps<'_>,
    kl_logratios: &[f64],
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
) -> (Vec<PairTerm>, f64) {
    let z0 = mean(kl_logratios).max(0.0);
    let terms = (0..logps.len())
        .map(|i| {
            let chosen_logratio = logps.policy_chosen[i] - logps.reference_chosen[i];
            let rejected_logratio = logps.policy_rejected[i] - logps.reference_rejected[i];
            let x_w = beta * (logps.policy_chosen[i] - logps.reference_chosen[i] - z0);
            let x_l = beta * (z0 - logps.policy_rejected[i] + logps.reference_rejected[i]);
            // 1 − σ(x) written as σ(−x), which keeps its digits for large x.
            let chosen = sigmoid(-x_w);
            let rejected = sigmoid(-x_l);
            PairTerm {
                loss: (desirable_weight * chosen + undesirable_weight * rejected) / 2.0,
                d_chosen: -desirable_weight * beta * sigmoid(x_w) * sigmoid(-x_w) / 2.0,
                d_rejected: undesirable_weight * beta * sigmoid(x_l) * sigmoid(-x_l) / 2.0,
                reward_chosen: beta * chosen_logratio,
                reward_rejected: beta * rejected_logratio,
            }
        })
        .collect();
    (terms, z0)
}
