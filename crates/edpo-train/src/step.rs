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
use edpo_data::rng::SplitMix64;
use edpo_data::TokenizedPair;
use edpo_model::logprobs::{mixed_sequence_logps, response_logits, sum_per_sequence, token_logps};
use edpo_model::{CausalLm, SequenceBatch};
use edpo_objectives::{
    self as objectives, add_sft, BetaDpo, EpsilonBeta, Method, ObjectiveOutput, PairInputs,
    PairLogps, PerturbedRatios,
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
    /// A stateless baseline (cDPO, robust DPO, IPO, hinge, SLiC, SimPO, R-DPO, CPO, ORPO, KTO).
    Method(Method),
    /// β-DPO: batch-level β and its data filter, with running estimates.
    BetaDpo {
        /// Base coefficient β₀.
        beta0: f64,
        /// Scale `a` of the β adjustment.
        a: f64,
        /// Fraction of pairs the filter keeps.
        keep_fraction: f64,
        /// Momentum of the running estimates.
        momentum: f64,
        /// Seed of the filter's sampling.
        seed: u64,
    },
    /// TR-DPO: the DPO loss, and every `tau` optimizer steps the reference becomes
    /// `α·θ + (1 − α)·θ_ref` (α = 1: a hard update).
    TrDpo {
        /// KL coefficient.
        beta: f64,
        /// Mixing weight of the policy.
        alpha: f64,
        /// Optimizer steps between reference updates.
        tau: usize,
    },
}

impl Objective {
    /// Whether the reference model (or its log-probs) is needed at all.
    pub fn needs_reference(&self) -> bool {
        match self {
            Objective::Method(m) => m.needs_reference(),
            _ => true,
        }
    }

    /// Whether reference log-probs computed once before training may stand in for the
    /// reference forward pass: not for ε-DPO (it needs the reference's full logits every step)
    /// nor TR-DPO (its reference changes).
    pub fn accepts_precomputed_reference(&self) -> bool {
        match self {
            Objective::EpsilonDpo { .. } | Objective::TrDpo { .. } => false,
            Objective::Method(m) => m.needs_reference(),
            Objective::Dpo { .. } | Objective::BetaDpo { .. } => true,
        }
    }

    fn needs_kl_logratios(&self) -> bool {
        matches!(self, Objective::Method(m) if m.needs_kl_logratios())
    }
}

/// Everything the objectives need about one micro-batch, plus the ε-DPO ratios.
#[derive(Debug, Clone)]
pub struct PairScores {
    /// `log π_θ(y_w|x)` per pair.
    pub policy_chosen: Vec<f64>,
    /// `log π_θ(y_l|x)` per pair.
    pub policy_rejected: Vec<f64>,
    /// `log π_ref(y_w|x)` per pair (empty when the objective needs no reference).
    pub reference_chosen: Vec<f64>,
    /// `log π_ref(y_l|x)` per pair (empty when the objective needs no reference).
    pub reference_rejected: Vec<f64>,
    /// `|y_w|` per pair, EOS included.
    pub chosen_lengths: Vec<usize>,
    /// `|y_l|` per pair, EOS included.
    pub rejected_lengths: Vec<usize>,
    /// The three preference log-ratios per pair, when ε > 0 was requested.
    pub ratios: Option<Vec<PerturbedRatios>>,
    /// KTO's policy-minus-reference log-ratios on mismatched pairs (prompt `i`, the chosen
    /// response of pair `i + 1`), when requested.
    pub kl_logratios: Option<Vec<f64>>,
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

    /// Borrowed view with lengths and KL log-ratios.
    pub fn inputs(&self) -> PairInputs<'_> {
        PairInputs {
            logps: self.logps(),
            chosen_lengths: &self.chosen_lengths,
            rejected_lengths: &self.rejected_lengths,
            kl_logratios: self.kl_logratios.as_deref(),
        }
    }
}

/// The layout of a micro-batch: one row per pair, its prompt shared by the chosen and the
/// rejected branch; sequences numbered chosen of every pair, then rejected ones.
fn pair_batch(pairs: &[TokenizedPair], pad_id: u32) -> Result<SequenceBatch> {
    let rows: Vec<(&[u32], &[u32], &[u32])> = pairs
        .iter()
        .map(|p| {
            (
                p.prompt.as_slice(),
                p.chosen.as_slice(),
                p.rejected.as_slice(),
            )
        })
        .collect();
    Ok(SequenceBatch::shared_prompt_pairs(&rows, pad_id)?)
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
}

