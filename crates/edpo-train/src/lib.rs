//! Optimisation for preference training: one training step from token ids to updated weights, AdamW with in-place updates, gradient clipping and learning-rate
//! schedules.
//!
//! # Overview
//! - [`schedule`]: warm-up then constant / linear / cosine decay, as `transformers` defines
//!   them (`get_*_schedule_with_warmup`).
//! - [`optim`]: [`AdamW`](optim::AdamW) (decoupled weight decay, PyTorch's update order) whose
//!   step mutates each parameter's storage in place; [`GradBuffers`](optim::GradBuffers) sums
//!   gradients over micro-batches and clips them by global norm.
//! - [`scoring`]: the forward passes of policy and reference over chosen and rejected
//!   sequences, computing exactly what the objective needs from the model
//!   ([`Objective::needs`](edpo_objectives::Objective::needs));
//! - [`trainer`]: [`Trainer`], one optimizer step: scoring, the objective with its running
//!   state (ε-DPO's base β, β-DPO's estimates, TR-DPO's reference), the backward pass of the
//!   surrogate whose gradient is the objective's, clipping, AdamW, the state update.
//!
//! The objectives themselves, their catalogue and what each needs live in `edpo-objectives`;
//! [`Objective`] is re-exported here.
//!
//! Depends on `edpo-model` (forward passes, log-probs), `edpo-objectives` (losses) and
//! `edpo-data` (tokenised pairs). Knows nothing of files or the command line.

pub mod optim;
pub mod schedule;
pub mod scoring;
pub mod sft;
mod state;
pub mod trainer;

pub use edpo_objectives::Objective;
pub use optim::{AdamW, AdamWConfig, GradBuffers};
pub use schedule::{Schedule, ScheduleKind};
pub use scoring::{reference_logps, score_pairs, PairScores, ReferenceSource};
pub use sft::SftTrainer;
pub use trainer::{StepReport, Trainer, TrainerConfig};

/// Everything that can go wrong in a training step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the model: a forward pass or inconsistent inputs.
    #[error(transparent)]
    Model(#[from] edpo_model::Error),
    /// From candle directly.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// From an objective: bad parameters or inputs.
    #[error(transparent)]
    Objective(#[from] edpo_objectives::Error),
    /// A loss or gradient is NaN or infinite.
    #[error("non-finite {what} at optimizer step {step}")]
    NonFinite {
        /// What went non-finite.
        what: &'static str,
        /// The optimizer step (0-based).
        step: usize,
    },
    /// An invalid setting.
    #[error("invalid setting: {0}")]
    Config(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
