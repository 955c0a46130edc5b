//! Sequence log-probs under the tokenisation convention of TRL-style trainers.
//!
//! A sequence is `prompt ++ response`, where the response already ends with EOS (which counts
//! as a response token). `log π(y|x) = Σ_t log_softmax(z_{t−1})[y_t]` over response tokens
//! only. Sequences are right-padded into one batch; only the rows that predict a response
//! token go through the LM head, so the vocabulary projection is never spent on prompt or
//! padding positions.
//!
//! A preference pair shares its prompt: [`SequenceBatch::shared_prompt_pairs`] lays out each
//! pair as one row `prompt ++ chosen ++ rejected` with a tree-shaped attention mask (the
//! rejected tokens see the prompt and themselves, never the chosen ones) and positions that
//! restart after the prompt for the rejected branch. The prompt then runs once instead of
//! twice, and every log-prob equals the one of the two separate sequences.

use crate::{CausalLm, Error, Result};
use candle_core::{Device, Tensor};

/// Prompt + response sequences laid out for one forward pass.
#[derive(Debug, Clone)]
pub struct SequenceBatch {
    /// Right-padded token ids, `rows × seq_len`.
    pub input_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    /// Number of sequences scored.
    pub batch: usize,
    /// Rows of the layout (`batch`, or one per pair when prompts are shared).
    pub rows: usize,
    /// Padded length.
    pub seq_len: usize,
    /// With shared prompts: each token's position, and its branch (0 the prompt, 1 the first
    /// response, 2 the second). `None`: every row is one sequence, positions count tokens.
    pub tree: Option<(Vec<u32>, Vec<u8>)>,
    /// For each scored response token: the flat index `row·seq_len + t` of the position
    /// that predicts it.
    pub predictor_rows: Vec<u32>,
    /// For each scored response token: its id.
    pub targets: Vec<u32>,
    /// For each scored response token: the sequence it belongs to.
    pub sequence_of: Vec<usize>,
    /// Response length (tokens, EOS included) of each sequence.
    pub response_lengths: Vec<usize>,
}

impl SequenceBatch {
    /// Lays out `(prompt ids, response ids)` pairs. The response must already carry its EOS.
    /// `pad_id` fills the padding (any id in the vocabulary; it is masked out).
    pub fn new(sequences: &[(&[u32], &[u32])], pad_id: u32) -> Result<Self> {
        let batch = sequences.len();
        if batch == 0 {
            return Err(Error::Input("no sequences to score".into()));
        }
        let seq_len = sequences
            .iter()
            .map(|(p, r)| p.len() + r.len())
            .max()
            .unwrap_or(0);
        let mut out = Self {
            input_ids: vec![pad_id; batch * seq_len],
            attention_mask: vec![0; batch * seq_len],
            batch,
            rows: batch,
            seq_len,
            tree: None,
            predictor_rows: Vec::new(),
            targets: Vec::new(),
            sequence_of: Vec::new(),
            response_lengths: Vec::with_capacity(batch),
        };
        for (b, (prompt, response)) in sequences.iter().enumerate() {
            if prompt.is_empty() {
                return Err(Error::Input(format!(
                    "sequence {b}: the prompt has no tokens, so the first response token has no position to predict it"
                )));
            }
            if response.is_empty() {
                return Err(Error::Input(format!(
                    "sequence {b}: the response has no tokens"
                )));
            }
            let row = b * seq_len;
            for (t, &id) in prompt.iter().chain(response.iter()).enumerate() {
                out.input_ids[row + t] = id;
                out.attention_mask[row + t] = 1;
            }
            for (k, &id) in response.iter().enumerate() {
                let t = prompt.len() + k;
                out.predictor_rows.push((row + t - 1) as u32);
                out.targets.push(id);
                out.sequence_of.push(b);
            }
            out.response_lengths.push(response.len());
        }
        Ok(out)
    }

