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
use crate::preferences::{by_name, name_of, PreferenceRecord, Turns};
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
    let (prompt, chosen, rejected, mismatch) =
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
    let mut pair = TokenizedPair {
        prompt,
        chosen,
        rejected,
    };
    let (prompt_truncated, response_truncated) = truncate(&mut pair, budget);
    Ok(Tokenized {
        pair,
        prompt_truncated,
        response_truncated,
        prefix_mismatch: mismatch,
    })
}

/// Truncates to `budget`: the prompt keeps its last ids, then each response its first ids.
/// Returns whether the prompt and whether a response lost ids.
fn truncate(pair: &mut TokenizedPair, budget: Budget) -> (bool, bool) {
    let mut prompt_truncated = false;
    if let Some(m) = budget.max_prompt_length {
        if pair.prompt.len() > m {
            pair.prompt.drain(..pair.prompt.len() - m);
            prompt_truncated = true;
        }
    }
    let mut response_truncated = false;
    if let Some(m) = budget.max_length {
        let room = m.saturating_sub(pair.prompt.len());
        for side in [&mut pair.chosen, &mut pair.rejected] {
            if side.len() > room {
                side.truncate(room);
                response_truncated = true;
            }
        }
    }
    (prompt_truncated, response_truncated)
}

/// What to do with a record whose prompt is over budget: longer than `max_prompt_length`, or
/// leaving no room for one response token within `max_length`. The rule is named
/// `prompt-over-budget` wherever it is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverBudget {
    /// An error naming the file and row (the default: nothing is cut unless asked).
    Error,
    /// The record is skipped and counted.
    Skip,
    /// The prompt keeps its last ids within the budget, and is counted.
    Truncate,
}

impl OverBudget {
    /// Every outcome, by name.
    pub const ALL: [(&'static str, OverBudget); 3] = [
        ("error", OverBudget::Error),
        ("skip", OverBudget::Skip),
        ("truncate", OverBudget::Truncate),
    ];

    /// The outcome called `name`.
    pub fn parse(name: &str) -> Result<Self> {
        by_name(&Self::ALL, name, "outcome of prompt-over-budget")
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        name_of(&Self::ALL, self)
    }
}

/// What tokenising a set of records did, rule by rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizeCounts {
    /// Records tokenised and kept.
    pub kept: usize,
    /// Records whose prompt was over budget (skipped or truncated, as asked).
    pub prompt_over_budget: usize,
    /// Records skipped by the prompt-over-budget rule.
    pub skipped: usize,
    /// Records whose chosen or rejected response lost ids at its end (`max_length`).
    pub responses_truncated: usize,
    /// Joint convention: records whose whole sequence did not start with the prompt's ids.
    pub prefix_mismatches: usize,
    /// Records whose two responses became equal ids after truncation (kept; they carry no
    /// preference signal).
    pub identical_after_truncation: usize,
}

impl TokenizeCounts {
    /// One line per count, for a preparation summary.
    pub fn summary(&self, over_budget: OverBudget) -> String {
        format!(
            "tokenised: {} kept; prompt-over-budget {} ({}; {} skipped); responses truncated {}; \
             prefix mismatches {}; identical after truncation {}\n",
            self.kept,
            self.prompt_over_budget,
            over_budget.name(),
            self.skipped,
            self.responses_truncated,
            self.prefix_mismatches,
            self.identical_after_truncation
        )
    }
}

/// Tokenises every record (see [`tokenize`]), applying the prompt-over-budget rule: a prompt
/// longer than `max_prompt_length`, or one that leaves no room for a response token within
/// `max_length`, is an error naming its file and row, a counted skip, or a counted truncation
/// (to `min(max_prompt_length, max_length − 1)` ids, keeping its end), as `over_budget` says.
/// Returns each kept record's index in `records` with its ids.
pub fn tokenize_all(
    records: &[PreferenceRecord],
    tokenizer: &PairTokenizer,
    template: Option<&ChatTemplate>,
    convention: Convention,
    budget: Budget,
    over_budget: OverBudget,
) -> Result<(Vec<(usize, TokenizedPair)>, TokenizeCounts)> {
    let prompt_budget = match (budget.max_prompt_length, budget.max_length) {
        (Some(p), Some(m)) => Some(p.min(m.saturating_sub(1))),
        (Some(p), None) => Some(p),
        (None, Some(m)) => Some(m.saturating_sub(1)),
        (None, None) => None,
    };
    let located = |r: &PreferenceRecord, message: String| Error::Row {
        path: r.file.clone(),
        line: r.row,
        message,
    };
    let mut counts = TokenizeCounts::default();
    let mut out = Vec::with_capacity(records.len());
    for (index, record) in records.iter().enumerate() {
        let whole = tokenize(record, tokenizer, template, convention, Budget::default())
            .map_err(|e| located(record, e.to_string()))?;
        let prompt_len = whole.pair.prompt.len();
        if prompt_budget.is_some_and(|b| prompt_len > b) {
            counts.prompt_over_budget += 1;
            match over_budget {
                OverBudget::Error => {
                    return Err(located(
                        record,
                        format!(
                            "prompt-over-budget: the prompt has {prompt_len} tokens, the budget {} \
                             (max_prompt_length {:?}, max_length {:?}); set the rule's outcome \
                             to `skip` or `truncate` to go on",
                            prompt_budget.unwrap_or_default(),
                            budget.max_prompt_length,
                            budget.max_length
                        ),
                    ))
                }
                OverBudget::Skip => {
                    counts.skipped += 1;
                    continue;
                }
                OverBudget::Truncate => {}
            }
        }
        let mut pair = whole.pair;
        let (_, response_truncated) = truncate(
            &mut pair,
            Budget {
                max_length: budget.max_length,
                max_prompt_length: prompt_budget,
            },
        );
        counts.kept += 1;
        counts.responses_truncated += usize::from(response_truncated);
        counts.prefix_mismatches += usize::from(whole.prefix_mismatch);
        counts.identical_after_truncation +=
            usize::from(response_truncated && pair.chosen == pair.rejected);
        out.push((index, pair));
    }
    Ok((out, counts))
}

/// Token lengths of prompts and responses (mean, median, 95th percentile, maximum), one line
/// each under a header, for a preparation summary.
pub fn length_summary(pairs: &[&TokenizedPair]) -> String {
    let mut out = format!(
        "token lengths:  {:>8} {:>6} {:>6} {:>6}\n",
        "mean", "p50", "p95", "max"
    );
    for (side, name) in ["prompt", "chosen", "rejected"].into_iter().enumerate() {
        let mut xs: Vec<usize> = pairs
            .iter()
            .map(|p| [&p.prompt, &p.chosen, &p.rejected][side].len())
            .collect();
        if xs.is_empty() {
            out.push_str(&format!("  {name:<13} (none)\n"));
            continue;
        }
        xs.sort_unstable();
        let at = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize];
        let mean = xs.iter().sum::<usize>() as f64 / xs.len() as f64;
        out.push_str(&format!(
            "  {name:<13} {mean:>8.1} {:>6} {:>6} {:>6}\n",
            at(0.5),
            at(0.95),
            xs[xs.len() - 1]
        ));
    }
    out
}
