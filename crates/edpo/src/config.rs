//! Run configuration in two layers: [`RawConfig`] mirrors the YAML file (every field optional,
//! unknown keys rejected), and [`RunConfig`] is the resolved, validated form where every
//! default lives. `--set key=value` overrides edit the YAML tree before it is parsed, so an
//! override is checked exactly like the file: an unknown key or a wrong type is an error naming
//! the key.

use anyhow::{anyhow, bail, Context, Result};
use edpo_train::Objective;
use serde::{Deserialize, Serialize};
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The task section as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawTask {
    /// A Markov-chain language with a per-token gold reward (seconds to train).
    Synthetic {
        vocab: Option<usize>,
        sharpness: Option<f64>,
        prompt_tokens: Option<usize>,
        response_tokens: Option<usize>,
        train_pairs: Option<usize>,
        eval_pairs: Option<usize>,
        eval_prompts: Option<usize>,
        val_prompts: Option<usize>,
        bt_temperature: Option<f64>,
        sft_steps: Option<usize>,
        seed: Option<u64>,
    },
    /// Controlled sentiment generation on real movie-review snippets with human ratings.
    Sentiment {
        data: Option<String>,
        sha256: Option<String>,
        lexicon: Option<String>,
        vocab_size: Option<usize>,
        prompt_words_min: Option<usize>,
        prompt_words_max: Option<usize>,
        response_tokens: Option<usize>,
        train_pairs: Option<usize>,
        eval_pairs: Option<usize>,
        eval_prompts: Option<usize>,
        val_prompts: Option<usize>,
        bt_temperature: Option<f64>,
        pretrain_steps: Option<usize>,
        gold_buckets: Option<usize>,
        seed: Option<u64>,
    },
}

/// The model section as written (a small GPT-2 trained from scratch as the reference).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    n_embd: Option<usize>,
    n_layer: Option<usize>,
    n_head: Option<usize>,
}

/// The objective section as written: `kind` and the parameters of that kind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawObjective {
    kind: String,
    beta: Option<f64>,
    epsilon: Option<f64>,
    label_smoothing: Option<f64>,
    average: Option<bool>,
    delta: Option<f64>,
    lambda: Option<f64>,
    gamma_ratio: Option<f64>,
    alpha: Option<f64>,
    desirable_weight: Option<f64>,
    undesirable_weight: Option<f64>,
    beta0: Option<f64>,
    a: Option<f64>,
    keep_fraction: Option<f64>,
    momentum: Option<f64>,
    tau: Option<usize>,
    sft_weight: Option<f64>,
    reference_logps: Option<String>,
}

/// The optimisation section as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOptim {
    lr: Option<f64>,
    schedule: Option<String>,
    warmup_ratio: Option<f64>,
    batch_size: Option<usize>,
    grad_accum: Option<usize>,
    epochs: Option<usize>,
    max_grad_norm: Option<f64>,
    weight_decay: Option<f64>,
    adam_beta1: Option<f64>,
    adam_beta2: Option<f64>,
    adam_eps: Option<f64>,
}

/// The evaluation section as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEval {
    every: Option<usize>,
    temperature: Option<f64>,
    top_k: Option<usize>,
    top_p: Option<f64>,
}

/// The run section as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRun {
    seed: Option<u64>,
    threads: Option<usize>,
    shards: Option<usize>,
    log_every: Option<usize>,
}

/// A run config exactly as the YAML says.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    task: RawTask,
    #[serde(default)]
    model: RawModel,
    objective: RawObjective,
    #[serde(default)]
    optim: RawOptim,
    #[serde(default)]
    eval: RawEval,
    #[serde(default)]
    run: RawRun,
}

/// The resolved synthetic task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyntheticTask {
    pub vocab: usize,
    pub sharpness: f64,
    pub prompt_tokens: usize,
    pub response_tokens: usize,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub eval_prompts: usize,
    pub val_prompts: usize,
    pub bt_temperature: f64,
    pub sft_steps: usize,
    pub seed: u64,
}

