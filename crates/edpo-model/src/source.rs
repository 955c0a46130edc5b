//! Model sources: every way a model is stored becomes one [`Source`]: the parsed config, the
//! `config.json` to write back, the tensors by Hugging Face name, and the directory its
//! tokenizer and generation files come from. [`crate::CausalLm::from_source`] builds a model
//! from any of them, so a new source (a GGUF file, the Hugging Face hub cache) is one
//! constructor here and nothing else.
//!
//! - [`Source::hf_dir`]: a Hugging Face directory (`config.json` and a single or sharded
//!   safetensors checkpoint), with the unprefixed tensor names of the original GPT-2
//!   checkpoints normalised;
//! - [`Source::gguf`]: a GGUF file (llama.cpp's format) of the `llama` or `qwen2`
//!   architecture: its metadata becomes the `config.json` `transformers` would write, every
//!   tensor is dequantised to f32 (any type candle dequantises) and renamed to its Hugging Face
//!   name, and for `llama` files the rotary row order llama.cpp gives the q and k projections
//!   is undone. Its tokenizer (`tokenizer.ggml.*`, byte-level BPE) becomes a `tokenizer.json`
//!   and its chat template a `tokenizer_config.json`, written beside the weights when the
//!   model is saved.
//!
//! - [`Source::hf_cache`]: a model in the local Hugging Face hub cache, named
//!   `hf:ORG/NAME[@REV]` (a branch, tag or commit; `main` when absent), found offline through
//!   `HF_HUB_CACHE`, `HF_HOME/hub` or `~/.cache/huggingface/hub`, resolved through the cache's
//!   `refs/` to its `snapshots/<commit>/` directory (with the `hf-hub` crate's cache layout),
//!   then read as a Hugging Face directory (sharded checkpoints included).
//!
//! [`Source::open`] picks the source by the name: `hf:…`, a `.gguf` file or a directory.

use crate::checkpoint::{self, Checkpoint};
use crate::config::ModelConfig;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value as Meta};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
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
    /// Tokenizer files the source makes rather than finds (`tokenizer.json` and
    /// `tokenizer_config.json` from a GGUF file's vocabulary), as `(file name, contents)`.
    pub files: Vec<(String, String)>,
}

