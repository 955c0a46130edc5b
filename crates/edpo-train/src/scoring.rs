//! Scoring pairs: forward passes of policy and reference over chosen and rejected sequences
//! (one row per pair, the prompt shared), giving exactly the inputs an objective declares it
//! needs ([`Objective::needs`]): sequence log-probs, lengths, ε-DPO's mixed-logit log-ratios,
//! KTO's mismatched-pair log-ratios, TDPO's sequential KLs (in the graph, like the log-probs). The reference runs on plain tensors, so no graph is
//! recorded for it; the policy's log-probs stay in the graph for the trainer's backward pass.

use crate::{Error, Result};
use candle_core::Tensor;
use edpo_data::TokenizedPair;
use edpo_model::logprobs::{policy_and_reference, response_token_logps, sum_per_sequence};
use edpo_model::{CausalLm, SequenceBatch};
use edpo_objectives::{
    Objective, PairInputs, PairLogps, PerturbedRatios, ResponseScores, SequenceKl,
};

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
    /// The responses' scores `(s_w, s_l)` per pair, from the data (ODPO's offset), when the
    /// caller gave them.
    pub response_scores: Option<(Vec<f64>, Vec<f64>)>,
    /// Each response's sequential KL `(K_w, K_l)` per pair (TDPO), when requested.
    pub sequence_kl: Option<(Vec<f64>, Vec<f64>)>,
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

    /// Borrowed view of the response scores, when there are some.
    fn response_scores(&self) -> Option<ResponseScores<'_>> {
        self.response_scores
            .as_ref()
            .map(|(chosen, rejected)| ResponseScores { chosen, rejected })
    }

    /// Borrowed view with lengths, KL log-ratios and response scores.
    pub fn inputs(&self) -> PairInputs<'_> {
        PairInputs {
            logps: self.logps(),
            chosen_lengths: &self.chosen_lengths,
            rejected_lengths: &self.rejected_lengths,
            kl_logratios: self.kl_logratios.as_deref(),
            scores: self.response_scores(),
            sequence_kl: self
                .sequence_kl
                .as_ref()
                .map(|(chosen, rejected)| SequenceKl { chosen, rejected }),
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
    /// The responses' sequential KLs `(2B,)` in the autograd graph, when requested.
    sequence_kl: Option<Tensor>,
}

/// The logit mixtures `(a, b)` of `a·z_θ + b·z_ref` whose log-ratios an objective reads
/// (ε-DPO's three; see [`Objective::mixed_logit_weights`]).
pub(crate) type MixedWeights = [(f32, f32); 3];

fn forward(
    policy: &CausalLm,
    reference: ReferenceSource<'_>,
    pairs: &[TokenizedPair],
    mixed_weights: Option<MixedWeights>,
    with_sequence_kl: bool,
) -> Result<Forward> {
    let n = pairs.len();
    let mut kl_graph = None;
    let batch = pair_batch(pairs, 0)?;
    let mut ratios = None;
    let policy_only = || -> Result<Tensor> {
        Ok(sum_per_sequence(
            &response_token_logps(policy, &batch)?,
            &batch,
        )?)
    };
    let (policy_logps, reference_chosen, reference_rejected) = match reference {
        ReferenceSource::None => (policy_only()?, Vec::new(), Vec::new()),
        ReferenceSource::Precomputed(values) => {
            if values.len() != n {
                return Err(Error::Config(format!(
                    "{} precomputed reference log-probs for {n} pairs",
                    values.len()
                )));
            }
            (
                policy_only()?,
                values.iter().map(|v| v[0]).collect(),
                values.iter().map(|v| v[1]).collect(),
            )
        }
        ReferenceSource::Model(reference) => {
            let scored = policy_and_reference(
                policy,
                reference,
                &batch,
                mixed_weights.as_ref().map(|w| w.as_slice()),
                with_sequence_kl,
            )?;
            let rp = to_f64(&sum_per_sequence(&scored.reference, &batch)?)?;
            if let Some(mixed) = scored.mixed {
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
            kl_graph = scored.sequence_kl;
            (
                sum_per_sequence(&scored.policy, &batch)?,
                rp[..n].to_vec(),
                rp[n..].to_vec(),
            )
        }
    };
    let lp = to_f64(&policy_logps)?;
    if mixed_weights.is_some() && ratios.is_none() {
        return Err(Error::Config(
            "ε-DPO needs the reference model's logits every step".into(),
        ));
    }
    if with_sequence_kl && kl_graph.is_none() {
        return Err(Error::Config(
            "TDPO needs the reference model's logits every step".into(),
        ));
    }
    let sequence_kl = match &kl_graph {
        Some(k) => {
            let k = to_f64(k)?;
            Some((k[..n].to_vec(), k[n..].to_vec()))
        }
        None => None,
    };
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
            response_scores: None,
            sequence_kl,
        },
        policy_logps,
        sequence_kl: kl_graph,
    })
}

