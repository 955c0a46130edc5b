//! χPO, χ²-regularised preference optimisation (Huang et al., 2024, arXiv 2407.13399,
//! Algorithm 1): DPO with the link `φ(z) = z + log z` of the ratio `z = π/π_ref` (the χ²
//! divergence plus KL) in place of `log z`, so a log-ratio `u` enters as `e^u + u`, and the
//! logit clipped to `[−2R_max, 2R_max]`. No official code is published; the experiments'
//! smoothed link (`exp(clip(α·u)) + γ·u`, the paper's appendix) is not this one.

use crate::math::{sigmoid, softplus};
use crate::term::PairTerm;
use crate::PairLogps;

/// χPO: `ℓ = −log σ(clip(d, −2R_max, 2R_max))`, `d = β·(e^{u_w} + u_w) − β·(e^{u_l} + u_l)`,
/// `u = log π − log π_ref`; inside the clip `∂ℓ/∂lw = −β·σ(−d)·(e^{u_w} + 1)`,
/// `∂ℓ/∂ll = β·σ(−d)·(e^{u_l} + 1)`, and 0 where the clip binds.
/// Rewards `β·(e^{u_w} + u_w)`, `β·(e^{u_l} + u_l)`.
pub(crate) fn chipo(logps: &PairLogps<'_>, beta: f64, r_max: f64) -> Vec<PairTerm> {
    (0..logps.len())
        .map(|i| {
            let uw = logps.policy_chosen[i] - logps.reference_chosen[i];
            let ul = logps.policy_rejected[i] - logps.reference_rejected[i];
            let (chosen, rejected) = (beta * (uw.exp() + uw), beta * (ul.exp() + ul));
            let d = chosen - rejected;
            let bound = 2.0 * r_max;
            let clipped = d.clamp(-bound, bound);
            // torch.clamp passes the gradient only strictly inside (and at) the bounds.
            let free = f64::from(u8::from(d.abs() <= bound));
            let push = beta * sigmoid(-clipped) * free;
            PairTerm {
                loss: softplus(-clipped),
                d_chosen: -push * (uw.exp() + 1.0),
                d_rejected: push * (ul.exp() + 1.0),
                reward_chosen: chosen,
                reward_rejected: rejected,
            }
        })
        .collect()
}
