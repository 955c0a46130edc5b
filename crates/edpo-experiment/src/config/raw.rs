//! The run config as written: [`RawConfig`] mirrors the YAML file (every field optional,
//! unknown keys rejected) and [`RawConfig::resolve`] fills every default and validates every
//! value, with errors naming the key (`key `optim.lr`: …`).
//!
//! The task section is each task's own ([`crate::task::RawTask`]); the objective section is
//! checked against the objective catalogue, so a new objective needs nothing here.

use super::{
    EvalConfig, LoraSettings, ModelShape, ObjectiveConfig, OnlineReference, OnlineSettings,
    OptimConfig, ReferenceLogps, RunConfig, RunSettings, ScheduleName, CONFIG_VERSION,
};
use crate::check::check;
use crate::task::RawTask;
use anyhow::{anyhow, bail, Result};
use edpo_objectives::catalogue::{self, ParamType};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// The model section as written (a small GPT-2 trained from scratch as the reference).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    n_embd: Option<usize>,
    n_layer: Option<usize>,
    n_head: Option<usize>,
}

/// The objective section as written: `kind`, the SFT weight, where reference log-probs come
/// from, and the parameters of that kind (checked against the catalogue).
#[derive(Debug, Clone, Deserialize)]
pub struct RawObjective {
    kind: String,
    sft_weight: Option<f64>,
    reference_logps: Option<String>,
    #[serde(flatten)]
    params: BTreeMap<String, Value>,
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
    samples: Option<usize>,
    best_of_n: Option<bool>,
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
    lora: Option<RawLora>,
    online: Option<RawOnline>,
}

/// The `online` section as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOnline {
    rounds: usize,
    reference: Option<String>,
}

/// The `lora` section as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLora {
    r: usize,
    alpha: Option<f64>,
    targets: Vec<String>,
    rslora: Option<bool>,
}

impl RawObjective {
    /// The objective checked against the catalogue, its defaults filled and its ranges
    /// checked; errors name the key (`objective.<name>`).
    pub fn resolve(self) -> Result<ObjectiveConfig> {
        let Some(entry) = catalogue::entry(&self.kind) else {
            let names: Vec<&str> = catalogue::CATALOGUE.iter().map(|e| e.kind).collect();
            bail!(
                "key `objective.kind`: unknown objective `{}` (one of {})",
                self.kind,
                names.join(", ")
            );
        };
        let kind = entry.kind;
        let allowed: Vec<&str> = entry.params.iter().map(|p| p.name).collect();
        let mut params = BTreeMap::new();
        for (name, value) in &self.params {
            let Some(param) = entry.params.iter().find(|p| p.name == name) else {
                bail!(
                    "key `objective.{name}`: not a parameter of `{kind}` (its parameters: {})",
                    allowed.join(", ")
                );
            };
            let key = format!("objective.{name}");
            let resolved = match param.kind {
                ParamType::Real => {
                    let x = value
                        .as_f64()
                        .ok_or_else(|| anyhow!("key `{key}`: `{value}` is not a number"))?;
                    check(x.is_finite(), &key, "must be a finite number")?;
                    serde_json::json!(x)
                }
                ParamType::Integer => {
                    let x = value.as_u64().ok_or_else(|| {
                        anyhow!("key `{key}`: `{value}` is not a non-negative integer")
                    })?;
                    serde_json::json!(x)
                }
                ParamType::Flag => {
                    let x = value
                        .as_bool()
                        .ok_or_else(|| anyhow!("key `{key}`: `{value}` is not true or false"))?;
                    serde_json::json!(x)
                }
            };
            params.insert(name.clone(), resolved);
        }
        for p in entry.params {
            if params.contains_key(p.name) {
                continue;
            }
            let Some(d) = p.default else {
                bail!("key `objective.{}`: required by `{kind}`", p.name);
            };
            let value = match p.kind {
                ParamType::Real => serde_json::json!(d),
                ParamType::Integer => serde_json::json!(d as u64),
                ParamType::Flag => serde_json::json!(d != 0.0),
            };
            params.insert(p.name.to_string(), value);
        }
        let sft_weight = self.sft_weight.unwrap_or(0.0);
        check(
            sft_weight >= 0.0 && sft_weight.is_finite(),
            "objective.sft_weight",
            "must be non-negative",
        )?;
        let name = self.reference_logps.unwrap_or_else(|| "online".into());
        let reference_logps = ReferenceLogps::parse(&name).ok_or_else(|| {
            anyhow!(
                "key `objective.reference_logps`: `{name}` is not one of {}",
                ReferenceLogps::NAMES
            )
        })?;
        let resolved = ObjectiveConfig {
            kind: kind.to_string(),
            params,
            sft_weight,
            reference_logps,
        };
        // Range checks live with the objectives; run them now so a bad value fails before any
        // run.
        let objective = resolved.to_objective(0)?;
        objective.validate(sft_weight).map_err(parameter_error)?;
        if reference_logps == ReferenceLogps::Cached && !objective.needs().precomputed_reference {
            bail!("key `objective.reference_logps`: `{kind}` cannot use cached reference log-probs (it needs the reference model every step, or no reference at all)");
        }
        Ok(resolved)
    }
}

