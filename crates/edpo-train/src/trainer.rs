//! [`Trainer`]: one optimizer step from token ids to updated weights. Per micro-batch:
//! score the pairs ([`crate::scoring`]), evaluate the objective with its running state
//! ([`crate::state`]), and back-propagate; then clip, step AdamW on the schedule, and update
//! the objective's state (ε-DPO's base β, TR-DPO's reference), in that order.
//!
//! Gradients come from back-propagating `Σ_i (∂L/∂lw_i · lw_i + ∂L/∂ll_i · ll_i)`: the
//! objective's derivatives (computed in f64) weight the policy's sequence log-probs.

use crate::optim::{ensure_finite, AdamW, AdamWConfig, GradBuffers};
use crate::schedule::Schedule;
use crate::scoring::{sharded_forward, PairScores, ReferenceSource, Request, ShardGraph};
use crate::state::{initial_state, State};
use crate::{Error, Result};
use candle_core::Tensor;
use edpo_data::TokenizedPair;
use edpo_model::CausalLm;
use edpo_objectives::{Objective, ObjectiveOutput};

/// Optimisation settings of a [`Trainer`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainerConfig {
    /// The objective.
    pub objective: Objective,
    /// Weight of the SFT term `−lw/|y_w|` added to the objective (0: none).
    pub sft_weight: f64,
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
    /// Base β before the step's update (ε-DPO), the batch β (β-DPO, last micro-batch), or the
    /// fixed β; NaN for objectives without one.
    pub beta: f64,
    /// Base β after the update.
    pub next_beta: f64,
    /// ε-DPO's step of every pair, in micro-batch order (empty for other objectives).
    pub pair_steps: Vec<i8>,
    /// The implicit margin `Δ = (lw − rw) − (ll − rl)` of every pair as the step scored it, in
    /// micro-batch order, where the step had reference log-probs (empty otherwise).
    pub pair_margins: Vec<f64>,
    /// Statistics averaged over micro-batches (`kl/avg_steps` is over all pairs).
    pub stats: Vec<(&'static str, f64)>,
}

/// Policy, reference and optimizer state.
pub struct Trainer {
    /// The policy being trained.
    pub policy: CausalLm,
    /// The reference (frozen, except for TR-DPO's scheduled updates).
    pub reference: CausalLm,
    config: TrainerConfig,
    optimizer: AdamW,
    grads: GradBuffers,
    state: State,
    step: usize,
    shards: usize,
    fault: Option<Fault>,
}

/// Where an injected fault makes a step non-finite (tests of the failure path only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultTarget {
    /// The loss.
    Loss,
    /// The gradient norm.
    Gradient,
    /// The parameters after the update (a NaN gradient scale).
    Parameter,
}

/// A non-finite value injected at one optimizer step, so that the failure path of a real
/// divergence can be tested at a chosen step (see `edpo_experiment::runner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// What goes non-finite.
    pub target: FaultTarget,
    /// At which optimizer step (0-based).
    pub step: usize,
}

impl Trainer {
    /// A trainer; `policy` must be trainable.
    pub fn new(policy: CausalLm, reference: CausalLm, config: TrainerConfig) -> Result<Self> {
        if policy.params().iter().all(|p| p.var.is_none()) {
            return Err(Error::Config(
                "the policy has no trainable parameters".into(),
            ));
        }
        let state = initial_state(&config.objective, config.sft_weight)?;
        let optimizer = AdamW::new(policy.params(), config.adamw);
        let grads = GradBuffers::with_sinks(policy.params())?;
        Ok(Self {
            policy,
            reference,
            config,
            optimizer,
            grads,
            state,
            step: 0,
            shards: 1,
            fault: None,
        })
    }

    /// Splits every micro-batch into `shards` groups of pairs whose forward and backward passes
    /// run in parallel on the current rayon pool, their gradients summed in shard order.
    ///
    /// The objective always sees the whole micro-batch, so losses, statistics and ε-DPO's
    /// decisions are those of the unsplit batch; the gradients agree with it to f32 rounding
    /// (they are summed over the shards instead of inside one matrix product). The result
    /// depends on the number of shards, never on the number of threads.
    pub fn with_shards(mut self, shards: usize) -> Result<Self> {
        if shards == 0 {
            return Err(Error::Config("shards must be at least 1".into()));
        }
        self.shards = shards;
        Ok(self)
    }

    /// Injects `fault` (tests of the failure path).
    pub fn with_fault(mut self, fault: Option<Fault>) -> Self {
        self.fault = fault;
        self
    }

