//! [`CausalLm`]: a GPT-2 or Llama-family model with its parameters by Hugging Face name.
//!
//! Architecture invariant: only a trainable model owns candle `Var`s. A frozen reference is
//! built from plain tensors, so no gradient can reach it and no optimizer can see it.

use crate::arch::{self, Forward, Init, Weights};
use crate::checkpoint::{self, Checkpoint};
use crate::config::ModelConfig;
use crate::nn::{attention_bias, attention_bias_rows, position_ids, tree_attention_bias, LayerKv};
use crate::source::Source;
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One parameter of a model.
#[derive(Debug, Clone)]
pub struct Param {
    /// Hugging Face name.
    pub name: String,
    /// The value (shares storage with `var` for a trainable model).
    pub tensor: Tensor,
    /// The trainable variable, for a policy; `None` for a frozen model.
    pub var: Option<Var>,
    /// Whether weight decay applies: matrices and embeddings yes, biases and norm scales no.
    pub decay: bool,
}

/// A causal language model returning logits at every position.
#[derive(Debug, Clone)]
pub struct CausalLm {
    pub(crate) config: ModelConfig,
    pub(crate) raw_config: serde_json::Value,
    pub(crate) arch: Arc<dyn Forward>,
    pub(crate) params: Vec<Param>,
    pub(crate) device: Device,
    pub(crate) source_dir: Option<PathBuf>,
    /// Tokenizer files a source made rather than found in a directory (a GGUF file's own
    /// tokenizer): `(file name, contents)`, written by [`CausalLm::save`].
    pub(crate) made_files: Vec<(String, String)>,
    /// The LoRA adapters' configuration, when the model carries adapters
    /// ([`CausalLm::with_lora`]).
    pub(crate) lora: Option<crate::nn::LoraConfig>,
    /// Forward passes run so far (shared by clones), so tests can prove a model was not run.
    pub(crate) forward_count: Arc<AtomicUsize>,
}

/// What incremental decoding has seen: every layer's keys and values, and for each row which
/// key columns are real tokens (positions follow from it). Made by [`CausalLm::new_cache`].
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    key_mask: Vec<Vec<u8>>,
}

impl KvCache {
    /// Rows (sequences) in the cache.
    pub fn batch(&self) -> usize {
        self.key_mask.len()
    }

    /// Keeps only the given rows, in that order (sequences that finished are dropped).
    pub fn keep_rows(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch()) {
            return Err(Error::Input(format!(
                "row {bad} is not in a cache of {} rows",
                self.batch()
            )));
        }
        for layer in &mut self.layers {
            layer.select_rows(rows)?;
        }
        self.key_mask = rows.iter().map(|&r| self.key_mask[r].clone()).collect();
        Ok(())
    }
}

impl CausalLm {
    /// Loads a Hugging Face directory (`config.json` + safetensors) or a `.gguf` file
    /// ([`Source::open`]). A trainable model gets a `Var` per parameter; a frozen one (a
    /// reference) does not.
    pub fn load(path: &Path, device: &Device, trainable: bool) -> Result<Self> {
        Self::from_source(Source::open(path, device)?, device, &|_| trainable)
    }

    /// Builds a model from a [`Source`]; `trainable(name)` says which parameters get a `Var`
    /// (none for a frozen reference, all for full fine-tuning, some for adapters).
    pub fn from_source(
        source: Source,
        device: &Device,
        trainable: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        let Source {
            config,
            raw_config,
            mut checkpoint,
            dir,
            files,
        } = source;
        let mut model =
            Self::from_checkpoint_with(config, raw_config, &mut checkpoint, device, trainable)?;
        model.source_dir = dir;
        model.made_files = files;
        Ok(model)
    }

    /// Builds a model from tensors in a checkpoint, checking every name and shape; every
    /// parameter trainable or none.
    pub fn from_checkpoint(
        config: ModelConfig,
        raw_config: serde_json::Value,
        ckpt: &mut Checkpoint,
        device: &Device,
        trainable: bool,
    ) -> Result<Self> {
        Self::from_checkpoint_with(config, raw_config, ckpt, device, &|_| trainable)
    }

