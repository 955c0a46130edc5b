//! Seeded batched sampling from a causal LM.
//!
//! Each step runs the batch of (prompt + tokens so far) and draws the next token of every
//! unfinished sequence from its last position. A sequence stops at EOS (kept, and counted as
//! a response token, as in training) or at `max_new_tokens`. The draw uses one seeded stream
//! per sequence, so a sequence's sample does not depend on the rest of the batch.

use crate::{Error, Result};
use candle_core::{DType, Tensor};
use edpo_model::CausalLm;

/// How to sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingSettings {
    /// Softmax temperature (0 means greedy).
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens with probability ≥ p (1: all).
    pub top_p: f64,
    /// Maximum response length, EOS included.
    pub max_new_tokens: usize,
    /// The EOS token.
    pub eos: u32,
}

pub use edpo_data::rng::SplitMix64;

/// Draws one token from `logits` under the settings.
pub fn draw(logits: &[f32], s: &SamplingSettings, rng: &mut SplitMix64) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.top_k > 0 {
        idx.truncate(s.top_k);
    }
    let max = f64::from(logits[idx[0]]);
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((f64::from(logits[i]) - max) / s.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (k, p) in probs.iter().enumerate() {
            cum += p;
            if cum >= s.top_p {
                keep = k + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let t: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= t);
    }
    let u = rng.uniform();
    let mut cum = 0.0;
    for (k, p) in probs.iter().enumerate() {
        cum += p;
        if u < cum {
            return idx[k] as u32;
        }
    }
    idx[idx.len() - 1] as u32
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Samples one response per prompt; sequence `i` uses the stream seeded by `seed` and `i`.
pub fn sample(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    settings: &SamplingSettings,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    if prompts.iter().any(Vec::is_empty) {
        return Err(Error::Input("a prompt has no tokens".into()));
    }
    let mut rngs: Vec<SplitMix64> = (0..prompts.len())
        .map(|i| SplitMix64(seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)))
        .collect();
    let mut responses: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    for _ in 0..settings.max_new_tokens {
        if active.is_empty() {
            break;
        }
        let lens: Vec<usize> = active
            .iter()
            .map(|&i| prompts[i].len() + responses[i].len())
            .collect();
        let t = lens.iter().copied().max().unwrap_or(0);
        let b = active.len();
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![0u8; b * t];
        for (row, &i) in active.iter().enumerate() {
            for (k, &id) in prompts[i].iter().chain(&responses[i]).enumerate() {
                ids[row * t + k] = id;
                mask[row * t + k] = 1;
            }
        }
        let hidden = model.hidden(&ids, &mask, b, t)?;
        let d = hidden.dim(2)?;
        let rows: Vec<u32> = lens
            .iter()
            .enumerate()
            .map(|(row, &l)| (row * t + l - 1) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, b, model.device())?;
        let last = hidden.reshape((b * t, d))?.index_select(&rows, 0)?;
        let logits = model
            .lm_head(&last)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut still = Vec::with_capacity(b);
        for (row, &i) in active.iter().enumerate() {
            let tok = draw(&logits[row], settings, &mut rngs[i]);
            responses[i].push(tok);
            if tok != settings.eos {
                still.push(i);
            }
        }
        active = still;
    }
    Ok(responses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_is_greedy_and_top_p_truncates() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let s = SamplingSettings {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            max_new_tokens: 1,
            eos: 0,
        };
        let mut rng = SplitMix64(1);
        assert!((0..20).all(|_| draw(&logits, &s, &mut rng) == 1));
        let s = SamplingSettings {
            top_k: 0,
            top_p: 0.5,
            ..s
        };
        let drawn: Vec<u32> = (0..200).map(|_| draw(&logits, &s, &mut rng)).collect();
        assert!(drawn.iter().all(|&t| t == 1 || t == 3), "{drawn:?}");
        assert!(drawn.contains(&1) && drawn.contains(&3));
        let greedy = SamplingSettings {
            temperature: 0.0,
            ..s
        };
        assert_eq!(draw(&logits, &greedy, &mut rng), 1);
    }
}
