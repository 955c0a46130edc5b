//! Tasks: what a run trains on and is judged by, behind one dispatcher ([`TaskConfig`]).
//!
//! Each task builds a reference model (π_ref, also the starting policy, saved in the Hugging
//! Face layout), a gold reward ([`Judge`]), and preference pairs: two responses per prompt
//! sampled from π_ref, scored by the gold reward, labelled by a Bradley–Terry draw
//! `P(a ≻ b) = σ((r_a − r_b)/τ)`, each pair keeping its true preference probability
//! ([`crate::pairs::sample_pairs`]). Held-out pairs and evaluation prompts come from the same
//! stage with their own seeds. Every stage is cached by a hash of its key
//! ([`crate::stages`]).
//!
//! - [`synthetic`]: a Markov-chain language with a per-token reward, seconds to build;
//! - [`sentiment`]: real movie-review snippets with human ratings (the default task);
//! - [`preferences`]: a user's own preference data and pretrained model, with no gold reward
//!   (the pairs are the data's; [`TaskData::judge`] is `None`).
//!
//! [`pretrained`] holds what the tasks that take a pretrained reference share.
//!
//! A new task is one module here (its raw and resolved config section, defaults, stage keys
//! and `prepare`) plus one variant in [`RawTask`] and [`TaskConfig`] and their `match`es.

pub mod preferences;
pub mod pretrained;
pub mod sentiment;
pub mod synthetic;

use crate::check::check;
use crate::stages::StageCache;
use anyhow::{bail, Context, Result};
use edpo_data::TokenizedPair;
use edpo_model::{CausalLm, Gpt2Config, ModelConfig};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};

pub use preferences::PreferencesTask;
pub use sentiment::SentimentTask;
pub use synthetic::SyntheticTask;

/// A labelled preference pair with its ground truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelledPair {
    /// Prompt ids.
    pub prompt_input_ids: Vec<u32>,
    /// Chosen response ids (EOS included when the response ended).
    pub chosen_input_ids: Vec<u32>,
    /// Rejected response ids.
    pub rejected_input_ids: Vec<u32>,
    /// The true probability that the chosen response is preferred (`None`: user data, whose
    /// labels have no known truth).
    pub p_true: Option<f64>,
    /// Gold reward of the chosen response (`None`: a task without a gold reward).
    pub chosen_reward: Option<f64>,
    /// Gold reward of the rejected response.
    pub rejected_reward: Option<f64>,
    /// The data's own scores of the two responses (user data: `score_chosen`,
    /// `score_rejected`), when it has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<[f64; 2]>,
}

impl LabelledPair {
    /// The two responses' scores an objective reads (ODPO's offset): the data's own, else the
    /// gold rewards.
    pub fn response_scores(&self) -> Option<[f64; 2]> {
        self.scores
            .or_else(|| Some([self.chosen_reward?, self.rejected_reward?]))
    }

    /// The token ids for training.
    pub fn tokenized(&self) -> TokenizedPair {
        TokenizedPair {
            prompt: self.prompt_input_ids.clone(),
            chosen: self.chosen_input_ids.clone(),
            rejected: self.rejected_input_ids.clone(),
        }
    }
}

/// A task's judges of a response to a prompt.
pub trait Judge: Send + Sync {
    /// The gold reward.
    fn gold(&self, prompt: &[u32], response: &[u32]) -> f64;
    /// A second, independent judge, where the task has one.
    fn second(&self, _prompt: &[u32], _response: &[u32]) -> Option<f64> {
        None
    }
}

