//! One training step: forward passes of policy and reference over chosen and rejected
//! sequences, the objective, and the backward pass; and [`Trainer`], which adds gradient
//! accumulation, clipping, the schedule, AdamW and ε-DPO's base-β update in that order.
//!
//! Chosen and rejected sequences go through the model as one batch (chosen first), as TRL's
//! `concatenated_forward` does. The reference runs on plain tensors, so no graph is recorded
//! for it. Gradients come from back-propagating `Σ_i (∂L/∂lw_i · lw_i + ∂L/∂ll_i · ll_i)`:
//! the objective's derivatives (computed in f64) weight the policy's sequence log-probs.

use crate::optim::{ensure_finite, AdamW, AdamWConfig, GradBuffers};
use crate::schedule::Schedule;
use crate::{Error, Result};
use candle_core::Tensor;
use edpo_data::TokenizedPair;
use edpo_model::logprobs::{mixed_sequence_logps, response_logits, sum_per_sequence, token_logps};
use edpo_model::{CausalLm, SequenceBatch};
use edpo_objectives::{
    self as objectives, EpsilonBeta, ObjectiveOutput, PairLogps, PerturbedRatios,
};

/// The objective of a run, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// DPO at a fixed β.
    Dpo {
        /// KL coefficient.
        beta: f64,
    },
    /// ε-DPO starting at base coefficient `beta`.
    EpsilonDpo {
        /// Initial base KL coefficient.
        beta: f64,
        /// Perturbation size.
        epsilon: f64,
    },
}

/// Everything the objectives need about one micro-batch, plus the ε-DPO steps.
#[derive(Debug, Clone)]
pub struct PairScores {
    /// `log π_θ(y_w|x)` per pair.
    pub policy_chosen: Vec<f64>,
    /// `log π_θ(y_l|x)` per pair.
    pub policy_rejected: Vec<f64>,
    /// `log π_ref(y_w|x)` per pair.
    pub reference_chosen: Vec<f64>,
    /// `log π_ref(y_l|x)` per pair.
    pub reference_rejected: Vec<f64>,
    /// The three preference log-ratios per pair, when ε > 0 was requested.
    pub ratios: Option<Vec<PerturbedRatios>>,
}

impl PairScores {
    /// Borrowed view for the objectives.
    pub fn logps(&self) -> PairLogps<'_> {
        PairLogps {
            policy_chosen: &self.policy_chosen,
            policy_rejected: &self.policy_rejected,
            reference_chosen: &self.reference_chosen,
            reference_rejected: &self.reference_rejected,
        }
    }
}

/// The layout of a micro-batch: chosen sequences of every pair, then rejected ones.
fn pair_batch(pairs: &[TokenizedPair], pad_id: u32) -> Result<SequenceBatch> {
    let mut seqs: Vec<(&[u32], &[u32])> = Vec::with_capacity(2 * pairs.len());
    seqs.extend(
        pairs
            .iter()
            .map(|p| (p.prompt.as_slice(), p.chosen.as_slice())),
    );
    seqs.extend(
        pairs
            .iter()
            .map(|p| (p.prompt.as_slice(), p.rejected.as_slice())),
    );
    Ok(SequenceBatch::new(&seqs, pad_id)?)
}

struct Forward {
    scores: PairScores,
    /// The policy's sequence log-probs `(2B,)`, still in the autograd graph.
    policy_logps: Tensor,
}

