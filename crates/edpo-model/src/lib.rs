//! Trainable causal language models of the GPT-2 and Llama families, built in candle from
//! differentiable operations only, with Hugging Face checkpoint I/O and sequence log-probs.
//!
//! # Overview
//! - [`config`]: `config.json` as Hugging Face writes it → a typed [`ModelConfig`].
//! - [`checkpoint`]: safetensors reading (single file or sharded with an index) and writing back
//!   to the same layout, with every tensor's shape checked against the config.
//! - [`source`]: every way a model is stored becomes one [`Source`] (config, tensors by
//!   Hugging Face name, tokenizer directory); a Hugging Face directory today.
//! - `arch`: the architecture description each family implements (parameters, depth,
//!   position limits, forward pass), chosen once from the config.
//! - [`nn`]: the building blocks (linear maps, LayerNorm, RMSNorm, rotary embeddings, attention,
//!   softmax, masks, the decoding cache).
//! - [`ops`]: the one place each differentiable operation is routed, by device and dtype, to
//!   a fused CPU kernel with an explicit backward ([`kernels`], one module per op family) or
//!   to its composed definition from candle's differentiable operations ([`composed`]), which
//!   runs on any device. candle's own fused kernels (`softmax_last_dim`, `rms_norm`,
//!   `layer_norm`, `rope*`, `sdpa`) are deliberately absent: they have no backward pass and
//!   silently drop gradients.
//! - [`gpt2`], [`llama`]: the two families, each reading bottom-up from blocks to the model.
//! - [`CausalLm`]: a loaded model (policy or frozen reference) with its parameters by
//!   Hugging Face name; trainability is per parameter (a `Var` for each trainable one), so a
//!   frozen reference has none and an adapter can make only its own parameters trainable.
//! - [`lora`]: LoRA adapters as PEFT defines and stores them, on the same base tensors as the
//!   reference (only the adapters train).
//! - [`logprobs`]: the batch layout of prompt + response sequences and per-sequence log-probs.
//!
//! This crate depends on candle and the file formats only; it knows nothing of objectives,
//! data files or the command line.

mod arch;
pub mod checkpoint;
pub mod composed;
pub mod config;
pub mod gpt2;
pub mod kernels;
pub mod llama;
pub mod logprobs;
pub mod lora;
mod model;
pub mod nn;
pub mod ops;
pub mod source;

pub use config::{Gpt2Config, LlamaConfig, LlamaVariant, ModelConfig};
pub use logprobs::{sequence_logps, SequenceBatch};
pub use lora::LoraConfig;
pub use model::{CausalLm, KvCache, Param};
pub use source::Source;

use std::path::PathBuf;

/// Everything that can go wrong while loading, running or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON.
    #[error("{path}: malformed JSON: {source}")]
    Json {
        /// The file at fault.
        path: PathBuf,
        /// The parser's message, with line and column.
        source: serde_json::Error,
    },
    /// A key of `config.json` has a value of the wrong type or an unusable value.
    #[error("{path}: key `{key}`: {message}")]
    BadKey {
        /// The file at fault.
        path: PathBuf,
        /// The key at fault.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// `config.json` names an architecture this crate does not implement.
    #[error("{path}: unknown architecture `{found}` (supported model_type: gpt2, llama, mistral, qwen2)")]
    UnknownArchitecture {
        /// The config file.
        path: PathBuf,
        /// The `model_type` found.
        found: String,
    },
    /// A model named `hf:ORG/NAME[@REV]` is not in the local Hugging Face cache.
    #[error("model `hf:{name}` is not in the Hugging Face cache: looked for {looked} (set HF_HUB_CACHE or HF_HOME to another cache, or fetch it with `huggingface-cli download {repo} --revision {revision}`)")]
    NotCached {
        /// The name as given (`ORG/NAME[@REV]`).
        name: String,
        /// The repository id.
        repo: String,
        /// The revision.
        revision: String,
        /// What was looked for.
        looked: PathBuf,
    },
    /// A tensor the config requires is absent from the checkpoint.
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor {
        /// The checkpoint file (or index) searched.
        path: PathBuf,
        /// The Hugging Face name of the tensor.
        name: String,
    },
    /// A tensor has a shape other than the config implies.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?} by the model's config (config.json, or a GGUF file's metadata)")]
    TensorShape {
        /// The checkpoint file.
        path: PathBuf,
        /// The Hugging Face name of the tensor.
        name: String,
        /// The shape in the file.
        found: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A checkpoint file is not valid safetensors or holds an unsupported dtype.
    #[error("{path}: {message}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Inputs to a forward pass or log-prob computation are inconsistent.
    #[error("invalid input: {0}")]
    Input(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
