//! ODPO, DPO with an offset (Amini et al., 2024, arXiv 2402.10571; official code
//! `rycolab/odpo`, `trainers.py::preference_loss`): the implicit reward margin must exceed an
//! offset that grows with how much better the chosen response is, by the two responses'
//! scores (a reward model's, a human rating's; the default task's gold rewards). The paper's
//! offset is `α·log(s_w − s_l)` (the code's default, which needs `s_w > s_l`); its ablation's
//! plain difference `α·(s_w − s_l)` is the other choice, defined for any pair.

use crate::math::{sigmoid, softplus};
use crate::term::PairTerm;
use crate::PairLogps;

/// ODPO: `ℓ = −log σ(β·Δ − Δ_r)`, `Δ_r = α·log(s_w − s_l)` (`log_offset`) or `α·(s_w − s_l)`;
/// `∂ℓ/∂lw = −β·σ(Δ_r − β·Δ) = −∂ℓ/∂ll`. Rewards `β·(lw − rw)`, `β·(ll − rl)`. The caller has
/// checked `s_w > s_l` for the log offset.
pub(crate) fn odpo(
    logps: &PairLogps<'_>,
    chosen_scores: &[f64],
    rejected_scores: &[f64],
    beta: f64,
    alpha: f64,
    log_offset: bool,
) -> Vec<PairTerm> {
    (0..logps.len())
        .map(|i| {
            let gap = chosen_scores[i] - rejected_scores[i];
            let offset = alpha * if log_offset { gap.ln() } else { gap };
            let z = beta * logps.delta(i) - offset;
            let push = beta * sigmoid(-z);
            PairTerm {
                loss: softplus(-z),
                d_chosen: -push,
                d_rejected: push,
                reward_chosen: beta * (logps.policy_chosen[i] - logps.reference_chosen[i]),
                reward_rejected: beta * (logps.policy_rejected[i] - logps.reference_rejected[i]),
            }
        })
        .collect()
}
