//! Sequence KL(π‖π_ref) along responses.
//!
//! Exact: at every response position the full-vocabulary `KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t))`,
//! summed over the response (EOS included). Sampled: `Σ_t log π(y_t) − log π_ref(y_t)`, whose
//! mean over responses drawn from π is an unbiased but noisier estimate of the same quantity.
//! Both are computed in f64 from the same logits.

use crate::Result;
use candle_core::DType;
use edpo_model::logprobs::response_logits;
use edpo_model::{CausalLm, SequenceBatch};

/// Per-sequence KL estimates.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceKl {
    /// Exact sequence KL of each response.
    pub exact: Vec<f64>,
    /// Sampled estimator of each response.
    pub sampled: Vec<f64>,
    /// Policy entropy summed over each response's positions.
    pub entropy: Vec<f64>,
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// KL of `policy` to `reference` along each `(prompt, response)`.
pub fn sequence_kl(
    policy: &CausalLm,
    reference: &CausalLm,
    sequences: &[(&[u32], &[u32])],
) -> Result<SequenceKl> {
    let batch = SequenceBatch::new(sequences, 0)?;
    let p = response_logits(policy, &batch)?
        .detach()
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    let q = response_logits(reference, &batch)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    let mut exact = vec![0.0; batch.batch];
    let mut sampled = vec![0.0; batch.batch];
    let mut entropy = vec![0.0; batch.batch];
    for (i, (pr, qr)) in p.iter().zip(&q).enumerate() {
        let (lp, lq) = (log_softmax(pr), log_softmax(qr));
        let kl: f64 = lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum();
        let b = batch.sequence_of[i];
        exact[b] += kl.max(0.0);
        let t = batch.targets[i] as usize;
        sampled[b] += lp[t] - lq[t];
        entropy[b] -= lp.iter().map(|a| a.exp() * a).sum::<f64>();
    }
    Ok(SequenceKl {
        exact,
        sampled,
        entropy,
    })
}

/// Log-probability of each response under `model` (sum over its tokens, EOS included), in
/// f64 from the model's logits.
pub fn sequence_logp(model: &CausalLm, sequences: &[(&[u32], &[u32])]) -> Result<Vec<f64>> {
    let batch = SequenceBatch::new(sequences, 0)?;
    let q = response_logits(model, &batch)?
        .detach()
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    let mut out = vec![0.0; batch.batch];
    for (i, row) in q.iter().enumerate() {
        let t = batch.targets[i] as usize;
        out[batch.sequence_of[i]] += log_softmax(row)[t];
    }
    Ok(out)
}