    /// Lays out preference pairs `(prompt, chosen, rejected)`, one row each:
    /// `prompt ++ chosen ++ rejected` with the rejected branch attending to the prompt and to
    /// itself only, at positions that continue the prompt. Sequence `i` is the chosen response
    /// of pair `i` and sequence `n + i` its rejected one, as [`SequenceBatch::new`] would number
    /// the chosen sequences followed by the rejected ones.
    pub fn shared_prompt_pairs(pairs: &[(&[u32], &[u32], &[u32])], pad_id: u32) -> Result<Self> {
        let n = pairs.len();
        if n == 0 {
            return Err(Error::Input("no sequences to score".into()));
        }
        let seq_len = pairs
            .iter()
            .map(|(p, c, r)| p.len() + c.len() + r.len())
            .max()
            .unwrap_or(0);
        let mut positions = vec![0u32; n * seq_len];
        let mut branch = vec![0u8; n * seq_len];
        let mut out = Self {
            input_ids: vec![pad_id; n * seq_len],
            attention_mask: vec![0; n * seq_len],
            batch: 2 * n,
            rows: n,
            seq_len,
            tree: None,
            predictor_rows: Vec::new(),
            targets: Vec::new(),
            sequence_of: Vec::new(),
            response_lengths: vec![0; 2 * n],
        };
        for (b, (prompt, chosen, rejected)) in pairs.iter().enumerate() {
            if prompt.is_empty() {
                return Err(Error::Input(format!(
                    "pair {b}: the prompt has no tokens, so the first response token has no position to predict it"
                )));
            }
            if chosen.is_empty() || rejected.is_empty() {
                return Err(Error::Input(format!("pair {b}: a response has no tokens")));
            }
            let row = b * seq_len;
            let p = prompt.len();
            let tokens = prompt.iter().chain(chosen.iter()).chain(rejected.iter());
            for (t, &id) in tokens.enumerate() {
                out.input_ids[row + t] = id;
                out.attention_mask[row + t] = 1;
                let (pos, br) = if t < p {
                    (t, 0)
                } else if t < p + chosen.len() {
                    (t, 1)
                } else {
                    (t - chosen.len(), 2)
                };
                positions[row + t] = pos as u32;
                branch[row + t] = br;
            }
            for (k, &id) in chosen.iter().enumerate() {
                out.predictor_rows.push((row + p + k - 1) as u32);
                out.targets.push(id);
                out.sequence_of.push(b);
            }
            for (k, &id) in rejected.iter().enumerate() {
                // The first rejected token is predicted by the last prompt token, as in its
                // own sequence; the rest by the rejected branch.
                let t = if k == 0 {
                    p - 1
                } else {
                    p + chosen.len() + k - 1
                };
                out.predictor_rows.push((row + t) as u32);
                out.targets.push(id);
                out.sequence_of.push(n + b);
            }
            out.response_lengths[b] = chosen.len();
            out.response_lengths[n + b] = rejected.len();
        }
        out.tree = Some((positions, branch));
        Ok(out)
    }

    /// Number of scored response tokens in the batch.
    pub fn n_targets(&self) -> usize {
        self.targets.len()
    }

    /// `(B, N)` indicator matrix: row `b` has ones at the response tokens of sequence `b`.
    fn segment_matrix(&self, device: &Device) -> Result<Tensor> {
        let n = self.n_targets();
        let mut m = vec![0f32; self.batch * n];
        for (i, &b) in self.sequence_of.iter().enumerate() {
            m[b * n + i] = 1.0;
        }
        Ok(Tensor::from_vec(m, (self.batch, n), device)?)
    }
}

/// Hidden states `(N, d)` at the positions that predict response tokens, in `targets` order.
pub fn response_hidden(model: &CausalLm, batch: &SequenceBatch) -> Result<Tensor> {
    let h = match &batch.tree {
        None => model.hidden(
            &batch.input_ids,
            &batch.attention_mask,
            batch.rows,
            batch.seq_len,
        )?,
        Some((positions, branch)) => model.hidden_tree(
            &batch.input_ids,
            &batch.attention_mask,
            positions,
            branch,
            batch.rows,
            batch.seq_len,
        )?,
    };
    let d = h.dim(2)?;
    let rows = Tensor::from_slice(&batch.predictor_rows, batch.n_targets(), model.device())?;
    Ok(h.reshape((batch.rows * batch.seq_len, d))?
        .index_select(&rows, 0)?) // (N, d)
}

/// Logits `(N, V)` at the positions that predict response tokens, in `targets` order.
pub fn response_logits(model: &CausalLm, batch: &SequenceBatch) -> Result<Tensor> {
    model.lm_head(&response_hidden(model, batch)?)
}

