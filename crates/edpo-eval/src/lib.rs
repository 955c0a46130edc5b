//! Evaluation of a policy against its reference.
//!
//! # Overview
//! - [`sampling`]: seeded batched sampling (temperature, top-k, top-p, maximum length, EOS).
//! - [`kl`]: sequence KL(π‖π_ref) along responses, exact (the full-vocabulary KL at every
//!   response position, summed) and sampled (`Σ_t log π(y_t) − log π_ref(y_t)`).
//! - [`stats`]: win rates with ties counted ½, means with standard errors, Wilson intervals.
//! - [`judges`]: a policy's answers to AlpacaEval 2, Arena-Hard-Auto and MT-Bench questions,
//!   written in each judge's format.
//!
//! Depends on `edpo-model` for forward passes; knows nothing of objectives or configs, and of
//! files only the judges' question and answer formats.
//! Gold rewards are passed in as functions, so the same code serves every task.

pub mod gold;
pub mod judges;
pub mod kl;
pub mod sampling;
pub mod stats;

pub use kl::{sequence_kl, sequence_logp, SequenceKl};
pub use sampling::{sample, sample_uncached, SamplingSettings};
pub use stats::{mean_and_stderr, win_rate, win_scores, WinRate};

/// Everything that can go wrong while evaluating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From a forward pass.
    #[error(transparent)]
    Model(#[from] edpo_model::Error),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Inconsistent inputs.
    #[error("invalid evaluation input: {0}")]
    Input(String),
    /// From reading data, tokenising or rendering a chat template.
    #[error(transparent)]
    Data(#[from] edpo_data::Error),
    /// A value could not be serialised.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
