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
//! Notation: `lw = log π_θ(y_w|x)`, `ll = log π_θ(y_l|x)` (sums over response tokens), `rw`,
//! `rl` the same under `π_ref`, `|y|` a response's length in tokens,
//! `Δ = (lw − rw) − (ll − rl)`.
//!
//! - [`dpo`]: `−log σ(β·Δ)` (Rafailov et al., 2023).
//! - [`epsilon_dpo`] and [`EpsilonBeta`]: ε-DPO's per-pair step decision, per-pair β and the
//!   base-β update (Lee et al., 2025, arXiv 2502.13177).
//! - [`evaluate`] with a [`Method`] and [`PairInputs`]: the stateless baselines of
//!   `docs/spec/baselines.md`, each with an optional SFT term `λ_sft·(−lw/|y_w|)`:
//!   - with a reference: `dpo`, `cdpo` (conservative DPO), `rdpo` (robust DPO), `ipo`,
//!     `hinge` (RSO), `rdpo_len` (length-regularised R-DPO), `kto` (paired KTO, which also
//!     reads the mismatched-pair log-ratios for its KL estimate);
//!   - reference-free: `slic` (SLiC-HF), `simpo`, `cpo`, `orpo`;
//!   - the related objectives of the ε-DPO literature: `odpo` (ODPO, which also reads the
//!     responses' scores), `hdpo` (H-DPO), `chipo` (χPO),
//!     `sppo_hard` (SPPO with hard labels), `bpo` (BPO's SBA instance), and reference-free
//!     `repo` (RePO); `tdpo1` and `tdpo2` (TDPO), which also read each response's sequential
//!     KL ([`SequenceKl`]) and return the loss's derivatives with respect to it.
//! - [`BetaDpo`]: β-DPO (Wu et al., 2024), whose batch-level β and data filter carry running
//!   estimates from batch to batch, so it is a stateful struct rather than a [`Method`];
//!   [`AlphaDpo`] (α-DPO, adaptive reward margin) likewise carries running statistics of its
//!   margins.
//!
//! - [`catalogue`]: every objective a run can use ([`CATALOGUE`]: config name, label,
//!   parameters and defaults), the one [`Objective`] type the trainer runs, and what each
//!   needs from the model ([`Needs`]).
//!
//! Input rule: a method reads only what it needs ([`Method::needs_reference`],
//! [`Method::needs_lengths`], [`Method::needs_kl_logratios`]); what it does not read may be
//! empty and is not checked, what it reads must have one entry per pair (KTO's mismatched-pair
//! log-ratios: at least one).
//!
//! Architecture invariant: this crate depends on nothing but `std`; it never sees a tensor, a
//! model or a file.

mod alpha_dpo;
mod beta_dpo;
mod bpo;
pub mod catalogue;
mod chipo;
mod cpo;
mod dpo;
mod epsilon;
mod evaluate;
mod hdpo;
mod hinge;
mod ipo;
mod kto;
pub mod math;
mod method;
mod odpo;
mod orpo;
mod repo;
mod simpo;
mod sppo;
mod tdpo;
mod term;

pub use alpha_dpo::{AlphaDpo, ALPHA_DPO_MOMENTUM};
pub use beta_dpo::{BetaDpo, BetaDpoReport};
pub use catalogue::{Needs, Objective, CATALOGUE};
pub use dpo::dpo;
pub use epsilon::{epsilon_dpo, step_decision, EpsilonBeta, PerturbedRatios};
pub use evaluate::{add_sft, evaluate, PairInputs, ResponseScores, SequenceKl};
pub use method::Method;

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

    /// Checks every slice, reference included.
    fn check(&self) -> Result<(), Error> {
        self.check_policy()?;
        check_len("reference_chosen", self.reference_chosen, self.len())?;
        check_len("reference_rejected", self.reference_rejected, self.len())
    }

    /// Checks the policy slices only (reference-free methods never read the reference).
    fn check_policy(&self) -> Result<(), Error> {
        if self.is_empty() {
            return Err(Error::Empty);
        }
        check_len("policy_rejected", self.policy_rejected, self.len())
    }
}

