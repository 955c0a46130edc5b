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

/// Fills `out` with `e^{x − max}` of each logit (f64) and returns the log-sum-exp.
fn exps(row: &[f32], out: &mut Vec<f64>) -> f64 {
    let max = f64::from(row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    out.clear();
    out.extend(row.iter().map(|&x| (f64::from(x) - max).exp()));
    out.iter().sum::<f64>().ln() + max
}

/// Log-sum-exp of a row, in f64.
fn log_sum_exp(row: &[f32]) -> f64 {
    let max = f64::from(row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    row.iter()
        .map(|&x| (f64::from(x) - max).exp())
        .sum::<f64>()
        .ln()
        + max
}

/// One position's full-vocabulary KL(p‖q), log-ratio of the target token and entropy of p,
/// from the two models' logits; one exponential per logit of each model (`scratch` is reused).
fn row_terms(pr: &[f32], qr: &[f32], target: usize, scratch: &mut Vec<f64>) -> (f64, f64, f64) {
    let lse_p = exps(pr, scratch);
    let total: f64 = scratch.iter().sum();
    let lse_q = log_sum_exp(qr);
    let (mut kl, mut h) = (0.0, 0.0);
    for ((&e, &a), &b) in scratch.iter().zip(pr).zip(qr) {
        let prob = e / total;
        let lp = f64::from(a) - lse_p;
        kl += prob * (lp - (f64::from(b) - lse_q));
        h -= prob * lp;
    }
    let log_ratio = (f64::from(pr[target]) - lse_p) - (f64::from(qr[target]) - lse_q);
    (kl, log_ratio, h)
}

/// Sequences per forward pass in [`sequence_kl`] and [`sequence_logp`]: bounds the logits held
/// at once (≈ 256 × response length × vocabulary floats) instead of materialising them for
/// every sequence.
const CHUNK: usize = 256;

/// KL of `policy` to `reference` along each `(prompt, response)`.
pub fn sequence_kl(
    policy: &CausalLm,
    reference: &CausalLm,
    sequences: &[(&[u32], &[u32])],
) -> Result<SequenceKl> {
    let mut out = SequenceKl {
        exact: Vec::with_capacity(sequences.len()),
        sampled: Vec::with_capacity(sequences.len()),
        entropy: Vec::with_capacity(sequences.len()),
    };
    let mut scratch = Vec::new();
    for chunk in sequences.chunks(CHUNK) {
        let batch = SequenceBatch::new(chunk, 0)?;
        let p = response_logits(policy, &batch)?
            .detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let q = response_logits(reference, &batch)?
            .detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let rows = batch.targets.len();
        let vocab = p.len().checked_div(rows).unwrap_or(0);
        let mut exact = vec![0.0; batch.batch];
        let mut sampled = vec![0.0; batch.batch];
        let mut entropy = vec![0.0; batch.batch];
        for i in 0..rows {
            let (pr, qr) = (
                &p[i * vocab..(i + 1) * vocab],
                &q[i * vocab..(i + 1) * vocab],
            );
            let t = batch.targets[i] as usize;
            let (kl, log_ratio, h) = row_terms(pr, qr, t, &mut scratch);
            let b = batch.sequence_of[i];
            exact[b] += kl.max(0.0);
            sampled[b] += log_ratio;
            entropy[b] += h;
        }
        out.exact.extend(exact);
        out.sampled.extend(sampled);
        out.entropy.extend(entropy);
    }
    Ok(out)
}

/// Log-probability of each response under `model` (sum over its tokens, EOS included), in
/// f64 from the model's logits.
pub fn sequence_logp(model: &CausalLm, sequences: &[(&[u32], &[u32])]) -> Result<Vec<f64>> {
    let mut all = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(CHUNK) {
        let batch = SequenceBatch::new(chunk, 0)?;
        let q = response_logits(model, &batch)?
            .detach()
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut out = vec![0.0; batch.batch];
        for (i, row) in q.iter().enumerate() {
            let t = batch.targets[i] as usize;
            out[batch.sequence_of[i]] += f64::from(row[t]) - log_sum_exp(row);
        }
        all.extend(out);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_position_matches_the_textbook_formulas() {
        let p: Vec<f32> = (0..50)
            .map(|i| ((i * 37 % 11) as f32) * 0.7 - 3.0)
            .collect();
        let q: Vec<f32> = (0..50).map(|i| ((i * 13 % 7) as f32) * 0.9 - 2.0).collect();
        let softmax = |x: &[f32]| -> Vec<f64> {
            let z: f64 = x.iter().map(|&v| f64::from(v).exp()).sum();
            x.iter().map(|&v| f64::from(v).exp() / z).collect()
        };
        let (pp, qq) = (softmax(&p), softmax(&q));
        let kl: f64 = pp.iter().zip(&qq).map(|(a, b)| a * (a / b).ln()).sum();
        let h: f64 = -pp.iter().map(|a| a * a.ln()).sum::<f64>();
        let (k, r, e) = row_terms(&p, &q, 7, &mut Vec::new());
        assert!((k - kl).abs() < 1e-12, "{k} {kl}");
        assert!((e - h).abs() < 1e-12, "{e} {h}");
        assert!((r - (pp[7] / qq[7]).ln()).abs() < 1e-12);
        let (k, r, _) = row_terms(&p, &p, 3, &mut Vec::new());
        assert!(k.abs() < 1e-15 && r == 0.0);
    }
}
