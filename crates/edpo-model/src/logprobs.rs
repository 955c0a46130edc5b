//! Sequence log-probs under the tokenisation convention of TRL-style trainers.
//!
//! A sequence is `prompt ++ response`, where the response already ends with EOS (which counts
//! as a response token). `log π(y|x) = Σ_t log_softmax(z_{t−1})[y_t]` over response tokens
//! only. Sequences are right-padded into one batch; only the rows that predict a response
//! token go through the LM head, so the vocabulary projection is never spent on prompt or
//! padding positions.

use crate::{CausalLm, Error, Result};
use candle_core::{Device, Tensor};

/// Prompt + response sequences laid out for one forward pass.
#[derive(Debug, Clone)]
pub struct SequenceBatch {
    /// Right-padded token ids, `batch × seq_len`.
    pub input_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    /// Number of sequences.
    pub batch: usize,
    /// Padded length.
    pub seq_len: usize,
    /// For each scored response token: the flat index `b·seq_len + t − 1` of the position
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
            seq_len,
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

/// Logits `(N, V)` at the positions that predict response tokens, in `targets` order.
pub fn response_logits(model: &CausalLm, batch: &SequenceBatch) -> Result<Tensor> {
    let h = model.hidden(
        &batch.input_ids,
        &batch.attention_mask,
        batch.batch,
        batch.seq_len,
    )?;
    let d = h.dim(2)?;
    let rows = Tensor::from_slice(&batch.predictor_rows, batch.n_targets(), model.device())?;
    let h = h
        .reshape((batch.batch * batch.seq_len, d))?
        .index_select(&rows, 0)?; // (N, d)
    model.lm_head(&h)
}

/// Per-token log-probs `(N,)` of the targets under `logits (N, V)`.
pub fn token_logps(logits: &Tensor, batch: &SequenceBatch) -> Result<Tensor> {
    Ok(crate::kernels::log_softmax_gather(logits, &batch.targets)?)
}

/// Sums per-token values `(N,)` into per-sequence values `(B,)`.
pub fn sum_per_sequence(per_token: &Tensor, batch: &SequenceBatch) -> Result<Tensor> {
    let seg = batch.segment_matrix(per_token.device())?; // (B, N)
    Ok(seg.matmul(&per_token.unsqueeze(1)?)?.squeeze(1)?) // (B,)
}

/// `log π(y|x)` of every sequence, `(B,)`, differentiable with respect to the model's `Var`s.
pub fn sequence_logps(model: &CausalLm, batch: &SequenceBatch) -> Result<Tensor> {
    let logits = response_logits(model, batch)?;
    sum_per_sequence(&token_logps(&logits, batch)?, batch)
}

/// Sequence log-probs under mixed logits `a·z + b·r` for each `(a, b)` in `mixtures`, where
/// `z` are policy and `r` reference logits at the response positions (`(N, V)` each).
///
/// This is ε-DPO's estimate of the policy at a perturbed β: `(1+ε)·z − ε·r` and
/// `(1−ε)·z + ε·r`, each log-softmaxed over the full vocabulary. Computed outside the autograd
/// graph (the decision it feeds is a constant for the gradient): the mixture is formed in f32
/// as PyTorch forms it, and the log-sum-exp and the sums over tokens are accumulated in f64 so
/// that the three log-ratios ε-DPO compares are not decided by rounding.
pub fn mixed_sequence_logps(
    policy_logits: &Tensor,
    reference_logits: &Tensor,
    batch: &SequenceBatch,
    mixtures: &[(f32, f32)],
) -> Result<Vec<Vec<f64>>> {
    let (n, v) = policy_logits.dims2()?;
    if reference_logits.dims() != [n, v] || n != batch.n_targets() {
        return Err(Error::Input(format!(
            "policy logits {:?}, reference logits {:?} and {} targets do not agree",
            policy_logits.dims(),
            reference_logits.dims(),
            batch.n_targets()
        )));
    }
    let z = policy_logits
        .detach()
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let r = reference_logits
        .detach()
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = vec![vec![0f64; batch.batch]; mixtures.len()];
    let mut mixed = vec![0f32; v];
    for i in 0..n {
        let (zi, ri) = (&z[i * v..(i + 1) * v], &r[i * v..(i + 1) * v]);
        let target = batch.targets[i] as usize;
        for (m, &(a, b)) in mixtures.iter().enumerate() {
            let mut max = f32::NEG_INFINITY;
            for ((x, &zv), &rv) in mixed.iter_mut().zip(zi).zip(ri) {
                *x = a * zv + b * rv;
                max = max.max(*x);
            }
            let sum: f64 = mixed.iter().map(|&x| ((x - max) as f64).exp()).sum();
            out[m][batch.sequence_of[i]] += (mixed[target] - max) as f64 - sum.ln();
        }
    }
    Ok(out)
}
