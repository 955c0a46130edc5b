//! Evaluation of a policy against the original reference: win rates of gold rewards on the
//! test prompts (every reported number) and on the validation prompts (`val_*`, what
//! settings are chosen by), exact and sampled sequence KL, entropy, length, held-out
//! preference accuracy, the win rate against held-out chosen responses, and the second judge.
//!
//! The evaluation is paired: every prompt is sampled `eval.samples` times, and sample `j` of
//! prompt `i` of the policy and of the reference draw from the same random stream (common
//! random numbers; the sampler inverts the CDF in token-id order, so a policy that has not
//! moved draws exactly the reference's sample). Win rates, reward differences and KL are
//! averaged over a prompt's samples first, and their standard errors come from the
//! per-prompt paired differences, which [`Evaluation::per_prompt`] keeps for the report's
//! comparisons across runs.

use crate::config::RunConfig;
use crate::task::{DrawnReference, Judge, LabelledPair, TaskData};
use anyhow::Result;
use edpo_data::TokenizedPair;
use edpo_eval::{mean_and_stderr, sample, sequence_kl, win_rate, win_scores, SamplingSettings};
use edpo_model::CausalLm;
use edpo_objectives::PairLogps;
use edpo_rundir::PerPrompt;
use edpo_train::score_pairs;
use serde_json::{json, Map, Value};

/// One evaluation: the summary numbers (the `eval/…` line and `eval.json`) and the paired
/// numbers of each test prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The summary numbers.
    pub summary: Map<String, Value>,
    /// Per test prompt: win, reward difference and KL, each a mean over the prompt's samples
    /// (`step` is left for the caller); `None` for a task without a gold reward.
    pub per_prompt: Option<PerPrompt>,
}

/// Evaluation of one run's policy, again and again over training, against the original
/// reference. The reference's samples and their rewards do not change during a run, so they
/// are drawn once.
///
/// A task without a gold reward (user data) is evaluated by what needs none: exact and
/// sampled KL, entropy and length on the test prompts, preference accuracy and the implicit
/// reward margin on the held-out pairs, and `val_preference_accuracy` on the validation
/// pairs, which settings are then chosen by.
pub struct Evaluator<'a> {
    reference: &'a CausalLm,
    data: &'a TaskData,
    settings: SamplingSettings,
    seed: u64,
    samples: usize,
    /// The test prompts, each repeated `samples` times, and the validation prompts likewise.
    test: Vec<Vec<u32>>,
    val: Vec<Vec<u32>>,
    /// With a gold reward: the judge, and the reference's samples and gold rewards on `test`
    /// and its gold rewards on `val`.
    gold_draws: Option<(&'a dyn Judge, DrawnReference)>,
}
/// Each prompt repeated `k` times in a row: prompt `i`'s sample `j` is sequence `i·k + j`,
/// so its random stream is fixed by `(i, j)` whatever model samples it.
fn repeated(prompts: &[Vec<u32>], k: usize) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), k))
        .collect()
}

/// Means of consecutive groups of `k` values: per-prompt means over its samples.
fn per_prompt_means(values: &[f64], k: usize) -> Vec<f64> {
    values
        .chunks(k.max(1))
        .map(|c| c.iter().sum::<f64>() / c.len() as f64)
        .collect()
}

/// Preference accuracy (the policy's implicit reward ranks the chosen response first) and
/// the mean log-ratio margin `Δ = (log π/π_ref)(chosen) − (log π/π_ref)(rejected)`, each
/// with its standard error over the pairs.
fn pair_numbers(
    policy: &CausalLm,
    reference: &CausalLm,
    pairs: &[LabelledPair],
) -> Result<[(f64, f64); 2]> {
    let held: Vec<TokenizedPair> = pairs.iter().map(|p| p.tokenized()).collect();
    let scores = score_pairs(policy, reference, &held, None)?;
    let logps: PairLogps<'_> = scores.logps();
    let margins: Vec<f64> = (0..logps.len()).map(|i| logps.delta(i)).collect();
    let correct: Vec<f64> = margins
        .iter()
        .map(|&d| f64::from(u8::from(d > 0.0)))
        .collect();
    Ok([mean_and_stderr(&correct), mean_and_stderr(&margins)])
}