/// Per-token log-probs `(N,)` of the targets under `logits (N, V)`.
pub fn token_logps(logits: &Tensor, batch: &SequenceBatch) -> Result<Tensor> {
    Ok(crate::ops::log_softmax_gather(logits, &batch.targets)?)
}

/// Rows per chunk when the LM head over hidden states `h (N, d)` runs as the chunked node
/// ([`crate::kernels::head`]): on the fused path, when the head's product is of the size
/// [`crate::kernels::gemm`] takes (`N`, `V` and `d` all at least its threshold: real models).
/// `None`: the head runs unchunked, as it always did for small models (the default task's,
/// width 128, whatever the batch), so their numbers do not move.
fn head_chunk_rows(model: &CausalLm, h: &Tensor) -> Result<Option<usize>> {
    let (n, d) = h.dims2()?;
    let v = model.config.vocab_size();
    let rows = crate::kernels::head::chunk_rows(v);
    let large = crate::kernels::gemm::large(n, v, d);
    Ok((crate::ops::fused(h) && large).then_some(rows))
}

/// Per-token log-probs `(N,)` of the batch's response tokens, differentiable with respect to
/// the model's `Var`s. Over the budget the LM head runs in chunks ([`crate::kernels::head`]):
/// no `(N, V)` logits are held.
pub fn response_token_logps(model: &CausalLm, batch: &SequenceBatch) -> Result<Tensor> {
    let h = response_hidden(model, batch)?;
    let rows = head_chunk_rows(model, &h)?;
    token_logps_chunked(model, &h, batch, rows)
}

/// [`response_token_logps`] from the hidden states, the head in chunks of `rows` rows if any.
fn token_logps_chunked(
    model: &CausalLm,
    h: &Tensor,
    batch: &SequenceBatch,
    rows: Option<usize>,
) -> Result<Tensor> {
    match rows {
        None => token_logps(&model.lm_head(h)?, batch),
        Some(rows) => {
            let (w, weight_grad) = model.arch.head_weight();
            Ok(crate::kernels::head::head_logps_visiting(
                h,
                w,
                &batch.targets,
                weight_grad,
                rows,
                None,
                |_, _, _| Ok(()),
            )?
            .0)
        }
    }
}

/// Sums per-token values `(N,)` into per-sequence values `(B,)`.
pub fn sum_per_sequence(per_token: &Tensor, batch: &SequenceBatch) -> Result<Tensor> {
    let seg = batch.segment_matrix(per_token.device())?; // (B, N)
    Ok(seg.matmul(&per_token.unsqueeze(1)?)?.squeeze(1)?) // (B,)
}

/// `log π(y|x)` of every sequence, `(B,)`, differentiable with respect to the model's `Var`s.
pub fn sequence_logps(model: &CausalLm, batch: &SequenceBatch) -> Result<Tensor> {
    sum_per_sequence(&response_token_logps(model, batch)?, batch)
}

/// What one forward pass of a policy and its reference gives the pair objectives, per scored
/// response token (`(N,)`, in `targets` order) and per sequence.
#[derive(Debug)]
pub struct PolicyAndReference {
    /// The policy's token log-probs, in the autograd graph.
    pub policy: Tensor,
    /// The reference's token log-probs (a constant).
    pub reference: Tensor,
    /// Sequence log-probs under each requested logit mixture ([`mixed_sequence_logps`]).
    pub mixed: Option<Vec<Vec<f64>>>,
    /// Each sequence's sequential KL ([`sequence_kl`]), in the graph, when requested.
    pub sequence_kl: Option<Tensor>,
}

/// The policy's and the reference's token log-probs on `batch`, with ε-DPO's mixed-logit
/// sequence log-probs for `mixtures` and TDPO's sequential KLs when asked for.
///
/// Below the size of [`crate::kernels::gemm`] (small models), both models' `(N, V)` logits are
/// formed, as [`response_logits`], [`token_logps`], [`mixed_sequence_logps`] and
/// [`sequence_kl`] compute them. At that size both heads run chunk by chunk through
/// [`crate::kernels::head`]: at each chunk the policy's and the reference's logits for the same
/// rows, the reference's log-probs, the mixtures and TDPO's per-row KL (a second output of the
/// policy's head node, with its own backward): no `(N, V)` tensor is held, and the mixtures
/// sum per sequence in the same row order.
pub fn policy_and_reference(
    policy: &CausalLm,
    reference: &CausalLm,
    batch: &SequenceBatch,
    mixtures: Option<&[(f32, f32)]>,
    with_sequence_kl: bool,
) -> Result<PolicyAndReference> {
    let h = response_hidden(policy, batch)?;
    let rows = head_chunk_rows(policy, &h)?;
    policy_and_reference_chunked(
        policy,
        reference,
        &h,
        batch,
        mixtures,
        with_sequence_kl,
        rows,
    )
}

