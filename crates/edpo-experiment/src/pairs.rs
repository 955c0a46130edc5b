//! Preference pairs sampled from a reference: two responses per prompt, scored by the task's
//! gold reward and labelled by a Bradley–Terry draw, each pair keeping its true preference
//! probability and both gold rewards. [`rso_pairs`]: RSO's statistical rejection sampling, the
//! two responses of a pair accepted from several candidates towards the optimal policy
//! `π*(y|x) ∝ π_ref(y|x)·exp(r(x, y)/β)`, then labelled the same way.

use crate::task::{Judge, LabelledPair};
use anyhow::{bail, Result};
use edpo_data::rng::SplitMix64;
use edpo_eval::{sample, SamplingSettings};
use edpo_model::CausalLm;

/// How the two responses of a pair are drawn, wherever pairs are sampled (a task's stages,
/// RSO's candidates, on-policy rounds): ancestral sampling from the full distribution at
/// temperature 1, up to `max_new_tokens` tokens or `eos`.
pub fn pair_sampling(max_new_tokens: usize, eos: u32) -> SamplingSettings {
    SamplingSettings {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens,
        eos,
    }
}

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
            pairs.push(label(judge, prompt, ra, rb, bt_temperature, rng.uniform()));
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

/// A Bradley–Terry label for responses `a` and `b` of `prompt` at temperature `tau`, drawn
/// with `u` uniform in [0, 1): the pair as (chosen, rejected) with its truth.
fn label(
    judge: &dyn Judge,
    prompt: Vec<u32>,
    a: Vec<u32>,
    b: Vec<u32>,
    tau: f64,
    u: f64,
) -> LabelledPair {
    let (ga, gb) = (judge.gold(&prompt, &a), judge.gold(&prompt, &b));
    let p_a = 1.0 / (1.0 + (-(ga - gb) / tau).exp());
    let (chosen, rejected, gc, gr, p) = if u < p_a {
        (a, b, ga, gb, p_a)
    } else {
        (b, a, gb, ga, 1.0 - p_a)
    };
    LabelledPair {
        prompt_input_ids: prompt,
        chosen_input_ids: chosen,
        rejected_input_ids: rejected,
        p_true: Some(p),
        chosen_reward: Some(gc),
        rejected_reward: Some(gr),
        scores: None,
    }
}

/// On-policy pairs: for each of `prompts`, two responses drawn from `model` (the current
/// policy), labelled by a Bradley–Terry draw at `bt_temperature` as [`sample_pairs`] labels.
/// Two identical responses carry no preference: such a prompt is drawn again (up to 8 times),
/// then left out. Returns the pairs, in prompt order, and how many prompts were left out.
pub fn policy_pairs(
    model: &CausalLm,
    judge: &dyn Judge,
    prompts: &[Vec<u32>],
    settings: &SamplingSettings,
    bt_temperature: f64,
    seed: u64,
) -> Result<(Vec<LabelledPair>, usize)> {
    let mut rng = SplitMix64(seed);
    let mut drawn: Vec<Option<(Vec<u32>, Vec<u32>)>> = vec![None; prompts.len()];
    for attempt in 0..8u64 {
        let open: Vec<usize> = (0..prompts.len()).filter(|&i| drawn[i].is_none()).collect();
        if open.is_empty() {
            break;
        }
        let asked: Vec<Vec<u32>> = open.iter().map(|&i| prompts[i].clone()).collect();
        let a = sample(model, &asked, settings, seed ^ (attempt * 2 + 1))?;
        let b = sample(model, &asked, settings, seed ^ (attempt * 2 + 2))?;
        for ((&i, ra), rb) in open.iter().zip(a).zip(b) {
            if ra != rb {
                drawn[i] = Some((ra, rb));
            }
        }
    }
    let mut pairs = Vec::with_capacity(prompts.len());
    let mut left_out = 0;
    for (prompt, d) in prompts.iter().zip(drawn) {
        match d {
            Some((a, b)) => pairs.push(label(
                judge,
                prompt.clone(),
                a,
                b,
                bt_temperature,
                rng.uniform(),
            )),
            None => left_out += 1,
        }
    }
    Ok((pairs, left_out))
}

/// RSO's pair sampling (Liu et al., 2024, arXiv 2309.06657, Algorithm 1).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RsoSampling {
    /// Responses drawn from the reference per prompt (the paper's 64; at least 2).
    pub candidates: usize,
    /// β of the target policy `π_ref·exp(r/β)`, in the gold reward's units (> 0).
    pub beta: f64,
}