impl Source {
    /// A model in the Hugging Face cache (`hf:ORG/NAME[@REV]`), a `.gguf` file or a Hugging
    /// Face directory, by the name.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        if let Some(name) = path.to_str().and_then(|p| p.strip_prefix("hf:")) {
            return Self::hf_cache(name, device);
        }
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            Self::gguf(path, device)
        } else {
            Self::hf_dir(path, device)
        }
    }

    /// A model in the local Hugging Face hub cache: `ORG/NAME[@REV]` (see the module
    /// documentation). Never touches the network; a miss is [`Error::NotCached`].
    pub fn hf_cache(name: &str, device: &Device) -> Result<Self> {
        let (repo_id, revision) = name.split_once('@').unwrap_or((name, "main"));
        let not_cached = |looked: PathBuf| Error::NotCached {
            name: name.to_string(),
            repo: repo_id.to_string(),
            revision: revision.to_string(),
            looked,
        };
        let root = hub_cache_dir().ok_or_else(|| not_cached(PathBuf::from("$HF_HUB_CACHE")))?;
        let repo = hf_hub::Repo::with_revision(
            repo_id.to_string(),
            hf_hub::RepoType::Model,
            revision.to_string(),
        );
        let repo_dir = root.join(repo.folder_name());
        let is_commit = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
        // A commit names its snapshot directly; a branch or tag goes through `refs/`.
        let (config, looked) = if is_commit {
            let p = repo_dir
                .join("snapshots")
                .join(revision)
                .join("config.json");
            (p.exists().then(|| p.clone()), p)
        } else {
            let config = hf_hub::Cache::new(root.clone())
                .repo(repo)
                .get("config.json");
            (config, repo_dir.join("refs").join(revision))
        };
        let dir = config
            .as_deref()
            .and_then(Path::parent)
            .ok_or_else(|| not_cached(looked))?;
        Self::hf_dir(dir, device)
    }

    /// A GGUF file of the `llama` or `qwen2` architecture (see the module documentation).
    pub fn gguf(path: &Path, device: &Device) -> Result<Self> {
        let bad = |key: &str, message: String| Error::BadKey {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = edpo_data::guard::catch(|| Content::read(&mut file))
            .map_err(|panic| Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!("not a readable GGUF file: damaged ({panic})"),
            })?
            .map_err(|e| Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!("not a readable GGUF file: {e}"),
            })?;
        let meta = |key: &str| content.metadata.get(key);
        let text = |key: &str| -> Result<String> {
            meta(key)
                .ok_or_else(|| bad(key, "missing".into()))?
                .to_string()
                .cloned()
                .map_err(|e| bad(key, e.to_string()))
        };
        let arch = text("general.architecture")?;
        let permuted = match arch.as_str() {
            "llama" => true,
            "qwen2" => false,
            other => {
                return Err(bad(
                    "general.architecture",
                    format!("`{other}` is not supported (llama, qwen2)"),
                ))
            }
        };
        let number = |key: &str| -> Result<Option<f64>> {
            let full = format!("{arch}.{key}");
            match meta(&full) {
                None => Ok(None),
                Some(v) => gguf_number(v)
                    .map(Some)
                    .ok_or_else(|| bad(&full, format!("expected a number, found {v:?}"))),
            }
        };
        let required = |key: &str| -> Result<f64> {
            number(key)?.ok_or_else(|| bad(&format!("{arch}.{key}"), "missing".into()))
        };
        let embedding = content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                name: "token_embd.weight".into(),
            })?;
        let vocab = embedding.shape.dims().first().copied().unwrap_or(0);
        let hidden = required("embedding_length")? as usize;
        let heads = required("attention.head_count")? as usize;
        let kv_heads = number("attention.head_count_kv")?.map_or(heads, |x| x as usize);
        let head_dim =
            number("rope.dimension_count")?.map_or(hidden / heads.max(1), |x| x as usize);
        let tied = !content.tensor_infos.contains_key("output.weight");
        let token = |key: &str| meta(key).and_then(gguf_number).map(|x| x as u64);
        let raw = json!({
            "model_type": arch,
            "architectures": [if permuted { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }],
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": required("feed_forward_length")? as usize,
            "num_hidden_layers": required("block_count")? as usize,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "rms_norm_eps": number("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
            "rope_theta": number("rope.freq_base")?.unwrap_or(10000.0),
            "max_position_embeddings": number("context_length")?.map_or(2048, |x| x as usize),
            "tie_word_embeddings": tied,
            "hidden_act": "silu",
            "bos_token_id": token("tokenizer.ggml.bos_token_id"),
            "eos_token_id": token("tokenizer.ggml.eos_token_id"),
        });
        let config = ModelConfig::from_json(&raw, path)?;
        let mut tensors = HashMap::new();
        for name in content.tensor_infos.keys() {
            let Some(hf) = hf_name(name) else {
                continue; // rope frequency tables and other buffers llama.cpp keeps
            };
            let read = |e: candle_core::Error| Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!("tensor `{name}`: {e}"),
            };
            // A damaged header can give dimensions whose product overflows (candle multiplies
            // them unchecked); refuse those before reading.
            let dims = content.tensor_infos[name].shape.dims();
            let elements = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if elements.is_none_or(|n| n == 0) {
                return Err(Error::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!("tensor `{name}`: impossible shape {dims:?}"),
                });
            }
            let tensor = edpo_data::guard::catch(|| {
                content
                    .tensor(&mut file, name, device)
                    .and_then(|q| q.dequantize(device))
            })
            .map_err(|panic| Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!("tensor `{name}`: damaged ({panic})"),
            })?
            .map_err(read)?;
            let tensor = match (permuted, hf.rsplit('.').nth(1)) {
                (true, Some("q_proj")) => unpermute_rotary(&tensor, heads)?,
                (true, Some("k_proj")) => unpermute_rotary(&tensor, kv_heads)?,
                _ => tensor,
            };
            tensors.insert(hf, tensor);
        }
        Ok(Self {
            config,
            raw_config: raw,
            checkpoint: Checkpoint::from_tensors(tensors, path.to_path_buf()),
            dir: None,
            files: gguf_tokenizer_files(&content, path)?,
        })
    }

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
            files: Vec::new(),
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

/// The Hugging Face hub cache (defined once, in `edpo-data`).
pub use edpo_data::hub::cache_dir as hub_cache_dir;

/// The pre-tokenizers of the byte-level BPE vocabularies llama.cpp names
/// (`tokenizer.ggml.pre`), as `tokenizer.json` writes them.
fn pre_tokenizer(name: &str) -> Option<Value> {
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": use_regex})
    };
    let split = |pattern: &str| {
        json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
            "invert": false})
    };
    Some(match name {
        // GPT-2's own regex, inside the byte-level pre-tokenizer.
        "gpt-2" | "default" => byte_level(true),
        // SmolLM: every digit alone, then GPT-2's regex.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        _ => return None,
    })
}

