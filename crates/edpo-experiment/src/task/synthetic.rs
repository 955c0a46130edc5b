//! The synthetic task: a seeded Markov-chain language with a per-token gold reward, a small
//! GPT-2 reference trained on it by SFT, and preference pairs sampled from the reference.
//! Seconds to build; the engine's tests run on it.

use super::ModelShape;
use super::{check_pairs, gpt2_config, write_pairs, Judge, TaskData};
use crate::check::check;
use crate::pairs::{pair_sampling, sample_pairs};
use crate::stages::StageCache;
use anyhow::Result;
use edpo_data::rng::SplitMix64;
use edpo_data::synthetic::MarkovTask;
use edpo_model::CausalLm;
use edpo_train::{AdamWConfig, SftTrainer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::Path;

/// The synthetic task's section as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSynthetic {
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
}

/// The resolved synthetic task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyntheticTask {
    /// Tokens of the language, EOS excluded.
    pub vocab: usize,
    /// How peaked the chain's transitions are.
    pub sharpness: f64,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Maximum response length in tokens, EOS included.
    pub response_tokens: usize,
    /// Training pairs.
    pub train_pairs: usize,
    /// Held-out pairs.
    pub eval_pairs: usize,
    /// Test prompts.
    pub eval_prompts: usize,
    /// Validation prompts.
    pub val_prompts: usize,
    /// τ of the Bradley–Terry labels.
    pub bt_temperature: f64,
    /// SFT steps of the reference.
    pub sft_steps: usize,
    /// Seed of the language, the reference and the pairs.
    pub seed: u64,
}

/// The reference's shape when the config gives none.
pub const DEFAULT_SHAPE: ModelShape = ModelShape {
    n_embd: 32,
    n_layer: 2,
    n_head: 2,
};

impl RawSynthetic {
    /// Fills defaults and validates.
    pub fn resolve(self) -> Result<SyntheticTask> {
        let task = SyntheticTask {
            vocab: self.vocab.unwrap_or(24),
            sharpness: self.sharpness.unwrap_or(2.0),
            prompt_tokens: self.prompt_tokens.unwrap_or(3),
            response_tokens: self.response_tokens.unwrap_or(8),
            train_pairs: self.train_pairs.unwrap_or(256),
            eval_pairs: self.eval_pairs.unwrap_or(64),
            eval_prompts: self.eval_prompts.unwrap_or(128),
            val_prompts: self.val_prompts.unwrap_or(64),
            bt_temperature: self.bt_temperature.unwrap_or(0.25),
            sft_steps: self.sft_steps.unwrap_or(150),
            seed: self.seed.unwrap_or(0),
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
        Ok(task)
    }
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
    let model = CausalLm::random(cfg, raw, task.seed ^ 0x5EED, &crate::device(), true)?;
    let mut trainer = SftTrainer::new(&model, AdamWConfig::default(), Some(1.0))?;
    let mut rng = SplitMix64(task.seed ^ 0xC0FFEE);
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

/// The synthetic task's stage keys: reference, then pairs.
pub fn stage_keys(
    task: &SyntheticTask,
    shape: &ModelShape,
) -> [(&'static str, serde_json::Value); 2] {
    let reference = json!({"stage": "synthetic-reference", "vocab": task.vocab, "sharpness": task.sharpness,
        "prompt_tokens": task.prompt_tokens, "response_tokens": task.response_tokens,
        "sft_steps": task.sft_steps, "seed": task.seed, "model": shape});
    let pairs = json!({"stage": "synthetic-pairs", "reference": reference, "train_pairs": task.train_pairs,
        "eval_pairs": task.eval_pairs, "eval_prompts": task.eval_prompts, "val_prompts": task.val_prompts,
        "bt_temperature": task.bt_temperature});
    [("reference", reference), ("pairs", pairs)]
}

/// The synthetic task's stages.
pub fn prepare(task: &SyntheticTask, shape: &ModelShape, cache: &StageCache) -> Result<TaskData> {
    let lang = MarkovTask::new(task.vocab, task.sharpness, task.seed);
    let [(_, ref_key), (_, pairs_key)] = stage_keys(task, shape);
    let (reference_dir, built) = cache.get_or_build("reference", &ref_key, |dir| {
        build_synthetic_reference(task, shape, &lang, dir)
    })?;
    if built {
        tracing::info!(dir = %reference_dir.display(), "built reference");
    }
    let judge = MarkovJudge(lang.clone());
    let settings = pair_sampling(task.response_tokens, lang.eos());
    let (pairs_dir, _) = cache.get_or_build("pairs", &pairs_key, |dir| {
        let reference = CausalLm::load(&reference_dir, &crate::device(), false)?;
        let mut rng = SplitMix64(task.seed ^ 0x4444);
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
    let mut data = TaskData::from_pairs_stage(
        Some(Box::new(judge)),
        eos,
        reference_dir,
        &pairs_dir,
        task.response_tokens,
        pairs_key,
    )?;
    data.bt_temperature = Some(task.bt_temperature);
    Ok(data)
}