/// The resolved sentiment task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SentimentTask {
    /// The snippets file (TSV: id, mean rating, text).
    pub data: String,
    /// Its expected SHA-256 (`None`: not checked).
    pub sha256: Option<String>,
    /// The VADER lexicon, for the second judge.
    pub lexicon: String,
    /// BPE vocabulary size, EOS included.
    pub vocab_size: usize,
    /// Prompts are the first `prompt_words_min..=prompt_words_max` words of a snippet.
    pub prompt_words_min: usize,
    pub prompt_words_max: usize,
    /// Maximum response length in tokens, EOS included.
    pub response_tokens: usize,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    /// Test prompts: every reported number is measured on them.
    pub eval_prompts: usize,
    /// Validation prompts: settings are chosen on them, never on the test prompts.
    pub val_prompts: usize,
    /// τ of the Bradley–Terry labels, in rating units.
    pub bt_temperature: f64,
    /// Optimizer steps of the reference LM's pre-training.
    pub pretrain_steps: usize,
    /// Hash buckets of the gold model's n-gram features.
    pub gold_buckets: usize,
    pub seed: u64,
}

/// The resolved task.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskConfig {
    Synthetic(SyntheticTask),
    Sentiment(SentimentTask),
}

/// The version of resolved configs and of the run files they produce. 2: validation prompts
/// apart from the test prompts, `decisions.json`, evaluation lines over training.
pub const CONFIG_VERSION: u32 = 2;

/// The snippets shipped in `datasets/` and their recorded checksum.
pub const SNIPPETS_PATH: &str = "datasets/movie-snippets/movieReviewSnippets_GroundTruth.txt";
/// SHA-256 of the snippets file as `vaderSentiment` 3.3.2 ships it.
pub const SNIPPETS_SHA256: &str =
    "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350";
/// The VADER lexicon shipped in `datasets/`.
pub const LEXICON_PATH: &str = "datasets/movie-snippets/vader_lexicon.txt";

/// The resolved model shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
}

/// The resolved objective: its kind, every parameter of that kind (defaults filled), the SFT
/// weight, and where reference log-probs come from (`online`: a reference forward pass every
/// step; `cached`: computed once per dataset and reference, for objectives that allow it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectiveConfig {
    pub kind: String,
    #[serde(flatten)]
    pub params: BTreeMap<String, serde_json::Value>,
    pub sft_weight: f64,
    pub reference_logps: String,
}

