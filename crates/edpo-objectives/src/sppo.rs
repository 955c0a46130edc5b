//! SPPO with hard labels (Wu et al., 2024, arXiv 2405.00675; TRL's `loss_type="sppo_hard"`):
//! each response's log-ratio regressed on its target `±η/2` with `η = 1/β` — the winner's
//! preference probability taken as 1, the loser's as 0. As TRL, the two squares are summed
//! (the official SPPO code averages them) and the reference is the run's fixed reference (in
//! SPPO's self-play it is the previous iterate).

use crate::term::PairTerm;
use crate::PairLogps;

/// SPPO (hard): `ℓ = (u_w − 1/(2β))² + (u_l + 1/(2β))²`, `u = log π − log π_ref`;
/// `∂ℓ/∂lw = 2·(u_w − 1/(2β))`, `∂ℓ/∂ll = 2·(u_l + 1/(2β))`. Rewards `β·u_w`, `β·u_l`.
pub(crate) fn sppo_hard(logps: &PairLogps<'_>, beta: f64) -> Vec<PairTerm> {
    let target = 1.0 / (2.0 * beta);
    (0..logps.len())
        .map(|i| {
            let uw = logps.policy_chosen[i] - logps.reference_chosen[i];
            let ul = logps.policy_rejected[i] - logps.reference_rejected[i];
            let (ew, el) = (uw - target, ul + target);
            PairTerm {
                loss: ew * ew + el * el,
                d_chosen: 2.0 * ew,
                d_rejected: 2.0 * el,
                reward_chosen: beta * uw,
                reward_rejected: beta * ul,
            }
        })
        .collect()
}
