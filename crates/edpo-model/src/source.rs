//! Model sources: every way a model is stored becomes one [`Source`]: the parsed config, the
//! `config.json` to write back, the tensors by Hugging Face name, and the directory its
//! tokenizer and generation files come from. [`crate::CausalLm::from_source`] builds a model
//! from any of them, so a new source (a GGUF file, the Hugging Face hub cache) is one
//! constructor here and nothing else.
//!
//! Today: a Hugging Face directory ([`Source::hf_dir`]: `config.json` and a single or sharded
//! safetensors checkpoint), with the unprefixed tensor names of the original GPT-2
//! checkpoints normalised.

use crate::checkpoint::{self, Checkpoint};
use crate::config::ModelConfig;
use crate::Result;
use candle_core::Device;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A model as a source gives it.
#[derive(Debug)]
pub struct Source {
    /// The parsed configuration.
    pub config: ModelConfig,
    /// `config.json` as it will be written back (every field kept).
    pub raw_config: serde_json::Value,
    /// The tensors, by Hugging Face name.
    pub checkpoint: Checkpoint,
    /// Where the tokenizer and generation files are, if anywhere.
    pub dir: Option<PathBuf>,
}

impl Source {
    /// A Hugging Face directory: `config.json` and `model.safetensors` (or the shards its
    /// index lists).
    pub fn hf_dir(dir: &Path, device: &Device) -> Result<Self> {
        let (config, raw_config) = ModelConfig::from_file(&dir.join("config.json"))?;
        let mut checkpoint = Checkpoint::read_dir(dir, device)?;
        if matches!(config, ModelConfig::Gpt2(_)) {
            checkpoint = gpt2_prefixed(checkpoint, dir)?;
        }
        Ok(Self {
            config,
            raw_config,
            checkpoint,
            dir: Some(dir.to_path_buf()),
        })
    }
}

/// The original GPT-2 checkpoints name tensors without the `transformer.` prefix that
/// `GPT2LMHeadModel` saves; adds it when it is missing.
fn gpt2_prefixed(mut ckpt: Checkpoint, dir: &Path) -> Result<Checkpoint> {
    if ckpt.contains("transformer.wte.weight") || !ckpt.contains("wte.weight") {
        return Ok(ckpt);
    }
    let names: Vec<String> = ckpt.remaining().map(str::to_string).collect();
    let mut renamed = HashMap::new();
    for name in names {
        let tensor = ckpt.take_any(&name)?;
        renamed.insert(format!("transformer.{name}"), tensor);
    }
    Ok(Checkpoint::from_tensors(
        renamed,
        dir.join(checkpoint::SINGLE_FILE),
    ))
}
