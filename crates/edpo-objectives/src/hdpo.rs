//! H-DPO, entropy-controllable DPO (Omura et al., 2024, arXiv 2411.07595): the reverse KL of
//! DPO's objective split into entropy and cross-entropy, α on the entropy, so the implicit
//! reward is `β·(α·log π − log π_ref)` and the optimum `π* ∝ (π_ref·e^{r/β})^{1/α}`: α < 1
//! sharpens the policy (lower entropy), α > 1 flattens it, α = 1 is DPO. No official code is
//! published; the loss follows from the paper's objective.

use crate::math::{sigmoid, softplus};
use crate::term::PairTerm;
use crate::PairLogps;

/// H-DPO: `ℓ = −log σ(z)`, `z = αβ·(lw − ll) − β·(rw − rl)`; `∂ℓ/∂lw = −αβ·σ(−z) = −∂ℓ/∂ll`.
/// Rewards `β·(α·lw − rw)`, `β·(α·ll − rl)`.
pub(crate) fn hdpo(logps: &PairLogps<'_>, beta: f64, alpha: f64) -> Vec<PairTerm> {
    (0..logps.len())
        .map(|i| {
            let chosen = beta * (alpha * logps.policy_chosen[i] - logps.reference_chosen[i]);
            let rejected = beta * (alpha * logps.policy_rejected[i] - logps.reference_rejected[i]);
            let z = chosen - rejected;
            let push = alpha * beta * sigmoid(-z);
            PairTerm {
                loss: softplus(-z),
                d_chosen: -push,
                d_rejected: push,
                reward_chosen: chosen,
                reward_rejected: rejected,
            }
        })
        .collect()
}