    /// Builds a model from tensors in a checkpoint, checking every name and shape;
    /// `trainable(name)` says which parameters get a `Var`.
    pub fn from_checkpoint_with(
        config: ModelConfig,
        raw_config: serde_json::Value,
        ckpt: &mut Checkpoint,
        device: &Device,
        trainable: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        let architecture = arch::of(&config);
        let mut weights = HashMap::new();
        let mut params = Vec::new();
        for spec in architecture.tensor_specs() {
            let tensor = ckpt.take(&spec.name, &spec.shape)?;
            let (tensor, var) = if trainable(&spec.name) {
                let var = Var::from_tensor(&tensor)?;
                (var.as_tensor().clone(), Some(var))
            } else {
                (tensor, None)
            };
            weights.insert(spec.name.clone(), tensor.clone());
            params.push(Param {
                decay: spec.shape.len() >= 2,
                name: spec.name,
                tensor,
                var,
            });
        }
        let arch = architecture.build(&Weights {
            tensors: weights,
            lora_scale: 0.0,
            frozen: false,
        });
        Ok(Self {
            config,
            raw_config,
            arch,
            params,
            device: device.clone(),
            source_dir: None,
            made_files: Vec::new(),
            lora: None,
            forward_count: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// A freshly initialised model (seeded), for benchmarks and tests.
    pub fn random(
        config: ModelConfig,
        raw_config: serde_json::Value,
        seed: u64,
        device: &Device,
        trainable: bool,
    ) -> Result<Self> {
        let mut rng = edpo_data::rng::SplitMix64(seed);
        let mut tensors = HashMap::new();
        for spec in arch::of(&config).tensor_specs() {
            let n: usize = spec.shape.iter().product();
            let values: Vec<f32> = match spec.init {
                Init::Ones => vec![1.0; n],
                Init::Zeros => vec![0.0; n],
                Init::Normal(std) => (0..n).map(|_| (rng.normal() * std) as f32).collect(),
            };
            tensors.insert(spec.name, Tensor::from_vec(values, spec.shape, device)?);
        }
        let mut ckpt = Checkpoint::from_tensors(tensors, PathBuf::from("<random>"));
        Self::from_checkpoint(config, raw_config, &mut ckpt, device, trainable)
    }

    /// The same model over the very same tensors, with no autograd history: what evaluation
    /// and sampling run, so that a trainable model's forward passes keep no activations alive
    /// for a backward pass that never comes (with every parameter a variable, a SmolLM2
    /// evaluation held gigabytes per batch). Same numbers, no copy.
    pub fn detached(&self) -> Self {
        let params: Vec<Param> = self
            .params
            .iter()
            .map(|p| Param {
                name: p.name.clone(),
                tensor: p.tensor.detach(),
                var: None,
                decay: p.decay,
            })
            .collect();
        let tensors = params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.clone()))
            .collect();
        let arch = arch::of(&self.config).build(&Weights {
            tensors,
            lora_scale: self.lora.as_ref().map_or(0.0, crate::nn::LoraConfig::scale),
            frozen: self.lora.is_some(),
        });
        Self {
            arch,
            params,
            ..self.clone()
        }
    }

    /// A frozen deep copy (the usual way to make the reference from the initial policy).
    pub fn frozen_copy(&self) -> Result<Self> {
        let mut tensors = HashMap::new();
        for p in &self.params {
            tensors.insert(p.name.clone(), p.tensor.detach().copy()?);
        }
        let mut ckpt = Checkpoint::from_tensors(tensors, PathBuf::from("<copy>"));
        let mut model = Self::from_checkpoint(
            self.config.clone(),
            self.raw_config.clone(),
            &mut ckpt,
            &self.device,
            false,
        )?;
        model.source_dir = self.source_dir.clone();
        model.made_files = self.made_files.clone();
        Ok(model)
    }

    /// The parsed configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// `config.json` as it was read (and will be written back).
    pub fn raw_config(&self) -> &serde_json::Value {
        &self.raw_config
    }

    /// The parameters in a fixed order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The directory the model was loaded from, if any.
    pub fn source_dir(&self) -> Option<&Path> {
        self.source_dir.as_deref()
    }

    /// The EOS token id from `config.json` (the first one when it is a list).
    pub fn eos_token_id(&self) -> Option<u32> {
        match self.raw_config.get("eos_token_id")? {
            serde_json::Value::Number(n) => n.as_u64().map(|v| v as u32),
            serde_json::Value::Array(a) => a.first()?.as_u64().map(|v| v as u32),
            _ => None,
        }
    }

    /// Final hidden states `(B, T, d)` for right- or left-padded token ids (`B·T` values).
    pub fn hidden(
        &self,
        input_ids: &[u32],
        attention_mask: &[u8],
        batch: usize,
        seq_len: usize,
    ) -> Result<Tensor> {
        self.check_ids(input_ids, attention_mask, batch, seq_len)?;
        if let Some(n_positions) = self.max_positions() {
            if seq_len > n_positions {
                return Err(Error::Input(format!(
                    "sequence of {seq_len} tokens is longer than the model's {n_positions} positions"
                )));
            }
        }
        let positions = position_ids(attention_mask, batch, seq_len);
        let bias = attention_bias(attention_mask, batch, seq_len, self.window(), &self.device)?;
        self.run_blocks(input_ids, positions, &bias, batch, seq_len, None)
    }

    /// Final hidden states `(B, T, d)` of rows laid out as a shared prompt followed by
    /// branches (`SequenceBatch::shared_prompt_pairs`): explicit `positions` and `branch` per
    /// token, attention restricted by [`tree_attention_bias`].
    pub fn hidden_tree(
        &self,
        input_ids: &[u32],
        attention_mask: &[u8],
        positions: &[u32],
        branch: &[u8],
        batch: usize,
        seq_len: usize,
    ) -> Result<Tensor> {
        self.check_ids(input_ids, attention_mask, batch, seq_len)?;
        if positions.len() != batch * seq_len || branch.len() != batch * seq_len {
            return Err(Error::Input(format!(
                "expected {batch}×{seq_len} positions and branches, got {} and {}",
                positions.len(),
                branch.len()
            )));
        }
        self.check_positions(positions)?;
        let bias = tree_attention_bias(
            attention_mask,
            positions,
            branch,
            batch,
            seq_len,
            self.window(),
            &self.device,
        )?;
        self.run_blocks(input_ids, positions.to_vec(), &bias, batch, seq_len, None)
    }

    /// An empty cache for incremental decoding of `batch` sequences.
    pub fn new_cache(&self, batch: usize) -> KvCache {
        let layers = arch::of(&self.config).n_layers();
        KvCache {
            layers: vec![LayerKv::default(); layers],
            key_mask: vec![Vec::new(); batch],
        }
    }

    /// Hidden states `(B, T_new, d)` of `T_new` new positions per row, attending to everything
    /// `cache` has seen; their keys and values are added to it. The first call may pass
    /// right-padded prompts (mask 0 on padding); padding stays masked for every later query,
    /// and positions count real tokens only, so the states equal [`CausalLm::hidden`]'s on the
    /// whole sequence (up to float rounding). No gradient: decoding is inference only.
    pub fn hidden_cached(
        &self,
        input_ids: &[u32],
        attention_mask: &[u8],
        new_len: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let batch = cache.key_mask.len();
        self.check_ids(input_ids, attention_mask, batch, new_len)?;
        // The whole mask so far: past columns, then the new ones. Positions and the bias
        // follow from it exactly as for a full forward pass.
        let past = cache.key_mask.first().map_or(0, Vec::len);
        let total = past + new_len;
        let mut mask = Vec::with_capacity(batch * total);
        for (b, seen) in cache.key_mask.iter().enumerate() {
            mask.extend_from_slice(seen);
            mask.extend(
                attention_mask[b * new_len..(b + 1) * new_len]
                    .iter()
                    .map(|&m| u8::from(m != 0)),
            );
        }
        let all_positions = position_ids(&mask, batch, total);
        let positions: Vec<u32> = all_positions
            .chunks(total)
            .flat_map(|row| row[past..].iter().copied())
            .collect();
        self.check_positions(&positions)?;
        let bias = attention_bias_rows(
            &mask,
            &all_positions,
            &vec![0; batch * total],
            batch,
            total,
            past,
            self.window(),
            &self.device,
        )?;
        // Only now, with the input checked, does the cache grow.
        for (row, seen) in mask.chunks(total).zip(&mut cache.key_mask) {
            seen.extend_from_slice(&row[past..]);
        }
        let input = input_ids.to_vec();
        self.run_blocks(
            &input,
            positions,
            &bias,
            batch,
            new_len,
            Some(&mut cache.layers),
        )
    }

    fn check_ids(
        &self,
        input_ids: &[u32],
        attention_mask: &[u8],
        batch: usize,
        seq_len: usize,
    ) -> Result<()> {
        if input_ids.len() != batch * seq_len || attention_mask.len() != batch * seq_len {
            return Err(Error::Input(format!(
                "expected {batch}×{seq_len} ids and mask values, got {} and {}",
                input_ids.len(),
                attention_mask.len()
            )));
        }
        let vocab = self.config.vocab_size() as u32;
        if let Some(bad) = input_ids.iter().find(|&&id| id >= vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }

    /// Refuses positions beyond GPT-2's learned position table.
    fn check_positions(&self, positions: &[u32]) -> Result<()> {
        if let Some(n_positions) = self.max_positions() {
            if let Some(&p) = positions
                .iter()
                .max()
                .filter(|&&p| p as usize >= n_positions)
            {
                return Err(Error::Input(format!(
                    "position {p} is beyond the model's {n_positions} positions"
                )));
            }
        }
        Ok(())
    }

    /// GPT-2's learned-position limit (rotary models have none).
    fn max_positions(&self) -> Option<usize> {
        arch::of(&self.config).max_positions()
    }

    fn window(&self) -> Option<usize> {
        arch::of(&self.config).sliding_window()
    }

    fn run_blocks(
        &self,
        input_ids: &[u32],
        positions: Vec<u32>,
        bias: &Tensor,
        batch: usize,
        seq_len: usize,
        cache: Option<&mut [LayerKv]>,
    ) -> Result<Tensor> {
        self.forward_count.fetch_add(1, Ordering::Relaxed);
        let ids = Tensor::from_slice(input_ids, (batch, seq_len), &self.device)?;
        self.arch.hidden(&ids, &positions, bias, cache)
    }

    /// How many forward passes this model (or a clone sharing it) has run.
    pub fn forward_count(&self) -> usize {
        self.forward_count.load(Ordering::Relaxed)
    }

    /// Moves this model's weights towards `other`'s in place: `θ ← α·θ_other + (1 − α)·θ`
    /// (TR-DPO's soft reference update; α = 1 copies). Both must have the same architecture.
    pub fn blend_from(&self, other: &CausalLm, alpha: f64) -> Result<()> {
        if self.params.len() != other.params.len() {
            return Err(Error::Input(
                "cannot blend models of different architectures".into(),
            ));
        }
        for (mine, theirs) in self.params.iter().zip(&other.params) {
            if mine.name != theirs.name || mine.tensor.dims() != theirs.tensor.dims() {
                return Err(Error::Input(format!(
                    "cannot blend `{}` into `{}`",
                    theirs.name, mine.name
                )));
            }
            let source = theirs.tensor.flatten_all()?.to_vec1::<f32>()?;
            mine.tensor.inplace_op1(&Blend {
                source,
                alpha: alpha as f32,
            })?;
        }
        Ok(())
    }

    /// Logits `(N, V)` for hidden states `(N, d)`.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        self.arch.lm_head(hidden)
    }

    /// Logits `(B, T, V)` at every position.
    pub fn forward(
        &self,
        input_ids: &[u32],
        attention_mask: &[u8],
        batch: usize,
        seq_len: usize,
    ) -> Result<Tensor> {
        let h = self.hidden(input_ids, attention_mask, batch, seq_len)?;
        let d = h.dim(2)?;
        let logits = self.lm_head(&h.reshape((batch * seq_len, d))?)?;
        Ok(logits.reshape((batch, seq_len, self.config.vocab_size()))?)
    }

    /// Writes the model to `dir` in the Hugging Face layout: `config.json` (as read, every field
    /// kept), `model.safetensors`, and the tokenizer and generation files of the source
    /// directory, so that `transformers` and this crate load it unchanged.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let tensors: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.tensor.clone()))
            .collect();
        checkpoint::write_safetensors(dir, &tensors)?;
        let config =
            serde_json::to_string_pretty(&self.raw_config).map_err(|source| Error::Json {
                path: dir.join("config.json"),
                source,
            })?;
        checkpoint::write_atomic(&dir.join("config.json"), config.as_bytes())?;
        self.write_tokenizer_files(dir)
    }

