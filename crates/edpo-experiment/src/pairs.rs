//! Preference pairs sampled from a reference: two responses per prompt, scored by the task's
//! gold reward and labelled by a Bradley–Terry draw, each pair keeping its true preference
//! probability and both gold rewards.

use crate::task::{Judge, LabelledPair};
use anyhow::{bail, Result};
use edpo_data::rng::SplitMix64;
use edpo_eval::{sample, SamplingSettings};
use edpo_model::CausalLm;

/// Samples `count` labelled pairs from `reference` for prompts drawn by `next_prompt`; pairs
/// whose two responses are identical carry no preference and are skipped.
pub fn sample_pairs(
    reference: &CausalLm,
    judge: &dyn Judge,
    next_prompt: &mut dyn FnMut() -> Vec<u32>,
    settings: &SamplingSettings,
    bt_temperature: f64,
    count: usize,
    seed: u64,
) -> Result<Vec<LabelledPair>> {
    let mut rng = SplitMix64(seed);
    let mut pairs = Vec::with_capacity(count);
    let mut round = 0u64;
    let started = std::time::Instant::now();
    while pairs.len() < count {
        if round > 20 {
            bail!(
                "could not sample {count} distinct pairs (got {})",
                pairs.len()
            );
        }
        let prompts: Vec<Vec<u32>> = (0..count - pairs.len()).map(|_| next_prompt()).collect();
        let a = sample(reference, &prompts, settings, seed ^ (round * 2 + 1))?;
        let b = sample(reference, &prompts, settings, seed ^ (round * 2 + 2))?;
        for ((prompt, ra), rb) in prompts.into_iter().zip(a).zip(b) {
            if ra == rb {
                continue;
            }
            let (ga, gb) = (judge.gold(&prompt, &ra), judge.gold(&prompt, &rb));
            let p_a = 1.0 / (1.0 + (-(ga - gb) / bt_temperature).exp());
            let a_wins = rng.uniform() < p_a;
            let (chosen, rejected, gc, gr, p) = if a_wins {
                (ra, rb, ga, gb, p_a)
            } else {
                (rb, ra, gb, ga, 1.0 - p_a)
            };
            pairs.push(LabelledPair {
                prompt_input_ids: prompt,
                chosen_input_ids: chosen,
                rejected_input_ids: rejected,
                p_true: Some(p),
                chosen_reward: Some(gc),
                rejected_reward: Some(gr),
                scores: None,
            });
        }
        round += 1;
    }
    tracing::info!(
        pairs = pairs.len(),
        seconds = started.elapsed().as_secs_f64(),
        "sampled preference pairs"
    );
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tiny_model, CountOnes};

    #[test]
    fn pairs_are_distinct_labelled_consistently_and_reproducible() {
        let model = tiny_model(3);
        let settings = SamplingSettings {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 6,
            eos: 5,
        };
        let draw = |seed| {
            let mut k = 0u32;
            let mut next = || {
                k += 1;
                vec![k % 5, (k + 2) % 5]
            };
            sample_pairs(&model, &CountOnes, &mut next, &settings, 0.5, 40, seed).expect("pairs")
        };
        let pairs = draw(9);
        assert_eq!(pairs.len(), 40);
        for p in &pairs {
            assert_ne!(p.chosen_input_ids, p.rejected_input_ids);
            let (rc, rr, pt) = (
                p.chosen_reward.expect("judged"),
                p.rejected_reward.expect("judged"),
                p.p_true.expect("labelled"),
            );
            assert_eq!(rc, CountOnes.gold(&[], &p.chosen_input_ids));
            assert_eq!(rr, CountOnes.gold(&[], &p.rejected_input_ids));
            // The label's probability is the Bradley–Terry probability of the chosen one.
            let bt = 1.0 / (1.0 + (-(rc - rr) / 0.5).exp());
            assert!((pt - bt).abs() < 1e-12, "{pt} vs {bt}");
        }
        // The label is drawn with the Bradley–Terry probability, so the chosen response's
        // probability averages p² + (1 − p)² ≥ ½ (an inverted label would average 2p(1 − p)).
        let mean = pairs.iter().filter_map(|p| p.p_true).sum::<f64>() / pairs.len() as f64;
        assert!(mean > 0.5, "mean true preference of the chosen {mean}");
        assert!(pairs.iter().any(|p| p.chosen_reward != p.rejected_reward));
        assert_eq!(draw(9), pairs, "same seed, same pairs");
        assert_ne!(draw(10), pairs, "another seed, other pairs");
    }
}