fn forward(
    policy: &CausalLm,
    reference: &CausalLm,
    pairs: &[TokenizedPair],
    epsilon: Option<f64>,
) -> Result<Forward> {
    let n = pairs.len();
    let batch = pair_batch(pairs, 0)?;
    let policy_logits = response_logits(policy, &batch)?; // (N, V)
    let policy_logps = sum_per_sequence(&token_logps(&policy_logits, &batch)?, &batch)?; // (2B,)
    let reference_logits = response_logits(reference, &batch)?.detach();
    let reference_logps = sum_per_sequence(&token_logps(&reference_logits, &batch)?, &batch)?;
    let lp: Vec<f64> = policy_logps
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    let rp: Vec<f64> = reference_logps
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    let ratios = match epsilon {
        None => None,
        Some(eps) => {
            let e = eps as f32;
            let mixed = mixed_sequence_logps(
                &policy_logits,
                &reference_logits,
                &batch,
                &[(1.0, 0.0), (1.0 + e, -e), (1.0 - e, e)],
            )?;
            let ratio = |m: &Vec<f64>, i: usize| m[i] - m[n + i];
            Some(
                (0..n)
                    .map(|i| PerturbedRatios {
                        h: ratio(&mixed[0], i),
                        h_relaxed: ratio(&mixed[1], i),
                        h_stronger: ratio(&mixed[2], i),
                    })
                    .collect(),
            )
        }
    };
    Ok(Forward {
        scores: PairScores {
            policy_chosen: lp[..n].to_vec(),
            policy_rejected: lp[n..].to_vec(),
            reference_chosen: rp[..n].to_vec(),
            reference_rejected: rp[n..].to_vec(),
            ratios,
        },
        policy_logps,
    })
}

/// Log-probs of pairs under policy and reference with no gradient, and the ε-DPO ratios
/// when `epsilon` is given (the `edpo score` command).
pub fn score_pairs(
    policy: &CausalLm,
    reference: &CausalLm,
    pairs: &[TokenizedPair],
    epsilon: Option<f64>,
) -> Result<PairScores> {
    Ok(forward(policy, reference, pairs, epsilon)?.scores)
}

/// Evaluates the objective on scores at the trainer's current base β.
fn evaluate(
    objective: &Objective,
    beta_state: Option<&EpsilonBeta>,
    scores: &PairScores,
) -> Result<(ObjectiveOutput, Option<Vec<i8>>)> {
    match (objective, beta_state) {
        (Objective::Dpo { beta }, _) => Ok((objectives::dpo(&scores.logps(), *beta)?, None)),
        (Objective::EpsilonDpo { epsilon, .. }, Some(state)) => {
            let ratios = scores
                .ratios
                .as_deref()
                .ok_or_else(|| Error::Config("ε-DPO needs the perturbed log-ratios".into()))?;
            let (out, steps) =
                objectives::epsilon_dpo(&scores.logps(), ratios, state.beta(), *epsilon)?;
            Ok((out, Some(steps)))
        }
        (Objective::EpsilonDpo { .. }, None) => {
            Err(Error::Config("ε-DPO without its β state".into()))
        }
    }
}