/// A parameter's name and default (`None`: required).
type ParamSpec = (&'static str, Option<f64>);

/// Parameters of each objective kind.
const OBJECTIVES: &[(&str, &[ParamSpec])] = &[
    ("dpo", &[("beta", None)]),
    ("epsilon_dpo", &[("beta", None), ("epsilon", None)]),
    ("cdpo", &[("beta", None), ("label_smoothing", Some(0.1))]),
    ("rdpo", &[("beta", None), ("label_smoothing", Some(0.1))]),
    ("ipo", &[("beta", None)]),
    ("hinge", &[("beta", None)]),
    ("slic", &[("delta", Some(1.0)), ("lambda", Some(0.1))]),
    ("simpo", &[("beta", Some(2.0)), ("gamma_ratio", Some(0.5))]),
    ("rdpo_len", &[("beta", None), ("alpha", Some(0.2))]),
    ("cpo", &[("beta", Some(0.1)), ("lambda", Some(1.0))]),
    ("orpo", &[("lambda", Some(0.1))]),
    (
        "kto",
        &[
            ("beta", None),
            ("desirable_weight", Some(1.0)),
            ("undesirable_weight", Some(1.0)),
        ],
    ),
    (
        "beta_dpo",
        &[
            ("beta0", Some(0.1)),
            ("a", Some(0.6)),
            ("keep_fraction", Some(0.8)),
            ("momentum", Some(0.9)),
        ],
    ),
    (
        "tr_dpo",
        &[("beta", None), ("alpha", Some(0.6)), ("tau", Some(8.0))],
    ),
];

impl RawObjective {
    fn given(&self) -> Vec<(&'static str, Option<f64>)> {
        vec![
            ("beta", self.beta),
            ("epsilon", self.epsilon),
            ("label_smoothing", self.label_smoothing),
            ("delta", self.delta),
            ("lambda", self.lambda),
            ("gamma_ratio", self.gamma_ratio),
            ("alpha", self.alpha),
            ("desirable_weight", self.desirable_weight),
            ("undesirable_weight", self.undesirable_weight),
            ("beta0", self.beta0),
            ("a", self.a),
            ("keep_fraction", self.keep_fraction),
            ("momentum", self.momentum),
            ("tau", self.tau.map(|t| t as f64)),
        ]
    }

    fn resolve(self) -> Result<ObjectiveConfig> {
        let names: Vec<&str> = OBJECTIVES.iter().map(|(k, _)| *k).collect();
        let Some((kind, spec)) = OBJECTIVES.iter().find(|(k, _)| *k == self.kind) else {
            bail!(
                "key `objective.kind`: unknown objective `{}` (one of {})",
                self.kind,
                names.join(", ")
            );
        };
        let allowed: Vec<&str> = spec.iter().map(|(n, _)| *n).collect();
        let mut params = BTreeMap::new();
        for (name, value) in self.given() {
            let Some(v) = value else { continue };
            if !allowed.contains(&name) {
                bail!(
                    "key `objective.{name}`: not a parameter of `{kind}` (its parameters: {})",
                    allowed.join(", ")
                );
            }
            check(
                v.is_finite(),
                &format!("objective.{name}"),
                "must be a finite number",
            )?;
            params.insert(name.to_string(), v);
        }
        for (name, default) in spec.iter() {
            if !params.contains_key(*name) {
                match default {
                    Some(d) => {
                        params.insert((*name).to_string(), *d);
                    }
                    None => bail!("key `objective.{name}`: required by `{kind}`"),
                }
            }
        }
        let mut out: BTreeMap<String, serde_json::Value> = params
            .into_iter()
            .map(|(k, v)| {
                let value = if k == "tau" {
                    serde_json::json!(v as u64)
                } else {
                    serde_json::json!(v)
                };
                (k, value)
            })
            .collect();
        if *kind == "ipo" {
            out.insert(
                "average".into(),
                serde_json::json!(self.average.unwrap_or(true)),
            );
        } else if self.average.is_some() {
            bail!(
                "key `objective.average`: not a parameter of `{kind}` (its parameters: {})",
                allowed.join(", ")
            );
        }
        let sft_weight = self.sft_weight.unwrap_or(0.0);
        check(
            sft_weight >= 0.0 && sft_weight.is_finite(),
            "objective.sft_weight",
            "must be non-negative",
        )?;
        let reference_logps = self.reference_logps.unwrap_or_else(|| "online".into());
        check(
            matches!(reference_logps.as_str(), "online" | "cached"),
            "objective.reference_logps",
            format!("`{reference_logps}` is not one of online, cached"),
        )?;
        let resolved = ObjectiveConfig {
            kind: (*kind).to_string(),
            params: out,
            sft_weight,
            reference_logps,
        };
        let objective = resolved.to_objective(0)?;
        if resolved.reference_logps == "cached" && !objective.accepts_precomputed_reference() {
            bail!("key `objective.reference_logps`: `{kind}` cannot use cached reference log-probs (it needs the reference model every step, or no reference at all)");
        }
        // Range checks live with the objectives; run them now so a bad value fails before any run.
        edpo_train::Trainer::check_objective(&objective, sft_weight).map_err(|e| match e {
            edpo_train::Error::Objective(edpo_objectives::Error::Parameter {
                name,
                value,
                message,
            }) => {
                anyhow!("key `objective.{name}`: {value} {message}")
            }
            other => anyhow!("key `objective`: {other}"),
        })?;
        Ok(resolved)
    }
}

impl ObjectiveConfig {
    fn get(&self, name: &str) -> f64 {
        self.params
            .get(name)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN)
    }

    /// The trainer's objective; `seed` seeds β-DPO's filter.
    pub fn to_objective(&self, seed: u64) -> Result<Objective> {
        use edpo_objectives::Method as M;
        let g = |n: &str| self.get(n);
        Ok(match self.kind.as_str() {
            "dpo" => Objective::Dpo { beta: g("beta") },
            "epsilon_dpo" => Objective::EpsilonDpo {
                beta: g("beta"),
                epsilon: g("epsilon"),
            },
            "cdpo" => Objective::Method(M::Cdpo {
                beta: g("beta"),
                label_smoothing: g("label_smoothing"),
            }),
            "rdpo" => Objective::Method(M::Rdpo {
                beta: g("beta"),
                label_smoothing: g("label_smoothing"),
            }),
            "ipo" => Objective::Method(M::Ipo {
                beta: g("beta"),
                average: self
                    .params
                    .get("average")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(true),
            }),
            "hinge" => Objective::Method(M::Hinge { beta: g("beta") }),
            "slic" => Objective::Method(M::Slic {
                delta: g("delta"),
                lambda: g("lambda"),
            }),
            "simpo" => Objective::Method(M::Simpo {
                beta: g("beta"),
                gamma_ratio: g("gamma_ratio"),
            }),
            "rdpo_len" => Objective::Method(M::RdpoLen {
                beta: g("beta"),
                alpha: g("alpha"),
            }),
            "cpo" => Objective::Method(M::Cpo {
                beta: g("beta"),
                lambda: g("lambda"),
            }),
            "orpo" => Objective::Method(M::Orpo {
                lambda: g("lambda"),
            }),
            "kto" => Objective::Method(M::Kto {
                beta: g("beta"),
                desirable_weight: g("desirable_weight"),
                undesirable_weight: g("undesirable_weight"),
            }),
            "beta_dpo" => Objective::BetaDpo {
                beta0: g("beta0"),
                a: g("a"),
                keep_fraction: g("keep_fraction"),
                momentum: g("momentum"),
                seed,
            },
            "tr_dpo" => Objective::TrDpo {
                beta: g("beta"),
                alpha: g("alpha"),
                tau: g("tau") as usize,
            },
            other => bail!("unknown objective `{other}`"),
        })
    }
}