/// [`policy_and_reference`] from the policy's hidden states, the heads in chunks of `rows`
/// rows if any.
fn policy_and_reference_chunked(
    policy: &CausalLm,
    reference: &CausalLm,
    h: &Tensor,
    batch: &SequenceBatch,
    mixtures: Option<&[(f32, f32)]>,
    with_sequence_kl: bool,
    rows: Option<usize>,
) -> Result<PolicyAndReference> {
    let rows = match rows {
        Some(rows) => rows,
        None => {
            let policy_logits = policy.lm_head(h)?;
            let reference_logits = response_logits(reference, batch)?.detach();
            let mixed = match mixtures {
                Some(m) => Some(mixed_sequence_logps(
                    &policy_logits,
                    &reference_logits,
                    batch,
                    m,
                )?),
                None => None,
            };
            let sequence_kl = match with_sequence_kl {
                true => Some(sequence_kl(&policy_logits, &reference_logits, batch)?),
                false => None,
            };
            return Ok(PolicyAndReference {
                policy: token_logps(&policy_logits, batch)?,
                reference: token_logps(&reference_logits, batch)?,
                mixed,
                sequence_kl,
            });
        }
    };
    let hr = response_hidden(reference, batch)?.detach();
    let (wr, _) = reference.arch.head_weight();
    let wr = wr.detach();
    let (w, weight_grad) = policy.arch.head_weight();
    if wr.dims() != w.dims() {
        return Err(Error::Input(format!(
            "policy and reference LM heads {:?} and {:?} differ",
            w.dims(),
            wr.dims()
        )));
    }
    let mut reference_logps = Vec::with_capacity(batch.n_targets());
    let mut mixed = mixtures.map(|m| vec![vec![0f64; batch.batch]; m.len()]);
    let reference_head = crate::kernels::head::ReferenceHead {
        hidden: &hr,
        weight: &wr,
        kl: with_sequence_kl.then_some((batch.sequence_of.as_slice(), batch.batch)),
    };
    let (policy_logps, sequence_kl) = crate::kernels::head::head_logps_visiting(
        h,
        w,
        &batch.targets,
        weight_grad,
        rows,
        Some(reference_head),
        |range, z, r| {
            let Some(r) = r else {
                candle_core::bail!("LM head: the reference's logits are missing");
            };
            reference_logps.extend(
                crate::ops::log_softmax_gather(r, &batch.targets[range.clone()])?
                    .to_vec1::<f32>()?,
            );
            if let (Some(m), Some(out)) = (mixtures, mixed.as_mut()) {
                let v = z.dim(1)?;
                crate::kernels::with_f32(z, |z| {
                    crate::kernels::with_f32(r, |r| {
                        mixed_rows(
                            z,
                            r,
                            v,
                            &batch.targets[range.clone()],
                            &batch.sequence_of[range.clone()],
                            m,
                            out,
                        )
                    })
                })??;
            }
            Ok(())
        },
    )?;
    let n = reference_logps.len();
    Ok(PolicyAndReference {
        policy: policy_logps,
        reference: Tensor::from_vec(reference_logps, n, h.device())?,
        mixed,
        sequence_kl,
    })
}

/// The vocabulary size of policy and reference logits `(N, V)` at a batch's `N` targets; an
/// error when their shapes disagree.
fn check_pair_logits(
    policy_logits: &Tensor,
    reference_logits: &Tensor,
    batch: &SequenceBatch,
) -> Result<usize> {
    let (n, v) = policy_logits.dims2()?;
    if reference_logits.dims() != [n, v] || n != batch.n_targets() {
        return Err(Error::Input(format!(
            "policy logits {:?}, reference logits {:?} and {} targets do not agree",
            policy_logits.dims(),
            reference_logits.dims(),
            batch.n_targets()
        )));
    }
    Ok(v)
}

