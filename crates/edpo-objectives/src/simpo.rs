//! SimPO, Simple Preference Optimisation (Meng et al., 2024; TRL's `CPOTrainer` with
//! `loss_type="simpo"`): a reference-free logistic loss on length-normalised log-probs with a
//! target margin γ.

use crate::math::{sigmoid, softplus};
use crate::term::PairTerm;

/// SimPO: `ℓ = −log σ(x)`, `x = β·lw/|y_w| − β·ll/|y_l| − γ`, `γ = γ_ratio·β`;
/// `∂ℓ/∂lw = −σ(−x)·β/|y_w|`, `∂ℓ/∂ll = σ(−x)·β/|y_l|`.
/// Rewards `β·lw/|y_w|`, `β·ll/|y_l|`.
pub(crate) fn simpo(
    policy_chosen: &[f64],
    policy_rejected: &[f64],
    chosen_lengths: &[usize],
    rejected_lengths: &[usize],
    beta: f64,
    gamma_ratio: f64,
) -> Vec<PairTerm> {
    (0..policy_chosen.len())
        .map(|i| {
            let (len_w, len_l) = (chosen_lengths[i] as f64, rejected_lengths[i] as f64);
            let chosen = beta * policy_chosen[i] / len_w;
            let rejected = beta * policy_rejected[i] / len_l;
            let x = chosen - rejected - gamma_ratio * beta;
            let push = sigmoid(-x);
            PairTerm {
                loss: softplus(-x),
                d_chosen: -push * beta / len_w,
                d_rejected: push * beta / len_l,
                reward_chosen: chosen,
                reward_rejected: rejected,
            }
        })
        .collect()
}
