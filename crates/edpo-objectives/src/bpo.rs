//! BPO, Bregman preference optimisation (Kim et al., 2025, arXiv 2505.19601): likelihood-ratio
//! estimation with a Bregman divergence `h`, of which DPO is the logistic instance. This is the
//! instance the paper recommends, SBA (scaled Basu's power divergence, its Table 2 and the code
//! of its Appendix C.1), on the model ratio `R = exp(−β·Δ)`, clamped below at `R_min` as the
//! paper's experiments do, with the scale `s = 4` that gives DPO's gradient at `R = 1`.

use crate::term::PairTerm;
use crate::PairLogps;

/// The SBA scale: `|∂ℓ/∂Δ| = β/2` at `R = 1`, as DPO's.
const SCALE: f64 = 4.0;

/// BPO (SBA): `ℓ = R^{λ+1}/(s·(λ+1)) − R^{−λ}/(s·λ)`, `R = max(e^{−β·Δ}, R_min)`, `s = 4`;
/// where the clamp is free `∂ℓ/∂lw = −(β/s)·(R^{λ+1} + R^{−λ}) = −∂ℓ/∂ll`, else 0. At λ = −½ the
/// loss is `√R`. Rewards `β·(lw − rw)`, `β·(ll − rl)`.
pub(crate) fn bpo(logps: &PairLogps<'_>, beta: f64, lambda: f64, r_min: f64) -> Vec<PairTerm> {
    (0..logps.len())
        .map(|i| {
            let raw = (-beta * logps.delta(i)).exp();
            let r = raw.max(r_min);
            let free = f64::from(u8::from(raw >= r_min));
            let (up, down) = (r.powf(lambda + 1.0), r.powf(-lambda));
            let slope = beta / SCALE * (up + down) * free;
            PairTerm {
                loss: up / (SCALE * (lambda + 1.0)) - down / (SCALE * lambda),
                d_chosen: -slope,
                d_rejected: slope,
                reward_chosen: beta * (logps.policy_chosen[i] - logps.reference_chosen[i]),
                reward_rejected: beta * (logps.policy_rejected[i] - logps.reference_rejected[i]),
            }
        })
        .collect()
}