/// The resolved optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OptimConfig {
    pub lr: f64,
    pub schedule: String,
    pub warmup_ratio: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub epochs: usize,
    pub max_grad_norm: Option<f64>,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
}

/// The resolved evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalConfig {
    pub every: usize,
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
}

/// The resolved run settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSettings {
    pub seed: u64,
    pub threads: usize,
    /// Groups of pairs per micro-batch whose passes run in parallel (see
    /// `Trainer::with_shards`). Part of the hash: gradients are summed per shard, so the
    /// numbers differ at f32 rounding. Left out of the file when 1, so configs written before
    /// it existed keep their hashes.
    #[serde(skip_serializing_if = "is_one")]
    pub shards: usize,
    pub log_every: usize,
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// A resolved, validated run config: what `config.yaml` in a run directory holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunConfig {
    /// [`CONFIG_VERSION`]: what the run directory's files mean. Reports skip other versions.
    pub config_version: u32,
    pub task: TaskConfig,
    pub model: ModelShape,
    pub objective: ObjectiveConfig,
    pub optim: OptimConfig,
    pub eval: EvalConfig,
    pub run: RunSettings,
}

fn check(ok: bool, key: &str, message: impl std::fmt::Display) -> Result<()> {
    if ok {
        Ok(())
    } else {
        bail!("key `{key}`: {message}")
    }
}

/// The checks every task shares: response length, pair and prompt counts, label temperature.
fn check_pairs(
    response_tokens: usize,
    train_pairs: usize,
    eval_pairs: usize,
    eval_prompts: usize,
    val_prompts: usize,
    bt_temperature: f64,
) -> Result<()> {
    check(
        response_tokens >= 2,
        "task.response_tokens",
        "must be at least 2",
    )?;
    check(train_pairs >= 1, "task.train_pairs", "must be at least 1")?;
    check(eval_pairs >= 1, "task.eval_pairs", "must be at least 1")?;
    check(eval_prompts >= 2, "task.eval_prompts", "must be at least 2")?;
    check(val_prompts >= 2, "task.val_prompts", "must be at least 2")?;
    check(
        bt_temperature > 0.0,
        "task.bt_temperature",
        "must be positive",
    )
}

