//! TDPO, token-level DPO (Zeng et al., 2024, arXiv 2404.11999): DPO's margin corrected by the
//! difference of the two responses' *sequential* KL divergences
//! `D_SeqKL(x, y) = Σ_t KL(π_ref(·|x, y_<t) ‖ π_θ(·|x, y_<t))` (full vocabulary, summed over the
//! response's positions), which the trainer computes from both models' logits and hands in as
//! an input. Follows the official code (`Vance0124/Token-level-Direct-Preference-Optimization`,
//! `trainers.py`: `_tdpo_get_batch_logps` for the per-position KL, `tdpo_loss` for the loss):
//! with `u = log π − log π_ref` summed over the response,
//!
//! - TDPO1: `z = β·((u_w − u_l) − (K_l − K_w))`;
//! - TDPO2: `z = β·((u_w − u_l) − α·(K_l − sg(K_w)))`, the chosen response's KL detached;
//!
//! `ℓ = −log σ(z)`, rewards `β·(u_w + K_w)` and `β·(u_l + K_l)` (the official code's).

use crate::math::{sigmoid, softplus};
use crate::term::PairTerm;
use crate::PairLogps;

/// Which TDPO.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Variant {
    /// TDPO1: both KL terms carry gradient, weight 1.
    One,
    /// TDPO2: the rejected response's KL weighted by α, the chosen one's detached.
    Two {
        /// α.
        alpha: f64,
    },
}

/// One pair's TDPO term and the derivatives of its loss with respect to `K_w` and `K_l`.
///
/// `∂ℓ/∂lw = −β·σ(−z) = −∂ℓ/∂ll`; TDPO1: `∂ℓ/∂K_w = −β·σ(−z)`, `∂ℓ/∂K_l = β·σ(−z)`;
/// TDPO2: `∂ℓ/∂K_w = 0`, `∂ℓ/∂K_l = αβ·σ(−z)`.
pub(crate) fn tdpo(
    logps: &PairLogps<'_>,
    kl_chosen: &[f64],
    kl_rejected: &[f64],
    beta: f64,
    variant: Variant,
) -> (Vec<PairTerm>, Vec<[f64; 2]>) {
    (0..logps.len())
        .map(|i| {
            let uw = logps.policy_chosen[i] - logps.reference_chosen[i];
            let ul = logps.policy_rejected[i] - logps.reference_rejected[i];
            let (kw, kl) = (kl_chosen[i], kl_rejected[i]);
            let weight = match variant {
                Variant::One => 1.0,
                Variant::Two { alpha } => alpha,
            };
            let z = beta * ((uw - ul) - weight * (kl - kw));
            let push = beta * sigmoid(-z);
            let d_kl = match variant {
                Variant::One => [-push, push],
                Variant::Two { alpha } => [0.0, alpha * push],
            };
            (
                PairTerm {
                    loss: softplus(-z),
                    d_chosen: -push,
                    d_rejected: push,
                    reward_chosen: beta * (uw + kw),
                    reward_rejected: beta * (ul + kl),
                },
                d_kl,
            )
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_kls_give_dpo_and_tdpo1_is_tdpo2_at_alpha_one_in_value() {
        let logps = PairLogps {
            policy_chosen: &[-10.0, -12.0],
            policy_rejected: &[-11.0, -9.0],
            reference_chosen: &[-10.5, -11.0],
            reference_rejected: &[-10.0, -9.5],
        };
        let dpo = crate::dpo::dpo_terms(&logps, 0.1);
        let (same, _) = tdpo(&logps, &[0.3, 0.7], &[0.3, 0.7], 0.1, Variant::One);
        for (a, b) in dpo.iter().zip(&same) {
            assert!((a.loss - b.loss).abs() < 1e-15);
            assert!((a.d_chosen - b.d_chosen).abs() < 1e-15);
        }
        let (one, g1) = tdpo(&logps, &[0.3, 0.1], &[0.9, 2.0], 0.1, Variant::One);
        let (two, g2) = tdpo(
            &logps,
            &[0.3, 0.1],
            &[0.9, 2.0],
            0.1,
            Variant::Two { alpha: 1.0 },
        );
        for i in 0..2 {
            assert_eq!(one[i].loss, two[i].loss);
            assert_eq!(g1[i][1], g2[i][1]);
            assert_eq!(g2[i][0], 0.0);
            // A larger rejected KL lowers the logit, so the loss is above DPO's.
            assert!(one[i].loss > dpo[i].loss);
        }
    }
}