/// What [`rso_pairs`] did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RsoSummary {
    /// Prompts given.
    pub prompts: usize,
    /// Pairs made.
    pub pairs: usize,
    /// Prompts left out: fewer than two distinct responses among their candidates.
    pub prompts_without_two_distinct: usize,
    /// Mean number of distinct responses among a prompt's candidates.
    pub mean_distinct_candidates: f64,
    /// Mean gold reward of the accepted responses.
    pub mean_accepted_reward: f64,
    /// Mean gold reward of all distinct candidates.
    pub mean_candidate_reward: f64,
}

/// Statistical rejection sampling (RSO's Algorithm 1): from distinct `candidates` with rewards
/// `r`, accept `wanted` of them. Each pass draws `u` for every remaining candidate in order and
/// accepts it when `u < exp((r − r_max)/β)`, `r_max` the largest remaining reward, until
/// `wanted` are accepted; accepted ones leave the pool. Returns indices into `rewards`.
pub fn rejection_sample(
    rewards: &[f64],
    wanted: usize,
    beta: f64,
    rng: &mut SplitMix64,
) -> Vec<usize> {
    let mut pool: Vec<usize> = (0..rewards.len()).collect();
    let mut accepted = Vec::with_capacity(wanted);
    while accepted.len() < wanted && !pool.is_empty() {
        let max = pool
            .iter()
            .map(|&i| rewards[i])
            .fold(f64::NEG_INFINITY, f64::max);
        let mut kept = Vec::with_capacity(pool.len());
        for &i in &pool {
            if accepted.len() < wanted && rng.uniform() < ((rewards[i] - max) / beta).exp() {
                accepted.push(i);
            } else {
                kept.push(i);
            }
        }
        pool = kept;
    }
    accepted
}

