//! The resolved run config: every default filled and every value validated; what a run
//! directory's `config.yaml` holds and what a run's hash is computed from.
//!
//! - [`raw`]: the config as written (every field optional, unknown keys rejected) and its
//!   resolution into a [`RunConfig`];
//! - here: the resolved types and the hash.
//!
//! The task sections are defined by their tasks ([`crate::task`]); the objective section's
//! kinds, parameters and defaults come from the objective catalogue
//! ([`edpo_objectives::catalogue`]).

pub mod raw;

use crate::hash::short_hash;
use crate::task::{ModelShape, TaskConfig};
use anyhow::{anyhow, Result};
use edpo_objectives::{catalogue, Objective};
use serde::Serialize;
use std::collections::BTreeMap;

pub use edpo_rundir::CONFIG_VERSION;
pub use raw::RawConfig;

/// Where reference log-probs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceLogps {
    /// A reference forward pass every step.
    Online,
    /// Computed once per dataset and reference, for objectives that allow it.
    Cached,
}

impl ReferenceLogps {
    /// The names a config may use.
    pub const NAMES: &'static str = "online, cached";

    /// Parses a config value.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "online" => Some(Self::Online),
            "cached" => Some(Self::Cached),
            _ => None,
        }
    }
}

/// The resolved objective: its kind, every parameter of that kind (defaults filled; reals as
/// JSON numbers, integers as integers, flags as booleans), the SFT weight, and where reference
/// log-probs come from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectiveConfig {
    /// The catalogue kind.
    pub kind: String,
    /// Its parameters.
    #[serde(flatten)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// Weight of the SFT term added to the objective.
    pub sft_weight: f64,
    /// Where reference log-probs come from.
    pub reference_logps: ReferenceLogps,
}

impl ObjectiveConfig {
    /// The trainer's objective; `seed` seeds β-DPO's filter. Its ranges were checked when the
    /// config was resolved, and are again when a trainer is made.
    pub fn to_objective(&self, seed: u64) -> Result<Objective> {
        let entry = catalogue::entry(&self.kind)
            .ok_or_else(|| anyhow!("unknown objective `{}`", self.kind))?;
        let values: Vec<(&str, f64)> = entry
            .params
            .iter()
            .map(|p| {
                let v = self.params.get(p.name);
                let x = v
                    .and_then(serde_json::Value::as_f64)
                    .or_else(|| v.and_then(serde_json::Value::as_bool).map(f64::from))
                    .unwrap_or(f64::NAN);
                (p.name, x)
            })
            .collect();
        Ok(entry.objective(&values, seed))
    }
}

/// The learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleName {
    /// Constant.
    Constant,
    /// Linear decay to 0.
    Linear,
    /// Cosine decay to 0.
    Cosine,
}

impl ScheduleName {
    /// The names a config may use.
    pub const NAMES: &'static str = "constant, linear, cosine";

    /// Parses a config value.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "constant" => Some(Self::Constant),
            "linear" => Some(Self::Linear),
            "cosine" => Some(Self::Cosine),
            _ => None,
        }
    }

    /// The trainer's schedule kind.
    pub fn kind(self) -> edpo_train::ScheduleKind {
        match self {
            Self::Constant => edpo_train::ScheduleKind::Constant,
            Self::Linear => edpo_train::ScheduleKind::Linear,
            Self::Cosine => edpo_train::ScheduleKind::Cosine,
        }
    }
}

/// The resolved optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Decay after warm-up.
    pub schedule: ScheduleName,
    /// Warm-up steps as a fraction of all steps.
    pub warmup_ratio: f64,
    /// Pairs per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Passes over the training pairs.
    pub epochs: usize,
    /// Clip the global gradient norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW's β₁.
    pub adam_beta1: f64,
    /// AdamW's β₂.
    pub adam_beta2: f64,
    /// AdamW's ε.
    pub adam_eps: f64,
}

