//! Evaluation of a policy against the original reference: win rates of gold rewards on the
//! test prompts (every reported number) and on the validation prompts (`val_*`, what
//! settings are chosen by), exact and sampled sequence KL, entropy, length, held-out
//! preference accuracy, the win rate against held-out chosen responses, and the second judge.

use crate::config::RunConfig;
use crate::task::TaskData;
use anyhow::Result;
use edpo_data::TokenizedPair;
use edpo_eval::{mean_and_stderr, sample, sequence_kl, win_rate, SamplingSettings};
use edpo_model::CausalLm;
use edpo_objectives::PairLogps;
use edpo_train::score_pairs;
use serde_json::{json, Map, Value};

/// Evaluation of one run's policy, again and again over training, against the original
/// reference. The reference's samples and their rewards do not change during a run, so they
/// are drawn once.
pub struct Evaluator<'a> {
    reference: &'a CausalLm,
    data: &'a TaskData,
    settings: SamplingSettings,
    seed: u64,
    /// Reference samples and gold rewards on the test prompts, then on the validation prompts.
    reference_test: (Vec<Vec<u32>>, Vec<f64>),
    reference_val: Vec<f64>,
}

impl<'a> Evaluator<'a> {
    /// Samples the reference once on the test and validation prompts.
    pub fn new(reference: &'a CausalLm, data: &'a TaskData, cfg: &RunConfig) -> Result<Self> {
        let settings = SamplingSettings {
            temperature: cfg.eval.temperature,
            top_k: cfg.eval.top_k,
            top_p: cfg.eval.top_p,
            max_new_tokens: data.response_tokens,
            eos: data.eos,
        };
        let seed = 0xE7A1 ^ cfg.run.seed.wrapping_mul(0x9E37_79B9);
        let started = std::time::Instant::now();
        let theirs = sample(reference, &data.eval_prompts, &settings, seed ^ 0xFFFF)?;
        let r_theirs = gold(data, &data.eval_prompts, &theirs);
        let theirs_val = sample(reference, &data.val_prompts, &settings, seed ^ 0x7A1)?;
        let reference_val = gold(data, &data.val_prompts, &theirs_val);
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "sampled the reference on the test and validation prompts"
        );
        Ok(Self {
            reference,
            data,
            settings,
            seed,
            reference_test: (theirs, r_theirs),
            reference_val,
        })
    }

    /// Every evaluation number of `policy`: on the test prompts and held-out pairs, and the
    /// `val_*` numbers on the validation prompts.
    pub fn evaluate(&self, policy: &CausalLm) -> Result<Map<String, Value>> {
        // No autograd history: evaluation never differentiates.
        let policy = &policy.detached();
        let (data, settings, seed) = (self.data, &self.settings, self.seed);
        let prompts = &data.eval_prompts;
        let started = std::time::Instant::now();
        let ours = sample(policy, prompts, settings, seed)?;
        let sampled = started.elapsed().as_secs_f64();
        let (theirs, r_theirs) = &self.reference_test;
        let r_ours = gold(data, prompts, &ours);
        let win = win_rate(&r_ours, r_theirs, 0.0);
        let seqs: Vec<(&[u32], &[u32])> = prompts
            .iter()
            .zip(&ours)
            .map(|(p, r)| (p.as_slice(), r.as_slice()))
            .collect();
        let kl = sequence_kl(policy, self.reference, &seqs)?;
        let kl_done = started.elapsed().as_secs_f64();
        let (kl_mean, kl_se) = mean_and_stderr(&kl.exact);
        let (kls_mean, kls_se) = mean_and_stderr(&kl.sampled);
        let (reward_mean, reward_se) = mean_and_stderr(&r_ours);
        let lengths: Vec<f64> = ours.iter().map(|r| r.len() as f64).collect();
        let entropy: Vec<f64> = kl
            .entropy
            .iter()
            .zip(&lengths)
            .map(|(h, n)| h / n.max(1.0))
            .collect();
        let second: Option<(Vec<f64>, Vec<f64>)> = prompts
            .iter()
            .zip(&ours)
            .zip(theirs)
            .map(|((p, a), b)| Some((data.judge.second(p, a)?, data.judge.second(p, b)?)))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.into_iter().unzip());
        // Win rate against the chosen response of held-out pairs, on their prompts.
        let held_prompts: Vec<Vec<u32>> = data
            .eval_pairs
            .iter()
            .map(|p| p.prompt_input_ids.clone())
            .collect();
        let on_pairs = sample(policy, &held_prompts, settings, seed ^ 0xC405)?;
        let r_on_pairs = gold(data, &held_prompts, &on_pairs);
        let r_chosen: Vec<f64> = data.eval_pairs.iter().map(|p| p.chosen_reward).collect();
        let win_chosen = win_rate(&r_on_pairs, &r_chosen, 0.0);
        let held: Vec<TokenizedPair> = data.eval_pairs.iter().map(|p| p.tokenized()).collect();
        let scores = score_pairs(policy, self.reference, &held, None)?;
        let logps: PairLogps<'_> = scores.logps();
        let correct: Vec<f64> = (0..logps.len())
            .map(|i| f64::from(u8::from(logps.delta(i) > 0.0)))
            .collect();
        let (accuracy, accuracy_se) = mean_and_stderr(&correct);
        // Validation: the numbers a setting is chosen by.
        let ours_val = sample(policy, &data.val_prompts, settings, seed ^ 0x7A2)?;
        let r_val = gold(data, &data.val_prompts, &ours_val);
        let win_val = win_rate(&r_val, &self.reference_val, 0.0);
        let mut out = Map::new();
        for (k, v) in [
            ("win_rate", win.rate),
            ("win_rate_se", win.stderr),
            ("win_rate_lo", win.lo),
            ("win_rate_hi", win.hi),
            ("gold_reward", reward_mean),
            ("gold_reward_se", reward_se),
            ("reference_gold_reward", mean_and_stderr(r_theirs).0),
            ("kl", kl_mean),
            ("kl_se", kl_se),
            ("kl_sampled", kls_mean),
            ("kl_sampled_se", kls_se),
            ("preference_accuracy", accuracy),
            ("preference_accuracy_se", accuracy_se),
            ("mean_length", mean_and_stderr(&lengths).0),
            ("entropy_per_token", mean_and_stderr(&entropy).0),
            ("win_rate_vs_chosen", win_chosen.rate),
            ("win_rate_vs_chosen_se", win_chosen.stderr),
            ("val_win_rate", win_val.rate),
            ("val_win_rate_se", win_val.stderr),
            ("val_gold_reward", mean_and_stderr(&r_val).0),
        ] {
            out.insert(k.to_string(), json!(v));
        }
        if let Some((a, b)) = second {
            let w = win_rate(&a, &b, 0.0);
            out.insert("second_judge_win_rate".into(), json!(w.rate));
            out.insert("second_judge_win_rate_se".into(), json!(w.stderr));
            out.insert("second_judge_score".into(), json!(mean_and_stderr(&a).0));
        }
        out.insert("n_prompts".into(), json!(prompts.len()));
        out.insert("n_val_prompts".into(), json!(data.val_prompts.len()));
        out.insert("n_pairs".into(), json!(held.len()));
        tracing::info!(
            sampling = sampled,
            kl = kl_done - sampled,
            total = started.elapsed().as_secs_f64(),
            "evaluated (seconds)"
        );
        Ok(out)
    }
}