/// Where the reference's log-probs come from for a micro-batch.
#[derive(Debug, Clone, Copy)]
pub enum ReferenceSource<'a> {
    /// No reference (reference-free objectives).
    None,
    /// A forward pass of the reference model.
    Model(&'a CausalLm),
    /// Log-probs computed once before training: `[chosen, rejected]` per pair.
    Precomputed(&'a [[f64; 2]]),
}

impl ReferenceSource<'_> {
    /// The source for the pairs `range` of a micro-batch.
    fn slice(&self, range: std::ops::Range<usize>) -> Result<Self> {
        Ok(match *self {
            ReferenceSource::Precomputed(values) => {
                ReferenceSource::Precomputed(values.get(range.clone()).ok_or_else(|| {
                    Error::Config(format!(
                        "{} precomputed reference log-probs for pairs {range:?}",
                        values.len()
                    ))
                })?)
            }
            other => other,
        })
    }
}

struct Forward {
    scores: PairScores,
    /// The policy's sequence log-probs `(2B,)`, still in the autograd graph.
    policy_logps: Tensor,
}

fn forward(
    policy: &CausalLm,
    reference: ReferenceSource<'_>,
    pairs: &[TokenizedPair],
    epsilon: Option<f64>,
) -> Result<Forward> {
    let n = pairs.len();
    let batch = pair_batch(pairs, 0)?;
    let policy_logits = response_logits(policy, &batch)?; // (N, V)
    let policy_logps = sum_per_sequence(&token_logps(&policy_logits, &batch)?, &batch)?; // (2B,)
    let lp = to_f64(&policy_logps)?;
    let mut ratios = None;
    let (reference_chosen, reference_rejected) = match reference {
        ReferenceSource::None => (Vec::new(), Vec::new()),
        ReferenceSource::Precomputed(values) => {
            if values.len() != n {
                return Err(Error::Config(format!(
                    "{} precomputed reference log-probs for {n} pairs",
                    values.len()
                )));
            }
            (
                values.iter().map(|v| v[0]).collect(),
                values.iter().map(|v| v[1]).collect(),
            )
        }
        ReferenceSource::Model(reference) => {
            let reference_logits = response_logits(reference, &batch)?.detach();
            let rp = to_f64(&sum_per_sequence(
                &token_logps(&reference_logits, &batch)?,
                &batch,
            )?)?;
            if let Some(eps) = epsilon {
                let e = eps as f32;
                let mixed = mixed_sequence_logps(
                    &policy_logits,
                    &reference_logits,
                    &batch,
                    &[(1.0, 0.0), (1.0 + e, -e), (1.0 - e, e)],
                )?;
                let ratio = |m: &Vec<f64>, i: usize| m[i] - m[n + i];
                ratios = Some(
                    (0..n)
                        .map(|i| PerturbedRatios {
                            h: ratio(&mixed[0], i),
                            h_relaxed: ratio(&mixed[1], i),
                            h_stronger: ratio(&mixed[2], i),
                        })
                        .collect(),
                );
            }
            (rp[..n].to_vec(), rp[n..].to_vec())
        }
    };
    if epsilon.is_some() && ratios.is_none() {
        return Err(Error::Config(
            "ε-DPO needs the reference model's logits every step".into(),
        ));
    }
    Ok(Forward {
        scores: PairScores {
            policy_chosen: lp[..n].to_vec(),
            policy_rejected: lp[n..].to_vec(),
            reference_chosen,
            reference_rejected,
            chosen_lengths: batch.response_lengths[..n].to_vec(),
            rejected_lengths: batch.response_lengths[n..].to_vec(),
            ratios,
            kl_logratios: None,
        },
        policy_logps,
    })
}

/// The contiguous groups of pairs a micro-batch of `n` pairs is split into: `shards` groups
/// (at most one per pair) whose sizes differ by at most one.
fn shard_ranges(n: usize, shards: usize) -> Vec<std::ops::Range<usize>> {
    let s = shards.clamp(1, n.max(1));
    (0..s).map(|i| (i * n / s)..((i + 1) * n / s)).collect()
}