impl<'a> Evaluator<'a> {
    /// Samples the reference once on the test and validation prompts (with a gold reward; a
    /// task without one compares no samples).
    pub fn new(reference: &'a CausalLm, data: &'a TaskData, cfg: &RunConfig) -> Result<Self> {
        let settings = SamplingSettings {
            temperature: cfg.eval.temperature,
            top_k: cfg.eval.top_k,
            top_p: cfg.eval.top_p,
            max_new_tokens: data.response_tokens,
            eos: data.eos,
        };
        let seed = 0xE7A1 ^ cfg.run.seed.wrapping_mul(0x9E37_79B9);
        let samples = cfg.eval.samples.max(1);
        let test = repeated(&data.eval_prompts, samples);
        let val = repeated(&data.val_prompts, samples);
        let gold_draws = match &data.judge {
            Some(judge) => Some((
                &**judge,
                Self::draw_reference(
                    reference, data, &**judge, &settings, seed, samples, &test, &val,
                )?,
            )),
            None => None,
        };
        Ok(Self {
            reference,
            data,
            settings,
            seed,
            samples,
            test,
            val,
            gold_draws,
        })
    }

    /// The reference's samples and gold rewards. They depend on the stream and the settings
    /// only: runs of one seed in one process draw them once (the first run to ask; the
    /// others wait for it).
    #[allow(clippy::too_many_arguments)]
    fn draw_reference(
        reference: &CausalLm,
        data: &TaskData,
        judge: &dyn Judge,
        settings: &SamplingSettings,
        seed: u64,
        samples: usize,
        test: &[Vec<u32>],
        val: &[Vec<u32>],
    ) -> Result<DrawnReference> {
        let key = format!("{seed}/{samples}/{settings:?}");
        let cell = data
            .reference_draws
            .lock()
            .map_err(|_| anyhow::anyhow!("reference draws lock poisoned"))?
            .entry(key)
            .or_default()
            .clone();
        if let Some(d) = cell.get() {
            return Ok(d.clone());
        }
        let started = std::time::Instant::now();
        let theirs = sample(reference, test, settings, seed)?;
        let r_theirs = gold(judge, test, &theirs);
        let theirs_val = sample(reference, val, settings, seed ^ 0x7A2)?;
        let reference_val = gold(judge, val, &theirs_val);
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "sampled the reference on the test and validation prompts"
        );
        // Another run may have filled it meanwhile; the values are the same.
        let _ = cell.set((theirs, r_theirs, reference_val));
        cell.get()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("reference draws missing"))
    }

    /// The sampling settings of the evaluation.
    pub fn settings(&self) -> &SamplingSettings {
        &self.settings
    }

    /// Every evaluation number of `policy`: on the test prompts and held-out pairs, and the
    /// `val_*` numbers on the validation prompts (or, without a gold reward, pairs).
    pub fn evaluate(&self, policy: &CausalLm) -> Result<Evaluation> {
        // No autograd history: evaluation never differentiates.
        let policy = &policy.detached();
        let (data, settings, seed, k) = (self.data, &self.settings, self.seed, self.samples);
        let prompts = &self.test;
        let started = std::time::Instant::now();
        let ours = sample(policy, prompts, settings, seed)?;
        let sampled = started.elapsed().as_secs_f64();
        let seqs: Vec<(&[u32], &[u32])> = prompts
            .iter()
            .zip(&ours)
            .map(|(p, r)| (p.as_slice(), r.as_slice()))
            .collect();
        let kl = sequence_kl(policy, self.reference, &seqs)?;
        let kl_done = started.elapsed().as_secs_f64();
        let kl_p = per_prompt_means(&kl.exact, k);
        let (kl_mean, kl_se) = mean_and_stderr(&kl_p);
        let (kls_mean, kls_se) = mean_and_stderr(&per_prompt_means(&kl.sampled, k));
        let lengths: Vec<f64> = ours.iter().map(|r| r.len() as f64).collect();
        let entropy: Vec<f64> = kl
            .entropy
            .iter()
            .zip(&lengths)
            .map(|(h, n)| h / n.max(1.0))
            .collect();
        let [(accuracy, accuracy_se), (margin, margin_se)] =
            pair_numbers(policy, self.reference, &data.eval_pairs)?;
        let mut out = Map::new();
        for (key, v) in [
            ("kl", kl_mean),
            ("kl_se", kl_se),
            ("kl_sampled", kls_mean),
            ("kl_sampled_se", kls_se),
            ("preference_accuracy", accuracy),
            ("preference_accuracy_se", accuracy_se),
            ("logratio_margin", margin),
            ("logratio_margin_se", margin_se),
            ("mean_length", mean_and_stderr(&lengths).0),
            ("entropy_per_token", mean_and_stderr(&entropy).0),
        ] {
            out.insert(key.to_string(), json!(v));
        }
        let per_prompt = match &self.gold_draws {
            Some((judge, drawn)) => {
                let (win_p, diff_p) = self.judged(policy, *judge, drawn, &ours, &mut out)?;
                Some(PerPrompt {
                    step: 0,
                    win: win_p,
                    reward_diff: diff_p,
                    kl: kl_p,
                })
            }
            None => {
                let [(val_accuracy, val_accuracy_se), _] =
                    pair_numbers(policy, self.reference, &data.val_pairs)?;
                out.insert("val_preference_accuracy".into(), json!(val_accuracy));
                out.insert("val_preference_accuracy_se".into(), json!(val_accuracy_se));
                out.insert("n_val_pairs".into(), json!(data.val_pairs.len()));
                None
            }
        };
        out.insert("n_prompts".into(), json!(data.eval_prompts.len()));
        out.insert("samples_per_prompt".into(), json!(k));
        out.insert("n_pairs".into(), json!(data.eval_pairs.len()));
        out.insert("n_train_pairs".into(), json!(data.train.len()));
        tracing::info!(
            sampling = sampled,
            kl = kl_done - sampled,
            total = started.elapsed().as_secs_f64(),
            "evaluated (seconds)"
        );
        Ok(Evaluation {
            summary: out,
            per_prompt,
        })
    }

    /// The numbers of a gold reward: win rates and reward gains against the reference's
    /// draws on the test and validation prompts (paired), the second judge, the win rate
    /// against held-out chosen responses and the label noise. Returns the per-prompt wins and
    /// reward gains.
    fn judged(
        &self,
        policy: &CausalLm,
        judge: &dyn Judge,
        drawn: &DrawnReference,
        ours: &[Vec<u32>],
        out: &mut Map<String, Value>,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let (data, settings, seed, k) = (self.data, &self.settings, self.seed, self.samples);
        let prompts = &self.test;
        let (theirs, r_theirs, reference_val) = drawn;
        let r_ours = gold(judge, prompts, ours);
        let win_p = per_prompt_means(&win_scores(&r_ours, r_theirs, 0.0), k);
        let diff: Vec<f64> = r_ours.iter().zip(r_theirs).map(|(a, b)| a - b).collect();
        let diff_p = per_prompt_means(&diff, k);
        let (win_mean, win_se) = mean_and_stderr(&win_p);
        let (diff_mean, diff_se) = mean_and_stderr(&diff_p);
        let (reward_mean, reward_se) = mean_and_stderr(&per_prompt_means(&r_ours, k));
        let second: Option<(Vec<f64>, Vec<f64>)> = prompts
            .iter()
            .zip(ours)
            .zip(theirs)
            .map(|((p, a), b)| Some((judge.second(p, a)?, judge.second(p, b)?)))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.into_iter().unzip());
        // Win rate against the chosen response of held-out pairs, on their prompts.
        let held_prompts: Vec<Vec<u32>> = data
            .eval_pairs
            .iter()
            .map(|p| p.prompt_input_ids.clone())
            .collect();
        let on_pairs = sample(policy, &held_prompts, settings, seed ^ 0xC405)?;
        let r_on_pairs = gold(judge, &held_prompts, &on_pairs);
        let r_chosen: Vec<f64> = data
            .eval_pairs
            .iter()
            .zip(&held_prompts)
            .map(|(p, prompt)| {
                p.chosen_reward
                    .unwrap_or_else(|| judge.gold(prompt, &p.chosen_input_ids))
            })
            .collect();
        let win_chosen = win_rate(&r_on_pairs, &r_chosen, 0.0);
        // Validation: the numbers a setting is chosen by, paired like the test numbers.
        let ours_val = sample(policy, &self.val, settings, seed ^ 0x7A2)?;
        let r_val = gold(judge, &self.val, &ours_val);
        let (win_val, win_val_se) = mean_and_stderr(&per_prompt_means(
            &win_scores(&r_val, reference_val, 0.0),
            k,
        ));
        let diff_val: Vec<f64> = r_val
            .iter()
            .zip(reference_val)
            .map(|(a, b)| a - b)
            .collect();
        let (diff_val_mean, diff_val_se) = mean_and_stderr(&per_prompt_means(&diff_val, k));
        for (key, v) in [
            ("win_rate", win_mean),
            ("win_rate_se", win_se),
            ("win_rate_lo", win_mean - 1.96 * win_se),
            ("win_rate_hi", win_mean + 1.96 * win_se),
            ("reward_diff", diff_mean),
            ("reward_diff_se", diff_se),
            ("gold_reward", reward_mean),
            ("gold_reward_se", reward_se),
            ("reference_gold_reward", mean_and_stderr(r_theirs).0),
            ("win_rate_vs_chosen", win_chosen.rate),
            ("win_rate_vs_chosen_se", win_chosen.stderr),
            ("val_win_rate", win_val),
            ("val_win_rate_se", win_val_se),
            ("val_reward_diff", diff_val_mean),
            ("val_reward_diff_se", diff_val_se),
            ("val_gold_reward", mean_and_stderr(&r_val).0),
        ] {
            out.insert(key.to_string(), json!(v));
        }
        if let Some(noise) = data.label_noise() {
            out.insert("label_noise".into(), json!(noise));
        }
        if let Some((a, b)) = second {
            let w = win_rate(&a, &b, 0.0);
            out.insert("second_judge_win_rate".into(), json!(w.rate));
            out.insert("second_judge_win_rate_se".into(), json!(w.stderr));
            out.insert("second_judge_score".into(), json!(mean_and_stderr(&a).0));
        }
        out.insert("n_val_prompts".into(), json!(data.val_prompts.len()));
        Ok((win_p, diff_p))
    }
}