/// A GGUF file's tokenizer as `tokenizer.json` (and its chat template as
/// `tokenizer_config.json`); none when the file carries no vocabulary. Byte-level BPE
/// (`tokenizer.ggml.model` = `gpt2`) only; any other model or an unknown pre-tokenizer name is
/// an error naming the key, never a silent default.
fn gguf_tokenizer_files(content: &Content, path: &Path) -> Result<Vec<(String, String)>> {
    let bad = |key: &str, message: String| Error::BadKey {
        path: path.to_path_buf(),
        key: key.to_string(),
        message,
    };
    let meta = |key: &str| content.metadata.get(key);
    let Some(tokens) = meta("tokenizer.ggml.tokens") else {
        return Ok(Vec::new());
    };
    let strings = |key: &str, v: &Meta| -> Result<Vec<String>> {
        v.to_vec()
            .map_err(|e| bad(key, e.to_string()))?
            .iter()
            .map(|s| s.to_string().cloned().map_err(|e| bad(key, e.to_string())))
            .collect()
    };
    let model = meta("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(bad(
            "tokenizer.ggml.model",
            format!("`{model}` is not supported (gpt2: byte-level BPE)"),
        ));
    }
    let pre = meta("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "default".into());
    let pre_tokenizer = pre_tokenizer(&pre).ok_or_else(|| {
        bad(
            "tokenizer.ggml.pre",
            format!("`{pre}` is not a pre-tokenizer this loader builds (gpt-2, default, smollm, llama-bpe, qwen2)"),
        )
    })?;
    let tokens = strings("tokenizer.ggml.tokens", tokens)?;
    let merges = match meta("tokenizer.ggml.merges") {
        Some(v) => strings("tokenizer.ggml.merges", v)?,
        None => Vec::new(),
    };
    let types: Vec<f64> = match meta("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| bad("tokenizer.ggml.token_type", e.to_string()))?
            .iter()
            .map(|t| gguf_number(t).unwrap_or(1.0))
            .collect(),
        None => Vec::new(),
    };
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Control (3) and user-defined (4) tokens are added tokens, matched before the model.
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i).copied(), Some(t) if t == 3.0 || t == 4.0))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": types[i] == 3.0})
        })
        .collect();
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap_or((m, ""));
            json!([a, b])
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": pre_tokenizer, "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
            "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let token_text = |key: &str| {
        meta(key)
            .and_then(gguf_number)
            .and_then(|i| tokens.get(i as usize))
            .cloned()
    };
    let mut config = json!({
        "bos_token": token_text("tokenizer.ggml.bos_token_id"),
        "eos_token": token_text("tokenizer.ggml.eos_token_id"),
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(template) = meta("tokenizer.chat_template").and_then(|v| v.to_string().ok()) {
        config["chat_template"] = json!(template);
    }
    let pretty = |v: &Value| {
        serde_json::to_string_pretty(v).map_err(|e| bad("tokenizer.ggml.tokens", e.to_string()))
    };
    Ok(vec![
        ("tokenizer.json".to_string(), pretty(&tokenizer)?),
        ("tokenizer_config.json".to_string(), pretty(&config)?),
    ])
}

/// A GGUF metadata value as a number, whatever its integer or float type.
fn gguf_number(v: &Meta) -> Option<f64> {
    match v {
        Meta::U8(x) => Some(f64::from(*x)),
        Meta::I8(x) => Some(f64::from(*x)),
        Meta::U16(x) => Some(f64::from(*x)),
        Meta::I16(x) => Some(f64::from(*x)),
        Meta::U32(x) => Some(f64::from(*x)),
        Meta::I32(x) => Some(f64::from(*x)),
        Meta::U64(x) => Some(*x as f64),
        Meta::I64(x) => Some(*x as f64),
        // The shortest decimal that reads back as the same f32 (1e-5, not 9.99999974e-6), as
        // the `config.json` the GGUF was converted from held it.
        Meta::F32(x) => x.to_string().parse().ok(),
        Meta::F64(x) => Some(*x),
        _ => None,
    }
}

/// The Hugging Face name of a llama.cpp tensor of the Llama family (`None`: not a parameter).
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes the row order llama.cpp's converter gives a `llama` file's q and k projections
/// (weight `(heads·hd, in)` or bias `(heads·hd,)`): it stores each head's rows as interleaved
/// pairs, `reshape(heads, 2, hd/2, …).swapaxes(1, 2)`; this applies the inverse,
/// `reshape(heads, hd/2, 2, …).swapaxes(1, 2)`, giving the rotate-half layout of `transformers`.
fn unpermute_rotary(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let half = rows / heads.max(1) / 2;
    if heads == 0 || rows != heads * half * 2 {
        return Err(Error::Input(format!(
            "a projection of {rows} rows does not split into {heads} rotary heads"
        )));
    }
    let inner: usize = dims[1..].iter().product();
    Ok(t.reshape((heads, half, 2, inner))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hugging_face_names() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").as_deref(),
            Some("model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight").as_deref(),
            Some("model.layers.0.mlp.down_proj.weight")
        );
        assert_eq!(
            hf_name("blk.1.attn_k.bias").as_deref(),
            Some("model.layers.1.self_attn.k_proj.bias")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    /// llama.cpp's permutation, as its converter writes it, then ours: the identity.
    #[test]
    fn unpermute_inverts_the_converter() -> Result<()> {
        let (heads, hd, inp) = (3, 4, 5);
        let w: Vec<f32> = (0..heads * hd * inp).map(|i| i as f32).collect();
        let w = Tensor::from_vec(w, (heads * hd, inp), &Device::Cpu)?;
        let permuted = w
            .reshape((heads, 2, hd / 2, inp))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((heads * hd, inp))?;
        let back = unpermute_rotary(&permuted, heads)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }
}
