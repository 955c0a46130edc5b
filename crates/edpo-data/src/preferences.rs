//! Preference data in the layouts users have (`docs/spec/data-formats.md`), from JSON lines,
//! JSON, Parquet or CSV (the last two through polars; see [`read_rows`] for why JSON is
//! parsed row by row), a local file or `hf:ORG/NAME` in the Hugging
//! Face cache, into one typed record, [`PreferenceRecord`].
//!
//! Layouts ([`Layout`]), detected from every row's shape (a file whose rows disagree is an
//! error naming the first row that differs) or forced:
//! - `standard`: `prompt`, `chosen`, `rejected` strings (TRL's explicit prompt);
//! - `implicit`: `chosen`, `rejected` full texts; the prompt is their longest common prefix,
//!   backed off to a word boundary in both;
//! - `conversational`: `chosen`, `rejected` message lists (`{role, content}`), `prompt` a
//!   string, a message list or absent (then the messages both share from the start); the
//!   prompt's turns repeated at the head of each response (UltraFeedback-binarized) are
//!   removed; `score_chosen`, `score_rejected`, `prompt_id` kept;
//! - `hh`: Anthropic HH-RLHF dialogues, the prompt everything up to and including the last
//!   `\n\nAssistant:`;
//! - `tokenized`: `prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids`.
//!
//! Bad rows are named rules ([`Rule`]); each is an error naming the file and row (the default)
//! or, when asked, a counted skip ([`BadRows`]); nothing is dropped silently.

use crate::chat::Message;
use crate::{Error, Result};
use polars::prelude::*;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One side of a record: text, messages or token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Turns {
    /// Plain text.
    Text(String),
    /// Chat messages, rendered by a chat template.
    Messages(Vec<Message>),
    /// Token ids (pre-tokenised data).
    Tokens(Vec<u32>),
}

impl Turns {
    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        match self {
            Turns::Text(t) => t.trim().is_empty(),
            Turns::Messages(m) => m.iter().all(|m| m.content.trim().is_empty()),
            Turns::Tokens(t) => t.is_empty(),
        }
    }

    /// Characters (text, message contents) or tokens, for statistics.
    pub fn size(&self) -> usize {
        match self {
            Turns::Text(t) => t.chars().count(),
            Turns::Messages(m) => m.iter().map(|m| m.content.chars().count()).sum(),
            Turns::Tokens(t) => t.len(),
        }
    }
}

/// One preference record, whatever the layout it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceRecord {
    /// The shared context.
    pub prompt: Turns,
    /// The preferred response.
    pub chosen: Turns,
    /// The dispreferred response.
    pub rejected: Turns,
    /// A score of the chosen response, when the data has one.
    pub score_chosen: Option<f64>,
    /// A score of the rejected response, when the data has one.
    pub score_rejected: Option<f64>,
    /// The row's id (`prompt_id` or `id`), when the data has one.
    pub id: Option<String>,
    /// The file the record came from.
    pub file: PathBuf,
    /// 1-based row in that file.
    pub row: usize,
}

/// How a file lays out its pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Layout {
    /// `prompt`, `chosen`, `rejected` strings.
    Standard,
    /// `chosen`, `rejected` texts sharing a prefix.
    Implicit,
    /// Message lists.
    Conversational,
    /// Anthropic HH-RLHF dialogues.
    Hh,
    /// Token id lists.
    Tokenized,
}

impl Layout {
    /// Every layout, by name.
    pub const ALL: [(&'static str, Layout); 5] = [
        ("standard", Layout::Standard),
        ("implicit", Layout::Implicit),
        ("conversational", Layout::Conversational),
        ("hh", Layout::Hh),
        ("tokenized", Layout::Tokenized),
    ];

    /// Its name.
    pub fn name(self) -> &'static str {
        name_of(&Self::ALL, self)
    }

    /// The layout called `name`.
    pub fn parse(name: &str) -> Result<Self> {
        by_name(&Self::ALL, name, "layout")
    }
}