/// The pairs of one shard and their policy log-probs `(2·len,)`, still in the autograd graph.
type ShardGraph = (std::ops::Range<usize>, Tensor);

/// [`forward`] over the shards of a micro-batch, in parallel on the current rayon pool, with
/// the per-pair scores joined back in pair order. Each shard's graph is kept for its own
/// backward pass. KTO's mismatched pairs wrap around the whole micro-batch, so they are scored
/// once over all of it.
fn sharded_forward(
    policy: &CausalLm,
    reference: ReferenceSource<'_>,
    pairs: &[TokenizedPair],
    epsilon: Option<f64>,
    kl_logratios: Option<&CausalLm>,
    shards: usize,
) -> Result<(PairScores, Vec<ShardGraph>)> {
    use rayon::prelude::*;
    let ranges = shard_ranges(pairs.len(), shards);
    let run = |r: &std::ops::Range<usize>| -> Result<Forward> {
        forward(
            policy,
            reference.slice(r.clone())?,
            &pairs[r.clone()],
            epsilon,
        )
    };
    let parts: Vec<Forward> = ranges.par_iter().map(run).collect::<Result<_>>()?;
    let mut scores = PairScores {
        policy_chosen: Vec::new(),
        policy_rejected: Vec::new(),
        reference_chosen: Vec::new(),
        reference_rejected: Vec::new(),
        chosen_lengths: Vec::new(),
        rejected_lengths: Vec::new(),
        ratios: epsilon.map(|_| Vec::new()),
        kl_logratios: match kl_logratios {
            None => None,
            Some(reference) => Some(mismatched_logratios(policy, reference, pairs)?),
        },
    };
    let mut graphs = Vec::with_capacity(parts.len());
    for (range, part) in ranges.into_iter().zip(parts) {
        let p = part.scores;
        scores.policy_chosen.extend(p.policy_chosen);
        scores.policy_rejected.extend(p.policy_rejected);
        scores.reference_chosen.extend(p.reference_chosen);
        scores.reference_rejected.extend(p.reference_rejected);
        scores.chosen_lengths.extend(p.chosen_lengths);
        scores.rejected_lengths.extend(p.rejected_lengths);
        if let (Some(all), Some(mine)) = (scores.ratios.as_mut(), p.ratios) {
            all.extend(mine);
        }
        graphs.push((range, part.policy_logps));
    }
    Ok((scores, graphs))
}

/// KTO's KL estimate inputs: `log π_θ(y_{i+1}|x_i) − log π_ref(y_{i+1}|x_i)` for the chosen
/// response of the next pair under each prompt (no gradient: KTO detaches `z₀`).
fn mismatched_logratios(
    policy: &CausalLm,
    reference: &CausalLm,
    pairs: &[TokenizedPair],
) -> Result<Vec<f64>> {
    let n = pairs.len();
    let seqs: Vec<(&[u32], &[u32])> = (0..n)
        .map(|i| {
            (
                pairs[i].prompt.as_slice(),
                pairs[(i + 1) % n].chosen.as_slice(),
            )
        })
        .collect();
    let batch = SequenceBatch::new(&seqs, 0)?;
    let p = to_f64(&sum_per_sequence(
        &token_logps(&response_logits(policy, &batch)?.detach(), &batch)?,
        &batch,
    )?)?;
    let r = to_f64(&sum_per_sequence(
        &token_logps(&response_logits(reference, &batch)?, &batch)?,
        &batch,
    )?)?;
    Ok(p.iter().zip(&r).map(|(a, b)| a - b).collect())
}

/// Log-probs of pairs under policy and reference with no gradient, and the ε-DPO ratios
/// when `epsilon` is given (the `edpo score` command).
pub fn score_pairs(
    policy: &CausalLm,
    reference: &CausalLm,
    pairs: &[TokenizedPair],
    epsilon: Option<f64>,
) -> Result<PairScores> {
    Ok(forward(policy, ReferenceSource::Model(reference), pairs, epsilon)?.scores)
}

