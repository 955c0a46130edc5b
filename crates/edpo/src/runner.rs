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

/// Evaluates `policy` against `reference` on held-out prompts and pairs.
pub fn evaluate(
    policy: &CausalLm,
    reference: &CausalLm,
    data: &TaskData,
    cfg: &RunConfig,
) -> Result<Map<String, Value>> {
    let settings = SamplingSettings {
        temperature: cfg.eval.temperature,
        top_k: cfg.eval.top_k,
        top_p: cfg.eval.top_p,
        max_new_tokens: data.response_tokens,
        eos: data.eos,
    };
    let seed = 0xE7A1 ^ cfg.run.seed.wrapping_mul(0x9E37_79B9);
    let ours = sample(policy, &data.eval_prompts, &settings, seed)?;
    let theirs = sample(reference, &data.eval_prompts, &settings, seed ^ 0xFFFF)?;
    let prompts = &data.eval_prompts;
    let r_ours: Vec<f64> = prompts
        .iter()
        .zip(&ours)
        .map(|(p, r)| data.judge.gold(p, r))
        .collect();
    let r_theirs: Vec<f64> = prompts
        .iter()
        .zip(&theirs)
        .map(|(p, r)| data.judge.gold(p, r))
        .collect();
    let win = win_rate(&r_ours, &r_theirs, 0.0);
    let seqs: Vec<(&[u32], &[u32])> = data
        .eval_prompts
        .iter()
        .zip(&ours)
        .map(|(p, r)| (p.as_slice(), r.as_slice()))
        .collect();
    let kl = sequence_kl(policy, reference, &seqs)?;
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
        .zip(&theirs)
        .map(|((p, a), b)| Some((data.judge.second(p, a)?, data.judge.second(p, b)?)))
        .collect::<Option<Vec<_>>>()
        .map(|v| v.into_iter().unzip());
    // Win rate against the chosen response of held-out pairs, on their prompts.
    let held_prompts: Vec<Vec<u32>> = data
        .eval_pairs
        .iter()
        .map(|p| p.prompt_input_ids.clone())
        .collect();
    let on_pairs = sample(policy, &held_prompts, &settings, seed ^ 0xC405)?;
    let r_on_pairs: Vec<f64> = held_prompts
        .iter()
        .zip(&on_pairs)
        .map(|(p, r)| data.judge.gold(p, r))
        .collect();
    let r_chosen: Vec<f64> = data.eval_pairs.iter().map(|p| p.chosen_reward).collect();
    let win_chosen = win_rate(&r_on_pairs, &r_chosen, 0.0);
    let held: Vec<TokenizedPair> = data.eval_pairs.iter().map(|p| p.tokenized()).collect();
    let scores = score_pairs(policy, reference, &held, None)?;
    let logps: PairLogps<'_> = scores.logps();
    let correct: Vec<f64> = (0..logps.len())
        .map(|i| f64::from(u8::from(logps.delta(i) > 0.0)))
        .collect();
    let (accuracy, accuracy_se) = mean_and_stderr(&correct);
    let mut out = Map::new();
    for (k, v) in [
        ("win_rate", win.rate),
        ("win_rate_se", win.stderr),
        ("win_rate_lo", win.lo),
        ("win_rate_hi", win.hi),
        ("gold_reward", reward_mean),
        ("gold_reward_se", reward_se),
        ("reference_gold_reward", mean_and_stderr(&r_theirs).0),
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
    ] {
        out.insert(k.to_string(), json!(v));
    }
    if let Some((a, b)) = second {
        let w = win_rate(&a, &b, 0.0);
        out.insert("second_judge_win_rate".into(), json!(w.rate));
        out.insert("second_judge_win_rate_se".into(), json!(w.stderr));
        out.insert("second_judge_score".into(), json!(mean_and_stderr(&a).0));
    }
    out.insert("n_prompts".into(), json!(data.eval_prompts.len()));
    out.insert("n_pairs".into(), json!(held.len()));
    Ok(out)
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
    )?;
    let precomputed = match cfg.objective.reference_logps.as_str() {
        "cached" => Some(data.cached_reference_logps(cache)?),
        _ => None,
    };
    let reference_forwards_before = trainer.reference.forward_count();
    let mut order: Vec<usize> = Vec::new();
    let mut rng = Rng(cfg.run.seed ^ 0xDA7A);
    let per_step = o.batch_size * o.grad_accum;
    progress.set_length(steps as u64);
    for step in 0..steps {
        if cfg.eval.every > 0 && step > 0 && step % cfg.eval.every == 0 {
            let mut record = evaluate(&trainer.policy, &original_reference, data, cfg)?;
            let mut line = Map::new();
            line.insert("step".into(), json!(step));
            for (k, v) in record.iter_mut() {
                line.insert(format!("eval/{k}"), v.take());
            }
            dir.log(&Value::Object(line))?;
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
    let mut eval = evaluate(&trainer.policy, &original_reference, data, cfg)?;
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
