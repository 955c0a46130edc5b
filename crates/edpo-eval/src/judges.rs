//! Generations for the public judges the ε-DPO paper reports (`docs/spec/data-formats.md`):
//! the benchmarks' question files in, a policy's answers out in each judge's format.
//!
//! - AlpacaEval 2: questions are a JSON list of `{instruction, dataset?}`; answers one JSON
//!   list of `{instruction, output, generator, dataset?}`.
//! - Arena-Hard-Auto: questions JSON lines `{uid, category, prompt}` (v2; v0.1's
//!   `{question_id, category, turns: [{content}]}` too); answers
//!   `model_answer/<model>.jsonl` of `{uid, ans_id, model, messages: [user, assistant
//!   {answer}], tstamp, metadata: {token_len}}`.
//! - MT-Bench (FastChat): questions JSON lines `{question_id, category, turns: [q1, q2]}`;
//!   answers `model_answer/<model>.jsonl` of `{question_id, answer_id, model_id, choices:
//!   [{index: 0, turns: [a1, a2]}], tstamp}`; the second turn is generated after the first
//!   answer, and the temperature is the category's (writing, roleplay 0.7; stem, humanities
//!   0.1; others 0, greedy), as FastChat sets it.
//!
//! Each prompt is the conversation so far rendered by the model's chat template with the
//! generation prompt; answers are sampled with the seeded batched sampler
//! ([`crate::sampling::sample`]), so a run of the same model, questions and seed writes the
//! same answers.

use crate::sampling::{sample, SamplingSettings};
use crate::{Error, Result};
use edpo_data::chat::{ChatTemplate, Message};
use edpo_data::PairTokenizer;
use edpo_model::CausalLm;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A public judge's benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Benchmark {
    /// AlpacaEval 2.
    AlpacaEval,
    /// Arena-Hard-Auto.
    ArenaHard,
    /// MT-Bench.
    MtBench,
}

impl Benchmark {
    /// The benchmark called `name` (`alpaca-eval`, `arena-hard`, `mt-bench`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "alpaca-eval" => Ok(Self::AlpacaEval),
            "arena-hard" => Ok(Self::ArenaHard),
            "mt-bench" => Ok(Self::MtBench),
            other => Err(Error::Input(format!(
                "unknown benchmark `{other}`; known: alpaca-eval, arena-hard, mt-bench"
            ))),
        }
    }
}

/// One question: its id, category and user turns (the original record kept for fields the
/// answer file repeats).
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// `question_id`, `uid`, or the position in an AlpacaEval list.
    pub id: Value,
    /// The category, where the benchmark has one.
    pub category: Option<String>,
    /// The user turns.
    pub turns: Vec<String>,
    /// The record as read.
    pub record: Value,
}

/// A question's answer: one text per turn, and the tokens generated.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The question.
    pub question: Question,
    /// One answer per user turn.
    pub turns: Vec<String>,
    /// Tokens generated over all turns.
    pub token_len: usize,
}

fn bad(path: &Path, line: usize, message: String) -> Error {
    Error::Input(format!("{}:{line}: {message}", path.display()))
}

/// Reads a benchmark's question file (formats in the module documentation).
pub fn read_questions(benchmark: Benchmark, path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    if benchmark == Benchmark::AlpacaEval {
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Input(format!("{}: malformed JSON: {e}", path.display())))?;
        let Value::Array(items) = v else {
            return Err(Error::Input(format!(
                "{}: AlpacaEval questions are a JSON list of {{instruction}}",
                path.display()
            )));
        };
        return items
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let instruction = r["instruction"]
                    .as_str()
                    .ok_or_else(|| bad(path, i + 1, "item has no string `instruction`".into()))?
                    .to_string();
                Ok(Question {
                    id: json!(i),
                    category: r["dataset"].as_str().map(str::to_string),
                    turns: vec![instruction],
                    record: r,
                })
            })
            .collect();
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: Value = serde_json::from_str(line)
            .map_err(|e| bad(path, i + 1, format!("malformed JSON: {e}")))?;
        let id = ["question_id", "uid"]
            .iter()
            .map(|k| r[*k].clone())
            .find(|v| !v.is_null())
            .ok_or_else(|| bad(path, i + 1, "no `question_id` or `uid`".into()))?;
        let turns: Vec<String> = match (&r["turns"], &r["prompt"]) {
            (Value::Array(t), _) => t
                .iter()
                .map(|x| {
                    x.as_str()
                        .or_else(|| x["content"].as_str())
                        .map(str::to_string)
                        .ok_or_else(|| bad(path, i + 1, "a turn is not text".into()))
                })
                .collect::<Result<_>>()?,
            (_, Value::String(p)) => vec![p.clone()],
            _ => return Err(bad(path, i + 1, "no `turns` or `prompt`".into())),
        };
        if turns.is_empty() {
            return Err(bad(path, i + 1, "no turns".into()));
        }
        out.push(Question {
            id,
            category: r["category"].as_str().map(str::to_string),
            turns,
            record: r,
        });
    }
    Ok(out)
}

/// MT-Bench's sampling temperature of a category, as FastChat sets it.
pub fn mt_bench_temperature(category: Option<&str>) -> f64 {
    match category {
        Some("writing" | "roleplay") => 0.7,
        Some("stem" | "humanities") => 0.1,
        _ => 0.0,
    }
}

