//! The architecture description every family implements ([`Architecture`]): its parameters
//! (Hugging Face name, shape, initialisation), its depth and position limits, and how it
//! assembles a forward pass ([`Forward`]) from its weights. [`of`] chooses the description
//! from a config, once; nothing else matches on the family.
//!
//! Adding a family is one module (its config, its [`Architecture`] and [`Forward`]) and one
//! arm in [`of`] and in `config.json` parsing.

use crate::config::ModelConfig;
use crate::nn::LayerKv;
use crate::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

/// How a parameter is initialised when a model is made from scratch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    /// All ones (norm scales).
    Ones,
    /// All zeros (biases, norm shifts).
    Zeros,
}

/// The Hugging Face name, shape and initialisation of one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Name as `transformers` saves it.
    pub name: String,
    /// Shape as stored in the checkpoint.
    pub shape: Vec<usize>,
    /// Initialisation for a fresh model.
    pub init: Init,
}

impl TensorSpec {
    pub(crate) fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            init,
        }
    }
}

/// Parameters by name, each present and of the shape its spec gives, and the LoRA adapters
/// (`<module>.lora_A.weight`, `<module>.lora_B.weight`) with their scale, if any.
pub(crate) struct Weights {
    pub(crate) tensors: HashMap<String, Tensor>,
    pub(crate) lora_scale: f64,
    /// Every base weight is frozen (a LoRA model): linear maps skip their weights' gradients.
    pub(crate) frozen: bool,
}

impl Weights {
    pub(crate) fn get(&self, name: &str) -> Tensor {
        // Weights is only ever built from the same specs the architectures read, so an absent
        // name is a programming error in this crate, not bad input.
        self.tensors
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("internal: parameter `{name}` not in the specs"))
    }

    /// The LoRA adapter of the linear module `module`, if it has one.
    pub(crate) fn lora(&self, module: &str) -> Option<crate::nn::Lora> {
        let a = self.tensors.get(&format!("{module}.lora_A.weight"))?;
        let b = self.tensors.get(&format!("{module}.lora_B.weight"))?;
        Some(crate::nn::Lora {
            a: a.clone(),
            b: b.clone(),
            scale: self.lora_scale,
        })
    }
}

/// What a family is, read from its config.
pub(crate) trait Architecture {
    /// Every parameter, in a fixed order, in `transformers`' naming.
    fn tensor_specs(&self) -> Vec<TensorSpec>;
    /// Blocks (one key/value cache layer each).
    fn n_layers(&self) -> usize;
    /// The learned-position limit (rotary models have none).
    fn max_positions(&self) -> Option<usize>;
    /// The sliding attention window, if any.
    fn sliding_window(&self) -> Option<usize>;
    /// The forward pass over these weights (named as in [`Architecture::tensor_specs`]).
    fn build(&self, weights: &Weights) -> Arc<dyn Forward>;
}

/// A family's forward pass.
pub(crate) trait Forward: std::fmt::Debug + Send + Sync {
    /// Final hidden states `(B, T, d)` for token ids `(B, T)` at `positions` (`B·T`), with an
    /// additive attention bias; with a cache (one [`LayerKv`] per block), `ids` are the new
    /// positions only, `bias` covers past and new keys, and the new keys and values are
    /// appended to the cache.
    fn hidden(
        &self,
        ids: &Tensor,
        positions: &[u32],
        bias: &Tensor,
        cache: Option<&mut [LayerKv]>,
    ) -> Result<Tensor>;
    /// Logits `(N, V)` for hidden states `(N, d)`.
    fn lm_head(&self, hidden: &Tensor) -> Result<Tensor>;
    /// The LM head's weight `(V, d)` (tied or not), and whether it trains (a LoRA model's
    /// base does not).
    fn head_weight(&self) -> (&Tensor, bool);
}

/// The architecture description of a config: the one place the family is chosen.
pub(crate) fn of(config: &ModelConfig) -> &dyn Architecture {
    match config {
        ModelConfig::Gpt2(c) => c,
        ModelConfig::Llama(c) => c,
    }
}
