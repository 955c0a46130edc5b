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

use edpo_data::rng::SplitMix64;

/// Draws one token from `logits` under the settings.
///
/// The draw inverts the cumulative distribution in token-id order, so logits that differ by
/// float rounding (a cached and an uncached forward pass) give the same token except with a
/// probability of the order of that difference; ordering by probability would flip the draw
/// whenever two nearly equal logits swap places. Top-k / top-p sort only to choose the kept set.
pub fn draw(logits: &[f32], s: &SamplingSettings, rng: &mut SplitMix64) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let truncate = (s.top_k > 0 && s.top_k < logits.len()) || s.top_p < 1.0;
    if !truncate && !logits.is_empty() {
        return draw_all(logits, s.temperature, rng);
    }
    draw_kept(logits, s, truncate, rng)
}

/// [`draw`] over every token: the same operations in the same order as [`draw_kept`] without
/// a truncation (each probability divided by the total as the cumulative sum reaches it, so
/// the same bits), without its index and pair vectors, stopping at the drawn token.
fn draw_all(logits: &[f32], temperature: f64, rng: &mut SplitMix64) -> u32 {
    let max = logits
        .iter()
        .map(|&l| f64::from(l))
        .fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|&l| ((f64::from(l) - max) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let u = rng.uniform();
    let mut cum = 0.0;
    for (i, w) in weights.iter().enumerate() {
        cum += w / total;
        if u < cum {
            return i as u32;
        }
    }
    (logits.len() - 1) as u32
}

/// [`draw`] through the kept set of tokens (all of them without `truncate`).
fn draw_kept(logits: &[f32], s: &SamplingSettings, truncate: bool, rng: &mut SplitMix64) -> u32 {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if truncate {
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if s.top_k > 0 {
            idx.truncate(s.top_k);
        }
    }
    let max = idx
        .iter()
        .map(|&i| f64::from(logits[i]))
        .fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((f64::from(logits[i]) - max) / s.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        // `idx` is sorted by decreasing probability here.
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
    let mut kept: Vec<(usize, f64)> = idx.into_iter().zip(probs).collect();
    if truncate {
        kept.sort_by_key(|&(i, _)| i);
    }
    let u = rng.uniform();
    let mut cum = 0.0;
    for &(i, p) in &kept {
        cum += p;
        if u < cum {
            return i as u32;
        }
    }
    kept[kept.len() - 1].0 as u32
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

/// Sequences decoded together: the key/value cache of a batch this size stays in the CPU's
/// caches, where one of thousands of sequences is copied through memory at every step.
const DECODE_BATCH: usize = 256;

/// Samples one response per prompt; sequence `i` uses the stream seeded by `seed` and `i`.
///
/// The prompts run once, right-padded, through the model with a key/value cache; after that
/// each step feeds only the newest token of every unfinished sequence, and finished
/// sequences leave the batch. Prompts are decoded in batches of [`DECODE_BATCH`]; a
/// sequence's stream is fixed by its index in `prompts`, whatever batch it falls in.
pub fn sample(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    settings: &SamplingSettings,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    let (mut rngs, mut responses) = start(prompts, seed)?;
    for (c, chunk) in prompts.chunks(DECODE_BATCH).enumerate() {
        let at = c * DECODE_BATCH;
        sample_batch(
            model,
            chunk,
            settings,
            &mut rngs[at..at + chunk.len()],
            &mut responses[at..at + chunk.len()],
        )?;
    }
    Ok(responses)
}

/// [`sample`] on one batch with its streams, appending to its responses.
fn sample_batch(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    settings: &SamplingSettings,
    rngs: &mut [SplitMix64],
    responses: &mut [Vec<u32>],
) -> Result<()> {
    if prompts.is_empty() || settings.max_new_tokens == 0 {
        return Ok(());
    }
    let b = prompts.len();
    let (ids, mask, t) = right_padded(prompts.iter().map(Vec::as_slice));
    let mut cache = model.new_cache(b);
    let hidden = model.hidden_cached(&ids, &mask, t, &mut cache)?;
    let d = hidden.dim(2)?;
    let rows: Vec<u32> = prompts
        .iter()
        .enumerate()
        .map(|(row, p)| (row * t + p.len() - 1) as u32)
        .collect();
    let rows = Tensor::from_vec(rows, b, model.device())?;
    let mut last = hidden.reshape((b * t, d))?.index_select(&rows, 0)?;
    // `active[row]` is the prompt index of the cache's row `row`.
    let mut active: Vec<usize> = (0..b).collect();
    for step in 0..settings.max_new_tokens {
        let logits = model
            .lm_head(&last)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut kept_rows = Vec::with_capacity(active.len());
        for (row, (&i, tok)) in active
            .iter()
            .zip(draw_rows(&logits, &active, settings, rngs))
            .enumerate()
        {
            responses[i].push(tok);
            if tok != settings.eos {
                kept_rows.push(row);
            }
        }
        if kept_rows.is_empty() || step + 1 == settings.max_new_tokens {
            break;
        }
        if kept_rows.len() < active.len() {
            cache.keep_rows(&kept_rows)?;
            active = kept_rows.iter().map(|&row| active[row]).collect();
        }
        let next: Vec<u32> = active.iter().map(|&i| responses[i][step]).collect();
        let ones = vec![1u8; next.len()];
        let hidden = model.hidden_cached(&next, &ones, 1, &mut cache)?;
        last = hidden.reshape((active.len(), d))?;
    }
    Ok(())
}

/// One token per row of `logits`, row `row` drawn with the stream of sequence `active[row]`;
/// the rows split across the kernels' threads where they may ([`edpo_model::kernels::parallel`]).
/// Each row's draw reads only its logits and its own stream, so the tokens are the same.
fn draw_rows(
    logits: &[Vec<f32>],
    active: &[usize],
    settings: &SamplingSettings,
    rngs: &mut [SplitMix64],
) -> Vec<u32> {
    let drawn = edpo_model::kernels::team::map(logits.len(), |row| {
        let mut stream = rngs[active[row]].clone();
        let token = draw(&logits[row], settings, &mut stream);
        (token, stream)
    });
    let mut tokens = Vec::with_capacity(drawn.len());
    for (&i, (token, stream)) in active.iter().zip(drawn) {
        rngs[i] = stream;
        tokens.push(token);
    }
    tokens
}

/// Right-padded ids (padding 0) and mask of a batch of sequences, and the padded length.
fn right_padded<'a>(
    sequences: impl Iterator<Item = &'a [u32]> + Clone,
) -> (Vec<u32>, Vec<u8>, usize) {
    let t = sequences.clone().map(<[u32]>::len).max().unwrap_or(0);
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for s in sequences {
        ids.extend_from_slice(s);
        ids.resize(ids.len() + t - s.len(), 0);
        mask.resize(mask.len() + s.len(), 1);
        mask.resize(mask.len() + t - s.len(), 0);
    }
    (ids, mask, t)
}

/// Checks the prompts; one seeded stream per sequence and empty responses.
fn start(prompts: &[Vec<u32>], seed: u64) -> Result<(Vec<SplitMix64>, Vec<Vec<u32>>)> {
    if prompts.iter().any(Vec::is_empty) {
        return Err(Error::Input("a prompt has no tokens".into()));
    }
    let streams = (0..prompts.len())
        .map(|i| SplitMix64(seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)))
        .collect();
    Ok((streams, vec![Vec::new(); prompts.len()]))
}

/// The same sampler without a cache: every step reruns the whole prefix of every unfinished
/// sequence. It is the definition [`sample`] must reproduce (tested) and the baseline the bench
/// times it against.
pub fn sample_uncached(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    settings: &SamplingSettings,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    let (mut rngs, mut responses) = start(prompts, seed)?;
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    for _ in 0..settings.max_new_tokens {
        if active.is_empty() {
            break;
        }
        let lens: Vec<usize> = active
            .iter()
            .map(|&i| prompts[i].len() + responses[i].len())
            .collect();
        let b = active.len();
        let sequences: Vec<Vec<u32>> = active
            .iter()
            .map(|&i| [prompts[i].as_slice(), &responses[i]].concat())
            .collect();
        let (ids, mask, t) = right_padded(sequences.iter().map(Vec::as_slice));
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
    fn drawing_from_all_tokens_gives_the_kept_set_path_s_tokens() {
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919 % 1013) as f32) * 0.011 - 4.0)
            .collect();
        for temperature in [0.3, 1.0, 1.7] {
            let s = SamplingSettings {
                temperature,
                top_k: 0,
                top_p: 1.0,
                max_new_tokens: 1,
                eos: 0,
            };
            let (mut fast, mut general) = (SplitMix64(11), SplitMix64(11));
            for _ in 0..300 {
                assert_eq!(
                    draw(&logits, &s, &mut fast),
                    draw_kept(&logits, &s, false, &mut general)
                );
            }
        }
    }

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
    fn tiny(raw: serde_json::Value) -> CausalLm {
        let cfg = edpo_model::ModelConfig::from_json(&raw, std::path::Path::new("<test>")).unwrap();
        CausalLm::random(cfg, raw, 7, &candle_core::Device::Cpu, false).unwrap()
    }

    fn tiny_models() -> Vec<CausalLm> {
        vec![
            tiny(
                serde_json::json!({"model_type": "gpt2", "vocab_size": 24, "n_positions": 64,
                "n_embd": 16, "n_layer": 2, "n_head": 2}),
            ),
            // Grouped-query attention and a sliding window shorter than the sequences.
            tiny(
                serde_json::json!({"model_type": "mistral", "vocab_size": 24,
                "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 5,
                "tie_word_embeddings": true}),
            ),
            // Wide enough (192) for decoding steps to read the cache in place: grouped heads
            // (three query heads on each key/value head) and a window, and GPT-2's heads.
            tiny(
                serde_json::json!({"model_type": "mistral", "vocab_size": 24,
                "hidden_size": 192, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 6, "num_key_value_heads": 2, "sliding_window": 5,
                "tie_word_embeddings": true}),
            ),
            tiny(
                serde_json::json!({"model_type": "gpt2", "vocab_size": 24, "n_positions": 64,
                "n_embd": 192, "n_layer": 2, "n_head": 3}),
            ),
        ]
    }

    fn prompts() -> Vec<Vec<u32>> {
        (0..9u32)
            .map(|i| {
                (0..1 + (i as usize * 5) % 7)
                    .map(|k| (i * 3 + k as u32) % 23)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn cached_sampling_reproduces_recomputing_the_prefix() -> Result<()> {
        for model in tiny_models() {
            let (mut stopped, mut ran_out) = (false, false);
            for (temperature, top_k, top_p) in [(1.0, 0, 1.0), (0.7, 5, 0.9), (0.0, 0, 1.0)] {
                let s = SamplingSettings {
                    temperature,
                    top_k,
                    top_p,
                    max_new_tokens: 12,
                    eos: 3,
                };
                let cached = sample(&model, &prompts(), &s, 11)?;
                let recomputed = sample_uncached(&model, &prompts(), &s, 11)?;
                assert_eq!(cached, recomputed, "{:?}", model.config());
                stopped |= cached.iter().any(|r| r.len() < 12 && r.last() == Some(&3));
                ran_out |= cached.iter().any(|r| r.len() == 12);
            }
            // Some sequences stopped at EOS and some ran to the limit, so both paths ran.
            assert!(stopped && ran_out);
        }
        Ok(())
    }

    #[test]
    fn cached_states_equal_full_forward_states() -> Result<()> {
        for model in tiny_models() {
            let seqs = prompts();
            let b = seqs.len();
            let t = seqs.iter().map(Vec::len).max().unwrap();
            let mut ids = vec![0u32; b * t];
            let mut mask = vec![0u8; b * t];
            for (r, p) in seqs.iter().enumerate() {
                ids[r * t..r * t + p.len()].copy_from_slice(p);
                mask[r * t..r * t + p.len()].fill(1);
            }
            let full = model.hidden(&ids, &mask, b, t)?.to_vec3::<f32>()?;
            // First three columns at once, then one column at a time.
            let mut cache = model.new_cache(b);
            let mut got = vec![Vec::new(); b];
            let mut col = 0;
            while col < t {
                let n = if col == 0 { 3.min(t) } else { 1 };
                let pick = |v: &[u32]| -> Vec<u32> {
                    (0..b)
                        .flat_map(|r| v[r * t + col..r * t + col + n].to_vec())
                        .collect()
                };
                let step_ids = pick(&ids);
                let m32: Vec<u32> = mask.iter().map(|&m| u32::from(m)).collect();
                let step_mask: Vec<u8> = pick(&m32).iter().map(|&m| m as u8).collect();
                let h = model
                    .hidden_cached(&step_ids, &step_mask, n, &mut cache)?
                    .to_vec3::<f32>()?;
                for (r, rows) in h.into_iter().enumerate() {
                    got[r].extend(rows);
                }
                col += n;
            }
            for r in 0..b {
                for c in 0..seqs[r].len() {
                    for (x, y) in full[r][c].iter().zip(&got[r][c]) {
                        assert!((x - y).abs() < 1e-5, "row {r} col {c}: {x} vs {y}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_cache_refuses_positions_beyond_the_model() -> Result<()> {
        let model = &tiny_models()[0];
        let mut cache = model.new_cache(1);
        let ids = vec![1u32; 64];
        model.hidden_cached(&ids, &[1; 64], 64, &mut cache)?;
        let err = model.hidden_cached(&[1], &[1], 1, &mut cache).unwrap_err();
        assert!(
            err.to_string().contains("beyond the model's 64 positions"),
            "{err}"
        );
        Ok(())
    }
}
