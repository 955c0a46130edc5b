//! A pretrained reference shared by the tasks that take one (the sentiment task's
//! `task.reference`, the user-data task): converted once into the stage cache in the Hugging
//! Face layout (its digest checked first), its tokenizer with the EOS of its `config.json`,
//! and the chat template a config names (`model`: the checkpoint's own).

use crate::check::check;
use anyhow::{anyhow, bail, Context, Result};
use edpo_data::chat::ChatTemplate;
use edpo_data::{snippets, PairTokenizer};
use edpo_model::CausalLm;
use serde_json::json;
use std::path::Path;

/// The key of the stage that converts `source` (shared by every task naming the same file).
pub fn stage_key(source: &str, sha256: Option<&str>) -> serde_json::Value {
    json!({"stage": "pretrained-reference", "source": source, "sha256": sha256})
}

/// Checks `task.reference_sha256` (64 hexadecimal digits, only with a reference) and
/// `task.chat_template` (`model` only with a reference, else a known name).
pub fn check_keys(
    reference: Option<&str>,
    sha256: Option<&str>,
    chat_template: Option<&str>,
) -> Result<()> {
    check(
        sha256.is_none() || reference.is_some(),
        "task.reference_sha256",
        "given without `task.reference`",
    )?;
    if let Some(d) = sha256 {
        check(
            d.len() == 64 && d.chars().all(|c| c.is_ascii_hexdigit()),
            "task.reference_sha256",
            "must be 64 hexadecimal digits",
        )?;
    }
    if let Some(name) = chat_template {
        if name == "model" {
            check(
                reference.is_some(),
                "task.chat_template",
                "`model` needs a pretrained `task.reference` (the task's own GPT-2 has no template)",
            )?;
        } else if let Err(e) = ChatTemplate::named(name) {
            check(false, "task.chat_template", format!("{e}; or `model`"))?;
        }
    }
    Ok(())
}

/// Converts a pretrained reference into the Hugging Face layout in `dir` (checking its
/// SHA-256 first when one is given).
pub fn convert(source: &str, sha256: Option<&str>, dir: &Path) -> Result<()> {
    let path = Path::new(source);
    if let Some(expected) = sha256 {
        let bytes = std::fs::read(path).with_context(|| {
            format!("key `task.reference`: cannot read {source} to check its SHA-256")
        })?;
        let found = snippets::sha256_hex(&bytes);
        if found != expected {
            bail!("key `task.reference_sha256`: {source} has SHA-256 {found}, expected {expected}");
        }
    }
    let model = CausalLm::load(path, &crate::device(), false)
        .with_context(|| format!("key `task.reference`: cannot load {source}"))?;
    model.save(dir)?;
    std::fs::write(
        dir.join("source.json"),
        serde_json::to_string_pretty(&json!({"source": source, "sha256": sha256}))?,
    )?;
    Ok(())
}

/// The tokenizer of a converted pretrained reference, with the EOS of its `config.json`, and
/// the model's context length.
pub fn tokenizer(dir: &Path) -> Result<(PairTokenizer, usize)> {
    let path = dir.join("config.json");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{}: malformed", path.display()))?;
    let eos = match &config["eos_token_id"] {
        serde_json::Value::Array(list) => list.first().and_then(serde_json::Value::as_u64),
        v => v.as_u64(),
    }
    .ok_or_else(|| anyhow!("{}: key `eos_token_id` missing", path.display()))?;
    let context = config["max_position_embeddings"]
        .as_u64()
        .or_else(|| config["n_positions"].as_u64())
        .ok_or_else(|| anyhow!("{}: no `max_position_embeddings`", path.display()))?;
    let eos = u32::try_from(eos).map_err(|_| anyhow!("{}: bad `eos_token_id`", path.display()))?;
    Ok((
        PairTokenizer::from_file(&dir.join("tokenizer.json"), eos)?,
        context as usize,
    ))
}

/// The chat template `name` names: `None` for none, `model` for the converted reference's
/// own (in `dir`; an error naming `source` when it carries none), else a template by name.
pub fn template(name: Option<&str>, dir: &Path, source: &str) -> Result<Option<ChatTemplate>> {
    Ok(match name {
        None => None,
        Some("model") => {
            let path = dir.join("tokenizer_config.json");
            let template = if path.exists() {
                ChatTemplate::from_tokenizer_config(&path)?
            } else {
                None
            };
            Some(template.ok_or_else(|| {
                anyhow!("key `task.chat_template`: `model`, but {source} carries no chat template")
            })?)
        }
        Some(name) => Some(ChatTemplate::named(name)?),
    })
}
