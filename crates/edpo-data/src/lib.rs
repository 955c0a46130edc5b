//! Preference data: the typed pair record, the JSON-lines reader, and the tokenisation
//! convention every scoring and training path assumes.
//!
//! # Overview
//! - [`PreferencePair`]: one `(prompt, chosen, rejected)` record with its source location.
//! - [`read_jsonl_pairs`]: rows `{"prompt", "chosen", "rejected"}`; a malformed row is an error
//!   naming the file and line.
//! - [`PairTokenizer`]: prompt and responses tokenised separately with no special tokens,
//!   EOS appended to each response (and counted as a response token), as TRL-style trainers do.
//!
//! - [`chat`]: chat templates rendered as `transformers` renders them (from a checkpoint's
//!   `tokenizer_config.json`, a GGUF file, or by name: ChatML, Llama 3, SmolLM2).
//! - [`guard`]: a panic inside a third-party parser (a damaged file) as an error.
//! - [`preferences`]: preference data in the layouts users have (standard, implicit prompt,
//!   conversational, HH-RLHF, pre-tokenised), from JSON lines, JSON, Parquet or CSV through
//!   polars, a local path or `hf:ORG/NAME` in the hub cache, with named bad-row rules.
//! - [`tokenization`]: a record to ids by the `separate` or `joint` convention, chat template
//!   applied, truncated to a budget.
//!
//! This crate depends on no model code; the model crate consumes token ids only.

pub mod bpe;
pub mod chat;
pub mod guard;
pub mod hub;
pub mod preferences;
pub mod rng;
pub mod snippets;
pub mod synthetic;
pub mod tokenization;

use serde_json::Value;
use std::path::{Path, PathBuf};

/// Everything that can go wrong reading or tokenising preference data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A row is not valid or lacks a field.
    #[error("{path}:{line}: {message}")]
    Row {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the row.
        message: String,
    },
    /// A chat template could not be parsed or rendered, or raised an error itself.
    #[error("chat template {origin}: {message}")]
    Template {
        /// Where the template came from.
        origin: String,
        /// What went wrong (the template's own message for `raise_exception`).
        message: String,
    },
    /// A data file could not be read as a table (JSON lines, JSON, Parquet, CSV).
    #[error("{path}: {message}")]
    Table {
        /// The data file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A data source or a reading option is wrong (the message names which).
    #[error("{0}")]
    Source(String),
    /// The tokenizer file could not be loaded or could not encode a text.
    #[error("{path}: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The tokenizer's message.
        message: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// One preference pair: `chosen` is preferred to `rejected` as a continuation of `prompt`.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    /// The shared context.
    pub prompt: String,
    /// The preferred response (y_w).
    pub chosen: String,
    /// The dispreferred response (y_l).
    pub rejected: String,
    /// 1-based line in the source file, for messages.
    pub line: usize,
}

/// Reads JSON lines `{"prompt": …, "chosen": …, "rejected": …}`; blank lines are skipped,
/// other fields are ignored, and a missing or non-string field is an error naming the line.
pub fn read_jsonl_pairs(path: &Path) -> Result<Vec<PreferencePair>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut pairs = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let row_err = |message: String| Error::Row {
            path: path.to_path_buf(),
            line,
            message,
        };
        let value: Value =
            serde_json::from_str(raw).map_err(|e| row_err(format!("malformed JSON: {e}")))?;
        let field = |key: &str| -> Result<String> {
            match value.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(row_err(format!(
                    "field `{key}` must be a string, found {other}"
                ))),
                None => Err(row_err(format!("field `{key}` is missing"))),
            }
        };
        pairs.push(PreferencePair {
            prompt: field("prompt")?,
            chosen: field("chosen")?,
            rejected: field("rejected")?,
            line,
        });
    }
    Ok(pairs)
}

/// Token ids of one pair; `chosen` and `rejected` end with EOS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPair {
    /// Prompt ids (no special tokens).
    pub prompt: Vec<u32>,
    /// Chosen response ids, EOS appended.
    pub chosen: Vec<u32>,
    /// Rejected response ids, EOS appended.
    pub rejected: Vec<u32>,
}

/// A `tokenizer.json` with the EOS id to append to responses.
pub struct PairTokenizer {
    tokenizer: tokenizers::Tokenizer,
    eos_id: u32,
    path: PathBuf,
}

impl PairTokenizer {
    /// Loads `tokenizer.json`; `eos_id` is the model's EOS token.
    pub fn from_file(path: &Path, eos_id: u32) -> Result<Self> {
        let tokenizer = guard::catch(|| tokenizers::Tokenizer::from_file(path))
            .map_err(|panic| Error::Tokenizer {
                path: path.to_path_buf(),
                message: format!("cannot load tokenizer: the file is damaged ({panic})"),
            })?
            .map_err(|e| Error::Tokenizer {
                path: path.to_path_buf(),
                message: format!("cannot load tokenizer: {e}"),
            })?;
        Ok(Self {
            tokenizer,
            eos_id,
            path: path.to_path_buf(),
        })
    }

    /// The vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The EOS id appended to responses.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Looks up a token's id, e.g. the EOS string of `tokenizer_config.json`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Encodes a text with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot encode {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids back to text (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot decode: {e}"),
            })
    }

    /// Decodes ids back to text with special tokens kept (the EOS string, say).
    pub fn decode_special(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot decode: {e}"),
            })
    }

    /// Tokenises a pair by the convention: prompt and each response separately, EOS appended
    /// to each response.
    pub fn encode_pair(&self, pair: &PreferencePair) -> Result<TokenizedPair> {
        let response = |text: &str| -> Result<Vec<u32>> {
            let mut ids = self.encode(text)?;
            ids.push(self.eos_id);
            Ok(ids)
        };
        Ok(TokenizedPair {
            prompt: self.encode(&pair.prompt)?,
            chosen: response(&pair.chosen)?,
            rejected: response(&pair.rejected)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` written to a file in a fresh directory (removed with the returned guard).
    fn write(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("edpo-data-{name}-"))
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path();
        let path = dir.join("pairs.jsonl");
        std::fs::write(&path, text).expect("write");
        (tmp, path)
    }

    #[test]
    fn reads_rows_and_skips_blank_lines() -> Result<()> {
        let (_tmp, path) = write("ok", "{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\",\"id\":3}\n\n{\"prompt\":\"d\",\"chosen\":\"e\",\"rejected\":\"f\"}\n");
        let pairs = read_jsonl_pairs(&path)?;
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1].line, 3);
        assert_eq!(pairs[1].rejected, "f");
        Ok(())
    }

    #[test]
    fn malformed_rows_name_file_and_line() {
        let (_tmp, path) = write("bad", "{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\"}\n{\"prompt\":\"a\",\"chosen\":\"b\"}\n");
        let e = read_jsonl_pairs(&path).expect_err("missing field");
        assert!(
            e.to_string()
                .ends_with("pairs.jsonl:2: field `rejected` is missing"),
            "{e}"
        );
        let (_tmp, path) = write("json", "{\"prompt\": 1}\nnot json\n");
        let e = read_jsonl_pairs(&path).expect_err("bad type");
        assert!(
            e.to_string()
                .contains(":1: field `prompt` must be a string"),
            "{e}"
        );
    }
}