/// The resolved evaluation settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalConfig {
    /// Evaluate every this many optimizer steps (0: only at the end).
    pub every: usize,
    /// Sampling temperature.
    pub temperature: f64,
    /// Top-k (0: off).
    pub top_k: usize,
    /// Top-p.
    pub top_p: f64,
    /// Samples per test and validation prompt, each paired with a reference sample drawn
    /// from the same random stream.
    pub samples: usize,
    /// Draw the best-of-n yardstick from the reference (a cached stage; its numbers go into
    /// `eval.json` as `best_of_n/<n>/…`).
    pub best_of_n: bool,
}

/// The resolved run settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSettings {
    /// The run seed (data order, evaluation sampling, β-DPO's filter).
    pub seed: u64,
    /// Threads inside the run (not part of the hash).
    pub threads: usize,
    /// Groups of pairs per micro-batch whose passes run in parallel (see
    /// `Trainer::with_shards`). Part of the hash: gradients are summed per shard, so the
    /// numbers differ at f32 rounding. Left out of the file when 1, so configs written before
    /// it existed keep their hashes.
    #[serde(skip_serializing_if = "is_one")]
    pub shards: usize,
    /// Log a training line every this many steps.
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
    /// The task.
    pub task: TaskConfig,
    /// The reference model's shape.
    pub model: ModelShape,
    /// The objective.
    pub objective: ObjectiveConfig,
    /// Optimisation.
    pub optim: OptimConfig,
    /// Evaluation.
    pub eval: EvalConfig,
    /// Seed, threads, shards, logging.
    pub run: RunSettings,
    /// LoRA adapters on the policy (none: full fine-tuning). Left out of the file when
    /// absent, so configs without it keep their hashes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSettings>,
    /// On-policy rounds (none: offline training on the task's pairs). Left out of the file
    /// when absent, so configs without it keep their hashes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub online: Option<OnlineSettings>,
}

/// The resolved `online` section: training in `rounds` rounds over the same label budget as
/// offline training. Round 0 trains on the first share of the task's training pairs (drawn
/// from the reference, which the policy still is); every later round draws two responses from
/// the current policy for each prompt of the next share, labels them with the task's rule
/// (its gold reward and Bradley–Terry temperature) and trains on them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OnlineSettings {
    /// Rounds (≥ 2).
    pub rounds: usize,
    /// The reference of each round.
    pub reference: OnlineReference,
}

/// The reference of an on-policy round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnlineReference {
    /// The original reference throughout.
    Fixed,
    /// The policy that ended the previous round (iterative DPO's reset).
    Previous,
}

/// The resolved `lora` section: adapters on the policy's linear modules named in `targets`,
/// the reference being the same base without them (see `edpo_model::lora`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraSettings {
    /// Rank.
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Module names (`c_attn`, `q_proj`, …).
    pub targets: Vec<String>,
    /// Scale by `alpha/√r` instead of `alpha/r`.
    pub rslora: bool,
}

impl LoraSettings {
    /// The model crate's adapter configuration.
    pub fn config(&self) -> edpo_model::LoraConfig {
        edpo_model::LoraConfig {
            r: self.r,
            alpha: self.alpha,
            targets: self.targets.clone(),
            rslora: self.rslora,
        }
    }
}

impl RunConfig {
    /// The run's identity: a hash of everything that changes its results. The thread count
    /// is left out: it changes speed, not what is computed.
    /// A config that cannot be serialised is an error, never a default hash (which would
    /// give every such run the same directory).
    pub fn hash(&self) -> Result<String> {
        let mut canonical = self.clone();
        canonical.run.threads = 0;
        short_hash(&canonical)
    }

    /// The stage cache entries a config reads, in build order, as `name-hash` (without building
    /// anything): the task's stages, and the cached reference log-probs where the objective uses
    /// them.
    pub fn stage_entries(&self) -> Result<Vec<String>> {
        let mut keys = self.task.stage_keys(&self.model);
        if self.objective.reference_logps == ReferenceLogps::Cached {
            if let Some((_, pairs)) = keys.last() {
                let key = crate::task::reference_logps_key(pairs);
                keys.push(("reference-logps", key));
            }
        }
        keys.iter()
            .map(|(name, key)| crate::stages::entry_name(name, key))
            .collect()
    }

    /// The resolved config as YAML.
    pub fn to_yaml(&self) -> Result<String> {
        Ok(serde_yaml::to_string(self)?)
    }
}
