//! One run, top to bottom: load the policy and reference, then for every optimizer step
//! (schedule → periodic evaluation → forward/backward → clip → step → log), then the final
//! evaluation. Metrics go to the run directory ([`edpo_rundir`]), never to the log.
//! Offline training is one round over the task's pairs; with `online.rounds` the steps run in
//! rounds, each after the first on pairs drawn from the current policy for the next share of
//! the training prompts and labelled by the task's rule ([`crate::pairs::policy_pairs`]), the
//! reference fixed or reset to the policy of the round before.
//!
//! [`run_one`] runs a config in its directory unless it is complete, writing its status
//! whatever happens; [`SharedTasks`] prepares each task's stages once per process for every
//! run that reads them.

use crate::config::{OnlineReference, ReferenceLogps, RunConfig};
use crate::evaluate::{Evaluation, Evaluator};
use crate::pairs::{pair_sampling, policy_pairs};
use crate::stages::StageCache;
use crate::task::{LabelledPair, TaskData};
use anyhow::{anyhow, bail, Result};
use edpo_data::rng::SplitMix64;
use edpo_data::TokenizedPair;
use edpo_eval::mean_and_stderr;
use edpo_model::CausalLm;
use edpo_rundir::{read_status, DecisionContext, Decisions, RunDir, RunState};
use edpo_train::{AdamWConfig, Schedule, StepReport, Trainer, TrainerConfig};
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The flag that asks every run of this process to stop: set by the binary's SIGTERM / SIGINT
/// handler (a Slurm time limit, a preemption, `scancel`, Ctrl-C). A run checks it before every
/// optimizer step and before its final evaluation, and stops with an error, so its status
/// says `failed` with why and its lock is released; the next launch runs it again.
pub fn stop_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone()
}

/// Fault injection for the launchers' tests: `EDPO_FAULT_STEP_DELAY_MS=N` sleeps N ms before
/// every optimizer step, so that a run lasts long enough to be cancelled or to reach a Slurm
/// time limit whatever the machine's speed. It changes no number.
fn fault_step_delay() -> Option<std::time::Duration> {
    std::env::var("EDPO_FAULT_STEP_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis)
}

/// Fault injection for the failure path of a diverging run:
/// `EDPO_FAULT_NONFINITE=TARGET@STEP[@HASH_PREFIX]` makes the loss (`loss`), the gradient
/// norm (`gradient`) or the parameters (`parameter`) non-finite at optimizer step STEP, in
/// every run or only in runs whose config hash starts with HASH_PREFIX. A malformed value is
/// an error naming the variable.
fn fault_nonfinite(hash: &str) -> Result<Option<edpo_train::trainer::Fault>> {
    use edpo_train::trainer::{Fault, FaultTarget};
    let Ok(spec) = std::env::var("EDPO_FAULT_NONFINITE") else {
        return Ok(None);
    };
    let parts: Vec<&str> = spec.split('@').collect();
    let target = match parts.first().copied() {
        Some("loss") => FaultTarget::Loss,
        Some("gradient") => FaultTarget::Gradient,
        Some("parameter") => FaultTarget::Parameter,
        _ => bail!("EDPO_FAULT_NONFINITE=`{spec}`: the target is loss, gradient or parameter"),
    };
    let step = parts
        .get(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("EDPO_FAULT_NONFINITE=`{spec}`: TARGET@STEP[@HASH_PREFIX]"))?;
    Ok(match parts.get(2) {
        Some(prefix) if !hash.starts_with(prefix) => None,
        _ => Some(Fault { target, step }),
    })
}

/// An error if a stop was asked for, naming how far the run got.
fn check_stop(step: usize) -> Result<()> {
    if stop_flag().load(Ordering::Relaxed) {
        return Err(anyhow!(
            "stopped by a signal after {step} optimizer steps (SIGTERM: a Slurm time limit, \
             preemption or scancel; SIGINT: Ctrl-C); the next launch runs it again from the start"
        ));
    }
    Ok(())
}

/// Number of optimizer steps a config takes over `n_pairs` training pairs (the last partial
/// batch of an epoch is dropped).
pub fn total_steps(cfg: &RunConfig, n_pairs: usize) -> usize {
    let per_step = cfg.optim.batch_size * cfg.optim.grad_accum;
    (n_pairs / per_step).max(1) * cfg.optim.epochs
}

/// What happened to one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Already completed before this invocation.
    Skipped,
    /// Trained now.
    Completed,
    /// Stopped by an error (message).
    Failed(String),
    /// Not run: another live process holds the run's lock (set by the launchers, which take
    /// it around [`run_one`]; the owner, described).
    Busy(String),
}