/// An objective's parameter error as a config error naming the key.
fn parameter_error(e: edpo_objectives::Error) -> anyhow::Error {
    match e {
        edpo_objectives::Error::Parameter {
            name,
            value,
            message,
        } => anyhow!("key `objective.{name}`: {value} {message}"),
        other => anyhow!("key `objective`: {other}"),
    }
}

impl RawConfig {
    /// Fills defaults and validates every value.
    pub fn resolve(self) -> Result<RunConfig> {
        let task = self.task.resolve()?;
        let default = task.default_shape();
        let pretrained = match &task {
            crate::task::TaskConfig::Sentiment(t) => t.reference.is_some(),
            crate::task::TaskConfig::Preferences(_) => true,
            crate::task::TaskConfig::Synthetic(_) => false,
        };
        {
            let written = self.model.n_embd.is_some()
                || self.model.n_layer.is_some()
                || self.model.n_head.is_some();
            check(
                !pretrained || !written,
                "model",
                "the shape of a model the task pre-trains; `task.reference` is a pretrained model, which has its own",
            )?;
        }
        let model = ModelShape {
            n_embd: self.model.n_embd.unwrap_or(default.n_embd),
            n_layer: self.model.n_layer.unwrap_or(default.n_layer),
            n_head: self.model.n_head.unwrap_or(default.n_head),
        };
        check(
            model.n_head >= 1 && model.n_embd.is_multiple_of(model.n_head),
            "model.n_head",
            format!(
                "{} heads do not divide width {}",
                model.n_head, model.n_embd
            ),
        )?;
        check(model.n_layer >= 1, "model.n_layer", "must be at least 1")?;
        let objective = self.objective.resolve()?;
        let o = self.optim;
        let schedule_name = o.schedule.unwrap_or_else(|| "cosine".into());
        let schedule = ScheduleName::parse(&schedule_name).ok_or_else(|| {
            anyhow!(
                "key `optim.schedule`: `{schedule_name}` is not one of {}",
                ScheduleName::NAMES
            )
        })?;
        let optim = OptimConfig {
            lr: o.lr.unwrap_or(1e-3),
            schedule,
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
            samples: e.samples.unwrap_or(4),
            best_of_n: e.best_of_n.unwrap_or(false),
        };
        check(eval.samples >= 1, "eval.samples", "must be at least 1")?;
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
        let lora = match self.lora {
            None => None,
            Some(l) => {
                let lora = LoraSettings {
                    r: l.r,
                    alpha: l.alpha.unwrap_or(2.0 * l.r as f64),
                    targets: l.targets,
                    rslora: l.rslora.unwrap_or(false),
                };
                check(lora.r >= 1, "lora.r", "must be at least 1")?;
                check(
                    lora.alpha > 0.0 && lora.alpha.is_finite(),
                    "lora.alpha",
                    "must be positive",
                )?;
                check(
                    !lora.targets.is_empty(),
                    "lora.targets",
                    "must name at least one module",
                )?;
                check(
                    !objective.to_objective(0)?.needs().reference_updates,
                    "lora",
                    format!("`{}` moves its reference towards the policy, which shares its base weights with a LoRA policy", objective.kind),
                )?;
                Some(lora)
            }
        };
        let online = match self.online {
            None => None,
            Some(o) => {
                let reference = match o.reference.as_deref() {
                    None | Some("fixed") => OnlineReference::Fixed,
                    Some("previous") => OnlineReference::Previous,
                    Some(other) => bail!(
                        "key `online.reference`: `{other}` is not `fixed` (the original reference \
                         throughout) or `previous` (each round's reference is the policy that \
                         ended the round before)"
                    ),
                };
                check(
                    o.rounds >= 2,
                    "online.rounds",
                    "must be at least 2 (1 is offline training)",
                )?;
                check(
                    reference == OnlineReference::Fixed || lora.is_none(),
                    "online.reference",
                    "`previous` copies the policy into the reference, which shares its base weights with a LoRA policy",
                )?;
                Some(OnlineSettings {
                    rounds: o.rounds,
                    reference,
                })
            }
        };
        let config = RunConfig {
            config_version: CONFIG_VERSION,
            task,
            model,
            objective,
            optim,
            eval,
            run,
            lora,
            online,
        };
        config.hash()?;
        Ok(config)
    }
}