fn resolve_task(raw: RawTask) -> Result<TaskConfig> {
    Ok(match raw {
        RawTask::Synthetic {
            vocab,
            sharpness,
            prompt_tokens,
            response_tokens,
            train_pairs,
            eval_pairs,
            eval_prompts,
            val_prompts,
            bt_temperature,
            sft_steps,
            seed,
        } => {
            let task = SyntheticTask {
                vocab: vocab.unwrap_or(24),
                sharpness: sharpness.unwrap_or(2.0),
                prompt_tokens: prompt_tokens.unwrap_or(3),
                response_tokens: response_tokens.unwrap_or(8),
                train_pairs: train_pairs.unwrap_or(256),
                eval_pairs: eval_pairs.unwrap_or(64),
                eval_prompts: eval_prompts.unwrap_or(128),
                val_prompts: val_prompts.unwrap_or(64),
                bt_temperature: bt_temperature.unwrap_or(0.25),
                sft_steps: sft_steps.unwrap_or(150),
                seed: seed.unwrap_or(0),
            };
            check(task.vocab >= 2, "task.vocab", "must be at least 2")?;
            check(
                task.sharpness >= 0.0,
                "task.sharpness",
                "must be non-negative",
            )?;
            check(
                task.prompt_tokens >= 1,
                "task.prompt_tokens",
                "must be at least 1",
            )?;
            check_pairs(
                task.response_tokens,
                task.train_pairs,
                task.eval_pairs,
                task.eval_prompts,
                task.val_prompts,
                task.bt_temperature,
            )?;
            TaskConfig::Synthetic(task)
        }
        RawTask::Sentiment {
            data,
            sha256,
            lexicon,
            vocab_size,
            prompt_words_min,
            prompt_words_max,
            response_tokens,
            train_pairs,
            eval_pairs,
            eval_prompts,
            val_prompts,
            bt_temperature,
            pretrain_steps,
            gold_buckets,
            seed,
        } => {
            let shipped = data.is_none();
            let task = SentimentTask {
                data: data.unwrap_or_else(|| SNIPPETS_PATH.into()),
                // The shipped file is always checked; a user's own file when a digest is given.
                sha256: sha256.or_else(|| shipped.then(|| SNIPPETS_SHA256.into())),
                lexicon: lexicon.unwrap_or_else(|| LEXICON_PATH.into()),
                vocab_size: vocab_size.unwrap_or(2048),
                prompt_words_min: prompt_words_min.unwrap_or(2),
                prompt_words_max: prompt_words_max.unwrap_or(8),
                response_tokens: response_tokens.unwrap_or(24),
                train_pairs: train_pairs.unwrap_or(512),
                eval_pairs: eval_pairs.unwrap_or(128),
                eval_prompts: eval_prompts.unwrap_or(256),
                val_prompts: val_prompts.unwrap_or(128),
                bt_temperature: bt_temperature.unwrap_or(0.5),
                pretrain_steps: pretrain_steps.unwrap_or(1200),
                gold_buckets: gold_buckets.unwrap_or(1 << 16),
                seed: seed.unwrap_or(0),
            };
            check(
                task.vocab_size >= 300,
                "task.vocab_size",
                "must be at least 300 (256 bytes, EOS and merges)",
            )?;
            check(
                task.prompt_words_min >= 1 && task.prompt_words_min <= task.prompt_words_max,
                "task.prompt_words_min",
                "must be at least 1 and at most prompt_words_max",
            )?;
            check_pairs(
                task.response_tokens,
                task.train_pairs,
                task.eval_pairs,
                task.eval_prompts,
                task.val_prompts,
                task.bt_temperature,
            )?;
            check(
                task.gold_buckets >= 16,
                "task.gold_buckets",
                "must be at least 16",
            )?;
            TaskConfig::Sentiment(task)
        }
    })
}