    fn faulted(&self, target: FaultTarget) -> bool {
        self.fault
            == Some(Fault {
                target,
                step: self.step,
            })
    }

    /// Checks an objective's parameters without building a trainer (for config validation).
    pub fn check_objective(objective: &Objective, sft_weight: f64) -> Result<()> {
        initial_state(objective, sft_weight).map(|_| ())
    }

    /// The current base β (ε-DPO), β₀ (β-DPO), the fixed β, or NaN for objectives without one.
    pub fn beta(&self) -> f64 {
        match &self.state {
            State::Epsilon(s) => s.beta(),
            _ => self.config.objective.beta().unwrap_or(f64::NAN),
        }
    }

    /// TR-DPO reference updates made so far.
    pub fn reference_updates(&self) -> usize {
        match self.state {
            State::TrDpo { updates } => updates,
            _ => 0,
        }
    }

    /// Evaluates the objective on one micro-batch's scores.
    fn objective(&mut self, scores: &PairScores) -> Result<(ObjectiveOutput, Vec<i8>)> {
        self.state
            .evaluate(&self.config.objective, self.config.sft_weight, scores)
    }

    /// Forward and backward over each micro-batch, then clip, step and update β.
    pub fn train_step(&mut self, micro_batches: &[Vec<TokenizedPair>]) -> Result<StepReport> {
        self.train_step_with_reference(micro_batches, None)
    }

    /// As [`Trainer::train_step`], with reference log-probs computed before training (one
    /// `[chosen, rejected]` per pair of each micro-batch) standing in for the reference forward
    /// pass, where the objective accepts them.
    ///
    /// The loss of the step is the mean over micro-batches of their mean losses, as a
    /// gradient-accumulating trainer that divides each micro-batch loss by their number.
    pub fn train_step_with_reference(
        &mut self,
        micro_batches: &[Vec<TokenizedPair>],
        precomputed: Option<&[Vec<[f64; 2]>]>,
    ) -> Result<StepReport> {
        self.train_step_with(micro_batches, precomputed, None)
    }

