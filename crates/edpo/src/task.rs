//! The tasks' pipelines as cached stages, and what every run reads from them ([`TaskData`]).
//!
//! Each task builds a reference model (π_ref, also the starting policy, saved in the Hugging
//! Face layout), a gold reward ([`Judge`]), and preference pairs: two responses per prompt
//! sampled from π_ref, scored by the gold reward, labelled by a Bradley–Terry draw
//! `P(a ≻ b) = σ((r_a − r_b)/τ)`, each pair keeping its true preference probability. Held-out
//! pairs and evaluation prompts come from the same stage with their own seeds.
//!
//! - synthetic ([`crate::task::synthetic_prepare`]): a Markov-chain language with a per-token
//!   reward, seconds to build;
//! - sentiment ([`crate::sentiment`]): real movie-review snippets with human ratings.

use crate::config::{ModelShape, SyntheticTask, TaskConfig};
use crate::stages::StageCache;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use edpo_data::synthetic::{MarkovTask, Rng};
use edpo_data::TokenizedPair;
use edpo_eval::{sample, SamplingSettings};
use edpo_model::{CausalLm, Gpt2Config, ModelConfig};
use edpo_train::{AdamWConfig, SftTrainer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};

/// A labelled preference pair with its ground truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelledPair {
    /// Prompt ids.
    pub prompt_input_ids: Vec<u32>,
    /// Chosen response ids (EOS included when the response ended).
    pub chosen_input_ids: Vec<u32>,
    /// Rejected response ids.
    pub rejected_input_ids: Vec<u32>,
    /// The true probability that the chosen response is preferred.
    pub p_true: f64,
    /// Gold reward of the chosen response.
    pub chosen_reward: f64,
    /// Gold reward of the rejected response.
    pub rejected_reward: f64,
}

impl LabelledPair {
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
    /// The gold reward (and second judge).
    pub judge: Box<dyn Judge>,
    /// The EOS token.
    pub eos: u32,
    /// The reference model directory.
    pub reference_dir: PathBuf,
    /// Training pairs.
    pub train: Vec<LabelledPair>,
    /// Held-out pairs.
    pub eval_pairs: Vec<LabelledPair>,
    /// Test prompts: every reported number is measured on them.
    pub eval_prompts: Vec<Vec<u32>>,
    /// Validation prompts: settings are chosen on them.
    pub val_prompts: Vec<Vec<u32>>,
    /// Maximum response length, EOS included.
    pub response_tokens: usize,
    /// What the pairs stage depends on (reference, data, tokenizer), for stages built on it.
    pub pairs_key: serde_json::Value,
}

impl TaskData {
    /// Reads the pairs stage `pairs_dir` (as [`write_pairs`] left it) into a task's data.
    pub fn from_pairs_stage(
        judge: Box<dyn Judge>,
        eos: u32,
        reference_dir: PathBuf,
        pairs_dir: &Path,
        response_tokens: usize,
        pairs_key: serde_json::Value,
    ) -> Result<Self> {
        Ok(Self {
            judge,
            eos,
            reference_dir,
            train: read_jsonl(&pairs_dir.join("train.jsonl"))?,
            eval_pairs: read_jsonl(&pairs_dir.join("eval_pairs.jsonl"))?,
            eval_prompts: read_jsonl(&pairs_dir.join("eval_prompts.jsonl"))?,
            val_prompts: read_jsonl(&pairs_dir.join("val_prompts.jsonl"))?,
            response_tokens,
            pairs_key,
        })
    }

    /// Reference log-probs `[chosen, rejected]` of every training pair, computed once per
    /// reference and dataset and cached as a stage of its own: a different reference, data or
    /// tokenisation has a different key and so a different cache entry.
    pub fn cached_reference_logps(&self, cache: &StageCache) -> Result<Vec<[f64; 2]>> {
        let key = json!({"stage": "reference-logps", "pairs": self.pairs_key});
        let (dir, built) = cache.get_or_build("reference-logps", &key, |dir| {
            let reference = CausalLm::load(&self.reference_dir, &Device::Cpu, false)?;
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

/// Builds (or reads from the cache) everything the runs of a task need.
pub fn prepare(task: &TaskConfig, shape: &ModelShape, cache: &StageCache) -> Result<TaskData> {
    match task {
        TaskConfig::Synthetic(t) => synthetic_prepare(t, shape, cache),
        TaskConfig::Sentiment(t) => crate::sentiment::prepare(t, shape, cache),
    }
}

/// A GPT-2 config for a task's reference model.
pub fn gpt2_config(
    vocab: usize,
    positions: usize,
    shape: &ModelShape,
    eos: u32,
) -> (ModelConfig, serde_json::Value) {
    let raw = json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab,
        "n_positions": positions, "n_embd": shape.n_embd, "n_layer": shape.n_layer,
        "n_head": shape.n_head, "eos_token_id": eos, "bos_token_id": eos,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    });
    let cfg = ModelConfig::Gpt2(Gpt2Config {
        vocab_size: vocab,
        n_positions: positions,
        n_embd: shape.n_embd,
        n_layer: shape.n_layer,
        n_head: shape.n_head,
        n_inner: 4 * shape.n_embd,
        layer_norm_epsilon: 1e-5,
    });
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
    let mut rng = Rng(seed);
    let mut pairs = Vec::with_capacity(count);
    let mut round = 0u64;
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
            let (ga, gb) = (judge.gold(&prompt, &ra), judge.gold(&prompt, &rb));
            let p_a = 1.0 / (1.0 + (-(ga - gb) / bt_temperature).exp());
            let a_wins = rng.uniform() < p_a;
            let (chosen, rejected, gc, gr, p) = if a_wins {
                (ra, rb, ga, gb, p_a)
            } else {
                (rb, ra, gb, ga, 1.0 - p_a)
            };
            pairs.push(LabelledPair {
                prompt_input_ids: prompt,
                chosen_input_ids: chosen,
                rejected_input_ids: rejected,
                p_true: p,
                chosen_reward: gc,
                rejected_reward: gr,
            });
        }
        round += 1;
    }
    Ok(pairs)
}

