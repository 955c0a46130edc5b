//! Hinge losses: RSO's hinge on the DPO logit (Liu et al., 2024; TRL `loss_type="hinge"`) and
//! reference-free SLiC-HF (Zhao et al., 2023).
//!
//! The subgradient at a kink is taken as 0, as `torch.relu` does.

use crate::term::PairTerm;
use crate::PairLogps;

/// 1 where the hinge is active (`arg > 0`), else 0 (so 0 at the kink, as `torch.relu`).
fn active(arg: f64) -> f64 {
    f64::from(u8::from(arg > 0.0))
}

/// Hinge: `ℓ = max(0, 1 − β·Δ)`; `∂ℓ/∂lw = −β·[1 − β·Δ > 0] = −∂ℓ/∂ll`.
/// Rewards `β·(lw − rw)`, `β·(ll − rl)`.
pub(crate) fn hinge(logps: &PairLogps<'_>, beta: f64) -> Vec<PairTerm> {
    (0..logps.len())
        .map(|i| {
            let arg = 1.0 - beta * logps.delta(i);
            let slope = beta * active(arg);
            PairTerm {
                loss: arg.max(0.0),
                d_chosen: -slope,
                d_rejected: slope,
                reward_chosen: beta * (logps.policy_chosen[i] - logps.reference_chosen[i]),
                reward_rejected: beta * (logps.policy_rejected[i] - logps.reference_rejected[i]),
            }
        })
        .collect()
}

/// SLiC-HF, reference-free: `ℓ = max(0, δ − lw + ll) − λ·lw`;
/// `∂ℓ/∂lw = −[δ − lw + ll > 0] − λ`, `∂ℓ/∂ll = [δ − lw + ll > 0]`.
/// Rewards are the policy log-probs `lw`, `ll` (no β).
pub(crate) fn slic(
    policy_chosen: &[f64],
    policy_rejected: &[f64],
    delta: f64,
    lambda: f64,
) -> Vec<PairTerm> {
    policy_chosen
        .iter()
        .zip(policy_rejected)
        .map(|(&lw, &ll)| {
            let arg = delta - lw + ll;
            let slope = active(arg);
            PairTerm {
                loss: arg.max(0.0) - lambda * lw,
                d_chosen: -slope - lambda,
                d_rejected: slope,
                reward_chosen: lw,
                reward_rejected: ll,
            }
        })
        .collect()
}