impl RawConfig {
    /// Fills defaults and validates every value.
    pub fn resolve(self) -> Result<RunConfig> {
        let task = resolve_task(self.task)?;
        let (width, layers, heads) = match task {
            TaskConfig::Synthetic(_) => (32, 2, 2),
            TaskConfig::Sentiment(_) => (128, 4, 4),
        };
        let model = ModelShape {
            n_embd: self.model.n_embd.unwrap_or(width),
            n_layer: self.model.n_layer.unwrap_or(layers),
            n_head: self.model.n_head.unwrap_or(heads),
        };
        check(
            model.n_head >= 1 && model.n_embd % model.n_head == 0,
            "model.n_head",
            format!(
                "{} heads do not divide width {}",
                model.n_head, model.n_embd
            ),
        )?;
        check(model.n_layer >= 1, "model.n_layer", "must be at least 1")?;
        let objective = self.objective.resolve()?;
        let o = self.optim;
        let optim = OptimConfig {
            lr: o.lr.unwrap_or(1e-3),
            schedule: o.schedule.unwrap_or_else(|| "cosine".into()),
            warmup_ratio: o.warmup_ratio.unwrap_or(0.1),
            batch_size: o.batch_size.unwrap_or(16),
            grad_accum: o.grad_accum.unwrap_or(1),
            epochs: o.epochs.unwrap_or(2),
            max_grad_norm: match o.max_grad_norm {
                Some(x) if x <= 0.0 => None,
                Some(x) => Some(x),
                None => Some(1.0),
            },
            weight_decay: o.weight_decay.unwrap_or(0.0),
            adam_beta1: o.adam_beta1.unwrap_or(0.9),
            adam_beta2: o.adam_beta2.unwrap_or(0.999),
            adam_eps: o.adam_eps.unwrap_or(1e-8),
        };
        check(
            optim.lr >= 0.0 && optim.lr.is_finite(),
            "optim.lr",
            "must be non-negative",
        )?;
        check(
            matches!(optim.schedule.as_str(), "constant" | "linear" | "cosine"),
            "optim.schedule",
            format!(
                "`{}` is not one of constant, linear, cosine",
                optim.schedule
            ),
        )?;
        check(
            (0.0..1.0).contains(&optim.warmup_ratio),
            "optim.warmup_ratio",
            "must lie in [0, 1)",
        )?;
        check(
            optim.batch_size >= 1,
            "optim.batch_size",
            "must be at least 1",
        )?;
        check(
            optim.grad_accum >= 1,
            "optim.grad_accum",
            "must be at least 1",
        )?;
        check(optim.epochs >= 1, "optim.epochs", "must be at least 1")?;
        check(
            optim.weight_decay >= 0.0,
            "optim.weight_decay",
            "must be non-negative",
        )?;
        check(
            (0.0..1.0).contains(&optim.adam_beta1),
            "optim.adam_beta1",
            "must lie in [0, 1)",
        )?;
        check(
            (0.0..1.0).contains(&optim.adam_beta2),
            "optim.adam_beta2",
            "must lie in [0, 1)",
        )?;
        check(optim.adam_eps > 0.0, "optim.adam_eps", "must be positive")?;
        let e = self.eval;
        let eval = EvalConfig {
            every: e.every.unwrap_or(0),
            temperature: e.temperature.unwrap_or(1.0),
            top_k: e.top_k.unwrap_or(0),
            top_p: e.top_p.unwrap_or(1.0),
        };
        check(
            eval.temperature >= 0.0,
            "eval.temperature",
            "must be non-negative",
        )?;
        check(
            eval.top_p > 0.0 && eval.top_p <= 1.0,
            "eval.top_p",
            "must lie in (0, 1]",
        )?;
        let run = RunSettings {
            seed: self.run.seed.unwrap_or(0),
            threads: self.run.threads.unwrap_or(1),
            shards: self.run.shards.unwrap_or(1),
            log_every: self.run.log_every.unwrap_or(1),
        };
        check(run.threads >= 1, "run.threads", "must be at least 1")?;
        check(run.shards >= 1, "run.shards", "must be at least 1")?;
        check(run.log_every >= 1, "run.log_every", "must be at least 1")?;
        Ok(RunConfig {
            config_version: CONFIG_VERSION,
            task,
            model,
            objective,
            optim,
            eval,
            run,
        })
    }
}