/// Each sequence's sequential KL `Σ_t KL(π_ref(·|x, y_<t) ‖ π_θ(·|x, y_<t))` over its
/// response positions, `(B,)`, from policy logits `z` and reference logits `r` (`(N, V)` each,
/// in `targets` order): per position `Σ_v p_ref(v)·(log p_ref(v) − log_softmax(z)(v))`, the
/// full-vocabulary KL TDPO reads. Differentiable with respect to the policy's logits (their
/// gradient at a position is `softmax(z) − p_ref` times the sequence's weight); the reference
/// is a constant. Composed of candle operations with a backward pass on every device.
pub fn sequence_kl(
    policy_logits: &Tensor,
    reference_logits: &Tensor,
    batch: &SequenceBatch,
) -> Result<Tensor> {
    check_pair_logits(policy_logits, reference_logits, batch)?;
    let log_ref = crate::composed::log_softmax_last(&reference_logits.detach())?;
    let p_ref = log_ref.exp()?;
    let log_policy = crate::composed::log_softmax_last(policy_logits)?;
    let per_token = (p_ref * (log_ref - log_policy)?)?.sum(1)?; // (N,)
    sum_per_sequence(&per_token, batch)
}

/// Sequence log-probs under mixed logits `a·z + b·r` for each `(a, b)` in `mixtures`, where
/// `z` are policy and `r` reference logits at the response positions (`(N, V)` each).
///
/// This is ε-DPO's estimate of the policy at a perturbed β: `(1+ε)·z − ε·r` and
/// `(1−ε)·z + ε·r`, each log-softmaxed over the full vocabulary. Computed outside the autograd
/// graph (the decision it feeds is a constant for the gradient): the mixture is formed in f32
/// as PyTorch forms it, and the log-sum-exp and the sums over tokens are accumulated in f64 so
/// that the three log-ratios ε-DPO compares are not decided by rounding (the exponentials by
/// [`crate::kernels::exp_f64`], within a unit in the last place of the library's, in eight
/// vectorised partial sums).
pub fn mixed_sequence_logps(
    policy_logits: &Tensor,
    reference_logits: &Tensor,
    batch: &SequenceBatch,
    mixtures: &[(f32, f32)],
) -> Result<Vec<Vec<f64>>> {
    let v = check_pair_logits(policy_logits, reference_logits, batch)?;
    // Read on the host: no gradient flows here, and on the CPU this copies nothing.
    let host = candle_core::Device::Cpu;
    let z = policy_logits
        .detach()
        .to_dtype(candle_core::DType::F32)?
        .to_device(&host)?
        .contiguous()?;
    let r = reference_logits
        .detach()
        .to_dtype(candle_core::DType::F32)?
        .to_device(&host)?
        .contiguous()?;
    let mut out = vec![vec![0f64; batch.batch]; mixtures.len()];
    crate::kernels::with_f32(&z, |z| {
        crate::kernels::with_f32(&r, |r| {
            mixed_rows(
                z,
                r,
                v,
                &batch.targets,
                &batch.sequence_of,
                mixtures,
                &mut out,
            )
        })
    })??;
    Ok(out)
}

