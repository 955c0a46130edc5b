//! RePO, ReLU-based preference optimisation (Wu et al., 2025, arXiv 2503.07426; official code
//! `junkangwu/RePO`, `scripts/simpo_trainer.py`, where `losses = F.relu(-logits)` with
//! `logits = pi_logratios - gamma_beta_ratio` on token-averaged log-probs): SimPO's
//! length-normalised margin under a hinge, reference-free and without β (SimPO's β → ∞ limit).
//! The official configs' `gamma_beta_ratio` is γ itself; their β only scales logged rewards.
//!
//! The subgradient at the kink is 0, as `torch.relu`'s.

use crate::term::PairTerm;

/// RePO: `ℓ = max(0, γ − (lw/|y_w| − ll/|y_l|))`; where the hinge is active
/// `∂ℓ/∂lw = −1/|y_w|`, `∂ℓ/∂ll = 1/|y_l|`, else 0. Rewards `lw/|y_w|`, `ll/|y_l|`.
pub(crate) fn repo(
    policy_chosen: &[f64],
    policy_rejected: &[f64],
    chosen_lengths: &[usize],
    rejected_lengths: &[usize],
    gamma: f64,
) -> Vec<PairTerm> {
    (0..policy_chosen.len())
        .map(|i| {
            let (len_w, len_l) = (chosen_lengths[i] as f64, rejected_lengths[i] as f64);
            let (chosen, rejected) = (policy_chosen[i] / len_w, policy_rejected[i] / len_l);
            let arg = gamma - (chosen - rejected);
            let on = f64::from(u8::from(arg > 0.0));
            PairTerm {
                loss: arg.max(0.0),
                d_chosen: -on / len_w,
                d_rejected: on / len_l,
                reward_chosen: chosen,
                reward_rejected: rejected,
            }
        })
        .collect()
}
