//! One run, top to bottom: load the policy and reference, then for every optimizer step
//! (schedule → periodic evaluation → forward/backward → clip → step → log), then the final
//! evaluation. Metrics go to the run directory, never to the log.

use crate::config::RunConfig;
use crate::rundir::RunDir;
use crate::stages::StageCache;
use crate::task::TaskData;
use anyhow::Result;
use candle_core::Device;
use edpo_data::synthetic::Rng;
use edpo_data::TokenizedPair;
use edpo_eval::{mean_and_stderr, sample, sequence_kl, win_rate, SamplingSettings};
use edpo_model::CausalLm;
use edpo_objectives::PairLogps;
use edpo_train::{score_pairs, AdamWConfig, Schedule, ScheduleKind, Trainer, TrainerConfig};
use serde_json::{json, Map, Value};

/// Number of optimizer steps a config takes over `n_pairs` training pairs (the last partial
/// batch of an epoch is dropped).
pub fn total_steps(cfg: &RunConfig, n_pairs: usize) -> usize {
    let per_step = cfg.optim.batch_size * cfg.optim.grad_accum;
    (n_pairs / per_step).max(1) * cfg.optim.epochs
}

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
        let theirs = sample(reference, &data.eval_prompts, &settings, seed ^ 0xFFFF)?;
        let r_theirs = gold(data, &data.eval_prompts, &theirs);
        let theirs_val = sample(reference, &data.val_prompts, &settings, seed ^ 0x7A1)?;
        let reference_val = gold(data, &data.val_prompts, &theirs_val);
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
        let (data, settings, seed) = (self.data, &self.settings, self.seed);
        let prompts = &data.eval_prompts;
        let ours = sample(policy, prompts, settings, seed)?;
        let (theirs, r_theirs) = &self.reference_test;
        let r_ours = gold(data, prompts, &ours);
        let win = win_rate(&r_ours, r_theirs, 0.0);
        let seqs: Vec<(&[u32], &[u32])> = prompts
            .iter()
            .zip(&ours)
            .map(|(p, r)| (p.as_slice(), r.as_slice()))
            .collect();
        let kl = sequence_kl(policy, self.reference, &seqs)?;
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

/// Number of true-preference-probability bins in `decisions.json`.
pub const P_TRUE_BINS: usize = 10;

/// ε-DPO's step decisions over a whole run, counted by bins of the pair's true preference
/// probability (`bin k` holds `p ∈ [k/10, (k+1)/10)`, the last bin closed).
#[derive(Debug, Clone, Default, PartialEq)]
struct Decisions {
    relaxed: [u64; P_TRUE_BINS],
    kept: [u64; P_TRUE_BINS],
    strengthened: [u64; P_TRUE_BINS],
}

impl Decisions {
    fn add(&mut self, p_true: f64, step: i8) {
        let bin = ((p_true * P_TRUE_BINS as f64).floor().max(0.0) as usize).min(P_TRUE_BINS - 1);
        match step {
            1 => self.relaxed[bin] += 1,
            -1 => self.strengthened[bin] += 1,
            _ => self.kept[bin] += 1,
        }
    }

    fn to_json(&self) -> Value {
        let edges: Vec<f64> = (0..=P_TRUE_BINS)
            .map(|k| k as f64 / P_TRUE_BINS as f64)
            .collect();
        json!({"p_true_edges": edges, "relaxed": self.relaxed, "kept": self.kept,
            "strengthened": self.strengthened})
    }
}