/// The gold reward of each prompt + response.
fn gold(data: &TaskData, prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Vec<f64> {
    prompts
        .iter()
        .zip(responses)
        .map(|(p, r)| data.judge.gold(p, r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::RawConfig;
    use crate::task::LabelledPair;
    use crate::testing::{tiny_model as model, CountOnes};

    fn data() -> TaskData {
        let prompts: Vec<Vec<u32>> = (0..12u32).map(|i| vec![i % 5, (i + 1) % 5]).collect();
        let pair = |i: u32| LabelledPair {
            prompt_input_ids: vec![i % 5],
            chosen_input_ids: vec![1, 1, 5],
            rejected_input_ids: vec![2, 3, 5],
            p_true: 0.8,
            chosen_reward: 2.0,
            rejected_reward: 0.0,
        };
        TaskData {
            judge: Box::new(CountOnes),
            eos: 5,
            reference_dir: std::path::PathBuf::from("<unused>"),
            train: (0..4).map(pair).collect(),
            eval_pairs: (0..4).map(pair).collect(),
            eval_prompts: prompts.clone(),
            val_prompts: prompts[..6].to_vec(),
            response_tokens: 6,
            pairs_key: json!({}),
        }
    }

    fn config() -> RunConfig {
        let yaml = "task: {kind: synthetic}\nobjective: {kind: dpo, beta: 0.1}\n";
        let raw: RawConfig = serde_yaml::from_str(yaml).expect("yaml");
        raw.resolve().expect("config")
    }

    #[test]
    fn the_reference_against_itself_has_zero_kl_and_a_moved_policy_does_not() -> Result<()> {
        let (reference, data, cfg) = (model(1), data(), config());
        let evaluator = Evaluator::new(&reference, &data, &cfg)?;
        let same = evaluator.evaluate(&reference)?;
        let get = |m: &Map<String, Value>, k: &str| m[k].as_f64().unwrap_or(f64::NAN);
        assert!(get(&same, "kl").abs() < 1e-9, "{same:?}");
        for key in [
            "win_rate",
            "win_rate_se",
            "val_win_rate",
            "preference_accuracy",
            "win_rate_vs_chosen",
            "gold_reward",
            "entropy_per_token",
        ] {
            assert!(get(&same, key).is_finite(), "{key} in {same:?}");
        }
        assert_eq!(same["n_prompts"], 12);
        assert_eq!(same["n_val_prompts"], 6);
        assert_eq!(same["n_pairs"], 4);
        // The same evaluation twice gives the same numbers (seeded sampling).
        assert_eq!(evaluator.evaluate(&reference)?, same);
        let moved = evaluator.evaluate(&model(2))?;
        assert!(get(&moved, "kl") > 1e-3, "{moved:?}");
        Ok(())
    }
}