/// Answers every question: each turn's prompt is the conversation so far rendered by
/// `template`; `settings.temperature` is used except for MT-Bench, whose categories set it.
/// Prompts longer than the model's context minus the answer budget keep their end.
pub fn generate(
    model: &CausalLm,
    tokenizer: &PairTokenizer,
    template: &ChatTemplate,
    benchmark: Benchmark,
    questions: &[Question],
    settings: &SamplingSettings,
    seed: u64,
) -> Result<Vec<Answer>> {
    let context = model.config().max_positions();
    let room = context.saturating_sub(settings.max_new_tokens).max(1);
    let mut answers: Vec<Answer> = questions
        .iter()
        .map(|q| Answer {
            question: q.clone(),
            turns: Vec::new(),
            token_len: 0,
        })
        .collect();
    let max_turns = questions.iter().map(|q| q.turns.len()).max().unwrap_or(0);
    for turn in 0..max_turns {
        // Questions of one temperature are sampled together.
        let mut groups: std::collections::BTreeMap<u64, Vec<usize>> = Default::default();
        for (i, q) in questions.iter().enumerate() {
            if q.turns.len() > turn {
                let t = match benchmark {
                    Benchmark::MtBench => mt_bench_temperature(q.category.as_deref()),
                    _ => settings.temperature,
                };
                groups.entry(t.to_bits()).or_default().push(i);
            }
        }
        for (bits, members) in groups {
            let mut prompts = Vec::with_capacity(members.len());
            for &i in &members {
                let q = &questions[i];
                let mut messages = Vec::new();
                for (k, user) in q.turns.iter().take(turn + 1).enumerate() {
                    messages.push(Message {
                        role: "user".into(),
                        content: user.clone(),
                    });
                    if k < turn {
                        messages.push(Message {
                            role: "assistant".into(),
                            content: answers[i].turns[k].clone(),
                        });
                    }
                }
                let text = template.render(&messages, true)?;
                let mut ids = tokenizer.encode(&text)?;
                if ids.len() > room {
                    ids.drain(..ids.len() - room);
                }
                prompts.push(ids);
            }
            let s = SamplingSettings {
                temperature: f64::from_bits(bits),
                ..*settings
            };
            let drawn = sample(
                model,
                &prompts,
                &s,
                seed ^ (turn as u64).wrapping_mul(0x9E37),
            )?;
            for (&i, ids) in members.iter().zip(drawn) {
                let text_ids: Vec<u32> =
                    ids.iter().copied().filter(|&t| t != settings.eos).collect();
                answers[i]
                    .turns
                    .push(tokenizer.decode(&text_ids)?.trim().to_string());
                answers[i].token_len += ids.len();
            }
        }
    }
    Ok(answers)
}

/// A stable id of an answer (in place of FastChat's random short UUID): a hash of the model's
/// name, the question's id and the answer.
fn answer_id(model: &str, answer: &Answer) -> String {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in format!(
        "{model}\u{0}{}\u{0}{}",
        answer.question.id,
        answer.turns.join("\u{0}")
    )
    .bytes()
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01B3);
    }
    format!("{h:016x}")
}

/// Writes `answers` in `benchmark`'s format under `out` (AlpacaEval: the file `out`; the
/// others: `out/model_answer/<model>.jsonl`), atomically; returns the file written.
pub fn write_answers(
    benchmark: Benchmark,
    answers: &[Answer],
    model: &str,
    out: &Path,
    tstamp: f64,
) -> Result<PathBuf> {
    let (path, text) = match benchmark {
        Benchmark::AlpacaEval => {
            let list: Vec<Value> = answers
                .iter()
                .map(|a| {
                    let mut r = json!({
                        "instruction": a.question.turns[0],
                        "output": a.turns.first().cloned().unwrap_or_default(),
                        "generator": model,
                    });
                    if let Some(d) = a.question.record.get("dataset") {
                        r["dataset"] = d.clone();
                    }
                    r
                })
                .collect();
            (
                out.to_path_buf(),
                serde_json::to_string_pretty(&list)? + "\n",
            )
        }
        Benchmark::ArenaHard | Benchmark::MtBench => {
            let lines: Vec<String> = answers
                .iter()
                .map(|a| {
                    let v = if benchmark == Benchmark::ArenaHard {
                        json!({
                            "uid": a.question.id,
                            "ans_id": answer_id(model, a),
                            "model": model,
                            "messages": [
                                {"role": "user", "content": a.question.turns[0]},
                                {"role": "assistant", "content": {"answer": a.turns.first().cloned().unwrap_or_default()}},
                            ],
                            "tstamp": tstamp,
                            "metadata": {"token_len": a.token_len},
                        })
                    } else {
                        json!({
                            "question_id": a.question.id,
                            "answer_id": answer_id(model, a),
                            "model_id": model,
                            "choices": [{"index": 0, "turns": a.turns}],
                            "tstamp": tstamp,
                        })
                    };
                    serde_json::to_string(&v)
                })
                .collect::<std::result::Result<_, _>>()?;
            (
                out.join("model_answer").join(format!("{model}.jsonl")),
                lines.join("\n") + "\n",
            )
        }
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::Input(format!("{}: {e}", parent.display())))?;
    }
    let tmp = path.with_extension("tmp-answers");
    std::fs::write(&tmp, text).map_err(|e| Error::Input(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt_bench_temperatures_follow_fastchat() {
        assert_eq!(mt_bench_temperature(Some("writing")), 0.7);
        assert_eq!(mt_bench_temperature(Some("roleplay")), 0.7);
        assert_eq!(mt_bench_temperature(Some("stem")), 0.1);
        assert_eq!(mt_bench_temperature(Some("humanities")), 0.1);
        assert_eq!(mt_bench_temperature(Some("math")), 0.0);
        assert_eq!(mt_bench_temperature(None), 0.0);
    }
}