/// A bad-row rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    /// A field the layout needs is absent or null.
    MissingField,
    /// A field has a type the layout does not allow.
    WrongType,
    /// The chosen or rejected response is empty.
    EmptyResponse,
    /// Chosen and rejected are the same.
    IdenticalResponses,
    /// A conversation's roles do not alternate user / assistant (after an optional system turn).
    RolesNotAlternating,
    /// No prompt could be found (an implicit or HH row whose texts share none).
    NoSharedPrompt,
}

impl Rule {
    /// Every rule, by name.
    pub const ALL: [(&'static str, Rule); 6] = [
        ("missing-field", Rule::MissingField),
        ("wrong-type", Rule::WrongType),
        ("empty-response", Rule::EmptyResponse),
        ("identical-responses", Rule::IdenticalResponses),
        ("roles-not-alternating", Rule::RolesNotAlternating),
        ("no-shared-prompt", Rule::NoSharedPrompt),
    ];

    /// Its name.
    pub fn name(self) -> &'static str {
        name_of(&Self::ALL, self)
    }

    /// The rule called `name`.
    pub fn parse(name: &str) -> Result<Self> {
        by_name(&Self::ALL, name, "bad-row rule")
    }
}

/// The name of `value` in a table of named values.
pub(crate) fn name_of<T: PartialEq>(all: &[(&'static str, T)], value: T) -> &'static str {
    all.iter()
        .find(|(_, v)| *v == value)
        .map(|(n, _)| *n)
        .unwrap_or("?")
}

/// The value called `name` in a table of named values; an error listing the names otherwise.
pub(crate) fn by_name<T: Copy>(all: &[(&'static str, T)], name: &str, what: &str) -> Result<T> {
    all.iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let known: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
            Error::Source(format!(
                "unknown {what} `{name}`; known: {}",
                known.join(", ")
            ))
        })
}

/// What to do with rows a rule catches: an error (the default) or a counted skip.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BadRows {
    /// Rules whose rows are skipped and counted instead of failing the read.
    pub skip: Vec<Rule>,
}

/// How to read a preference file.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// Force a layout instead of detecting it.
    pub layout: Option<Layout>,
    /// The split of an `hf:` dataset or of a directory (`train_prefs`, `test`, …).
    pub split: Option<String>,
    /// Bad rows.
    pub bad_rows: BadRows,
}

/// A read file: its records and what the reading did.
#[derive(Debug, Clone)]
pub struct Preferences {
    /// The files read (more than one for a sharded split).
    pub files: Vec<PathBuf>,
    /// The layout, detected or forced.
    pub layout: Layout,
    /// Rows in the files.
    pub rows: usize,
    /// The records kept.
    pub records: Vec<PreferenceRecord>,
    /// Rows skipped, by rule.
    pub skipped: BTreeMap<Rule, usize>,
}

/// Reads `source`: a file (`.jsonl`, `.json`, `.parquet`, `.csv`), a directory of them, or
/// `hf:ORG/NAME` in the Hugging Face cache (offline), with `options.split` choosing among
/// split files.
pub fn read_preferences(source: &str, options: &ReadOptions) -> Result<Preferences> {
    let files = resolve(source, options.split.as_deref())?;
    let mut rows: Vec<(PathBuf, usize, Map<String, Value>)> = Vec::new();
    for file in &files {
        for (line, row) in read_rows(file)? {
            rows.push((file.clone(), line, row));
        }
    }
    let layout = match options.layout {
        Some(l) => l,
        None => detect(&rows)?,
    };
    let mut records = Vec::new();
    let mut skipped = BTreeMap::new();
    for (file, row, map) in &rows {
        match record(layout, map, *row) {
            Ok(mut r) => {
                r.file = file.clone();
                records.push(r)
            }
            Err((rule, message)) => {
                if options.bad_rows.skip.contains(&rule) {
                    *skipped.entry(rule).or_insert(0) += 1;
                } else {
                    return Err(Error::Row {
                        path: file.clone(),
                        line: *row,
                        message: format!(
                            "{} ({layout} layout): {message}",
                            rule.name(),
                            layout = layout.name()
                        ),
                    });
                }
            }
        }
    }
    Ok(Preferences {
        files,
        layout,
        rows: rows.len(),
        records,
        skipped,
    })
}

const DATA_EXTENSIONS: [&str; 4] = ["jsonl", "json", "parquet", "csv"];

fn is_data_file(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| DATA_EXTENSIONS.contains(&e))
}