/// `[log π_ref(y_w|x), log π_ref(y_l|x)]` of every pair, in chunks of `chunk` pairs: what a
/// run computes once when its objective accepts precomputed reference log-probs.
pub fn reference_logps(
    reference: &CausalLm,
    pairs: &[TokenizedPair],
    chunk: usize,
) -> Result<Vec<[f64; 2]>> {
    let mut out = Vec::with_capacity(pairs.len());
    for part in pairs.chunks(chunk.max(1)) {
        let batch = pair_batch(part, 0)?;
        let rp = to_f64(&sum_per_sequence(
            &token_logps(&response_logits(reference, &batch)?, &batch)?,
            &batch,
        )?)?;
        let n = part.len();
        out.extend((0..n).map(|i| [rp[i], rp[n + i]]));
    }
    Ok(out)
}

/// The objective's running state.
enum State {
    Stateless,
    Epsilon(EpsilonBeta),
    BetaDpo(BetaDpo, SplitMix64),
    TrDpo { updates: usize },
}

/// The objective's state at the start of training, after checking its parameters.
fn initial_state(objective: &Objective, sft_weight: f64) -> Result<State> {
    let positive = |name: &str, v: f64| -> Result<()> {
        if v > 0.0 && v.is_finite() {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "{name} = {v}: must be positive and finite"
            )))
        }
    };
    if !(sft_weight >= 0.0 && sft_weight.is_finite()) {
        return Err(Error::Config(format!(
            "sft_weight = {sft_weight}: must be non-negative"
        )));
    }
    Ok(match *objective {
        Objective::EpsilonDpo { beta, epsilon } => State::Epsilon(EpsilonBeta::new(beta, epsilon)?),
        Objective::Dpo { beta } => {
            positive("beta", beta)?;
            State::Stateless
        }
        Objective::Method(m) => {
            m.validate()?;
            State::Stateless
        }
        Objective::BetaDpo {
            beta0,
            a,
            keep_fraction,
            momentum,
            seed,
        } => {
            if sft_weight != 0.0 {
                return Err(Error::Config(
                    "β-DPO averages its loss over the pairs its filter keeps; an SFT term is not supported with it".into(),
                ));
            }
            State::BetaDpo(
                BetaDpo::new(beta0, a, keep_fraction, momentum)?,
                SplitMix64(seed),
            )
        }
        Objective::TrDpo { beta, alpha, tau } => {
            positive("beta", beta)?;
            if !(alpha > 0.0 && alpha <= 1.0) || tau == 0 {
                return Err(Error::Config(format!(
                    "TR-DPO needs 0 < alpha ≤ 1 and tau ≥ 1 (got {alpha}, {tau})"
                )));
            }
            State::TrDpo { updates: 0 }
        }
    })
}

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
        let grads = GradBuffers::new(policy.params());
        Ok(Self {
            policy,
            reference,
            config,
            optimizer,
            grads,
            state,
            step: 0,
            shards: 1,
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

    /// Checks an objective's parameters without building a trainer (for config validation).
    pub fn check_objective(objective: &Objective, sft_weight: f64) -> Result<()> {
        initial_state(objective, sft_weight).map(|_| ())
    }

    /// The current base β (ε-DPO), β₀ (β-DPO), the fixed β, or NaN for objectives without one.
    pub fn beta(&self) -> f64 {
        match (&self.state, self.config.objective) {
            (State::Epsilon(s), _) => s.beta(),
            (
                _,
                Objective::Dpo { beta }
                | Objective::EpsilonDpo { beta, .. }
                | Objective::TrDpo { beta, .. },
            ) => beta,
            (_, Objective::BetaDpo { beta0, .. }) => beta0,
            (_, Objective::Method(m)) => m.beta().unwrap_or(f64::NAN),
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
        let sft = self.config.sft_weight;
        match (self.config.objective, &mut self.state) {
            (Objective::Dpo { beta } | Objective::TrDpo { beta, .. }, _) => Ok((
                objectives::evaluate(&Method::Dpo { beta }, &scores.inputs(), sft)?,
                Vec::new(),
            )),
            (Objective::Method(m), _) => {
                Ok((objectives::evaluate(&m, &scores.inputs(), sft)?, Vec::new()))
            }
            (Objective::EpsilonDpo { epsilon, .. }, State::Epsilon(state)) => {
                let ratios = scores
                    .ratios
                    .as_deref()
                    .ok_or_else(|| Error::Config("ε-DPO needs the perturbed log-ratios".into()))?;
                let (mut out, steps) =
                    objectives::epsilon_dpo(&scores.logps(), ratios, state.beta(), epsilon)?;
                add_sft(&mut out, &scores.policy_chosen, &scores.chosen_lengths, sft)?;
                state.record(&steps);
                Ok((out, steps))
            }
            (Objective::BetaDpo { .. }, State::BetaDpo(state, rng)) => {
                let (out, _report) = state.step(&scores.logps(), &mut || rng.uniform())?;
                Ok((out, Vec::new()))
            }
            _ => Err(Error::Config("objective and its state disagree".into())),
        }
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
        if micro_batches.is_empty() || micro_batches.iter().any(Vec::is_empty) {
            return Err(Error::Config(
                "a training step needs non-empty micro-batches".into(),
            ));
        }
        let objective = self.config.objective;
        if precomputed.is_some() && !objective.accepts_precomputed_reference() {
            return Err(Error::Config(
                "this objective cannot use precomputed reference log-probs".into(),
            ));
        }
        let k = micro_batches.len() as f64;
        let epsilon = match objective {
            Objective::EpsilonDpo { epsilon, .. } => Some(epsilon),
            _ => None,
        };
        let beta_before = self.beta();
        self.grads.zero();
        let mut loss = 0.0;
        let mut pair_steps = Vec::new();
        let mut batch_beta = beta_before;
        let mut stats: Vec<(&'static str, f64)> = Vec::new();
        for (m, pairs) in micro_batches.iter().enumerate() {
            let reference = match (objective.needs_reference(), precomputed) {
                (false, _) => ReferenceSource::None,
                (true, Some(p)) => ReferenceSource::Precomputed(&p[m]),
                (true, None) => ReferenceSource::Model(&self.reference),
            };
            let kl = objective.needs_kl_logratios().then_some(&self.reference);
            let (scores, graphs) =
                sharded_forward(&self.policy, reference, pairs, epsilon, kl, self.shards)?;
            let (out, steps) = self.objective(&scores)?;
            ensure_finite(out.loss(), "loss", self.step)?;
            pair_steps.extend(steps);
            if let Some(b) = out.stat("beta/mean") {
                batch_beta = b;
            }
            // Per shard, a surrogate whose gradient is ∂(loss / k)/∂θ over its pairs.
            let backward = |(range, logps): &ShardGraph| {
                let coef: Vec<f32> = out.grad_policy_chosen[range.clone()]
                    .iter()
                    .chain(&out.grad_policy_rejected[range.clone()])
                    .map(|g| (g / k) as f32)
                    .collect();
                let coef = Tensor::from_vec(coef, logps.dims(), logps.device())?;
                Ok((logps * &coef)?.sum_all()?.backward()?)
            };
            let stores: Vec<candle_core::backprop::GradStore> = {
                use rayon::prelude::*;
                graphs.par_iter().map(backward).collect::<Result<_>>()?
            };
            for store in &stores {
                self.grads.add(self.policy.params(), store)?;
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
        let grad_norm = self.grads.global_norm();
        ensure_finite(grad_norm, "gradient norm", self.step)?;
        let lr = self.config.schedule.lr(self.step);
        let scale = GradBuffers::clip_factor(grad_norm, self.config.max_grad_norm);
        self.optimizer
            .step(self.policy.params(), &self.grads, lr, scale)?;
        match &mut self.state {
            State::Epsilon(state) => {
                let mean_step = state.update();
                if let Some(s) = stats.iter_mut().find(|(n, _)| *n == "kl/avg_steps") {
                    s.1 = mean_step;
                }
            }
            State::TrDpo { updates } => {
                if let Objective::TrDpo { alpha, tau, .. } = objective {
                    if (self.step + 1) % tau == 0 {
                        self.reference.blend_from(&self.policy, alpha)?;
                        *updates += 1;
                    }
                    stats.push(("tr_dpo/reference_updates", *updates as f64));
                }
            }
            State::Stateless | State::BetaDpo(..) => {}
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
            stats,
        };
        self.step += 1;
        Ok(report)
    }
}