/// Everything a run reads.
pub struct TaskData {
    /// The gold reward (and second judge); `None` for user data, which has none: such a run
    /// is evaluated by KL and held-out preference accuracy, and judged by the public judges.
    pub judge: Option<Box<dyn Judge>>,
    /// The EOS token.
    pub eos: u32,
    /// The reference model directory.
    pub reference_dir: PathBuf,
    /// Training pairs.
    pub train: Vec<LabelledPair>,
    /// Held-out pairs.
    pub eval_pairs: Vec<LabelledPair>,
    /// Validation pairs (user data: settings are chosen by their preference accuracy; empty
    /// for tasks that choose by the validation prompts' win rate).
    pub val_pairs: Vec<LabelledPair>,
    /// Test prompts: every reported number is measured on them.
    pub eval_prompts: Vec<Vec<u32>>,
    /// Validation prompts: settings are chosen on them.
    pub val_prompts: Vec<Vec<u32>>,
    /// Maximum response length, EOS included.
    pub response_tokens: usize,
    /// What the pairs stage depends on (reference, data, tokenizer), for stages built on it.
    pub pairs_key: serde_json::Value,
    /// The Bradley–Terry temperature the task's pairs were labelled with, in gold-reward units,
    /// for pairs labelled during training (on-policy rounds); `None`: the task has no labelling
    /// rule (user data).
    pub bt_temperature: Option<f64>,
    /// What the test prompts depend on, for stages built on them alone (the best-of-n curve):
    /// `pairs_key`, except for pairs derived from another stage's prompts (RSO).
    pub prompts_key: serde_json::Value,
    /// The preparation summary (user data: what was read, skipped and truncated), written
    /// into every run directory.
    pub data_summary: Option<String>,
    /// The reference's evaluation samples, drawn once per sampling stream and shared by every
    /// run of this process that evaluates on the same stream (runs of one seed).
    pub reference_draws: ReferenceDraws,
}

/// The reference's samples and gold rewards on the (repeated) test and validation prompts,
/// by a key naming the stream and settings.
pub type ReferenceDraws = std::sync::Mutex<
    std::collections::HashMap<String, std::sync::Arc<std::sync::OnceLock<DrawnReference>>>,
>;

/// One stream's reference samples: test samples, their gold rewards, validation rewards.
pub type DrawnReference = (Vec<Vec<u32>>, Vec<f64>, Vec<f64>);

impl TaskData {
    /// The share of training labels that contradict the gold ordering (the chosen response's
    /// gold reward below the rejected one's): the label noise the Bradley–Terry draw put in.
    /// `None` where the pairs have no gold rewards.
    pub fn label_noise(&self) -> Option<f64> {
        let judged: Vec<(f64, f64)> = self
            .train
            .iter()
            .map(|p| Some((p.chosen_reward?, p.rejected_reward?)))
            .collect::<Option<_>>()?;
        if judged.is_empty() {
            return Some(0.0);
        }
        let wrong = judged.iter().filter(|(c, r)| c < r).count();
        Some(wrong as f64 / judged.len() as f64)
    }

    /// Reads the pairs stage `pairs_dir` (as [`write_pairs`] left it) into a task's data.
    pub fn from_pairs_stage(
        judge: Option<Box<dyn Judge>>,
        eos: u32,
        reference_dir: PathBuf,
        pairs_dir: &Path,
        response_tokens: usize,
        pairs_key: serde_json::Value,
    ) -> Result<Self> {
        // Written by the user-data task only.
        let val_path = pairs_dir.join(VAL_PAIRS);
        let val_pairs = if val_path.exists() {
            read_jsonl(&val_path)?
        } else {
            Vec::new()
        };
        let summary_path = pairs_dir.join(edpo_rundir::DATA_SUMMARY);
        let data_summary = if summary_path.exists() {
            Some(
                std::fs::read_to_string(&summary_path)
                    .with_context(|| format!("cannot read {}", summary_path.display()))?,
            )
        } else {
            None
        };
        Ok(Self {
            judge,
            eos,
            reference_dir,
            train: read_jsonl(&pairs_dir.join("train.jsonl"))?,
            eval_pairs: read_jsonl(&pairs_dir.join("eval_pairs.jsonl"))?,
            val_pairs,
            eval_prompts: read_jsonl(&pairs_dir.join("eval_prompts.jsonl"))?,
            val_prompts: read_jsonl(&pairs_dir.join("val_prompts.jsonl"))?,
            response_tokens,
            bt_temperature: None,
            prompts_key: pairs_key.clone(),
            pairs_key,
            data_summary,
            reference_draws: Default::default(),
        })
    }