/// The data files `source` names (see [`read_preferences`]), without reading them: what a
/// cache key of the data is made from.
pub fn source_files(source: &str, split: Option<&str>) -> Result<Vec<PathBuf>> {
    resolve(source, split)
}

/// The files of `source` (see [`read_preferences`]).
fn resolve(source: &str, split: Option<&str>) -> Result<Vec<PathBuf>> {
    let dir = match source.strip_prefix("hf:") {
        Some(name) => {
            let cache = crate::hub::cache_dir().ok_or_else(|| {
                Error::Source("no Hugging Face cache: set HF_HUB_CACHE or HF_HOME".into())
            })?;
            let repo = cache.join(format!("datasets--{}", name.replace('/', "--")));
            let rev = std::fs::read_to_string(repo.join("refs/main")).map_err(|e| Error::Io {
                path: repo.join("refs/main"),
                source: e,
            })?;
            repo.join("snapshots").join(rev.trim())
        }
        None => {
            let p = PathBuf::from(source);
            if !p.is_dir() {
                if !p.exists() {
                    return Err(Error::Io {
                        path: p,
                        source: std::io::Error::from(std::io::ErrorKind::NotFound),
                    });
                }
                return Ok(vec![p]);
            }
            p
        }
    };
    let mut files = Vec::new();
    let mut pending = vec![dir.clone()];
    while let Some(d) = pending.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| Error::Io {
            path: d.clone(),
            source: e,
        })?;
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                pending.push(p);
            } else if is_data_file(&p) {
                files.push(p);
            }
        }
    }
    files.sort();
    let split_of = |p: &Path| -> String {
        let rel = p
            .strip_prefix(&dir)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned();
        let stem = rel.rsplit('/').next().unwrap_or(&rel);
        // `data/train_prefs-00000-of-00001.parquet` → `train_prefs`; `test.jsonl` → `test`.
        stem.split(['-', '.']).next().unwrap_or(stem).to_string()
    };
    let splits: std::collections::BTreeSet<String> = files.iter().map(|p| split_of(p)).collect();
    let chosen: Vec<PathBuf> = match split {
        Some(s) => files.iter().filter(|p| split_of(p) == s).cloned().collect(),
        None if splits.len() <= 1 => files.clone(),
        None => {
            return Err(Error::Source(format!(
                "{source} has several splits ({}); choose one",
                splits.into_iter().collect::<Vec<_>>().join(", ")
            )))
        }
    };
    if chosen.is_empty() {
        return Err(Error::Source(format!(
            "{source}: no data files{} (found splits: {})",
            split
                .map(|s| format!(" of split `{s}`"))
                .unwrap_or_default(),
            splits.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(chosen)
}

fn polars_error(path: &Path) -> impl FnOnce(PolarsError) -> Error + '_ {
    move |e| Error::Table {
        path: path.to_path_buf(),
        message: format!("cannot read it as a table: {e}"),
    }
}

/// The rows of one file as JSON objects with their 1-based row numbers (lines, for JSON
/// lines). Parquet and CSV are read through polars. JSON and JSON lines are parsed row by row:
/// polars' JSON reader gives each column one type for every row, which would erase the very
/// differences of shape (a string here, a message list there; a number where a string
/// belongs) that layout detection and the bad-row rules must see.
fn read_rows(path: &Path) -> Result<Vec<(usize, Map<String, Value>)>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let io = |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let object = |line: usize, v: Value| match v {
        Value::Object(m) => Ok((line, m)),
        other => Err(Error::Row {
            path: path.to_path_buf(),
            line,
            message: format!("a row must be an object, found {}", kind(&other)),
        }),
    };
    match ext {
        "jsonl" => {
            let text = std::fs::read_to_string(path).map_err(io)?;
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    let v = serde_json::from_str(l).map_err(|e| Error::Row {
                        path: path.to_path_buf(),
                        line: i + 1,
                        message: format!("malformed JSON: {e}"),
                    })?;
                    object(i + 1, v)
                })
                .collect()
        }
        "json" => {
            let text = std::fs::read_to_string(path).map_err(io)?;
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::Table {
                path: path.to_path_buf(),
                message: format!("malformed JSON: {e}"),
            })?;
            let Value::Array(rows) = v else {
                return Err(Error::Table {
                    path: path.to_path_buf(),
                    message: "a JSON file must hold a list of rows".into(),
                });
            };
            rows.into_iter()
                .enumerate()
                .map(|(i, v)| object(i + 1, v))
                .collect()
        }
        _ => {
            let file = std::fs::File::open(path).map_err(io)?;
            let df = crate::guard::catch(|| match ext {
                "parquet" => ParquetReader::new(file).finish(),
                _ => CsvReadOptions::default()
                    .with_has_header(true)
                    .into_reader_with_file_handle(file)
                    .finish(),
            })
            .map_err(|panic| Error::Table {
                path: path.to_path_buf(),
                message: format!("cannot read it as a table: damaged ({panic})"),
            })?
            .map_err(polars_error(path))?;
            let mut columns = Vec::new();
            for s in df.columns() {
                let s = s.as_materialized_series();
                columns.push((s.name().to_string(), values(s).map_err(polars_error(path))?));
            }
            Ok((0..df.height())
                .map(|i| {
                    let row = columns
                        .iter()
                        .map(|(name, vals)| (name.clone(), vals[i].clone()))
                        .collect();
                    (i + 1, row)
                })
                .collect())
        }
    }
}

