//! CPO, Contrastive Preference Optimisation (Xu et al., 2024; TRL's `CPOTrainer`): a
//! reference-free DPO-like logistic loss plus an NLL term on the chosen response.
//!
//! The NLL term is on the *summed* chosen log-prob, as `docs/spec/baselines.md` writes it (TRL
//! averages the token cross-entropy instead).

use crate::math::{sigmoid, softplus};
use crate::term::PairTerm;

/// CPO: `ℓ = −log σ(β·(lw − ll)) − λ·lw`;
/// `∂ℓ/∂lw = −β·σ(−β·(lw − ll)) − λ`, `∂ℓ/∂ll = β·σ(−β·(lw − ll))`.
/// Rewards `β·lw`, `β·ll`.
pub(crate) fn cpo(
    policy_chosen: &[f64],
    policy_rejected: &[f64],
    beta: f64,
    lambda: f64,
) -> Vec<PairTerm> {
    policy_chosen
        .iter()
        .zip(policy_rejected)
        .map(|(&lw, &ll)| {
            let x = beta * (lw - ll);
            let push = beta * sigmoid(-x);
            PairTerm {
                loss: softplus(-x) - lambda * lw,
                d_chosen: -push - lambda,
                d_rejected: push,
                reward_chosen: beta * lw,
                reward_rejected: beta * ll,
            }
        })
        .collect()
}
