//! A preference record ([`crate::preferences::PreferenceRecord`]) to token ids, by one of
//! two documented conventions, with truncation to a budget.
//!
//! Text: a conversation is rendered by the chat template first — the prompt with the
//! generation prompt appended, each response as the text the template adds after it (the
//! render of prompt + response minus the render of the prompt, as TRL does).
//!
//! Conventions ([`Convention`]):
//! - `separate` (the ε-DPO authors' trainer, TRL ≤ 0.28, this harness's default): prompt and
//!   response tokenised apart with no special tokens, and the EOS id appended to the response;
//! - `joint` (TRL ≥ 0.29): the EOS *string* appended to a plain-text response (a conversation's
//!   template already ends its turn), `prompt` and `prompt + response` tokenised whole, and the
//!   response's ids taken after the prompt's length; when the whole sequence does not start
//!   with the prompt's own ids (a merge across the boundary) the record says so
//!   ([`Tokenized::prefix_mismatch`]), as TRL warns.
//!
//! Truncation ([`Budget`]): the prompt keeps its last `max_prompt_length` ids; then each
//! response keeps its first `max_length − prompt length` ids.

use crate::chat::{ChatTemplate, Message};
use crate::preferences::{PreferenceRecord, Turns};
use crate::{Error, PairTokenizer, Result, TokenizedPair};

/// How prompt and response become ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convention {
    /// Apart, EOS id appended.
    Separate,
    /// Whole, response ids after the prompt's.
    Joint,
}

impl Convention {
    /// The convention called `name` (`separate`, `joint`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "separate" => Ok(Self::Separate),
            "joint" => Ok(Self::Joint),
            other => Err(Error::Source(format!(
                "unknown tokenisation `{other}`; known: separate, joint"
            ))),
        }
    }
}

/// Token budgets (`None`: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    /// Prompt plus response.
    pub max_length: Option<usize>,
    /// The prompt alone.
    pub max_prompt_length: Option<usize>,
}

/// A tokenised record and what tokenising it did.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    /// The ids.
    pub pair: TokenizedPair,
    /// The prompt lost ids at its start.
    pub prompt_truncated: bool,
    /// A response lost ids at its end.
    pub response_truncated: bool,
    /// Joint convention: the whole sequence did not start with the prompt's own ids.
    pub prefix_mismatch: bool,
}

/// The texts of a record: prompt, chosen, rejected.
fn texts(record: &PreferenceRecord, template: Option<&ChatTemplate>) -> Result<[String; 3]> {
    let plain = |t: &Turns| match t {
        Turns::Text(s) => Some(s.clone()),
        _ => None,
    };
    if let (Some(p), Some(c), Some(r)) = (
        plain(&record.prompt),
        plain(&record.chosen),
        plain(&record.rejected),
    ) {
        return Ok([p, c, r]);
    }
    let (Turns::Messages(p), Turns::Messages(c), Turns::Messages(r)) =
        (&record.prompt, &record.chosen, &record.rejected)
    else {
        return Err(Error::Source(format!(
            "row {}: a record must be all text or all messages to be rendered",
            record.row
        )));
    };
    let template = template.ok_or_else(|| {
        Error::Source(format!(
            "row {}: a conversation needs a chat template",
            record.row
        ))
    })?;
    let prompt = template.render(p, true)?;
    let response = |m: &[Message]| -> Result<String> {
        let mut whole = p.clone();
        whole.extend(m.iter().cloned());
        let text = template.render(&whole, false)?;
        text.strip_prefix(&prompt)
            .map(str::to_string)
            .ok_or_else(|| Error::Template {
                origin: "render".into(),
                message: format!(
                    "row {}: the conversation's render does not start with the prompt's",
                    record.row
                ),
            })
    };
    let (chosen, rejected) = (response(c)?, response(r)?);
    Ok([prompt, chosen, rejected])
}

/// Tokenises `record` by `convention` within `budget` (see the module documentation).
pub fn tokenize(
    record: &PreferenceRecord,
    tokenizer: &PairTokenizer,
    template: Option<&ChatTemplate>,
    convention: Convention,
    budget: Budget,
) -> Result<Tokenized> {
    let (mut prompt, mut chosen, mut rejected, mismatch) =
        match (&record.prompt, &record.chosen, &record.rejected) {
            (Turns::Tokens(p), Turns::Tokens(c), Turns::Tokens(r)) => {
                (p.clone(), c.clone(), r.clone(), false)
            }
            _ => {
                let [p, c, r] = texts(record, template)?;
                let conversational = matches!(record.chosen, Turns::Messages(_));
                match convention {
                    Convention::Separate => {
                        let response = |t: &str| -> Result<Vec<u32>> {
                            let mut ids = tokenizer.encode(t)?;
                            ids.push(tokenizer.eos_id());
                            Ok(ids)
                        };
                        (tokenizer.encode(&p)?, response(&c)?, response(&r)?, false)
                    }
                    Convention::Joint => {
                        let eos = if conversational {
                            String::new()
                        } else {
                            tokenizer.decode_special(&[tokenizer.eos_id()])?
                        };
                        let prompt_ids = tokenizer.encode(&p)?;
                        let mut mismatch = false;
                        let mut after = |t: &str| -> Result<Vec<u32>> {
                            let whole = tokenizer.encode(&format!("{p}{t}{eos}"))?;
                            mismatch |= !whole.starts_with(&prompt_ids);
                            Ok(whole.get(prompt_ids.len()..).unwrap_or_default().to_vec())
                        };
                        let (c, r) = (after(&c)?, after(&r)?);
                        (prompt_ids, c, r, mismatch)
                    }
                }
            }
        };
    let mut prompt_truncated = false;
    if let Some(m) = budget.max_prompt_length {
        if prompt.len() > m {
            prompt.drain(..prompt.len() - m);
            prompt_truncated = true;
        }
    }
    let mut response_truncated = false;
    if let Some(m) = budget.max_length {
        let room = m.saturating_sub(prompt.len());
        for side in [&mut chosen, &mut rejected] {
            if side.len() > room {
                side.truncate(room);
                response_truncated = true;
            }
        }
    }
    Ok(Tokenized {
        pair: TokenizedPair {
            prompt,
            chosen,
            rejected,
        },
        prompt_truncated,
        response_truncated,
        prefix_mismatch: mismatch,
    })
}