/// One RSO pair per prompt of `prompts`: `rso.candidates` responses from `reference`, their
/// distinct ones scored by the gold reward, two accepted by [`rejection_sample`], then
/// labelled by a Bradley–Terry draw at `bt_temperature` as [`sample_pairs`] labels. A prompt
/// whose candidates hold fewer than two distinct responses is left out (and counted).
pub fn rso_pairs(
    reference: &CausalLm,
    judge: &dyn Judge,
    prompts: &[Vec<u32>],
    settings: &SamplingSettings,
    bt_temperature: f64,
    rso: RsoSampling,
    seed: u64,
) -> Result<(Vec<LabelledPair>, RsoSummary)> {
    if rso.candidates < 2 || !(rso.beta > 0.0 && rso.beta.is_finite()) {
        bail!(
            "key `task.rso`: candidates must be at least 2 and beta positive (got {} and {})",
            rso.candidates,
            rso.beta
        );
    }
    let started = std::time::Instant::now();
    let draws: Vec<Vec<Vec<u32>>> = (0..rso.candidates as u64)
        .map(|k| {
            Ok(sample(
                reference,
                prompts,
                settings,
                seed ^ (0x5250_0000 + k),
            )?)
        })
        .collect::<Result<_>>()?;
    let mut rng = SplitMix64(seed);
    let mut pairs = Vec::with_capacity(prompts.len());
    let mut summary = RsoSummary {
        prompts: prompts.len(),
        ..RsoSummary::default()
    };
    let (mut distinct_total, mut accepted_sum, mut candidate_sum, mut candidate_n) =
        (0usize, 0.0, 0.0, 0usize);
    for (i, prompt) in prompts.iter().enumerate() {
        // Distinct responses in draw order (the paper's candidates are a set).
        let mut distinct: Vec<Vec<u32>> = Vec::new();
        for draw in &draws {
            if !distinct.contains(&draw[i]) {
                distinct.push(draw[i].clone());
            }
        }
        distinct_total += distinct.len();
        let rewards: Vec<f64> = distinct.iter().map(|r| judge.gold(prompt, r)).collect();
        candidate_sum += rewards.iter().sum::<f64>();
        candidate_n += rewards.len();
        let picked = rejection_sample(&rewards, 2, rso.beta, &mut rng);
        let u = rng.uniform();
        if let [a, b] = picked[..] {
            accepted_sum += rewards[a] + rewards[b];
            pairs.push(label(
                judge,
                prompt.clone(),
                distinct[a].clone(),
                distinct[b].clone(),
                bt_temperature,
                u,
            ));
        } else {
            summary.prompts_without_two_distinct += 1;
        }
    }
    summary.pairs = pairs.len();
    summary.mean_distinct_candidates = distinct_total as f64 / prompts.len().max(1) as f64;
    summary.mean_accepted_reward = accepted_sum / (2 * pairs.len()).max(1) as f64;
    summary.mean_candidate_reward = candidate_sum / candidate_n.max(1) as f64;
    tracing::info!(
        pairs = pairs.len(),
        seconds = started.elapsed().as_secs_f64(),
        "RSO: sampled {} candidates per prompt; accepted mean reward {:.3} against {:.3} for all candidates",
        rso.candidates,
        summary.mean_accepted_reward,
        summary.mean_candidate_reward
    );
    Ok((pairs, summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tiny_model, CountOnes};

    /// Plain sampling of up to 6 tokens, EOS 5 (the tiny model's).
    fn settings() -> SamplingSettings {
        pair_sampling(6, 5)
    }

    #[test]
    fn pairs_are_distinct_labelled_consistently_and_reproducible() {
        let model = tiny_model(3);
        let settings = settings();
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

    /// Rejection sampling accepts with probability `exp((r − r_max)/β)` per pass: the best
    /// candidate always on the first pass; a small β accepts almost only the top ones, a large
    /// β almost uniformly.
    #[test]
    fn rejection_sampling_tilts_towards_high_rewards_by_beta() {
        let rewards = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5];
        let mean_accepted = |beta: f64| {
            let mut rng = SplitMix64(5);
            let mut total = 0.0;
            for _ in 0..4000 {
                let picked = rejection_sample(&rewards, 2, beta, &mut rng);
                assert_eq!(picked.len(), 2);
                assert_ne!(picked[0], picked[1]);
                total += rewards[picked[0]] + rewards[picked[1]];
            }
            total / 8000.0
        };
        let (sharp, flat) = (mean_accepted(0.05), mean_accepted(1000.0));
        // β → 0: the two best (3.5 and 3.0); β → ∞: the first two tried, in draw order.
        assert!((sharp - 3.25).abs() < 0.01, "{sharp}");
        assert!((flat - 0.25).abs() < 0.05, "{flat}");
        let middle = mean_accepted(1.0);
        assert!(middle > 2.0 && middle < 3.25, "{middle}");
        // The best remaining candidate is accepted whenever it is reached (u < e⁰); a pool
        // smaller than asked gives what it has.
        let mut rng = SplitMix64(1);
        assert!(rejection_sample(&[1.0, 7.0], 1, 1e-9, &mut rng) == vec![1]);
        assert!(rejection_sample(&[1.0], 2, 1.0, &mut rng) == vec![0]);
    }

    #[test]
    fn rso_pairs_prefer_rewarded_responses_and_keep_the_label_rule() {
        let model = tiny_model(3);
        let settings = settings();
        let prompts: Vec<Vec<u32>> = (0..40u32).map(|k| vec![k % 5, (k + 2) % 5]).collect();
        let draw = |candidates: usize, beta: f64| {
            rso_pairs(
                &model,
                &CountOnes,
                &prompts,
                &settings,
                0.5,
                RsoSampling { candidates, beta },
                7,
            )
        };
        let run = |beta: f64| draw(8, beta).expect("rso");
        let (sharp, s) = run(0.05);
        let (flat, f) = run(100.0);
        assert_eq!(s.prompts, 40);
        assert_eq!(s.pairs + s.prompts_without_two_distinct, 40);
        assert!(s.mean_accepted_reward > f.mean_accepted_reward);
        assert!(s.mean_accepted_reward >= s.mean_candidate_reward);
        assert_eq!(
            s.mean_candidate_reward, f.mean_candidate_reward,
            "same candidates"
        );
        for p in sharp.iter().chain(&flat) {
            assert_ne!(p.chosen_input_ids, p.rejected_input_ids);
            let (rc, rr) = (
                p.chosen_reward.expect("gold"),
                p.rejected_reward.expect("gold"),
            );
            let bt = 1.0 / (1.0 + (-(rc - rr) / 0.5).exp());
            assert!((p.p_true.expect("truth") - bt).abs() < 1e-12);
        }
        assert_eq!(run(0.05).0, sharp, "reproducible");
        assert!(draw(1, 1.0).is_err());
    }
}