    /// Writes the tokenizer files (`tokenizer.json`, `tokenizer_config.json` with its chat
    /// template, …) of the model's source to `dir`: those a GGUF file made, or those beside a
    /// Hugging Face checkpoint.
    pub fn write_tokenizer_files(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        for (name, text) in &self.made_files {
            checkpoint::write_atomic(&dir.join(name), text.as_bytes())?;
        }
        if let Some(src) = &self.source_dir {
            for name in [
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "generation_config.json",
                "vocab.json",
                "merges.txt",
            ] {
                let from = src.join(name);
                if from.exists() && src != dir {
                    let bytes = std::fs::read(&from).map_err(|source| Error::Io {
                        path: from.clone(),
                        source,
                    })?;
                    checkpoint::write_atomic(&dir.join(name), &bytes)?;
                }
            }
        }
        Ok(())
    }
}

/// `θ ← α·source + (1 − α)·θ`, in place.
struct Blend {
    source: Vec<f32>,
    alpha: f32,
}

impl candle_core::InplaceOp1 for Blend {
    fn name(&self) -> &'static str {
        "edpo-blend"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("blend: f32 only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("blend: parameters must be contiguous");
        };
        if end - start != self.source.len() {
            candle_core::bail!("blend: sizes differ");
        }
        for (t, &s) in data[start..end].iter_mut().zip(&self.source) {
            *t = self.alpha * s + (1.0 - self.alpha) * *t;
        }
        Ok(())
    }
}