/// A column's values as JSON.
fn values(s: &Series) -> PolarsResult<Vec<Value>> {
    let n = s.len();
    Ok(match s.dtype() {
        DataType::String => s
            .str()?
            .iter()
            .map(|v| v.map_or(Value::Null, |x| Value::String(x.to_string())))
            .collect(),
        DataType::Boolean => s
            .bool()?
            .iter()
            .map(|v| v.map_or(Value::Null, Value::Bool))
            .collect(),
        DataType::Null => vec![Value::Null; n],
        d if d.is_integer() => s
            .cast(&DataType::Int64)?
            .i64()?
            .iter()
            .map(|v| v.map_or(Value::Null, Value::from))
            .collect(),
        d if d.is_float() => s
            .cast(&DataType::Float64)?
            .f64()?
            .iter()
            .map(|v| v.map_or(Value::Null, Value::from))
            .collect(),
        DataType::List(_) => {
            let mut out = Vec::with_capacity(n);
            for v in s.list()?.series_iter() {
                out.push(match v {
                    None => Value::Null,
                    Some(inner) => Value::Array(values(&inner)?),
                });
            }
            out
        }
        DataType::Struct(_) => {
            let sc = s.struct_()?;
            let fields: Vec<(String, Vec<Value>)> = sc
                .fields_as_series()
                .iter()
                .map(|f| Ok((f.name().to_string(), values(f)?)))
                .collect::<PolarsResult<_>>()?;
            (0..n)
                .map(|i| {
                    Value::Object(
                        fields
                            .iter()
                            .map(|(k, v)| (k.clone(), v[i].clone()))
                            .collect(),
                    )
                })
                .collect()
        }
        other => {
            return Err(PolarsError::ComputeError(
                format!(
                    "column `{}` has type {other}, which no layout uses",
                    s.name()
                )
                .into(),
            ))
        }
    })
}

/// The layout a row's shape says, if any.
fn shape_of(row: &Map<String, Value>) -> Option<Layout> {
    let has = |k: &str| row.get(k).is_some_and(|v| !v.is_null());
    if has("chosen_input_ids") && has("rejected_input_ids") {
        return Some(Layout::Tokenized);
    }
    match (row.get("chosen"), row.get("prompt")) {
        (Some(Value::Array(_)), _) => Some(Layout::Conversational),
        (Some(Value::String(c)), Some(Value::String(_))) if !c.is_empty() || has("prompt") => {
            Some(Layout::Standard)
        }
        (Some(Value::String(c)), _) if c.contains("\n\nHuman:") && c.contains("\n\nAssistant:") => {
            Some(Layout::Hh)
        }
        (Some(Value::String(_)), _) => Some(Layout::Implicit),
        _ => None,
    }
}