    /// As [`Trainer::train_step_with_reference`], with each pair's response scores
    /// `[s_w, s_l]` (per micro-batch) for the objectives that read them (ODPO).
    pub fn train_step_with(
        &mut self,
        micro_batches: &[Vec<TokenizedPair>],
        precomputed: Option<&[Vec<[f64; 2]>]>,
        response_scores: Option<&[Vec<[f64; 2]>]>,
    ) -> Result<StepReport> {
        if micro_batches.is_empty() || micro_batches.iter().any(Vec::is_empty) {
            return Err(Error::Config(
                "a training step needs non-empty micro-batches".into(),
            ));
        }
        let objective = self.config.objective;
        let needs = objective.needs();
        if precomputed.is_some() && !needs.precomputed_reference {
            return Err(Error::Config(
                "this objective cannot use precomputed reference log-probs".into(),
            ));
        }
        let k = micro_batches.len() as f64;
        let beta_before = self.beta();
        self.grads.zero();
        let mut loss = 0.0;
        let mut pair_steps = Vec::new();
        let mut pair_margins = Vec::new();
        let mut batch_beta = beta_before;
        let mut stats: Vec<(&'static str, f64)> = Vec::new();
        for (m, pairs) in micro_batches.iter().enumerate() {
            let request = Request {
                reference: match (needs.reference, precomputed) {
                    (false, _) => ReferenceSource::None,
                    (true, Some(p)) => ReferenceSource::Precomputed(&p[m]),
                    (true, None) => ReferenceSource::Model(&self.reference),
                },
                mixed_weights: objective.mixed_logit_weights(),
                kl_logratios: needs.kl_logratios.then_some(&self.reference),
                sequence_kl: needs.sequence_kl,
            };
            let (mut scores, graphs) = sharded_forward(&self.policy, request, pairs, self.shards)?;
            if needs.scores {
                let given = response_scores.and_then(|s| s.get(m)).ok_or_else(|| {
                    Error::Config(format!(
                        "objective `{}` needs each pair's response scores",
                        objective.kind()
                    ))
                })?;
                scores.response_scores = Some(given.iter().map(|s| (s[0], s[1])).unzip());
            }
            let (out, steps) = self.objective(&scores)?;
            let value = if self.faulted(FaultTarget::Loss) {
                f64::NAN
            } else {
                out.loss()
            };
            ensure_finite(value, "loss", self.step)?;
            pair_steps.extend(steps);
            let logps = scores.logps();
            if logps.reference_chosen.len() == logps.len() {
                pair_margins.extend((0..logps.len()).map(|i| logps.delta(i)));
            }
            if let Some(b) = out.stat("beta/mean") {
                batch_beta = b;
            }
            // Per shard, a surrogate whose gradient is ∂(loss / k)/∂θ over its pairs:
            // Σ ∂L/∂lp·lp, plus Σ ∂L/∂K·K for the objectives that read the sequential KLs.
            let backward = |shard: &ShardGraph| {
                let range = shard.range.clone();
                let coef: Vec<f32> = out.grad_policy_chosen[range.clone()]
                    .iter()
                    .chain(&out.grad_policy_rejected[range.clone()])
                    .map(|g| (g / k) as f32)
                    .collect();
                let logps = &shard.logps;
                let coef = Tensor::from_vec(coef, logps.dims(), logps.device())?;
                let mut surrogate = (logps * &coef)?.sum_all()?;
                match (&shard.sequence_kl, &out.grad_sequence_kl) {
                    (Some(kl), Some(grads)) => {
                        let part = &grads[range];
                        let coef: Vec<f32> = part
                            .iter()
                            .map(|g| g[0])
                            .chain(part.iter().map(|g| g[1]))
                            .map(|g| (g / k) as f32)
                            .collect();
                        let coef = Tensor::from_vec(coef, kl.dims(), kl.device())?;
                        surrogate = (surrogate + (kl * &coef)?.sum_all()?)?;
                    }
                    (None, None) => {}
                    _ => {
                        return Err(Error::Config(format!(
                            "objective `{}`: sequential KLs and their derivatives do not match",
                            objective.kind()
                        )))
                    }
                }
                Ok(surrogate.backward()?)
            };
            let stores: Vec<candle_core::backprop::GradStore> = {
                use rayon::prelude::*;
                let sharded = graphs.len() > 1;
                graphs
                    .par_iter()
                    .enumerate()
                    .map(|(i, g)| {
                        edpo_model::kernels::as_shard(sharded, || {
                            edpo_model::kernels::sink::in_shard(i, || backward(g))
                        })
                    })
                    .collect::<Result<_>>()?
            };
            for (i, store) in stores.iter().enumerate() {
                self.grads.add_shard(self.policy.params(), store, i)?;
            }
            loss += out.loss() / k;
            if stats.is_empty() {
                stats = out.stats.iter().map(|&(n, v)| (n, v / k)).collect();
            } else {
                for (acc, &(_, v)) in stats.iter_mut().zip(&out.stats) {
                    acc.1 += v / k;
                }
            }
        }
        let grad_norm = if self.faulted(FaultTarget::Gradient) {
            f64::NAN
        } else {
            self.grads.global_norm()
        };
        ensure_finite(grad_norm, "gradient norm", self.step)?;
        let lr = self.config.schedule.lr(self.step);
        let scale = if self.faulted(FaultTarget::Parameter) {
            f64::NAN
        } else {
            GradBuffers::clip_factor(grad_norm, self.config.max_grad_norm)
        };
        let nonfinite = self
            .optimizer
            .step(self.policy.params(), &self.grads, lr, scale)?;
        if nonfinite > 0 {
            return Err(Error::NonFinite {
                what: "parameter",
                step: self.step,
            });
        }
        match &mut self.state {
            State::Epsilon(state) => {
                let mean_step = state.update();
                if let Some(s) = stats.iter_mut().find(|(n, _)| *n == "kl/avg_steps") {
                    s.1 = mean_step;
                }
            }
            State::TrDpo { updates } => {
                if let Objective::TrDpo { alpha, tau, .. } = objective {
                    if (self.step + 1).is_multiple_of(tau) {
                        self.reference.blend_from(&self.policy, alpha)?;
                        *updates += 1;
                    }
                    stats.push(("tr_dpo/reference_updates", *updates as f64));
                }
            }
            State::Stateless | State::BetaDpo(..) | State::AlphaDpo(..) => {}
        }
        let report = StepReport {
            step: self.step,
            lr,
            loss,
            grad_norm,
            beta: if matches!(objective, Objective::BetaDpo { .. }) {
                batch_beta
            } else {
                beta_before
            },
            next_beta: self.beta(),
            pair_steps,
            pair_margins,
            stats,
        };
        self.step += 1;
        Ok(report)
    }
}
