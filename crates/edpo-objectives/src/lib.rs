//! Preference-optimisation objectives as pure functions of sequence log-probs.
//!
//! # Overview
//! Every objective takes per-pair log-probs (policy and, where needed, reference) and returns
//! an [`ObjectiveOutput`]: the per-pair losses, the derivative of the *batch* loss (their mean)
//! with respect to each policy log-prob, the β actually used for each pair, and named
//! statistics. The training step turns the derivatives into parameter gradients by
//! back-propagating the surrogate `Σ_i (∂L/∂lw_i · lw_i + ∂L/∂ll_i · ll_i)` through the model,
//! which has exactly the gradient of `L`. So the losses are computed once, in f64, and can be
//! checked against PyTorch with no model at all.
//!
//! - [`dpo`]: `−log σ(β·Δ)` (Rafailov et al., 2023).
//! - [`epsilon_dpo`] and [`EpsilonBeta`]: ε-DPO's per-pair step decision, per-pair β and the
//!   base-β update (Lee et al., 2025, arXiv 2502.13177).
//!
//! Architecture invariant: this crate depends on nothing but `std`; it never sees a tensor, a
//! model or a file.

mod dpo;
mod epsilon;
pub mod math;

pub use dpo::dpo;
pub use epsilon::{epsilon_dpo, step_decision, EpsilonBeta, PerturbedRatios};

/// Sequence log-probs of a batch of pairs; every slice has one entry per pair.
#[derive(Debug, Clone, Copy)]
pub struct PairLogps<'a> {
    /// `log π_θ(y_w|x)`.
    pub policy_chosen: &'a [f64],
    /// `log π_θ(y_l|x)`.
    pub policy_rejected: &'a [f64],
    /// `log π_ref(y_w|x)`.
    pub reference_chosen: &'a [f64],
    /// `log π_ref(y_l|x)`.
    pub reference_rejected: &'a [f64],
}

impl PairLogps<'_> {
    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.policy_chosen.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.policy_chosen.is_empty()
    }

    /// DPO's logit `Δ_i = (lw − rw) − (ll − rl)` of pair `i`.
    pub fn delta(&self, i: usize) -> f64 {
        (self.policy_chosen[i] - self.reference_chosen[i])
            - (self.policy_rejected[i] - self.reference_rejected[i])
    }

    fn check(&self) -> Result<(), Error> {
        let n = self.len();
        if n == 0 {
            return Err(Error::Empty);
        }
        for (name, s) in [
            ("policy_rejected", self.policy_rejected),
            ("reference_chosen", self.reference_chosen),
            ("reference_rejected", self.reference_rejected),
        ] {
            if s.len() != n {
                return Err(Error::Length {
                    name,
                    found: s.len(),
                    expected: n,
                });
            }
        }
        Ok(())
    }
}

/// What an objective returns for one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectiveOutput {
    /// Per-pair losses; the batch loss is their mean.
    pub losses: Vec<f64>,
    /// `∂(mean loss)/∂ log π_θ(y_w|x)` for each pair.
    pub grad_policy_chosen: Vec<f64>,
    /// `∂(mean loss)/∂ log π_θ(y_l|x)` for each pair.
    pub grad_policy_rejected: Vec<f64>,
    /// The β each pair's loss used.
    pub betas: Vec<f64>,
    /// Named batch statistics (means over pairs), in a fixed order.
    pub stats: Vec<(&'static str, f64)>,
}

impl ObjectiveOutput {
    /// The batch loss: the mean of the per-pair losses.
    pub fn loss(&self) -> f64 {
        math::mean(&self.losses)
    }

    /// A statistic by name.
    pub fn stat(&self, name: &str) -> Option<f64> {
        self.stats.iter().find(|(k, _)| *k == name).map(|&(_, v)| v)
    }
}

/// Invalid objective inputs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// No pairs were given.
    #[error("an objective needs at least one pair")]
    Empty,
    /// Input slices disagree in length.
    #[error("`{name}` has {found} entries, expected {expected}")]
    Length {
        /// The slice at fault.
        name: &'static str,
        /// Its length.
        found: usize,
        /// The number of pairs.
        expected: usize,
    },
    /// A hyper-parameter is out of range.
    #[error("`{name}` = {value}: {message}")]
    Parameter {
        /// The parameter.
        name: &'static str,
        /// Its value.
        value: f64,
        /// The allowed range.
        message: &'static str,
    },
}

/// Reward statistics shared by the reference-based objectives, with per-pair `β_i`:
/// implicit rewards `β_i·(lw − rw)` and `β_i·(ll − rl)`, their margin and accuracy, and the
/// policy log-probs.
pub(crate) fn reward_stats(logps: &PairLogps<'_>, betas: &[f64]) -> Vec<(&'static str, f64)> {
    let n = logps.len();
    let chosen: Vec<f64> = (0..n)
        .map(|i| betas[i] * (logps.policy_chosen[i] - logps.reference_chosen[i]))
        .collect();
    let rejected: Vec<f64> = (0..n)
        .map(|i| betas[i] * (logps.policy_rejected[i] - logps.reference_rejected[i]))
        .collect();
    let margins: Vec<f64> = chosen.iter().zip(&rejected).map(|(c, r)| c - r).collect();
    let accuracies: Vec<f64> = chosen
        .iter()
        .zip(&rejected)
        .map(|(c, r)| f64::from(u8::from(c > r)))
        .collect();
    vec![
        ("rewards/chosen", math::mean(&chosen)),
        ("rewards/rejected", math::mean(&rejected)),
        ("rewards/margins", math::mean(&margins)),
        ("rewards/accuracies", math::mean(&accuracies)),
        ("logps/chosen", math::mean(logps.policy_chosen)),
        ("logps/rejected", math::mean(logps.policy_rejected)),
        ("beta/mean", math::mean(betas)),
        ("beta/std", math::std(betas)),
    ]
}