impl RunConfig {
    /// The run's identity: a hash of everything that changes its results. The thread count
    /// is left out: it changes speed, not what is computed.
    pub fn hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut canonical = self.clone();
        canonical.run.threads = 0;
        let json = serde_json::to_string(&canonical).unwrap_or_default();
        let digest = Sha256::digest(json.as_bytes());
        digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }

    /// The resolved config as YAML.
    pub fn to_yaml(&self) -> Result<String> {
        Ok(serde_yaml::to_string(self)?)
    }
}

/// Reads a YAML file into a tree, with the file named in errors.
pub fn read_yaml(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Parses `key=value` (value as YAML) and sets it in the tree, creating sections as needed.
/// A value that is a mapping replaces the whole subtree (so `objective={kind: dpo, beta: 0.1}`
/// swaps the objective).
pub fn apply_set(tree: &mut Value, assignment: &str) -> Result<()> {
    let (key, value) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow!("override `{assignment}` is not of the form key=value"))?;
    let value: Value = serde_yaml::from_str(value)
        .map_err(|e| anyhow!("override `{key}`: value is not YAML: {e}"))?;
    set_path(tree, key, value)
}

/// Sets a dotted key in the tree.
pub fn set_path(tree: &mut Value, key: &str, value: Value) -> Result<()> {
    let mut node = tree;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            bail!("override key `{key}` has an empty component");
        }
        if node.is_null() {
            *node = Value::Mapping(Default::default());
        }
        let Value::Mapping(map) = node else {
            bail!(
                "override `{key}`: `{}` is not a section",
                parts[..i].join(".")
            );
        };
        let k = Value::String((*part).to_string());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map.entry(k).or_insert(Value::Null);
    }
    Ok(())
}

/// Reads a dotted key from the tree.
pub fn get_path<'a>(tree: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(tree, |node, part| node.get(part))
}

/// Parses and resolves a tree; `origin` names where it came from in errors.
/// The tree goes through YAML text so that schema errors carry the key path; the line numbers
/// of that text mean nothing to the user and are cut.
pub fn resolve_tree(tree: Value, origin: &str) -> Result<RunConfig> {
    let text = serde_yaml::to_string(&tree)?;
    let raw: RawConfig = serde_yaml::from_str(&text).map_err(|e| {
        let message = e.to_string();
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_string();
        anyhow!("{origin}: {message}")
    })?;
    raw.resolve().map_err(|e| anyhow!("{origin}: {e}"))
}

/// The 1-based line of a dotted key in block-style YAML text, if it can be found.
pub fn find_line(text: &str, dotted: &str) -> Option<usize> {
    let mut parts = dotted.split('.').peekable();
    let mut want = parts.next()?;
    let mut parent_indent: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if parent_indent.is_some_and(|p| indent <= p) {
            return None;
        }
        if trimmed
            .strip_prefix(want)
            .is_some_and(|rest| rest.starts_with(':'))
        {
            match parts.next() {
                None => return Some(i + 1),
                Some(next) => {
                    want = next;
                    parent_indent = Some(indent);
                }
            }
        }
    }
    None
}

/// Loads a config file, applies overrides, resolves.
pub fn load(path: &Path, sets: &[String]) -> Result<RunConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // Parse straight from text first so YAML syntax and schema errors carry line numbers.
    if sets.is_empty() {
        let raw: RawConfig =
            serde_yaml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        return raw.resolve().map_err(|e| {
            // Semantic errors name their key; point at its line too.
            let line = e
                .to_string()
                .split('`')
                .nth(1)
                .and_then(|key| find_line(&text, key))
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            anyhow!("{}{line}: {e}", path.display())
        });
    }
    let mut tree: Value =
        serde_yaml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    for s in sets {
        apply_set(&mut tree, s)?;
    }
    resolve_tree(
        tree,
        &format!("{} with overrides {}", path.display(), sets.join(" ")),
    )
}