/// The layout of every row; rows that disagree are an error naming the first that differs.
fn detect(rows: &[(PathBuf, usize, Map<String, Value>)]) -> Result<Layout> {
    let mut found: Option<(Layout, &Path, usize)> = None;
    for (file, row, map) in rows {
        let Some(layout) = shape_of(map) else {
            continue; // a row no layout fits is reported by its rule when read
        };
        match found {
            None => found = Some((layout, file, *row)),
            Some((l, first_file, first_row)) if l != layout => {
                return Err(Error::Row {
                    path: file.clone(),
                    line: *row,
                    message: format!(
                        "this row is in the {} layout, but {}:{} is {}; force one with the `layout` option",
                        layout.name(),
                        first_file.display(),
                        first_row,
                        l.name()
                    ),
                })
            }
            Some(_) => {}
        }
    }
    found.map(|(l, _, _)| l).ok_or_else(|| {
        Error::Source(format!(
            "no row has `chosen` and `rejected` (or `chosen_input_ids` and `rejected_input_ids`); columns: {}",
            rows.first()
                .map(|(_, _, m)| m.keys().cloned().collect::<Vec<_>>().join(", "))
                .unwrap_or_else(|| "none (empty file)".into())
        ))
    })
}

type RowResult<T> = std::result::Result<T, (Rule, String)>;

fn field<'a>(row: &'a Map<String, Value>, key: &str) -> RowResult<&'a Value> {
    match row.get(key) {
        None | Some(Value::Null) => Err((Rule::MissingField, format!("no `{key}`"))),
        Some(v) => Ok(v),
    }
}

fn text(row: &Map<String, Value>, key: &str) -> RowResult<String> {
    match field(row, key)? {
        Value::String(s) => Ok(s.clone()),
        other => Err((
            Rule::WrongType,
            format!("`{key}` is {}, not a string", kind(other)),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn messages(row: &Map<String, Value>, key: &str) -> RowResult<Vec<Message>> {
    let Value::Array(items) = field(row, key)? else {
        return Err((
            Rule::WrongType,
            format!("`{key}` is not a list of messages"),
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| match (m.get("role"), m.get("content")) {
            (Some(Value::String(role)), Some(Value::String(content))) => Ok(Message {
                role: role.clone(),
                content: content.clone(),
            }),
            _ => Err((
                Rule::WrongType,
                format!("`{key}[{i}]` is not a message with string `role` and `content`"),
            )),
        })
        .collect()
}

fn tokens(row: &Map<String, Value>, key: &str) -> RowResult<Vec<u32>> {
    let Value::Array(items) = field(row, key)? else {
        return Err((
            Rule::WrongType,
            format!("`{key}` is not a list of token ids"),
        ));
    };
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| {
                    (
                        Rule::WrongType,
                        format!("`{key}` holds {v}, not a token id"),
                    )
                })
        })
        .collect()
}

/// The longest common prefix of `a` and `b`, backed off so that it ends at a word boundary
/// in both (after whitespace, or before whitespace or the end in each).
pub fn shared_prompt<'a>(a: &'a str, b: &str) -> &'a str {
    let mut end = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()));
    let boundary = |s: &str, i: usize| {
        i == 0
            || s[..i].ends_with(char::is_whitespace)
            || s[i..].chars().next().is_none_or(char::is_whitespace)
    };
    while end > 0 && !(boundary(a, end) && boundary(b, end)) {
        end = a[..end]
            .char_indices()
            .next_back()
            .map(|(i, _)| i)
            .unwrap_or(0);
    }
    &a[..end]
}

fn check_roles(conversation: &[Message]) -> RowResult<()> {
    let turns: Vec<&str> = conversation
        .iter()
        .map(|m| m.role.as_str())
        .skip_while(|r| *r == "system")
        .collect();
    for (i, r) in turns.iter().enumerate() {
        let want = if i % 2 == 0 { "user" } else { "assistant" };
        if *r != want {
            return Err((
                Rule::RolesNotAlternating,
                format!("turn {} is `{r}` where `{want}` was expected", i + 1),
            ));
        }
    }
    Ok(())
}

fn score(row: &Map<String, Value>, key: &str) -> Option<f64> {
    row.get(key).and_then(Value::as_f64)
}