/// [`mixed_sequence_logps`] on the logits' elements of the rows whose `targets` and
/// `sequence_of` are given: each row's mixed log-probs added to its sequence's sums in `out`
/// (one vector per mixture), in row order.
fn mixed_rows(
    z: &[f32],
    r: &[f32],
    v: usize,
    targets: &[u32],
    sequence_of: &[usize],
    mixtures: &[(f32, f32)],
    out: &mut [Vec<f64>],
) {
    let n = targets.len();
    // Row by row (in parallel when kernels may), then summed per sequence in row order, so
    // the result does not depend on the thread count.
    let row = |i: usize| -> Vec<f64> {
        let (zi, ri) = (&z[i * v..(i + 1) * v], &r[i * v..(i + 1) * v]);
        let target = targets[i] as usize;
        let mut mixed = vec![0f32; v];
        mixtures
            .iter()
            .map(|&(a, b)| {
                crate::kernels::vectorised(
                    #[inline(always)]
                    || {
                        for ((x, &zv), &rv) in mixed.iter_mut().zip(zi).zip(ri) {
                            *x = a * zv + b * rv;
                        }
                        let max = crate::kernels::lane_max(&mixed); // exact, so order-free
                        let sum = crate::kernels::lane_sum(
                            &mixed,
                            #[inline(always)]
                            |x| crate::kernels::exp_f64(f64::from(x - max)),
                        );
                        f64::from(mixed[target] - max) - sum.ln()
                    },
                )
            })
            .collect()
    };
    let per_row: Vec<Vec<f64>> = if crate::kernels::parallel() {
        use rayon::prelude::*;
        (0..n).into_par_iter().map(row).collect()
    } else {
        (0..n).map(row).collect()
    };
    for (i, values) in per_row.iter().enumerate() {
        for (m, value) in values.iter().enumerate() {
            out[m][sequence_of[i]] += value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelConfig;

    fn tiny(raw: serde_json::Value) -> CausalLm {
        let cfg = ModelConfig::from_json(&raw, std::path::Path::new("<test>")).expect("config");
        CausalLm::random(cfg, raw, 3, &Device::Cpu, true).expect("model")
    }

    type Pair = (Vec<u32>, Vec<u32>, Vec<u32>);

    fn pairs() -> Vec<Pair> {
        (0..5u32)
            .map(|i| {
                let seq =
                    |len: u32, off: u32| (0..len).map(|k| (i * 7 + k * 3 + off) % 29).collect();
                (
                    seq(1 + i % 4, 0),
                    seq(2 + (i * 3) % 5, 1),
                    seq(1 + (i * 2) % 6, 2),
                )
            })
            .collect()
    }

    /// Sequence log-probs and the gradient of a weighted sum of them, for a layout.
    fn logps_and_grads(model: &CausalLm, batch: &SequenceBatch) -> (Vec<f32>, Vec<Vec<f32>>) {
        let lp = sequence_logps(model, batch).expect("logps");
        let w: Vec<f32> = (0..batch.batch).map(|i| 0.3 + 0.1 * i as f32).collect();
        let w = Tensor::from_vec(w, batch.batch, &Device::Cpu).expect("w");
        let grads = (&lp * &w)
            .expect("mul")
            .sum_all()
            .expect("sum")
            .backward()
            .expect("bwd");
        let g = model
            .params()
            .iter()
            .map(|p| {
                let var = p.var.as_ref().expect("trainable");
                grads
                    .get(var.as_tensor())
                    .expect("every parameter gets a gradient")
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("grad")
            })
            .collect();
        (lp.to_vec1::<f32>().expect("lp"), g)
    }

    #[test]
    fn sequence_kl_is_the_full_vocabulary_kl_with_its_gradient() {
        let pairs = pairs();
        let rows: Vec<(&[u32], &[u32], &[u32])> = pairs
            .iter()
            .map(|(p, c, r)| (p.as_slice(), c.as_slice(), r.as_slice()))
            .collect();
        let batch = SequenceBatch::shared_prompt_pairs(&rows, 0).expect("layout");
        let n = batch.n_targets();
        let v = 7;
        let z: Vec<f32> = (0..n * v)
            .map(|i| ((i * 37 % 23) as f32) * 0.21 - 2.0)
            .collect();
        let r: Vec<f32> = (0..n * v)
            .map(|i| ((i * 11 % 17) as f32) * 0.3 - 2.5)
            .collect();
        let zt = candle_core::Var::from_vec(z.clone(), (n, v), &Device::Cpu).expect("z");
        let rt = Tensor::from_vec(r.clone(), (n, v), &Device::Cpu).expect("r");
        // The same logits as reference: zero everywhere.
        let same = sequence_kl(zt.as_tensor(), zt.as_tensor(), &batch).expect("kl");
        for k in same.to_vec1::<f32>().expect("kl") {
            assert!(k.abs() < 1e-6, "{k}");
        }
        let kl = sequence_kl(zt.as_tensor(), &rt, &batch).expect("kl");
        let got = kl.to_vec1::<f32>().expect("kl");
        // Direct f64 computation, and the analytic gradient of Σ_b w_b·K_b.
        let log_softmax = |row: &[f32]| -> Vec<f64> {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            row.iter().map(|&x| x as f64 - lse).collect()
        };
        let weights: Vec<f32> = (0..batch.batch).map(|b| 0.5 + b as f32 * 0.25).collect();
        let mut expected = vec![0f64; batch.batch];
        let mut expected_grad = vec![0f64; n * v];
        for i in 0..n {
            let lq = log_softmax(&z[i * v..(i + 1) * v]);
            let lr = log_softmax(&r[i * v..(i + 1) * v]);
            let b = batch.sequence_of[i];
            for j in 0..v {
                expected[b] += lr[j].exp() * (lr[j] - lq[j]);
                expected_grad[i * v + j] = f64::from(weights[b]) * (lq[j].exp() - lr[j].exp());
            }
        }
        for (g, e) in got.iter().zip(&expected) {
            assert!(
                *e > 0.0 && (f64::from(*g) - e).abs() < 1e-5 * e.max(1.0),
                "{g} vs {e}"
            );
        }
        let w = Tensor::from_vec(weights, batch.batch, &Device::Cpu).expect("w");
        let grads = (&kl * &w)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("backward");
        let grad = grads
            .get(zt.as_tensor())
            .expect("the policy logits get a gradient")
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("grad");
        for (g, e) in grad.iter().zip(&expected_grad) {
            assert!((f64::from(*g) - e).abs() < 1e-5, "{g} vs {e}");
        }
    }

    /// The chunked heads give the unchunked log-probs, mixtures, sequential KLs and gradients
    /// (of log-probs and KLs together), for a trained head (tied GPT-2, untied Mistral) and a
    /// frozen one (LoRA); one chunk of all rows (logits kept for the backward) and several.
    #[test]
    fn chunked_heads_equal_the_materialised_logits() {
        for (raw, lora) in [
            (
                serde_json::json!({"model_type": "gpt2", "vocab_size": 29, "n_positions": 32,
                    "n_embd": 16, "n_layer": 2, "n_head": 2}),
                false,
            ),
            (
                serde_json::json!({"model_type": "mistral", "vocab_size": 29, "hidden_size": 16,
                    "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "tie_word_embeddings": false}),
                false,
            ),
            (
                serde_json::json!({"model_type": "llama", "vocab_size": 29, "hidden_size": 16,
                    "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2}),
                true,
            ),
        ] {
            let cfg = ModelConfig::from_json(&raw, std::path::Path::new("<test>")).expect("config");
            let (policy, reference) = if lora {
                let base = CausalLm::random(cfg, raw, 3, &Device::Cpu, false).expect("base");
                let lora = crate::LoraConfig {
                    r: 2,
                    alpha: 4.0,
                    targets: vec!["q_proj".into(), "v_proj".into()],
                    rslora: false,
                };
                (base.with_lora(&lora, 5).expect("lora"), base)
            } else {
                let reference = CausalLm::random(cfg.clone(), raw.clone(), 4, &Device::Cpu, false)
                    .expect("ref");
                (tiny(raw), reference)
            };
            // Move the policy's trainable weights well away from the reference's, so the KL
            // and its gradient are far from zero.
            for (j, p) in policy.params().iter().enumerate() {
                if let Some(var) = &p.var {
                    let t = var.as_tensor();
                    let noise: Vec<f32> = (0..t.elem_count())
                        .map(|i| ((i * 31 + j * 7) % 17) as f32 * 0.05 - 0.4)
                        .collect();
                    let moved = Tensor::from_vec(noise, t.shape(), &Device::Cpu)
                        .and_then(|n| t + n)
                        .expect("moved");
                    var.set(&moved).expect("set");
                }
            }
            let pairs = pairs();
            let rows: Vec<(&[u32], &[u32], &[u32])> = pairs
                .iter()
                .map(|(p, c, r)| (p.as_slice(), c.as_slice(), r.as_slice()))
                .collect();
            let batch = SequenceBatch::shared_prompt_pairs(&rows, 0).expect("layout");
            let mixtures = [(1.0f32, 0.0f32), (0.99, 0.01), (1.01, -0.01)];
            let run = |chunk: Option<usize>| {
                let h = response_hidden(&policy, &batch).expect("hidden");
                let out = policy_and_reference_chunked(
                    &policy,
                    &reference,
                    &h,
                    &batch,
                    Some(&mixtures),
                    true,
                    chunk,
                )
                .expect("scores");
                let kl = out.sequence_kl.clone().expect("the sequential KL");
                let alone = token_logps_chunked(&policy, &h, &batch, chunk).expect("alone");
                let w: Vec<f32> = (0..batch.n_targets())
                    .map(|i| 0.1 + 0.01 * i as f32)
                    .collect();
                let w = Tensor::from_vec(w, batch.n_targets(), &Device::Cpu).expect("w");
                let u: Vec<f32> = (0..batch.batch).map(|b| 0.3 - 0.2 * b as f32).collect();
                let u = Tensor::from_vec(u, batch.batch, &Device::Cpu).expect("u");
                let grads = (&out.policy * &w)
                    .and_then(|t| t.sum_all())
                    .and_then(|a| (&kl * &u)?.sum_all().map(|b| (a, b)))
                    .and_then(|(a, b)| a + b)
                    .and_then(|t| t.backward())
                    .expect("backward");
                let g: Vec<Vec<f32>> = policy
                    .params()
                    .iter()
                    .filter_map(|p| p.var.as_ref())
                    .map(|var| {
                        grads
                            .get(var.as_tensor())
                            .expect("every trainable parameter gets a gradient")
                            .flatten_all()
                            .and_then(|t| t.to_vec1::<f32>())
                            .expect("grad")
                    })
                    .collect();
                let values = |t: &Tensor| t.to_vec1::<f32>().expect("values");
                (
                    values(&out.policy),
                    values(&alone),
                    values(&out.reference),
                    out.mixed.expect("mixtures"),
                    g,
                    values(&kl),
                )
            };
            let (p, alone, r, m, g, kl) = run(None);
            assert!(!g.is_empty());
            assert!(kl.iter().all(|&k| k > 1e-3), "{kl:?}");
            for chunk in [1, 4, 7, 1000] {
                let (p2, alone2, r2, m2, g2, kl2) = run(Some(chunk));
                let close = |a: &[f32], b: &[f32]| {
                    for (x, y) in a.iter().zip(b) {
                        assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{x} vs {y}");
                    }
                };
                close(&p, &p2);
                close(&p, &alone2);
                close(&alone, &alone2);
                close(&r, &r2);
                close(&kl, &kl2);
                for (a, b) in m.iter().flatten().zip(m2.iter().flatten()) {
                    assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
                }
                for (a, b) in g.iter().zip(&g2) {
                    let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                    for (x, y) in a.iter().zip(b) {
                        assert!((x - y).abs() <= 1e-4 * scale, "{x} vs {y}");
                    }
                }
            }
        }
    }

    #[test]
    fn shared_prompt_layout_equals_separate_sequences() {
        for raw in [
            serde_json::json!({"model_type": "gpt2", "vocab_size": 29, "n_positions": 32,
                "n_embd": 16, "n_layer": 2, "n_head": 2}),
            serde_json::json!({"model_type": "mistral", "vocab_size": 29, "hidden_size": 16,
                "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "sliding_window": 4}),
        ] {
            let model = tiny(raw);
            let pairs = pairs();
            let mut seqs: Vec<(&[u32], &[u32])> = pairs
                .iter()
                .map(|(p, c, _)| (p.as_slice(), c.as_slice()))
                .collect();
            seqs.extend(pairs.iter().map(|(p, _, r)| (p.as_slice(), r.as_slice())));
            let separate = SequenceBatch::new(&seqs, 0).expect("layout");
            let rows: Vec<(&[u32], &[u32], &[u32])> = pairs
                .iter()
                .map(|(p, c, r)| (p.as_slice(), c.as_slice(), r.as_slice()))
                .collect();
            let shared = SequenceBatch::shared_prompt_pairs(&rows, 0).expect("layout");
            assert_eq!(shared.rows, pairs.len());
            assert!(shared.rows * shared.seq_len < separate.rows * separate.seq_len);
            let (a, ga) = logps_and_grads(&model, &separate);
            let (b, gb) = logps_and_grads(&model, &shared);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{a:?} vs {b:?}");
            }
            for (p, (x, y)) in model.params().iter().zip(ga.iter().zip(&gb)) {
                let scale = x.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                for (u, v) in x.iter().zip(y) {
                    assert!((u - v).abs() <= 1e-4 * scale, "{}: {u} vs {v}", p.name);
                }
            }
        }
    }
}