/// Whether `dir` holds a completed run of exactly `config`: `status.json` in state
/// `completed` with the same config hash, a `config.yaml` equal to the resolved config, and
/// `eval.json`. Any other run (absent, failed, or killed while running) starts again from
/// scratch.
pub fn is_complete(dir: &Path, config: &RunConfig) -> bool {
    let Some(status) = read_status(dir) else {
        return false;
    };
    let yaml = std::fs::read_to_string(dir.join(edpo_rundir::CONFIG_YAML)).unwrap_or_default();
    status.state == RunState::Completed
        && config.hash().is_ok_and(|h| h == status.hash)
        && config.to_yaml().is_ok_and(|y| y == yaml)
        && dir.join(edpo_rundir::EVAL).exists()
}

/// Runs one config in `dir` (unless complete), writing its status whatever happens.
pub fn run_one(
    config: &RunConfig,
    dir: &Path,
    data: &TaskData,
    cache: &StageCache,
    progress: &indicatif::ProgressBar,
) -> Result<Outcome> {
    if is_complete(dir, config) {
        return Ok(Outcome::Skipped);
    }
    let hash = config.hash()?;
    let mut rundir = RunDir::start(
        dir,
        &hash,
        &config.to_yaml()?,
        &serde_json::to_string_pretty(config)?,
    )?;
    let span = tracing::info_span!("run", hash = %hash);
    let _enter = span.enter();
    match run(config, data, cache, &mut rundir, progress) {
        Ok(eval) => {
            rundir.complete(&eval)?;
            Ok(Outcome::Completed)
        }
        Err(e) => {
            let message = format!("{e:#}");
            rundir.fail(e.chain().map(|c| c.to_string()).collect())?;
            Ok(Outcome::Failed(message))
        }
    }
}

/// One task's data, filled by whichever run asks first.
type TaskSlot = Arc<Mutex<Option<Arc<TaskData>>>>;

/// Task data shared by runs with the same task and model, prepared once.
pub struct SharedTasks {
    cache: StageCache,
    prepared: Mutex<HashMap<String, TaskSlot>>,
}

impl SharedTasks {
    /// Stages cached under `cache_dir`.
    pub fn new(cache_dir: &Path) -> Self {
        Self {
            cache: StageCache::new(cache_dir),
            prepared: Mutex::new(HashMap::new()),
        }
    }

    /// The stage cache.
    pub fn cache(&self) -> &StageCache {
        &self.cache
    }