/// Trains one config to completion in `dir`; returns the final evaluation.
pub fn run(
    cfg: &RunConfig,
    data: &TaskData,
    cache: &StageCache,
    dir: &mut RunDir,
    progress: &indicatif::ProgressBar,
) -> Result<Value> {
    let policy = CausalLm::load(&data.reference_dir, &Device::Cpu, true)?;
    let reference = CausalLm::load(&data.reference_dir, &Device::Cpu, false)?;
    let original_reference = reference.frozen_copy()?;
    let steps = total_steps(cfg, data.train.len());
    let o = &cfg.optim;
    let schedule = Schedule {
        peak_lr: o.lr,
        warmup_steps: (o.warmup_ratio * steps as f64).ceil() as usize,
        total_steps: steps,
        kind: match o.schedule.as_str() {
            "constant" => ScheduleKind::Constant,
            "linear" => ScheduleKind::Linear,
            _ => ScheduleKind::Cosine,
        },
    };
    let mut trainer = Trainer::new(
        policy,
        reference,
        TrainerConfig {
            objective: cfg.objective.to_objective(cfg.run.seed)?,
            sft_weight: cfg.objective.sft_weight,
            adamw: AdamWConfig {
                beta1: o.adam_beta1,
                beta2: o.adam_beta2,
                eps: o.adam_eps,
                weight_decay: o.weight_decay,
            },
            schedule,
            max_grad_norm: o.max_grad_norm,
        },
    )?
    .with_shards(cfg.run.shards)?;
    let precomputed = match cfg.objective.reference_logps.as_str() {
        "cached" => Some(data.cached_reference_logps(cache)?),
        _ => None,
    };
    let evaluator = Evaluator::new(&original_reference, data, cfg)?;
    let mut decisions = Decisions::default();
    let reference_forwards_before = trainer.reference.forward_count();
    let mut order: Vec<usize> = Vec::new();
    let mut rng = Rng(cfg.run.seed ^ 0xDA7A);
    let per_step = o.batch_size * o.grad_accum;
    progress.set_length(steps as u64);
    for step in 0..steps {
        if cfg.eval.every > 0 && step > 0 && step % cfg.eval.every == 0 {
            log_eval(dir, step, evaluator.evaluate(&trainer.policy)?)?;
        }
        // A fresh seeded shuffle at the start of every epoch.
        if order.len() < per_step {
            let mut idx: Vec<usize> = (0..data.train.len()).collect();
            for i in (1..idx.len()).rev() {
                idx.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            order = idx;
        }
        let taken: Vec<usize> = order.drain(..per_step).collect();
        let micro: Vec<Vec<TokenizedPair>> = taken
            .chunks(o.batch_size)
            .map(|c| c.iter().map(|&i| data.train[i].tokenized()).collect())
            .collect();
        let report = match &precomputed {
            Some(values) => {
                let per_micro: Vec<Vec<[f64; 2]>> = taken
                    .chunks(o.batch_size)
                    .map(|c| c.iter().map(|&i| values[i]).collect())
                    .collect();
                trainer.train_step_with_reference(&micro, Some(&per_micro))?
            }
            None => trainer.train_step(&micro)?,
        };
        for (&i, &x) in taken.iter().zip(&report.pair_steps) {
            decisions.add(data.train[i].p_true, x);
        }
        dir.set_steps_done(step + 1);
        if step % cfg.run.log_every == 0 || step + 1 == steps {
            let mut line = Map::new();
            line.insert("step".into(), json!(report.step));
            line.insert("lr".into(), json!(report.lr));
            line.insert("loss".into(), json!(report.loss));
            line.insert("grad_norm".into(), json!(report.grad_norm));
            line.insert("beta".into(), json!(report.beta));
            line.insert("next_beta".into(), json!(report.next_beta));
            for (k, v) in &report.stats {
                line.insert((*k).to_string(), json!(v));
            }
            let p_true: Vec<f64> = taken.iter().map(|&i| data.train[i].p_true).collect();
            line.insert("data/p_true".into(), json!(mean_and_stderr(&p_true).0));
            if !report.pair_steps.is_empty() {
                // ε-DPO's decisions against label confusion: mean true preference probability
                // of the pairs it relaxed, strengthened and left alone.
                for (name, s) in [("relaxed", 1i8), ("strengthened", -1), ("kept", 0)] {
                    let p: Vec<f64> = taken
                        .iter()
                        .zip(&report.pair_steps)
                        .filter(|(_, &x)| x == s)
                        .map(|(&i, _)| data.train[i].p_true)
                        .collect();
                    if !p.is_empty() {
                        line.insert(format!("kl/p_true_{name}"), json!(mean_and_stderr(&p).0));
                    }
                }
            }
            dir.log(&Value::Object(line))?;
        }
        progress.inc(1);
    }
    let reference_forwards = trainer.reference.forward_count() - reference_forwards_before;
    // Always judged against the original reference, which TR-DPO's updates have moved away from.
    let mut eval = evaluator.evaluate(&trainer.policy)?;
    if cfg.eval.every > 0 {
        // The trajectory ends at the final evaluation.
        log_eval(dir, steps, eval.clone())?;
    }
    if decisions != Decisions::default() {
        dir.write_file("decisions.json", &decisions.to_json())?;
    }
    eval.insert("steps".into(), json!(steps));
    eval.insert(
        "training_reference_forward_passes".into(),
        json!(reference_forwards),
    );
    eval.insert(
        "reference_updates".into(),
        json!(trainer.reference_updates()),
    );
    eval.insert("final_beta".into(), json!(trainer.beta()));
    Ok(Value::Object(eval))
}

/// One line of evaluation numbers over training, keys prefixed `eval/`.
fn log_eval(dir: &mut RunDir, step: usize, record: Map<String, Value>) -> Result<()> {
    let mut line = Map::new();
    line.insert("step".into(), json!(step));
    for (k, v) in record {
        line.insert(format!("eval/{k}"), v);
    }
    dir.log(&Value::Object(line))
}