/// One row in `layout` as a record, or the rule it breaks.
fn record(layout: Layout, row: &Map<String, Value>, index: usize) -> RowResult<PreferenceRecord> {
    let (prompt, chosen, rejected) = match layout {
        Layout::Standard => (
            Turns::Text(text(row, "prompt")?),
            Turns::Text(text(row, "chosen")?),
            Turns::Text(text(row, "rejected")?),
        ),
        Layout::Implicit => {
            let (c, r) = (text(row, "chosen")?, text(row, "rejected")?);
            let p = shared_prompt(&c, &r).to_string();
            if p.trim().is_empty() && c != r {
                return Err((
                    Rule::NoSharedPrompt,
                    "`chosen` and `rejected` share no prefix".into(),
                ));
            }
            let (cr, rr) = (c[p.len()..].to_string(), r[p.len()..].to_string());
            (Turns::Text(p), Turns::Text(cr), Turns::Text(rr))
        }
        Layout::Hh => {
            let (c, r) = (text(row, "chosen")?, text(row, "rejected")?);
            const ASSISTANT: &str = "\n\nAssistant:";
            let Some(at) = c.rfind(ASSISTANT) else {
                return Err((
                    Rule::NoSharedPrompt,
                    "`chosen` has no `\\n\\nAssistant:` turn".into(),
                ));
            };
            let p = &c[..at + ASSISTANT.len()];
            let Some(rest) = r.strip_prefix(p) else {
                return Err((
                    Rule::NoSharedPrompt,
                    "`rejected` does not continue the dialogue `chosen` continues".into(),
                ));
            };
            (
                Turns::Text(p.to_string()),
                Turns::Text(c[p.len()..].to_string()),
                Turns::Text(rest.to_string()),
            )
        }
        Layout::Conversational => {
            let mut c = messages(row, "chosen")?;
            let mut r = messages(row, "rejected")?;
            let prompt: Vec<Message> = match row.get("prompt") {
                Some(Value::String(p)) => vec![Message {
                    role: "user".into(),
                    content: p.clone(),
                }],
                Some(Value::Array(_)) => messages(row, "prompt")?,
                Some(Value::Null) | None => {
                    // Implicit: the messages both share from the start, up to the last user turn.
                    let shared = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
                    let upto = c[..shared]
                        .iter()
                        .rposition(|m| m.role == "user")
                        .map(|i| i + 1)
                        .unwrap_or(0);
                    c[..upto].to_vec()
                }
                Some(other) => {
                    return Err((
                        Rule::WrongType,
                        format!("`prompt` is {}, not a string or messages", kind(other)),
                    ))
                }
            };
            if prompt.is_empty() {
                return Err((
                    Rule::NoSharedPrompt,
                    "no user turn both responses share".into(),
                ));
            }
            // The prompt's turns repeated at the head of each response are the prompt's.
            for side in [&mut c, &mut r] {
                if side.len() >= prompt.len() && side[..prompt.len()] == prompt[..] {
                    side.drain(..prompt.len());
                }
            }
            let mut whole = prompt.clone();
            whole.extend(c.iter().cloned());
            check_roles(&whole)?;
            let mut whole = prompt.clone();
            whole.extend(r.iter().cloned());
            check_roles(&whole)?;
            (
                Turns::Messages(prompt),
                Turns::Messages(c),
                Turns::Messages(r),
            )
        }
        Layout::Tokenized => (
            Turns::Tokens(tokens(row, "prompt_input_ids").or_else(|(rule, m)| {
                if rule == Rule::MissingField {
                    Ok(Vec::new())
                } else {
                    Err((rule, m))
                }
            })?),
            Turns::Tokens(tokens(row, "chosen_input_ids")?),
            Turns::Tokens(tokens(row, "rejected_input_ids")?),
        ),
    };
    if chosen.is_empty() || rejected.is_empty() {
        return Err((
            Rule::EmptyResponse,
            format!(
                "the {} response is empty",
                if chosen.is_empty() {
                    "chosen"
                } else {
                    "rejected"
                }
            ),
        ));
    }
    if chosen == rejected {
        return Err((
            Rule::IdenticalResponses,
            "`chosen` equals `rejected`".into(),
        ));
    }
    let id = ["prompt_id", "id"].iter().find_map(|k| match row.get(*k) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    });
    Ok(PreferenceRecord {
        prompt,
        chosen,
        rejected,
        score_chosen: score(row, "score_chosen"),
        score_rejected: score(row, "score_rejected"),
        id,
        file: PathBuf::new(),
        row: index,
    })
}

