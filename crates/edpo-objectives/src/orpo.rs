//! ORPO, Odds-Ratio Preference Optimisation (Hong et al., 2024; TRL's `ORPOTrainer`): a
//! reference-free SFT loss plus a log-odds-ratio term on token-averaged log-probs.
//!
//! The NLL term is the per-pair token average `−lw/|y_w|`, averaged over pairs (TRL averages
//! over all chosen tokens of the batch instead).

use crate::math::{log1m_exp, sigmoid, softplus};
use crate::term::PairTerm;
use crate::{Error, PairLogps};

/// `log odds(p̄) = p̄ − log(1 − e^p̄)` for a token-averaged log-prob `p̄ < 0`.
fn log_odds(p: f64) -> f64 {
    p - log1m_exp(p)
}

/// `d log odds(p̄)/dp̄ = 1/(1 − e^p̄) = −1/expm1(p̄)`.
fn log_odds_slope(p: f64) -> f64 {
    -1.0 / p.exp_m1()
}

/// ORPO: `ℓ = −p̄_w − λ·log σ(u)`, `u = log odds(p̄_w) − log odds(p̄_l)`, `p̄ = log π/|y|`;
/// `∂ℓ/∂lw = −1/|y_w| − λ·σ(−u)/((1 − e^p̄_w)·|y_w|)`, `∂ℓ/∂ll = λ·σ(−u)/((1 − e^p̄_l)·|y_l|)`.
/// Rewards `p̄_w`, `p̄_l` (no β).
pub(crate) fn orpo(
    policy_chosen: &[f64],
    policy_rejected: &[f64],
    chosen_lengths: &[usize],
    rejected_lengths: &[usize],
    lambda: f64,
) -> Vec<PairTerm> {
    (0..policy_chosen.len())
        .map(|i| {
            let (len_w, len_l) = (chosen_lengths[i] as f64, rejected_lengths[i] as f64);
            let (pw, pl) = (policy_chosen[i] / len_w, policy_rejected[i] / len_l);
            let u = log_odds(pw) - log_odds(pl);
            let push = lambda * sigmoid(-u);
            PairTerm {
                loss: -pw + lambda * softplus(-u),
                d_chosen: (-1.0 - push * log_odds_slope(pw)) / len_w,
                d_rejected: push * log_odds_slope(pl) / len_l,
                reward_chosen: pw,
                reward_rejected: pl,
            }
        })
        .collect()
}

/// The odds `p/(1 − p)` need `p < 1`: every policy log-prob must be negative.
pub(crate) fn check_log_probs(
    logps: &PairLogps<'_>,
    chosen_lengths: &[usize],
    rejected_lengths: &[usize],
) -> Result<(), Error> {
    for (name, logps, lengths) in [
        ("policy_chosen", logps.policy_chosen, chosen_lengths),
        ("policy_rejected", logps.policy_rejected, rejected_lengths),
    ] {
        for (index, (&logp, &len)) in logps.iter().zip(lengths).enumerate() {
            let p = logp / len as f64;
            if p.is_nan() || p >= 0.0 {
                return Err(Error::Input {
                    name,
                    index,
                    value: logp,
                    message: "ORPO's odds need a negative log-prob",
                });
            }
        }
    }
    Ok(())
}