    /// Reference log-probs `[chosen, rejected]` of every training pair, computed once per
    /// reference and dataset and cached as a stage of its own: a different reference, data or
    /// tokenisation has a different key and so a different cache entry.
    pub fn cached_reference_logps(&self, cache: &StageCache) -> Result<Vec<[f64; 2]>> {
        let key = reference_logps_key(&self.pairs_key);
        let (dir, built) = cache.get_or_build("reference-logps", &key, |dir| {
            let reference = CausalLm::load(&self.reference_dir, &crate::device(), false)?;
            let pairs: Vec<TokenizedPair> =
                self.train.iter().map(LabelledPair::tokenized).collect();
            let values = edpo_train::reference_logps(&reference, &pairs, 32)?;
            std::fs::write(
                dir.join("reference_logps.json"),
                serde_json::to_string(&values)?,
            )?;
            Ok(())
        })?;
        if built {
            tracing::info!(dir = %dir.display(), "computed reference log-probs");
        }
        let path = dir.join("reference_logps.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let values: Vec<[f64; 2]> = serde_json::from_str(&text)
            .with_context(|| format!("{}: malformed", path.display()))?;
        if values.len() != self.train.len() {
            bail!(
                "{}: {} values for {} pairs",
                path.display(),
                values.len(),
                self.train.len()
            );
        }
        Ok(values)
    }
}

/// A pairs stage's validation pairs (user data only).
pub const VAL_PAIRS: &str = "val_pairs.jsonl";

/// The key of the cached reference log-probs of a pairs stage.
pub fn reference_logps_key(pairs_key: &serde_json::Value) -> serde_json::Value {
    json!({"stage": "reference-logps", "pairs": pairs_key})
}

/// The resolved model shape (a GPT-2 the task pre-trains as its reference).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    /// Width.
    pub n_embd: usize,
    /// Blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
}

/// A task section as written: `kind` and that task's own keys. Deserialised by hand (not as
/// an internally tagged enum, whose buffering loses where an error is) so that an error
/// names its key: `task.train_pairs: invalid value: integer -1, expected usize`.
#[derive(Debug, Clone)]
pub enum RawTask {
    /// A Markov-chain language with a per-token gold reward (seconds to train).
    Synthetic(synthetic::RawSynthetic),
    /// Controlled sentiment generation on real movie-review snippets with human ratings.
    Sentiment(sentiment::RawSentiment),
    /// A user's preference data on a pretrained model.
    Preferences(preferences::RawPreferences),
}

/// The resolved task.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskConfig {
    /// See [`synthetic`].
    Synthetic(SyntheticTask),
    /// See [`sentiment`].
    Sentiment(SentimentTask),
    /// See [`preferences`].
    Preferences(PreferencesTask),
}

impl<'de> Deserialize<'de> for RawTask {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut map = serde_yaml::Mapping::deserialize(d)?;
        let kind = match map.remove("kind") {
            Some(serde_yaml::Value::String(k)) => k,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "task.kind: expected a task name, found {other:?}"
                )))
            }
            None => return Err(D::Error::missing_field("kind")),
        };
        fn section<T: serde::de::DeserializeOwned, E: serde::de::Error>(
            map: serde_yaml::Mapping,
        ) -> std::result::Result<T, E> {
            serde_path_to_error::deserialize(serde_yaml::Value::Mapping(map)).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path == "." {
                    E::custom(format!("task: {inner}"))
                } else {
                    E::custom(format!("task.{path}: {inner}"))
                }
            })
        }
        match kind.as_str() {
            "synthetic" => section(map).map(RawTask::Synthetic),
            "sentiment" => section(map).map(RawTask::Sentiment),
            "preferences" => section(map).map(RawTask::Preferences),
            other => Err(D::Error::custom(format!(
                "task.kind: unknown task `{other}`, expected `synthetic`, `sentiment` or `preferences`"
            ))),
        }
    }
}

