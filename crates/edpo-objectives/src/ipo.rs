//! IPO, Identity Preference Optimisation (Azar et al., 2024; TRL `loss_type="ipo"`).
//!
//! The loss regresses the preference logit onto `1/(2β)` instead of pushing it to infinity.
//! Rewards are `β·(lw − rw)`, `β·(ll − rl)` on the summed log-probs in both forms.

use crate::term::PairTerm;
use crate::PairLogps;

/// The pair term of `ℓ = (d − 1/(2β))²` given `d` and `∂d/∂lw`, `∂d/∂ll`.
fn ipo_term(
    logps: &PairLogps<'_>,
    i: usize,
    beta: f64,
    d: f64,
    dd_dlw: f64,
    dd_dll: f64,
) -> PairTerm {
    let residual = d - 1.0 / (2.0 * beta);
    PairTerm {
        loss: residual * residual,
        d_chosen: 2.0 * residual * dd_dlw,
        d_rejected: 2.0 * residual * dd_dll,
        reward_chosen: beta * (logps.policy_chosen[i] - logps.reference_chosen[i]),
        reward_rejected: beta * (logps.policy_rejected[i] - logps.reference_rejected[i]),
    }
}

/// IPO as in its paper, on summed log-probs: `ℓ = (Δ − 1/(2β))²`;
/// `∂ℓ/∂lw = 2·(Δ − 1/(2β)) = −∂ℓ/∂ll`.
pub(crate) fn ipo(logps: &PairLogps<'_>, beta: f64) -> Vec<PairTerm> {
    (0..logps.len())
        .map(|i| ipo_term(logps, i, beta, logps.delta(i), 1.0, -1.0))
        .collect()
}

/// IPO as TRL computes it, on token-averaged log-probs (policy and reference divided by the
/// same lengths): `ℓ = (Δ̄ − 1/(2β))²`, `Δ̄ = (lw/|y_w| − rw/|y_w|) − (ll/|y_l| − rl/|y_l|)`;
/// `∂ℓ/∂lw = 2·(Δ̄ − 1/(2β))/|y_w|`, `∂ℓ/∂ll = −2·(Δ̄ − 1/(2β))/|y_l|`.
pub(crate) fn ipo_averaged(
    logps: &PairLogps<'_>,
    chosen_lengths: &[usize],
    rejected_lengths: &[usize],
    beta: f64,
) -> Vec<PairTerm> {
    (0..logps.len())
        .map(|i| {
            let (len_w, len_l) = (chosen_lengths[i] as f64, rejected_lengths[i] as f64);
            let d = (logps.policy_chosen[i] / len_w - logps.reference_chosen[i] / len_w)
                - (logps.policy_rejected[i] / len_l - logps.reference_rejected[i] / len_l);
            ipo_term(logps, i, beta, d, 1.0 / len_w, -1.0 / len_l)
        })
        .collect()
}
