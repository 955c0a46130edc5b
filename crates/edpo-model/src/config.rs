//! `config.json` of a Hugging Face checkpoint → a typed [`ModelConfig`].
//!
//! Parsing is in two layers: the file is read as JSON, then each field the architecture needs
//! is taken by key, with the default `transformers` uses when the key is absent. A key with a
//! value of the wrong type is an error naming the file and the key. The raw JSON is kept so a
//! saved checkpoint carries every field the user's config had, including ones we do not read.

use crate::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// GPT-2 family hyper-parameters (`GPT2Config` in `transformers`).
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    /// Vocabulary size (`vocab_size`).
    pub vocab_size: usize,
    /// Learned positions (`n_positions`).
    pub n_positions: usize,
    /// Model width (`n_embd`).
    pub n_embd: usize,
    /// Number of blocks (`n_layer`).
    pub n_layer: usize,
    /// Number of attention heads (`n_head`).
    pub n_head: usize,
    /// Width of the MLP (`n_inner`, default 4·`n_embd`).
    pub n_inner: usize,
    /// LayerNorm epsilon (`layer_norm_epsilon`).
    pub layer_norm_epsilon: f64,
}

impl Gpt2Config {
    /// The `config.json` `transformers` writes for this config (`GPT2LMHeadModel`, dropout
    /// off, `eos_token_id` and `bos_token_id` both `eos`): the one place a config file is
    /// made rather than read.
    pub fn hf_json(&self, eos: u32) -> Value {
        serde_json::json!({
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size, "n_positions": self.n_positions,
            "n_embd": self.n_embd, "n_layer": self.n_layer, "n_head": self.n_head,
            "n_inner": self.n_inner, "layer_norm_epsilon": self.layer_norm_epsilon,
            "activation_function": "gelu_new",
            "eos_token_id": eos, "bos_token_id": eos,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        })
    }
}

/// Which member of the Llama family a checkpoint is; they differ only in biases and masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaVariant {
    /// Llama 2 / 3, SmolLM2 (`model_type: llama`).
    Llama,
    /// Mistral (`model_type: mistral`): sliding-window attention.
    Mistral,
    /// Qwen2 (`model_type: qwen2`): biases on the q, k and v projections.
    Qwen2,
}

