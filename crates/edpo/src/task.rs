//! The synthetic task's pipeline: reference model and preference pairs as cached stages.
//!
//! 1. Reference: a small GPT-2 trained from a seeded initialisation by next-token likelihood
//!    on sequences of the Markov language (prompt, continuation, EOS), saved in the Hugging
//!    Face layout. It is π_ref and the starting policy.
//! 2. Pairs: prompts are chain prefixes; two responses per prompt are sampled from π_ref,
//!    scored by the gold reward, and labelled by a Bradley–Terry draw
//!    `P(a ≻ b) = σ((r_a − r_b)/τ)`. Each pair keeps its true preference probability. Held-out
//!    pairs and evaluation prompts come from the same stage with their own seeds.

use crate::config::{ModelShape, TaskConfig};
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

/// Everything a run of the synthetic task reads.
pub struct TaskData {
    /// The language and its gold reward.
    pub task: MarkovTask,
    /// The reference model directory.
    pub reference_dir: PathBuf,
    /// Training pairs.
    pub train: Vec<LabelledPair>,
    /// Held-out pairs.
    pub eval_pairs: Vec<LabelledPair>,
    /// Held-out prompts for sampling.
    pub eval_prompts: Vec<Vec<u32>>,
    /// Sampling settings used to build the pairs (and the maximum response length).
    pub response_tokens: usize,
    /// What the pairs stage depends on (reference, data, tokenizer), for stages built on it.
    pub pairs_key: serde_json::Value,
}

impl TaskData {
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

fn model_config(task: &TaskConfig, shape: &ModelShape) -> (ModelConfig, serde_json::Value) {
    let vocab = task.vocab + 1;
    let positions = (task.prompt_tokens + task.response_tokens + 1)
        .next_power_of_two()
        .max(16);
    let raw = json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab,
        "n_positions": positions, "n_embd": shape.n_embd, "n_layer": shape.n_layer,
        "n_head": shape.n_head, "eos_token_id": task.vocab, "bos_token_id": task.vocab,
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

fn build_reference(
    task: &TaskConfig,
    shape: &ModelShape,
    lang: &MarkovTask,
    dir: &Path,
) -> Result<()> {
    let (cfg, raw) = model_config(task, shape);
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

fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

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

fn sample_pairs(
    lang: &MarkovTask,
    reference: &CausalLm,
    task: &TaskConfig,
    count: usize,
    seed: u64,
) -> Result<Vec<LabelledPair>> {
    let mut rng = Rng(seed);
    let settings = SamplingSettings {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: task.response_tokens,
        eos: lang.eos(),
    };
    let mut pairs = Vec::with_capacity(count);
    let mut round = 0u64;
    while pairs.len() < count {
        if round > 20 {
            bail!(
                "could not sample {count} distinct pairs (got {})",
                pairs.len()
            );
        }
        let need = count - pairs.len();
        let prompts: Vec<Vec<u32>> = (0..need)
            .map(|_| lang.continue_chain(&[], task.prompt_tokens, &mut rng))
            .collect();
        let a = sample(reference, &prompts, &settings, seed ^ (round * 2 + 1))?;
        let b = sample(reference, &prompts, &settings, seed ^ (round * 2 + 2))?;
        for ((prompt, ra), rb) in prompts.into_iter().zip(a).zip(b) {
            if ra == rb {
                continue; // identical responses carry no preference
            }
            let (ga, gb) = (lang.reward(&ra), lang.reward(&rb));
            let p_a = 1.0 / (1.0 + (-(ga - gb) / task.bt_temperature).exp());
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

/// Builds (or reads from the cache) everything the runs of this task need.
pub fn prepare(task: &TaskConfig, shape: &ModelShape, cache: &StageCache) -> Result<TaskData> {
    let lang = MarkovTask::new(task.vocab, task.sharpness, task.seed);
    let ref_key = json!({"stage": "synthetic-reference", "vocab": task.vocab, "sharpness": task.sharpness,
        "prompt_tokens": task.prompt_tokens, "response_tokens": task.response_tokens,
        "sft_steps": task.sft_steps, "seed": task.seed, "model": shape});
    let (reference_dir, built) = cache.get_or_build("reference", &ref_key, |dir| {
        build_reference(task, shape, &lang, dir)
    })?;
    if built {
        tracing::info!(dir = %reference_dir.display(), "built reference");
    }
    let pairs_key = json!({"stage": "synthetic-pairs", "reference": ref_key, "train_pairs": task.train_pairs,
        "eval_pairs": task.eval_pairs, "eval_prompts": task.eval_prompts, "bt_temperature": task.bt_temperature});
    let (pairs_dir, _) = cache.get_or_build("pairs", &pairs_key, |dir| {
        let reference = CausalLm::load(&reference_dir, &Device::Cpu, false)?;
        let train = sample_pairs(
            &lang,
            &reference,
            task,
            task.train_pairs,
            task.seed ^ 0x1111,
        )?;
        let held_out = sample_pairs(&lang, &reference, task, task.eval_pairs, task.seed ^ 0x2222)?;
        let mut rng = Rng(task.seed ^ 0x3333);
        let prompts: Vec<Vec<u32>> = (0..task.eval_prompts)
            .map(|_| lang.continue_chain(&[], task.prompt_tokens, &mut rng))
            .collect();
        write_jsonl(&dir.join("train.jsonl"), &train)?;
        write_jsonl(&dir.join("eval_pairs.jsonl"), &held_out)?;
        write_jsonl(&dir.join("eval_prompts.jsonl"), &prompts)?;
        Ok(())
    })?;
    Ok(TaskData {
        task: lang,
        reference_dir,
        train: read_jsonl(&pairs_dir.join("train.jsonl"))?,
        eval_pairs: read_jsonl(&pairs_dir.join("eval_pairs.jsonl"))?,
        eval_prompts: read_jsonl(&pairs_dir.join("eval_prompts.jsonl"))?,
        response_tokens: task.response_tokens,
        pairs_key,
    })
}