impl RawTask {
    /// Fills the task's defaults and validates its values.
    pub fn resolve(self) -> Result<TaskConfig> {
        Ok(match self {
            RawTask::Synthetic(raw) => TaskConfig::Synthetic(raw.resolve()?),
            RawTask::Sentiment(raw) => TaskConfig::Sentiment(raw.resolve()?),
            RawTask::Preferences(raw) => TaskConfig::Preferences(raw.resolve()?),
        })
    }
}

impl TaskConfig {
    /// The reference model's shape when the config gives none.
    pub fn default_shape(&self) -> ModelShape {
        match self {
            TaskConfig::Synthetic(_) => synthetic::DEFAULT_SHAPE,
            TaskConfig::Sentiment(_) => sentiment::DEFAULT_SHAPE,
            TaskConfig::Preferences(_) => preferences::DEFAULT_SHAPE,
        }
    }

    /// The task's stages, in build order: `(name, key)`, the last one the pairs stage.
    pub fn stage_keys(&self, shape: &ModelShape) -> Vec<(&'static str, serde_json::Value)> {
        match self {
            TaskConfig::Synthetic(t) => synthetic::stage_keys(t, shape).into(),
            TaskConfig::Sentiment(t) => sentiment::stage_keys(t, shape),
            TaskConfig::Preferences(t) => preferences::stage_keys(t),
        }
    }

    /// Builds (or reads from the cache) everything the runs of the task need.
    pub fn prepare(&self, shape: &ModelShape, cache: &StageCache) -> Result<TaskData> {
        match self {
            TaskConfig::Synthetic(t) => synthetic::prepare(t, shape, cache),
            TaskConfig::Sentiment(t) => sentiment::prepare(t, shape, cache),
            TaskConfig::Preferences(t) => preferences::prepare(t, cache),
        }
    }
}

/// The checks every task shares: response length, pair and prompt counts, label temperature.
pub(crate) fn check_pairs(
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

/// A GPT-2 config for a task's reference model.
pub fn gpt2_config(
    vocab: usize,
    positions: usize,
    shape: &ModelShape,
    eos: u32,
) -> (ModelConfig, serde_json::Value) {
    let cfg = Gpt2Config {
        vocab_size: vocab,
        n_positions: positions,
        n_embd: shape.n_embd,
        n_layer: shape.n_layer,
        n_head: shape.n_head,
        n_inner: 4 * shape.n_embd,
        layer_norm_epsilon: 1e-5,
    };
    let raw = cfg.hf_json(eos);
    let cfg = ModelConfig::Gpt2(cfg);
    (cfg, raw)
}

/// Writes rows as JSON lines.
fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Writes a pairs stage: training pairs, held-out pairs, test and validation prompts.
pub fn write_pairs(
    dir: &Path,
    train: &[LabelledPair],
    held_out: &[LabelledPair],
    prompts: &[Vec<u32>],
    val_prompts: &[Vec<u32>],
) -> Result<()> {
    write_jsonl(&dir.join("train.jsonl"), train)?;
    write_jsonl(&dir.join("eval_pairs.jsonl"), held_out)?;
    write_jsonl(&dir.join("eval_prompts.jsonl"), prompts)?;
    write_jsonl(&dir.join("val_prompts.jsonl"), val_prompts)
}

/// Reads JSON lines; a malformed row is an error naming the file and line.
fn read_jsonl<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: malformed row", path.display(), i + 1))
        })
        .collect()
}