/// The gold reward of each prompt + response.
fn gold(judge: &dyn Judge, prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Vec<f64> {
    prompts
        .iter()
        .zip(responses)
        .map(|(p, r)| judge.gold(p, r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::RawConfig;
    use crate::testing::{tiny_model as model, CountOnes};

    fn data() -> TaskData {
        let prompts: Vec<Vec<u32>> = (0..12u32).map(|i| vec![i % 5, (i + 1) % 5]).collect();
        let pair = |i: u32| LabelledPair {
            prompt_input_ids: vec![i % 5],
            chosen_input_ids: vec![1, 1, 5],
            rejected_input_ids: vec![2, 3, 5],
            p_true: Some(0.8),
            chosen_reward: Some(2.0),
            rejected_reward: Some(0.0),
            scores: None,
        };
        TaskData {
            judge: Some(Box::new(CountOnes)),
            eos: 5,
            reference_dir: std::path::PathBuf::from("<unused>"),
            train: (0..4).map(pair).collect(),
            eval_pairs: (0..4).map(pair).collect(),
            val_pairs: Vec::new(),
            eval_prompts: prompts.clone(),
            val_prompts: prompts[..6].to_vec(),
            response_tokens: 6,
            pairs_key: json!({}),
            prompts_key: json!({}),
            bt_temperature: None,
            data_summary: None,
            reference_draws: Default::default(),
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
        let same_eval = evaluator.evaluate(&reference)?;
        let same = same_eval.summary.clone();
        let get = |m: &Map<String, Value>, k: &str| m[k].as_f64().unwrap_or(f64::NAN);
        assert!(get(&same, "kl").abs() < 1e-9, "{same:?}");
        // Common random numbers: the reference against itself draws the same samples, so it
        // wins exactly half of every prompt and gains exactly nothing, prompt by prompt.
        let per_prompt = same_eval.per_prompt.clone().expect("a gold reward");
        assert_eq!(per_prompt.win, vec![0.5; 12]);
        assert_eq!(per_prompt.reward_diff, vec![0.0; 12]);
        assert_eq!(get(&same, "win_rate"), 0.5);
        assert_eq!(get(&same, "win_rate_se"), 0.0);
        assert_eq!(get(&same, "reward_diff"), 0.0);
        assert_eq!(get(&same, "val_win_rate"), 0.5);
        assert_eq!(get(&same, "val_reward_diff"), 0.0);
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
        assert_eq!(same["samples_per_prompt"], 4);
        // The same evaluation twice gives the same numbers (seeded sampling).
        assert_eq!(evaluator.evaluate(&reference)?, same_eval);
        let moved = evaluator.evaluate(&model(2))?.summary;
        assert!(get(&moved, "kl") > 1e-3, "{moved:?}");
        Ok(())
    }

    #[test]
    fn without_a_gold_reward_the_evaluation_is_kl_and_preference_accuracy() -> Result<()> {
        let (reference, mut data, cfg) = (model(1), data(), config());
        data.judge = None;
        data.val_pairs = data.eval_pairs[..3].to_vec();
        let evaluator = Evaluator::new(&reference, &data, &cfg)?;
        let same = evaluator.evaluate(&reference)?;
        assert_eq!(same.per_prompt, None, "no paired per-prompt numbers");
        let get = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_f64);
        assert_eq!(get(&same.summary, "kl"), Some(0.0));
        assert_eq!(get(&same.summary, "logratio_margin"), Some(0.0));
        // The reference ranks no pair: a margin of exactly zero is not a correct ranking.
        assert_eq!(get(&same.summary, "val_preference_accuracy"), Some(0.0));
        assert_eq!(same.summary["n_val_pairs"], 3);
        for key in ["win_rate", "gold_reward", "val_win_rate", "label_noise"] {
            assert!(!same.summary.contains_key(key), "{key} without a judge");
        }
        let moved = evaluator.evaluate(&model(2))?.summary;
        assert!(get(&moved, "kl").is_some_and(|kl| kl > 1e-3), "{moved:?}");
        assert!(get(&moved, "logratio_margin").is_some_and(|m| m != 0.0));
        Ok(())
    }
}