/// Mean, median, 95th percentile and maximum of `xs` (zeros when empty).
fn stats(mut xs: Vec<usize>) -> (f64, usize, usize, usize) {
    if xs.is_empty() {
        return (0.0, 0, 0, 0);
    }
    xs.sort_unstable();
    let at = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize];
    let mean = xs.iter().sum::<usize>() as f64 / xs.len() as f64;
    (mean, at(0.5), at(0.95), xs[xs.len() - 1])
}

impl Preferences {
    /// A plain-text summary: files, layout, counts, every rule's count, length statistics,
    /// scores when present, and the first record rendered (conversations through `template`).
    pub fn summary(&self, template: &crate::chat::ChatTemplate) -> Result<String> {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        for f in &self.files {
            line(format!("file:     {}", f.display()));
        }
        line(format!("layout:   {}", self.layout.name()));
        line(format!(
            "rows:     {} read, {} kept, {} skipped",
            self.rows,
            self.records.len(),
            self.skipped.values().sum::<usize>()
        ));
        let rules: Vec<String> = Rule::ALL
            .iter()
            .map(|(name, r)| format!("{name} {}", self.skipped.get(r).copied().unwrap_or(0)))
            .collect();
        line(format!("skipped by rule: {}", rules.join(", ")));
        let unit = if self.layout == Layout::Tokenized {
            "tokens"
        } else {
            "characters"
        };
        line(format!(
            "lengths ({unit}):  {:>8} {:>6} {:>6} {:>6}",
            "mean", "p50", "p95", "max"
        ));
        for (name, side) in [("prompt", 0usize), ("chosen", 1), ("rejected", 2)] {
            let sizes = self
                .records
                .iter()
                .map(|r| [&r.prompt, &r.chosen, &r.rejected][side].size())
                .collect();
            let (mean, p50, p95, max) = stats(sizes);
            line(format!(
                "  {name:<9}            {mean:>8.1} {p50:>6} {p95:>6} {max:>6}"
            ));
        }
        let scored: Vec<(f64, f64)> = self
            .records
            .iter()
            .filter_map(|r| Some((r.score_chosen?, r.score_rejected?)))
            .collect();
        if !scored.is_empty() {
            let n = scored.len() as f64;
            line(format!(
                "scores:   chosen mean {:.3}, rejected mean {:.3} ({} rows with both)",
                scored.iter().map(|s| s.0).sum::<f64>() / n,
                scored.iter().map(|s| s.1).sum::<f64>() / n,
                scored.len()
            ));
        }
        if let Some(r) = self.records.first() {
            line(format!("example (row {}):", r.row));
            let show = |t: &Turns, generation: bool| -> Result<String> {
                Ok(match t {
                    Turns::Text(s) => s.clone(),
                    Turns::Messages(m) => template.render(m, generation)?,
                    Turns::Tokens(ids) => format!("{ids:?}"),
                })
            };
            line(format!("  prompt:   {:?}", show(&r.prompt, true)?));
            let response = |t: &Turns| match t {
                Turns::Messages(m) => m
                    .iter()
                    .map(|m| m.content.as_str())
                    .collect::<Vec<_>>()
                    .join(" / "),
                other => show(other, false).unwrap_or_default(),
            };
            line(format!("  chosen:   {:?}", response(&r.chosen)));
            line(format!("  rejected: {:?}", response(&r.rejected)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implicit_prompts_end_at_a_word_boundary_in_both_texts() {
        assert_eq!(
            shared_prompt("The answer is yes.", "The answer is no."),
            "The answer is "
        );
        // The shared final word of the prefix is not cut into.
        assert_eq!(shared_prompt("It is yes", "It is yesterday"), "It is ");
        assert_eq!(shared_prompt("Q: hi A: ok", "Q: hi A: ok"), "Q: hi A: ok");
        assert_eq!(shared_prompt("abc", "abd"), "");
        assert_eq!(shared_prompt("héllo wörld", "héllo wörth"), "héllo ");
    }
}