/// Llama family hyper-parameters (`LlamaConfig`, `MistralConfig`, `Qwen2Config`).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Which family member.
    pub variant: LlamaVariant,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width (`hidden_size`).
    pub hidden_size: usize,
    /// SwiGLU width (`intermediate_size`).
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one head (`head_dim`, default `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base, from `rope_theta` or `rope_parameters.rope_theta`.
    pub rope_theta: f64,
    /// Whether `lm_head` shares the token embedding.
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama `attention_bias`).
    pub o_bias: bool,
    /// Biases in the MLP (`mlp_bias`).
    pub mlp_bias: bool,
    /// Sliding attention window (Mistral), if any.
    pub sliding_window: Option<usize>,
    /// Maximum positions (informational; rotary embeddings have no table to overflow).
    pub max_position_embeddings: usize,
}

/// A parsed model configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// GPT-2 family.
    Gpt2(Gpt2Config),
    /// Llama family.
    Llama(LlamaConfig),
}

impl ModelConfig {
    /// Reads and parses `config.json`.
    pub fn from_file(path: &Path) -> Result<(Self, Value)> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = Self::from_json(&raw, path)?;
        Ok((cfg, raw))
    }

    /// Parses an already-read `config.json`; `path` is used in error messages only.
    pub fn from_json(raw: &Value, path: &Path) -> Result<Self> {
        let keys = Keys { raw, path };
        if !raw.is_object() {
            return Err(Error::BadKey {
                path: path.to_path_buf(),
                key: "<root>".into(),
                message: "expected a JSON object".into(),
            });
        }
        let model_type = keys.string("model_type")?.ok_or_else(|| Error::BadKey {
            path: path.to_path_buf(),
            key: "model_type".into(),
            message: "missing; cannot tell the architecture".into(),
        })?;
        let cfg = match model_type.as_str() {
            "gpt2" => {
                let n_embd = keys.usize_or("n_embd", 768)?;
                let n_inner = match keys.get("n_inner") {
                    None | Some(Value::Null) => 4 * n_embd,
                    Some(_) => keys.usize_or("n_inner", 0)?,
                };
                let act = keys
                    .string("activation_function")?
                    .unwrap_or_else(|| "gelu_new".into());
                if !matches!(act.as_str(), "gelu_new" | "gelu_pytorch_tanh") {
                    return Err(keys.bad(
                        "activation_function",
                        format!("`{act}` is not supported (gelu_new, gelu_pytorch_tanh)"),
                    ));
                }
                for key in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
                    if keys.bool_or(key, false)? {
                        return Err(keys.bad(key, "true is not supported".into()));
                    }
                }
                if !keys.bool_or("scale_attn_weights", true)? {
                    return Err(keys.bad("scale_attn_weights", "false is not supported".into()));
                }
                ModelConfig::Gpt2(Gpt2Config {
                    vocab_size: keys.usize_or("vocab_size", 50257)?,
                    n_positions: keys.usize_or("n_positions", 1024)?,
                    n_embd,
                    n_layer: keys.usize_or("n_layer", 12)?,
                    n_head: keys.usize_or("n_head", 12)?,
                    n_inner,
                    layer_norm_epsilon: keys.f64_or("layer_norm_epsilon", 1e-5)?,
                })
            }
            "llama" | "mistral" | "qwen2" => {
                let variant = match model_type.as_str() {
                    "llama" => LlamaVariant::Llama,
                    "mistral" => LlamaVariant::Mistral,
                    _ => LlamaVariant::Qwen2,
                };
                // Defaults of LlamaConfig / MistralConfig / Qwen2Config in `transformers`.
                let (vocab, inter, kv_default_is_heads, window) = match variant {
                    LlamaVariant::Llama => (32000, 11008, true, None),
                    LlamaVariant::Mistral => (32000, 14336, false, Some(4096)),
                    LlamaVariant::Qwen2 => (151936, 22016, true, None),
                };
                let hidden_size = keys.usize_or("hidden_size", 4096)?;
                let heads = keys.usize_or("num_attention_heads", 32)?;
                let kv = match keys.get("num_key_value_heads") {
                    None | Some(Value::Null) if kv_default_is_heads => heads,
                    None | Some(Value::Null) => 8,
                    Some(_) => keys.usize_or("num_key_value_heads", heads)?,
                };
                if heads == 0 || kv == 0 || heads % kv != 0 {
                    return Err(keys.bad(
                        "num_key_value_heads",
                        format!("{kv} key/value heads do not divide {heads} query heads"),
                    ));
                }
                let head_dim = match keys.get("head_dim") {
                    None | Some(Value::Null) => hidden_size / heads,
                    Some(_) => keys.usize_or("head_dim", 0)?,
                };
                if head_dim % 2 != 0 {
                    return Err(keys.bad(
                        "head_dim",
                        format!("{head_dim} is odd; rotary embeddings need an even head width"),
                    ));
                }
                let act = keys.string("hidden_act")?.unwrap_or_else(|| "silu".into());
                if act != "silu" {
                    return Err(keys.bad("hidden_act", format!("`{act}` is not supported (silu)")));
                }
                let attention_bias = keys.bool_or("attention_bias", false)?;
                let sliding_window = match variant {
                    LlamaVariant::Mistral => match keys.get("sliding_window") {
                        None => window,
                        Some(Value::Null) => None,
                        Some(_) => Some(keys.usize_or("sliding_window", 4096)?),
                    },
                    _ => None,
                };
                LlamaConfig {
                    variant,
                    vocab_size: keys.usize_or("vocab_size", vocab)?,
                    hidden_size,
                    intermediate_size: keys.usize_or("intermediate_size", inter)?,
                    num_hidden_layers: keys.usize_or("num_hidden_layers", 32)?,
                    num_attention_heads: heads,
                    num_key_value_heads: kv,
                    head_dim,
                    rms_norm_eps: keys.f64_or("rms_norm_eps", 1e-6)?,
                    rope_theta: keys.rope_theta()?,
                    tie_word_embeddings: keys.bool_or("tie_word_embeddings", false)?,
                    qkv_bias: variant == LlamaVariant::Qwen2 || attention_bias,
                    o_bias: variant != LlamaVariant::Qwen2 && attention_bias,
                    mlp_bias: keys.bool_or("mlp_bias", false)?,
                    sliding_window,
                    max_position_embeddings: keys.usize_or("max_position_embeddings", 2048)?,
                }
                .into()
            }
            other => {
                return Err(Error::UnknownArchitecture {
                    path: path.to_path_buf(),
                    found: other.to_string(),
                })
            }
        };
        Ok(cfg)
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    /// The longest sequence the model takes (`n_positions`, `max_position_embeddings`).
    pub fn max_positions(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_positions,
            ModelConfig::Llama(c) => c.max_position_embeddings,
        }
    }
}

impl From<LlamaConfig> for ModelConfig {
    fn from(c: LlamaConfig) -> Self {
        ModelConfig::Llama(c)
    }
}

/// Typed access to the keys of a config object, with errors naming file and key.
struct Keys<'a> {
    raw: &'a Value,
    path: &'a Path,
}

impl Keys<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.raw.get(key)
    }

    fn bad(&self, key: &str, message: String) -> Error {
        Error::BadKey {
            path: PathBuf::from(self.path),
            key: key.into(),
            message,
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.bad(key, format!("expected a string, found {v}"))),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| self.bad(key, format!("expected a positive integer, found {v}"))),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| self.bad(key, format!("expected a positive number, found {v}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.bad(key, format!("expected true or false, found {v}"))),
        }
    }

    /// `rope_theta` lives at the top level in older configs and inside `rope_parameters` in
    /// newer ones; scaled rotary variants are refused rather than silently computed wrong.
    fn rope_theta(&self) -> Result<f64> {
        for key in ["rope_scaling", "rope_parameters"] {
            if let Some(params) = self.get(key).filter(|v| !v.is_null()) {
                let kind = params
                    .get("rope_type")
                    .or_else(|| params.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                if kind != "default" {
                    return Err(self.bad(
                        key,
                        format!("rotary scaling `{kind}` is not supported (only `default`)"),
                    ));
                }
            }
        }
        if let Some(params) = self.get("rope_parameters").filter(|v| !v.is_null()) {
            if let Some(v) = params.get("rope_theta") {
                return v.as_f64().filter(|x| *x > 0.0).ok_or_else(|| {
                    self.bad(
                        "rope_parameters.rope_theta",
                        format!("expected a positive number, found {v}"),
                    )
                });
            }
        }
        self.f64_or("rope_theta", 10000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_json(&v, Path::new("config.json"))
    }

    #[test]
    fn rope_theta_is_read_from_either_place() {
        let base = json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4});
        let mut top = base.clone();
        top["rope_theta"] = json!(500000.0);
        let mut nested = base.clone();
        nested["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 250000.0});
        let theta = |v| match parse(v) {
            Ok(ModelConfig::Llama(c)) => c.rope_theta,
            other => panic!("{other:?}"),
        };
        assert_eq!(theta(base), 10000.0);
        assert_eq!(theta(top), 500000.0);
        assert_eq!(theta(nested), 250000.0);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse(json!({"model_type": "gpt2", "n_embd": "wide"})).unwrap_err();
        assert!(e.to_string().contains("`n_embd`"), "{e}");
        let e = parse(json!({"model_type": "bert"})).unwrap_err();
        assert!(e.to_string().contains("unknown architecture `bert`"), "{e}");
        let e = parse(json!({"model_type": "llama", "rope_scaling": {"rope_type": "llama3"}}))
            .unwrap_err();
        assert!(e.to_string().contains("rope_scaling"), "{e}");
        let e = parse(
            json!({"model_type": "llama", "num_attention_heads": 6, "num_key_value_heads": 4}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads"), "{e}");
    }

    #[test]
    fn qwen2_has_qkv_bias_and_mistral_a_window() {
        match parse(json!({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4})) {
            Ok(ModelConfig::Llama(c)) => assert!(c.qkv_bias && !c.o_bias),
            other => panic!("{other:?}"),
        }
        match parse(json!({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 8})) {
            Ok(ModelConfig::Llama(c)) => {
                assert_eq!(c.sliding_window, Some(4096));
                assert_eq!(c.num_key_value_heads, 8);
            }
            other => panic!("{other:?}"),
        }
    }
}