    /// The task data of `config`, prepared at most once per process.
    pub fn get(&self, config: &RunConfig) -> Result<Arc<TaskData>> {
        let key = serde_json::to_string(&(&config.task, &config.model))?;
        let slot = {
            let mut map = self
                .prepared
                .lock()
                .map_err(|_| anyhow!("task lock poisoned"))?;
            map.entry(key).or_default().clone()
        };
        let mut slot = slot.lock().map_err(|_| anyhow!("task lock poisoned"))?;
        if let Some(data) = slot.as_ref() {
            return Ok(data.clone());
        }
        let data = Arc::new(config.task.prepare(&config.model, &self.cache)?);
        *slot = Some(data.clone());
        Ok(data)
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
    let device = crate::device();
    let reference = CausalLm::load(&data.reference_dir, &device, false)?;
    // With LoRA the policy is the reference's own base tensors plus trainable adapters: one
    // copy of the base weights.
    let policy = match &cfg.lora {
        Some(lora) => reference.with_lora(&lora.config(), cfg.run.seed ^ 0x10_7A)?,
        None => CausalLm::load(&data.reference_dir, &device, true)?,
    };
    let original_reference = reference.frozen_copy()?;
    let o = &cfg.optim;
    let per_step = o.batch_size * o.grad_accum;
    if data.train.len() < per_step {
        bail!(
            "the task has {} training pairs, fewer than one optimizer step takes \
             (optim.batch_size {} × optim.grad_accum {})",
            data.train.len(),
            o.batch_size,
            o.grad_accum
        );
    }
    // Offline training is one round over the task's pairs; on-policy training splits the same
    // label budget into rounds, each on the prompts of the next share of the pairs.
    let rounds = cfg.online.as_ref().map_or(1, |online| online.rounds);
    let n_train = data.train.len();
    let shares: Vec<std::ops::Range<usize>> = (0..rounds)
        .map(|r| (r * n_train / rounds)..((r + 1) * n_train / rounds))
        .collect();
    if let Some(short) = shares.iter().find(|s| s.len() < per_step) {
        bail!(
            "key `online.rounds`: {rounds} rounds over {n_train} training pairs leave {} pairs \
             in a round, fewer than one optimizer step takes ({per_step})",
            short.len()
        );
    }
    let round_steps: Vec<usize> = shares.iter().map(|s| total_steps(cfg, s.len())).collect();
    let steps: usize = round_steps.iter().sum();
    let reset_reference = cfg
        .online
        .as_ref()
        .is_some_and(|o| o.reference == OnlineReference::Previous);
    let online_labels = match &cfg.online {
        None => None,
        Some(_) => Some((
            data.judge.as_deref().ok_or_else(|| {
                anyhow!("key `online`: on-policy rounds label fresh pairs with the task's gold reward, and this task has none")
            })?,
            data.bt_temperature.ok_or_else(|| {
                anyhow!("key `online`: on-policy rounds need the task's labelling rule (its Bradley–Terry temperature), and this task has none")
            })?,
        )),
    };
    let schedule = Schedule {
        peak_lr: o.lr,
        warmup_steps: (o.warmup_ratio * steps as f64).ceil() as usize,
        total_steps: steps,
        kind: o.schedule.kind(),
    };
    let objective = cfg.objective.to_objective(cfg.run.seed)?;
    let mut trainer = Trainer::new(
        policy,
        reference,
        TrainerConfig {
            objective,
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
    .with_shards(cfg.run.shards)?
    .with_fault(fault_nonfinite(&cfg.hash()?)?);
    // Each pair's response scores, for the objectives that read them (ODPO), checked before
    // training starts.
    let scores_of = |pairs: &[LabelledPair]| -> Result<Option<Vec<[f64; 2]>>> {
        if !objective.needs().scores {
            return Ok(None);
        }
        pairs
            .iter()
            .map(|p| {
                p.response_scores().ok_or_else(|| {
                    anyhow!(
                        "objective `{}` reads each pair's response scores; this task's pairs \
                         have no gold rewards and the data no `score_chosen` / `score_rejected`",
                        cfg.objective.kind
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    };
    let scores = scores_of(&data.train)?;
    let precomputed = match cfg.objective.reference_logps {
        ReferenceLogps::Cached => Some(data.cached_reference_logps(cache)?),
        ReferenceLogps::Online => None,
    };
    let evaluator = Evaluator::new(&original_reference, data, cfg)?;
    if let Some(summary) = &data.data_summary {
        dir.write_text(edpo_rundir::DATA_SUMMARY, summary)?;
    }
    let mut decisions = Decisions::default();
    let reference_forwards_before = trainer.reference.forward_count();
    let mut rng = SplitMix64(cfg.run.seed ^ 0xDA7A);
    progress.set_length(steps as u64);
    let delay = fault_step_delay();
    let mut step = 0;
    for (round, share) in shares.iter().enumerate() {
        // This round's pairs, and their reference log-probs and scores where needed.
        let (pairs, precomputed, scores) = match online_labels {
            Some((judge, tau)) if round > 0 => {
                check_stop(step)?;
                if reset_reference {
                    trainer.reference.blend_from(&trainer.policy, 1.0)?;
                }
                let prompts: Vec<Vec<u32>> = data.train[share.clone()]
                    .iter()
                    .map(|p| p.prompt_input_ids.clone())
                    .collect();
                let settings = pair_sampling(data.response_tokens, data.eos);
                let seed =
                    cfg.run.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (0x0A11_0000 + round as u64);
                let (pairs, left_out) =
                    policy_pairs(&trainer.policy, judge, &prompts, &settings, tau, seed)?;
                if pairs.len() < per_step {
                    bail!(
                        "round {round}: the policy gave {} distinct pairs for {} prompts, fewer \
                         than one optimizer step takes",
                        pairs.len(),
                        prompts.len()
                    );
                }
                let precomputed = match cfg.objective.reference_logps {
                    ReferenceLogps::Cached => {
                        let tokenized: Vec<TokenizedPair> =
                            pairs.iter().map(LabelledPair::tokenized).collect();
                        Some(edpo_train::reference_logps(
                            &trainer.reference,
                            &tokenized,
                            o.batch_size,
                        )?)
                    }
                    ReferenceLogps::Online => None,
                };
                let scores = scores_of(&pairs)?;
                dir.log(&round_line(step, round, &pairs, left_out))?;
                (
                    Cow::Owned(pairs),
                    precomputed.map(Cow::Owned),
                    scores.map(Cow::Owned),
                )
            }
            _ => (
                Cow::Borrowed(&data.train[share.clone()]),
                precomputed
                    .as_ref()
                    .map(|p| Cow::Borrowed(&p[share.clone()])),
                scores.as_ref().map(|s| Cow::Borrowed(&s[share.clone()])),
            ),
        };
        // A round whose policy gave fewer pairs than its prompts (two identical responses for
        // some) takes the steps its pairs fill, so that no pair is seen twice in an epoch.
        let round_end = step + round_steps[round].min(total_steps(cfg, pairs.len()));
        // Steps taken while the policy is the reference: the first, and the first of every
        // round that reset the reference to the policy.
        let at_reference = if step == 0 || (round > 0 && reset_reference) {
            Some(step)
        } else {
            None
        };
        let mut order: Vec<usize> = Vec::new();
        while step < round_end {
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            check_stop(step)?;
            if cfg.eval.every > 0 && step > 0 && step % cfg.eval.every == 0 {
                let evaluation = evaluator.evaluate(&trainer.policy)?;
                log_eval(dir, step, evaluation)?;
            }
            // A fresh seeded shuffle at the start of every epoch.
            if order.len() < per_step {
                let mut idx: Vec<usize> = (0..pairs.len()).collect();
                rng.shuffle(&mut idx);
                order = idx;
            }
            let taken: Vec<usize> = order.drain(..per_step).collect();
            let micro: Vec<Vec<TokenizedPair>> = taken
                .chunks(o.batch_size)
                .map(|c| c.iter().map(|&i| pairs[i].tokenized()).collect())
                .collect();
            // Per-pair values of the round's pairs, laid out by micro-batch.
            let per_micro = |values: &Cow<'_, [[f64; 2]]>| -> Vec<Vec<[f64; 2]>> {
                taken
                    .chunks(o.batch_size)
                    .map(|c| c.iter().map(|&i| values[i]).collect())
                    .collect()
            };
            let reference_values = precomputed.as_ref().map(per_micro);
            let step_scores = scores.as_ref().map(per_micro);
            let report = trainer.train_step_with(
                &micro,
                reference_values.as_deref(),
                step_scores.as_deref(),
            )?;
            for (k, (&i, &x)) in taken.iter().zip(&report.pair_steps).enumerate() {
                let pair = &pairs[i];
                if let Some(p_true) = pair.p_true {
                    decisions.add(
                        DecisionContext {
                            p_true,
                            gold_gap: pair
                                .chosen_reward
                                .zip(pair.rejected_reward)
                                .map(|(w, l)| w - l),
                            margin: report.pair_margins.get(k).copied(),
                            at_start: at_reference == Some(step),
                        },
                        x,
                    );
                }
            }
            dir.set_steps_done(step + 1)?;
            if step % cfg.run.log_every == 0 || step + 1 == round_end {
                dir.log(&step_line(&report, &taken, &pairs))?;
            }
            progress.inc(1);
            step += 1;
        }
    }
    // The steps taken: the planned ones, less any a short on-policy round could not fill.
    let steps = step;
    check_stop(steps)?;
    let reference_forwards = trainer.reference.forward_count() - reference_forwards_before;
    // Always judged against the original reference, which TR-DPO's updates have moved away from.
    let evaluation = evaluator.evaluate(&trainer.policy)?;
    let mut eval = evaluation.summary.clone();
    if cfg.eval.every > 0 {
        // The trajectory ends at the final evaluation.
        log_eval(dir, steps, evaluation)?;
    } else if let Some(mut per_prompt) = evaluation.per_prompt {
        per_prompt.step = steps;
        dir.log_per_prompt(&per_prompt)?;
    }
    if !decisions.is_empty() {
        dir.write_file(edpo_rundir::DECISIONS, &decisions.to_json())?;
    }
    if cfg.lora.is_some() {
        // The trained adapters (small), loadable by PEFT or merged with `edpo convert --adapter`.
        trainer
            .policy
            .save_adapter(&dir.path.join(edpo_rundir::ADAPTER))?;
    }
    if cfg.eval.best_of_n {
        for b in crate::best_of_n::best_of_n(data, cache, evaluator.settings())? {
            for (k, v) in b.eval_keys() {
                eval.insert(k, json!(v));
            }
        }
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

/// The metrics line of one optimizer step: the trainer's report, the mean true preference
/// probability of its pairs (where known), and for ε-DPO the mean true preference probability
/// of the pairs it relaxed, strengthened and left alone.
fn step_line(report: &StepReport, taken: &[usize], pairs: &[LabelledPair]) -> Value {
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
    let p_true: Vec<f64> = taken.iter().filter_map(|&i| pairs[i].p_true).collect();
    if !p_true.is_empty() {
        line.insert("data/p_true".into(), json!(mean_and_stderr(&p_true).0));
    }
    if !report.pair_steps.is_empty() && !p_true.is_empty() {
        // ε-DPO's decisions against label confusion: mean true preference probability
        // of the pairs it relaxed, strengthened and left alone.
        for (name, s) in [("relaxed", 1i8), ("strengthened", -1), ("kept", 0)] {
            let p: Vec<f64> = taken
                .iter()
                .zip(&report.pair_steps)
                .filter(|(_, &x)| x == s)
                .filter_map(|(&i, _)| pairs[i].p_true)
                .collect();
            if !p.is_empty() {
                line.insert(format!("kl/p_true_{name}"), json!(mean_and_stderr(&p).0));
            }
        }
    }
    Value::Object(line)
}

/// The metrics line of an on-policy round's pairs, logged at the step the round starts:
/// how many there are, how many prompts gave two identical responses and were left out, the
/// mean gold reward of the policy's responses, the mean true preference probability of the
/// chosen response, and the share of labels against the gold order.
fn round_line(step: usize, round: usize, pairs: &[LabelledPair], left_out: usize) -> Value {
    let rewards: Vec<f64> = pairs
        .iter()
        .flat_map(|p| [p.chosen_reward, p.rejected_reward])
        .flatten()
        .collect();
    let p_true: Vec<f64> = pairs.iter().filter_map(|p| p.p_true).collect();
    let against: Vec<f64> = pairs
        .iter()
        .filter_map(|p| Some(f64::from(u8::from(p.chosen_reward? < p.rejected_reward?))))
        .collect();
    json!({
        "step": step,
        "online/round": round,
        "online/pairs": pairs.len(),
        "online/left_out": left_out,
        "online/gold_reward": mean_and_stderr(&rewards).0,
        "online/p_true": mean_and_stderr(&p_true).0,
        "online/label_noise": mean_and_stderr(&against).0,
    })
}

/// One line of evaluation numbers over training, keys prefixed `eval/`, and its per-prompt
/// line.
fn log_eval(dir: &mut RunDir, step: usize, evaluation: Evaluation) -> Result<()> {
    let mut line = Map::new();
    line.insert("step".into(), json!(step));
    for (k, v) in evaluation.summary {
        line.insert(format!("eval/{k}"), v);
    }
    dir.log(&Value::Object(line))?;
    if let Some(mut per_prompt) = evaluation.per_prompt {
        per_prompt.step = step;
        dir.log_per_prompt(&per_prompt)?;
    }
    Ok(())
}