fn check_len<T>(name: &'static str, s: &[T], expected: usize) -> Result<(), Error> {
    if s.len() == expected {
        Ok(())
    } else {
        Err(Error::Length {
            name,
            found: s.len(),
            expected,
        })
    }
}

/// Response lengths: one per pair, each at least one token.
fn check_lengths(name: &'static str, lengths: &[usize], expected: usize) -> Result<(), Error> {
    check_len(name, lengths, expected)?;
    match lengths.iter().position(|&len| len == 0) {
        Some(index) => Err(Error::Input {
            name,
            index,
            value: 0.0,
            message: "a response needs at least one token",
        }),
        None => Ok(()),
    }
}

/// What an objective returns for one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectiveOutput {
    /// The losses of the pairs that enter the batch loss, which is their mean: one per pair,
    /// except for β-DPO, whose filtered-out pairs do not enter it and are left out here (the
    /// kept pairs' losses, in ascending pair order; see [`BetaDpoReport`]).
    pub losses: Vec<f64>,
    /// `∂(mean loss)/∂ log π_θ(y_w|x)` for each pair of the batch (0 for a pair β-DPO filters
    /// out).
    pub grad_policy_chosen: Vec<f64>,
    /// `∂(mean loss)/∂ log π_θ(y_l|x)` for each pair of the batch.
    pub grad_policy_rejected: Vec<f64>,
    /// `[∂(mean loss)/∂K_w, ∂(mean loss)/∂K_l]` per pair, with `K` a response's sequential KL
    /// (see [`SequenceKl`]), for the objectives that read it (TDPO); `None` for the others.
    pub grad_sequence_kl: Option<Vec<[f64; 2]>>,
    /// The β each pair's loss used, one per pair; empty for the methods without a β (`slic`,
    /// `orpo`), which then log no `beta/*` statistics either.
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
    /// A per-pair input is out of range.
    #[error("`{name}[{index}]` = {value}: {message}")]
    Input {
        /// The input slice.
        name: &'static str,
        /// The pair.
        index: usize,
        /// Its value.
        value: f64,
        /// The allowed range.
        message: &'static str,
    },
    /// An input the method reads was not given.
    #[error("`{method}` needs `{name}`")]
    Missing {
        /// The input.
        name: &'static str,
        /// The method.
        method: &'static str,
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
    batch_stats(logps, &chosen, &rejected, betas)
}

/// The statistics every objective logs, from its own per-pair rewards: `rewards/chosen`,
/// `rewards/rejected`, `rewards/margins` (mean of chosen − rejected), `rewards/accuracies`
/// (fraction with chosen > rejected, strict), `logps/chosen`, `logps/rejected` (policy), and
/// `beta/mean`, `beta/std` (population) unless `betas` is empty.
pub(crate) fn batch_stats(
    logps: &PairLogps<'_>,
    chosen: &[f64],
    rejected: &[f64],
    betas: &[f64],
) -> Vec<(&'static str, f64)> {
    let margins: Vec<f64> = chosen.iter().zip(rejected).map(|(c, r)| c - r).collect();
    let accuracies: Vec<f64> = chosen
        .iter()
        .zip(rejected)
        .map(|(c, r)| f64::from(u8::from(c > r)))
        .collect();
    let mut stats = vec![
        ("rewards/chosen", math::mean(chosen)),
        ("rewards/rejected", math::mean(rejected)),
        ("rewards/margins", math::mean(&margins)),
        ("rewards/accuracies", math::mean(&accuracies)),
        ("logps/chosen", math::mean(logps.policy_chosen)),
        ("logps/rejected", math::mean(logps.policy_rejected)),
    ];
    if !betas.is_empty() {
        stats.extend([
            ("beta/mean", math::mean(betas)),
            ("beta/std", math::std(betas)),
        ]);
    }
    stats
}