/// The contiguous groups of pairs a micro-batch of `n` pairs is split into: `shards` groups
/// (at most one per pair) whose sizes differ by at most one.
fn shard_ranges(n: usize, shards: usize) -> Vec<std::ops::Range<usize>> {
    let s = shards.clamp(1, n.max(1));
    (0..s).map(|i| (i * n / s)..((i + 1) * n / s)).collect()
}

/// The pairs of one shard and what of it is still in the autograd graph.
pub(crate) struct ShardGraph {
    /// The shard's pairs within the micro-batch.
    pub range: std::ops::Range<usize>,
    /// Policy log-probs `(2·len,)`: chosen responses, then rejected ones.
    pub logps: Tensor,
    /// Sequential KLs `(2·len,)` in the same order, when the objective reads them (TDPO).
    pub sequence_kl: Option<Tensor>,
}

/// What a training step computes from the models for one micro-batch: exactly the inputs its
/// objective declares ([`Objective::needs`]).
#[derive(Clone, Copy)]
pub(crate) struct Request<'a> {
    /// Where reference log-probs come from ([`ReferenceSource::None`] when not needed).
    pub reference: ReferenceSource<'a>,
    /// Mixed-logit log-ratios (ε-DPO).
    pub mixed_weights: Option<MixedWeights>,
    /// The reference to score mismatched pairs against (KTO's KL estimate).
    pub kl_logratios: Option<&'a CausalLm>,
    /// The responses' sequential KLs, in the graph (TDPO; needs the reference model).
    pub sequence_kl: bool,
}

/// [`forward`] over the shards of a micro-batch, in parallel on the current rayon pool, with
/// the per-pair scores joined back in pair order. Each shard's graph is kept for its own
/// backward pass. KTO's mismatched pairs wrap around the whole micro-batch, so they are scored
/// once over all of it.
pub(crate) fn sharded_forward(
    policy: &CausalLm,
    request: Request<'_>,
    pairs: &[TokenizedPair],
    shards: usize,
) -> Result<(PairScores, Vec<ShardGraph>)> {
    use rayon::prelude::*;
    let ranges = shard_ranges(pairs.len(), shards);
    let sharded = ranges.len() > 1;
    let run = |r: &std::ops::Range<usize>| -> Result<Forward> {
        edpo_model::kernels::as_shard(sharded, || {
            forward(
                policy,
                request.reference.slice(r.clone())?,
                &pairs[r.clone()],
                request.mixed_weights,
                request.sequence_kl,
            )
        })
    };
    let parts: Vec<Forward> = ranges.par_iter().map(run).collect::<Result<_>>()?;
    let mut scores = PairScores {
        policy_chosen: Vec::new(),
        policy_rejected: Vec::new(),
        reference_chosen: Vec::new(),
        reference_rejected: Vec::new(),
        chosen_lengths: Vec::new(),
        rejected_lengths: Vec::new(),
        ratios: request.mixed_weights.map(|_| Vec::new()),
        kl_logratios: match request.kl_logratios {
            None => None,
            Some(reference) => Some(mismatched_logratios(policy, reference, pairs)?),
        },
        response_scores: None,
        sequence_kl: request.sequence_kl.then(|| (Vec::new(), Vec::new())),
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
        if let (Some(all), Some(mine)) = (scores.sequence_kl.as_mut(), p.sequence_kl) {
            all.0.extend(mine.0);
            all.1.extend(mine.1);
        }
        graphs.push(ShardGraph {
            range,
            logps: part.policy_logps,
            sequence_kl: part.sequence_kl,
        });
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
        &response_token_logps(policy, &batch)?.detach(),
        &batch,
    )?)?;
    let r = to_f64(&sum_per_sequence(
        &response_token_logps(reference, &batch)?,
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
    let weights = epsilon
        .and_then(|epsilon| Objective::EpsilonDpo { beta: 1.0, epsilon }.mixed_logit_weights());
    Ok(forward(
        policy,
        ReferenceSource::Model(reference),
        pairs,
        weights,
        false,
    )?
    .scores)
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
            &response_token_logps(reference, &batch)?,
            &batch,
        )?)?;
        let n = part.len();
        out.extend((0..n).map(|i| [rp[i], rp[n + i]]));
    }
    Ok(out)
}