/// The synthetic task's gold reward: the mean token reward of the response.
struct MarkovJudge(MarkovTask);

impl Judge for MarkovJudge {
    fn gold(&self, _prompt: &[u32], response: &[u32]) -> f64 {
        self.0.reward(response)
    }
}

fn build_synthetic_reference(
    task: &SyntheticTask,
    shape: &ModelShape,
    lang: &MarkovTask,
    dir: &Path,
) -> Result<()> {
    let positions = (task.prompt_tokens + task.response_tokens + 1)
        .next_power_of_two()
        .max(16);
    let (cfg, raw) = gpt2_config(task.vocab + 1, positions, shape, lang.eos());
    let model = CausalLm::random(cfg, raw, task.seed ^ 0x5EED, &Device::Cpu, true)?;
    let mut trainer = SftTrainer::new(&model, AdamWConfig::default(), Some(1.0));
    let mut rng = Rng(task.seed ^ 0xC0FFEE);
    let warmup = (task.sft_steps / 10).max(1);
    for step in 0..task.sft_steps {
        let seqs: Vec<(Vec<u32>, Vec<u32>)> = (0..32)
            .map(|_| {
                let prompt = lang.continue_chain(&[], task.prompt_tokens, &mut rng);
                let len = 1 + (rng.next_u64() % (task.response_tokens as u64 - 1)) as usize;
                let mut response = lang.continue_chain(&prompt, len, &mut rng);
                response.push(lang.eos());
                (prompt, response)
            })
            .collect();
        let views: Vec<(&[u32], &[u32])> = seqs
            .iter()
            .map(|(p, r)| (p.as_slice(), r.as_slice()))
            .collect();
        let lr = 3e-3 * ((step + 1) as f64 / warmup as f64).min(1.0);
        let loss = trainer.step(&model, &views, lr)?;
        if step + 1 == task.sft_steps {
            tracing::info!(loss, "reference SFT done");
        }
    }
    model.save(dir)?;
    Ok(())
}

/// The synthetic task's stages.
pub fn synthetic_prepare(
    task: &SyntheticTask,
    shape: &ModelShape,
    cache: &StageCache,
) -> Result<TaskData> {
    let lang = MarkovTask::new(task.vocab, task.sharpness, task.seed);
    let ref_key = json!({"stage": "synthetic-reference", "vocab": task.vocab, "sharpness": task.sharpness,
        "prompt_tokens": task.prompt_tokens, "response_tokens": task.response_tokens,
        "sft_steps": task.sft_steps, "seed": task.seed, "model": shape});
    let (reference_dir, built) = cache.get_or_build("reference", &ref_key, |dir| {
        build_synthetic_reference(task, shape, &lang, dir)
    })?;
    if built {
        tracing::info!(dir = %reference_dir.display(), "built reference");
    }
    let pairs_key = json!({"stage": "synthetic-pairs", "reference": ref_key, "train_pairs": task.train_pairs,
        "eval_pairs": task.eval_pairs, "eval_prompts": task.eval_prompts, "val_prompts": task.val_prompts,
        "bt_temperature": task.bt_temperature});
    let judge = MarkovJudge(lang.clone());
    let settings = SamplingSettings {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: task.response_tokens,
        eos: lang.eos(),
    };
    let (pairs_dir, _) = cache.get_or_build("pairs", &pairs_key, |dir| {
        let reference = CausalLm::load(&reference_dir, &Device::Cpu, false)?;
        let mut rng = Rng(task.seed ^ 0x4444);
        let mut next = || lang.continue_chain(&[], task.prompt_tokens, &mut rng);
        let train = sample_pairs(
            &reference,
            &judge,
            &mut next,
            &settings,
            task.bt_temperature,
            task.train_pairs,
            task.seed ^ 0x1111,
        )?;
        let held_out = sample_pairs(
            &reference,
            &judge,
            &mut next,
            &settings,
            task.bt_temperature,
            task.eval_pairs,
            task.seed ^ 0x2222,
        )?;
        let prompts: Vec<Vec<u32>> = (0..task.eval_prompts).map(|_| next()).collect();
        let val_prompts: Vec<Vec<u32>> = (0..task.val_prompts).map(|_| next()).collect();
        write_pairs(dir, &train, &held_out, &prompts, &val_prompts)
    })?;
    let eos = lang.eos();
    TaskData::from_pairs_stage(
        Box::new(judge),
        eos,
        reference_dir,
        &pairs_dir,
        task.response_tokens,
        pairs_key,
    )
}