/// Optimisation settings of a [`Trainer`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainerConfig {
    /// The objective.
    pub objective: Objective,
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Clip gradients to this global norm (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Optimizer step index (0-based).
    pub step: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Mean loss over every pair of the step.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Base β before the step's update (ε-DPO) or the fixed β (DPO).
    pub beta: f64,
    /// Base β after the update.
    pub next_beta: f64,
    /// Statistics averaged over micro-batches (`kl/avg_steps` is over all pairs).
    pub stats: Vec<(&'static str, f64)>,
}

/// Policy, frozen reference and optimizer state.
pub struct Trainer {
    /// The policy being trained.
    pub policy: CausalLm,
    /// The frozen reference.
    pub reference: CausalLm,
    config: TrainerConfig,
    optimizer: AdamW,
    grads: GradBuffers,
    beta_state: Option<EpsilonBeta>,
    step: usize,
}

impl Trainer {
    /// A trainer; `policy` must be trainable.
    pub fn new(policy: CausalLm, reference: CausalLm, config: TrainerConfig) -> Result<Self> {
        if policy.params().iter().all(|p| p.var.is_none()) {
            return Err(Error::Config(
                "the policy has no trainable parameters".into(),
            ));
        }
        let beta_state = match config.objective {
            Objective::EpsilonDpo { beta, epsilon } => Some(EpsilonBeta::new(beta, epsilon)?),
            Objective::Dpo { beta } if beta > 0.0 && beta.is_finite() => None,
            Objective::Dpo { beta } => {
                return Err(Error::Config(format!(
                    "beta = {beta}: must be positive and finite"
                )))
            }
        };
        let optimizer = AdamW::new(policy.params(), config.adamw);
        let grads = GradBuffers::new(policy.params());
        Ok(Self {
            policy,
            reference,
            config,
            optimizer,
            grads,
            beta_state,
            step: 0,
        })
    }

    /// The current base β (ε-DPO) or the fixed β (DPO).
    pub fn beta(&self) -> f64 {
        match (&self.beta_state, self.config.objective) {
            (Some(s), _) => s.beta(),
            (None, Objective::Dpo { beta } | Objective::EpsilonDpo { beta, .. }) => beta,
        }
    }

    /// Forward and backward over each micro-batch, then clip, step and update β.
    /// The loss of the step is the mean over micro-batches of their mean losses, as a
    /// gradient-accumulating trainer that divides each micro-batch loss by their number.
    pub fn train_step(&mut self, micro_batches: &[Vec<TokenizedPair>]) -> Result<StepReport> {
        if micro_batches.is_empty() || micro_batches.iter().any(Vec::is_empty) {
            return Err(Error::Config(
                "a training step needs non-empty micro-batches".into(),
            ));
        }
        let k = micro_batches.len() as f64;
        let epsilon = match self.config.objective {
            Objective::EpsilonDpo { epsilon, .. } => Some(epsilon),
            Objective::Dpo { .. } => None,
        };
        let beta_before = self.beta();
        self.grads.zero();
        let mut loss = 0.0;
        let mut stats: Vec<(&'static str, f64)> = Vec::new();
        for pairs in micro_batches {
            let fwd = forward(&self.policy, &self.reference, pairs, epsilon)?;
            let (out, steps) = evaluate(
                &self.config.objective,
                self.beta_state.as_ref(),
                &fwd.scores,
            )?;
            ensure_finite(out.loss(), "loss", self.step)?;
            if let (Some(state), Some(steps)) = (self.beta_state.as_mut(), steps) {
                state.record(&steps);
            }
            // Surrogate whose gradient is ∂(loss / k)/∂θ.
            let coef: Vec<f32> = out
                .grad_policy_chosen
                .iter()
                .chain(&out.grad_policy_rejected)
                .map(|g| (g / k) as f32)
                .collect();
            let coef = Tensor::from_vec(coef, fwd.policy_logps.dims(), fwd.policy_logps.device())?;
            let surrogate = (&fwd.policy_logps * &coef)?.sum_all()?;
            let store = surrogate.backward()?;
            self.grads.add(self.policy.params(), &store)?;
            loss += out.loss() / k;
            if stats.is_empty() {
                stats = out.stats.iter().map(|&(n, v)| (n, v / k)).collect();
            } else {
                for (acc, &(_, v)) in stats.iter_mut().zip(&out.stats) {
                    acc.1 += v / k;
                }
            }
        }
        let grad_norm = self.grads.global_norm();
        ensure_finite(grad_norm, "gradient norm", self.step)?;
        let lr = self.config.schedule.lr(self.step);
        let scale = GradBuffers::clip_factor(grad_norm, self.config.max_grad_norm);
        self.optimizer
            .step(self.policy.params(), &self.grads, lr, scale)?;
        if let Some(state) = self.beta_state.as_mut() {
            let mean_step = state.update();
            if let Some(s) = stats.iter_mut().find(|(n, _)| *n == "kl/avg_steps") {
                s.1 = mean_step;
            }
        }
        let report = StepReport {
            step: self.step,
            lr,
            loss,
            grad_norm,
            beta: beta_before,
            next_beta: self.beta(),
            stats,
        };
        self.step += 1;
        Ok(report)
    }
}
