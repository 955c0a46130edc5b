//! User preference data (`kind: preferences`): a dataset in any layout and format
//! [`edpo_data::preferences`] reads (a file, a directory, or `hf:ORG/NAME` in the Hugging Face
//! cache), a pretrained reference ([`super::pretrained`]: GGUF, Hugging Face directory,
//! `hf:ORG/NAME[@REV]`), tokenised by a documented convention through the chat template the
//! config names ([`edpo_data::tokenization`]), bad rows and over-budget prompts handled by named
//! rules.
//!
//! Splits are by prompt, so no prompt text crosses them: the distinct prompts are shuffled with
//! `task.seed` and taken in turn for the test side (until it holds `eval_pairs` pairs and
//! `eval_prompts` prompts), then the validation pairs (`val_pairs`), the rest training; or, with `task.test_split`, the test pairs come from that
//! split of the same source (those whose prompt is a training or validation prompt dropped and
//! counted). The
//! test pairs are the test side's first `eval_pairs`; the test prompts its first `eval_prompts`
//! distinct prompts that leave room for `response_tokens` within the model's context.
//!
//! Such data has no gold reward: a run is evaluated by exact and sampled KL on the test prompts,
//! preference accuracy and the log-ratio margin on the test pairs, and chooses its settings by
//! the validation pairs' preference accuracy ([`crate::evaluate`]); its answers go to the public
//! judges (`edpo generate`), whose results the report reads back. What the preparation read,
//! skipped and truncated is the stage's `data_summary.txt`, copied into every run directory.

use super::{pretrained, write_jsonl, write_pairs, LabelledPair, ModelShape, TaskData};
use crate::check::check;
use crate::stages::StageCache;
use anyhow::{Context, Result};
use edpo_data::chat::ChatTemplate;
use edpo_data::preferences::{read_preferences, source_files, BadRows, Layout, ReadOptions, Rule};
use edpo_data::rng::SplitMix64;
use edpo_data::tokenization::{length_summary, tokenize_all, Budget, Convention, OverBudget};
use edpo_data::{PairTokenizer, TokenizedPair};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The user-data task's section as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPreferences {
    data: String,
    split: Option<String>,
    test_split: Option<String>,
    layout: Option<String>,
    skip: Option<Vec<String>>,
    prompt_over_budget: Option<String>,
    tokenization: Option<String>,
    max_length: Option<usize>,
    max_prompt_length: Option<usize>,
    reference: String,
    reference_sha256: Option<String>,
    chat_template: Option<String>,
    train_pairs: Option<usize>,
    eval_pairs: Option<usize>,
    val_pairs: Option<usize>,
    eval_prompts: Option<usize>,
    response_tokens: Option<usize>,
    seed: Option<u64>,
}

/// The resolved user-data task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PreferencesTask {
    /// The data: a file, a directory, or `hf:ORG/NAME` in the Hugging Face cache.
    pub data: String,
    /// The split the training (and, without `test_split`, every) pair comes from.
    pub split: Option<String>,
    /// A split of the same source for the test pairs (`None`: split off the training data).
    pub test_split: Option<String>,
    /// The layout, forced (`None`: detected from every row).
    pub layout: Option<String>,
    /// Bad-row rules whose rows are skipped and counted rather than an error.
    pub skip: Vec<String>,
    /// `error`, `skip` or `truncate`: what a prompt over budget gets.
    pub prompt_over_budget: String,
    /// `separate` (prompt and response apart, EOS id appended) or `joint`.
    pub tokenization: String,
    /// Prompt plus response, in tokens (also at most the model's context).
    pub max_length: usize,
    /// The prompt, in tokens.
    pub max_prompt_length: usize,
    /// The pretrained reference (also the starting policy).
    pub reference: String,
    /// Expected SHA-256 of the reference file.
    pub reference_sha256: Option<String>,
    /// The chat template conversations are rendered with: `model` or a name; `None`: none.
    pub chat_template: Option<String>,
    /// At most this many training pairs, the first in the data's order (`None`: all).
    pub train_pairs: Option<usize>,
    /// Test pairs (preference accuracy), and whose prompts the KL is measured on.
    pub eval_pairs: usize,
    /// Validation pairs (settings are chosen by their preference accuracy).
    pub val_pairs: usize,
    /// Test prompts the policy is sampled on for KL, entropy and length.
    pub eval_prompts: usize,
    /// Longest sampled response, EOS included.
    pub response_tokens: usize,
    /// Seed of the split.
    pub seed: u64,
}

impl RawPreferences {
    /// Fills defaults and validates.
    pub fn resolve(self) -> Result<PreferencesTask> {
        let task = PreferencesTask {
            data: self.data,
            split: self.split,
            test_split: self.test_split,
            layout: self.layout,
            skip: self.skip.unwrap_or_default(),
            prompt_over_budget: self
                .prompt_over_budget
                .unwrap_or_else(|| OverBudget::Error.name().into()),
            tokenization: self.tokenization.unwrap_or_else(|| "separate".into()),
            max_length: self.max_length.unwrap_or(512),
            max_prompt_length: self.max_prompt_length.unwrap_or(256),
            reference: self.reference,
            reference_sha256: self.reference_sha256.map(|d| d.to_ascii_lowercase()),
            chat_template: self.chat_template,
            train_pairs: self.train_pairs,
            eval_pairs: self.eval_pairs.unwrap_or(256),
            val_pairs: self.val_pairs.unwrap_or(128),
            eval_prompts: self.eval_prompts.unwrap_or(64),
            response_tokens: self.response_tokens.unwrap_or(64),
            seed: self.seed.unwrap_or(0),
        };
        let named = |key: &str, r: edpo_data::Result<()>| -> Result<()> {
            r.map_err(|e| anyhow::anyhow!("key `{key}`: {e}"))
        };
        if let Some(l) = &task.layout {
            named("task.layout", Layout::parse(l).map(|_| ()))?;
        }
        for r in &task.skip {
            if r != "all" {
                named("task.skip", Rule::parse(r).map(|_| ()))?;
            }
        }
        named(
            "task.prompt_over_budget",
            OverBudget::parse(&task.prompt_over_budget).map(|_| ()),
        )?;
        named(
            "task.tokenization",
            Convention::parse(&task.tokenization).map(|_| ()),
        )?;
        pretrained::check_keys(
            Some(&task.reference),
            task.reference_sha256.as_deref(),
            task.chat_template.as_deref(),
        )?;
        check(
            task.max_prompt_length >= 1 && task.max_prompt_length < task.max_length,
            "task.max_prompt_length",
            "must be at least 1 and below task.max_length (a response needs room)",
        )?;
        check(
            task.train_pairs != Some(0),
            "task.train_pairs",
            "must be at least 1",
        )?;
        check(
            task.eval_pairs >= 1,
            "task.eval_pairs",
            "must be at least 1",
        )?;
        check(task.val_pairs >= 1, "task.val_pairs", "must be at least 1")?;
        check(
            task.eval_prompts >= 2,
            "task.eval_prompts",
            "must be at least 2",
        )?;
        check(
            task.response_tokens >= 2,
            "task.response_tokens",
            "must be at least 2",
        )?;
        Ok(task)
    }
}

impl PreferencesTask {
    fn read_options(&self, split: Option<&String>) -> Result<ReadOptions> {
        let skip = if self.skip.iter().any(|s| s == "all") {
            Rule::ALL.map(|(_, r)| r).to_vec()
        } else {
            self.skip
                .iter()
                .map(|s| Rule::parse(s))
                .collect::<edpo_data::Result<_>>()?
        };
        Ok(ReadOptions {
            layout: self.layout.as_deref().map(Layout::parse).transpose()?,
            split: split.cloned(),
            bad_rows: BadRows { skip },
        })
    }
}

/// The identity of the data files the task reads (path, size, modification time, for the
/// training split and the test split), recorded in the pairs stage: data changed under the
/// same name is noticed and the stage rebuilt. (It is not part of the stage's key, which
/// depends on the config alone, the same on every machine.)
fn files_identity(task: &PreferencesTask) -> Result<serde_json::Value> {
    let mut out = Vec::new();
    let mut splits = vec![task.split.as_deref()];
    if let Some(t) = &task.test_split {
        splits.push(Some(t.as_str()));
    }
    for split in splits {
        let files = source_files(&task.data, split)
            .with_context(|| format!("key `task.data`: cannot find {}", task.data))?;
        for f in files {
            let meta = std::fs::metadata(&f)
                .with_context(|| format!("key `task.data`: cannot read {}", f.display()))?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos().to_string());
            out.push(json!([f.display().to_string(), meta.len(), modified]));
        }
    }
    Ok(serde_json::Value::Array(out))
}

/// The pairs stage's record of [`files_identity`].
const SOURCE_FILES: &str = "source_files.json";

/// The task's stage keys, in build order: the reference, then the pairs.
pub fn stage_keys(task: &PreferencesTask) -> Vec<(&'static str, serde_json::Value)> {
    let reference = pretrained::stage_key(&task.reference, task.reference_sha256.as_deref());
    let pairs = json!({"stage": "preference-data", "reference": reference, "task": task,
        "split_by": "prompt"});
    vec![("reference", reference), ("pairs", pairs)]
}

/// The task's stages.
pub fn prepare(task: &PreferencesTask, cache: &StageCache) -> Result<TaskData> {
    let keys = stage_keys(task);
    let (reference_dir, _) = cache.get_or_build("reference", &keys[0].1, |dir| {
        pretrained::convert(&task.reference, task.reference_sha256.as_deref(), dir)
    })?;
    let (tokenizer, context) = pretrained::tokenizer(&reference_dir)?;
    let template = pretrained::template(
        task.chat_template.as_deref(),
        &reference_dir,
        &task.reference,
    )?;
    let identity = files_identity(task)?;
    let build = |dir: &Path| -> Result<()> {
        build_pairs(task, &tokenizer, template.as_ref(), context, dir)?;
        std::fs::write(
            dir.join(SOURCE_FILES),
            serde_json::to_string_pretty(&identity)?,
        )?;
        Ok(())
    };
    let (mut pairs_dir, mut built) = cache.get_or_build("pairs", &keys[1].1, build)?;
    let recorded: Option<serde_json::Value> = std::fs::read_to_string(pairs_dir.join(SOURCE_FILES))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    if recorded.as_ref() != Some(&identity) {
        tracing::warn!(
            dir = %pairs_dir.display(),
            "the data files changed since the pairs stage was built; rebuilding it"
        );
        std::fs::remove_dir_all(&pairs_dir)
            .with_context(|| format!("cannot remove {}", pairs_dir.display()))?;
        (pairs_dir, built) = cache.get_or_build("pairs", &keys[1].1, build)?;
    }
    let data = TaskData::from_pairs_stage(
        None,
        tokenizer.eos_id(),
        reference_dir,
        &pairs_dir,
        task.response_tokens,
        keys[1].1.clone(),
    )?;
    if built {
        if let Some(s) = &data.data_summary {
            tracing::info!("prepared {}:\n{}", task.data, s.trim_end());
        }
    }
    Ok(data)
}

/// A pair's ids and the data's scores of its two responses, when it has both.
type ScoredPair = (TokenizedPair, Option<[f64; 2]>);

/// A read and tokenised split: the records' ids in the data's order, each with the data's
/// scores of its two responses when it has both, and the summary lines.
fn read_split(
    task: &PreferencesTask,
    split: Option<&String>,
    tokenizer: &PairTokenizer,
    template: Option<&ChatTemplate>,
    budget: Budget,
) -> Result<(Vec<ScoredPair>, String)> {
    let options = task.read_options(split)?;
    let read = read_preferences(&task.data, &options)
        .with_context(|| format!("key `task.data`: cannot read {}", task.data))?;
    let convention = Convention::parse(&task.tokenization)?;
    let over_budget = OverBudget::parse(&task.prompt_over_budget)?;
    let (pairs, counts) = tokenize_all(
        &read.records,
        tokenizer,
        template,
        convention,
        budget,
        over_budget,
    )
    .context("key `task.data`")?;
    if counts.prefix_mismatches > 0 {
        tracing::warn!(
            records = counts.prefix_mismatches,
            "joint tokenisation: the whole sequence does not start with the prompt's own ids \
             (a merge across the prompt's end); the response ids are taken after the prompt's length"
        );
    }
    let vocab = tokenizer.vocab_size();
    for (i, p) in &pairs {
        let bad = [&p.prompt, &p.chosen, &p.rejected]
            .into_iter()
            .flatten()
            .find(|&&id| id as usize >= vocab);
        if let Some(id) = bad {
            let r = &read.records[*i];
            anyhow::bail!(
                "{}:{}: token id {id} is outside the reference's vocabulary of {vocab}",
                r.file.display(),
                r.row
            );
        }
    }
    let shown = match template {
        Some(t) => t.clone(),
        None => ChatTemplate::named("chatml")?,
    };
    let mut summary = String::new();
    summary.push_str(&format!(
        "source:   {}{}\n",
        task.data,
        split.map(|s| format!(" (split {s})")).unwrap_or_default()
    ));
    summary.push_str(&read.summary(&shown)?);
    summary.push_str(&counts.summary(over_budget));
    let scored = pairs
        .into_iter()
        .map(|(i, p)| {
            let r = &read.records[i];
            let scores = r.score_chosen.zip(r.score_rejected).map(|(c, r)| [c, r]);
            (p, scores)
        })
        .collect();
    Ok((scored, summary))
}

/// Reads, tokenises and splits the data into a pairs stage in `dir`.
fn build_pairs(
    task: &PreferencesTask,
    tokenizer: &PairTokenizer,
    template: Option<&ChatTemplate>,
    context: usize,
    dir: &Path,
) -> Result<()> {
    let budget = Budget {
        max_length: Some(task.max_length.min(context)),
        max_prompt_length: Some(task.max_prompt_length),
    };
    let (all, mut summary) = read_split(task, task.split.as_ref(), tokenizer, template, budget)?;
    let labelled = |(p, scores): ScoredPair| LabelledPair {
        prompt_input_ids: p.prompt,
        chosen_input_ids: p.chosen,
        rejected_input_ids: p.rejected,
        p_true: None,
        chosen_reward: None,
        rejected_reward: None,
        scores,
    };
    // Distinct prompts in a seeded order; each prompt's pairs stay together.
    let mut groups: Vec<Vec<u32>> = Vec::new();
    let mut members: HashMap<Vec<u32>, Vec<usize>> = HashMap::new();
    for (i, p) in all.iter().enumerate() {
        let entry = members.entry(p.0.prompt.clone()).or_default();
        if entry.is_empty() {
            groups.push(p.0.prompt.clone());
        }
        entry.push(i);
    }
    SplitMix64(task.seed ^ 0x5E1F).shuffle(&mut groups);
    let mut side = vec![0u8; all.len()]; // 0 train, 1 validation, 2 test
    let mut wanted = [(1u8, task.val_pairs)].to_vec();
    if task.test_split.is_none() {
        wanted.insert(0, (2, task.eval_pairs));
    }
    let mut g = groups.iter();
    for (which, n) in wanted {
        // The test side also needs `eval_prompts` distinct prompts for the KL.
        let prompts_needed = if which == 2 { task.eval_prompts } else { 0 };
        let (mut taken, mut prompts_taken) = (0, 0);
        while taken < n || prompts_taken < prompts_needed {
            let Some(prompt) = g.next() else { break };
            for &i in &members[prompt] {
                side[i] = which;
            }
            taken += members[prompt].len();
            prompts_taken += 1;
        }
    }
    let mut parts: [Vec<LabelledPair>; 3] = Default::default();
    for (p, s) in all.into_iter().zip(&side) {
        parts[*s as usize].push(labelled(p));
    }
    let [mut train, mut val, mut test] = parts;
    val.truncate(task.val_pairs);
    if let Some(n) = task.train_pairs {
        train.truncate(n);
    }
    let mut dropped = 0;
    if let Some(split) = &task.test_split {
        let (pairs, test_summary) = read_split(task, Some(split), tokenizer, template, budget)?;
        summary.push_str(&test_summary);
        let seen: HashSet<&Vec<u32>> = train
            .iter()
            .chain(&val)
            .map(|p| &p.prompt_input_ids)
            .collect();
        for p in pairs {
            if seen.contains(&p.0.prompt) {
                dropped += 1;
            } else {
                test.push(labelled(p));
            }
        }
    }
    // Test prompts from every test-side pair; accuracy on the first `eval_pairs`.
    let mut prompts: Vec<Vec<u32>> = Vec::new();
    let mut too_long = 0;
    let mut distinct: HashSet<&Vec<u32>> = HashSet::new();
    for p in &test {
        if prompts.len() == task.eval_prompts {
            break;
        }
        if !distinct.insert(&p.prompt_input_ids) {
            continue;
        }
        if p.prompt_input_ids.len() + task.response_tokens > context {
            too_long += 1;
        } else {
            prompts.push(p.prompt_input_ids.clone());
        }
    }
    test.truncate(task.eval_pairs);
    check(!train.is_empty(), "task.data", "no training pairs are left")?;
    check(
        !test.is_empty(),
        "task.eval_pairs",
        "no test pairs are left (the data has too few distinct prompts)",
    )?;
    check(
        !val.is_empty(),
        "task.val_pairs",
        "no validation pairs are left (the data has too few distinct prompts)",
    )?;
    check(
        prompts.len() >= 2,
        "task.eval_prompts",
        format!(
            "fewer than 2 test prompts leave room for {} response tokens in the context of {context}",
            task.response_tokens
        ),
    )?;
    summary.push_str(&format!(
        "split by prompt (seed {}): train {} pairs, validation {}, test {}{}\n",
        task.seed,
        train.len(),
        val.len(),
        test.len(),
        if task.test_split.is_some() {
            format!(
                " ({dropped} test pairs dropped: their prompt is a training or validation prompt)"
            )
        } else {
            String::new()
        }
    ));
    summary.push_str(&format!(
        "test prompts for KL: {} ({too_long} passed over: no room for {} response tokens)\n",
        prompts.len(),
        task.response_tokens
    ));
    summary.push_str("training pairs, ");
    let ids: Vec<TokenizedPair> = train.iter().map(LabelledPair::tokenized).collect();
    summary.push_str(&length_summary(&ids.iter().collect::<Vec<_>>()));
    write_pairs(dir, &train, &test, &prompts, &[])?;
    write_jsonl(&dir.join(super::VAL_PAIRS), &val)?;
    std::fs::write(dir.join(edpo_rundir::DATA_SUMMARY), summary)
        .with_context(|| format!("cannot write {}", dir.display()))?;
    Ok(())
}

/// The shape a config gives is not used: the pretrained reference defines the model.
pub const DEFAULT_SHAPE: ModelShape = super::sentiment::DEFAULT_SHAPE;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn write_rows(path: &Path, n: usize) {
        let rows: Vec<String> = (0..n)
            .map(|i| {
                // Prompts repeat (i % 8), so a prompt's pairs must stay on one side.
                json!({"prompt": format!("Film {}:", i % 8), "chosen": format!(" great {i}"),
                       "rejected": " bad"})
                .to_string()
            })
            .collect();
        std::fs::write(path, rows.join("\n")).expect("write rows");
    }

    #[test]
    fn splits_are_by_prompt_and_changed_data_rebuilds_the_stage() -> Result<()> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let gguf = root.join("testdata/gguf/tiny-llama-f32.gguf");
        let tmp_dir = tempfile::Builder::new()
            .prefix("edpo-user-task-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp_dir.path().join("user-task");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let data = dir.join("pairs.jsonl");
        write_rows(&data, 16);
        let raw: RawPreferences = serde_yaml::from_str(&format!(
            "{{data: {:?}, reference: {:?}, max_length: 40, max_prompt_length: 20,
              eval_pairs: 3, val_pairs: 2, eval_prompts: 2, response_tokens: 4}}",
            data.display().to_string(),
            gguf.display().to_string()
        ))?;
        let task = raw.resolve()?;
        let cache = StageCache::new(&dir.join("cache"));
        let prepared = prepare(&task, &cache)?;
        assert!(prepared.judge.is_none());
        let prompts = |pairs: &[LabelledPair]| -> HashSet<Vec<u32>> {
            pairs.iter().map(|p| p.prompt_input_ids.clone()).collect()
        };
        let (train, val, test) = (
            prompts(&prepared.train),
            prompts(&prepared.val_pairs),
            prompts(&prepared.eval_pairs),
        );
        assert!(train.is_disjoint(&val) && train.is_disjoint(&test) && val.is_disjoint(&test));
        // Each prompt has two pairs: test takes two prompts (4 pairs, cut to 3), validation one.
        assert_eq!(
            (prepared.eval_pairs.len(), prepared.val_pairs.len()),
            (3, 2)
        );
        assert_eq!(prepared.train.len(), 16 - 4 - 2);
        assert_eq!(prepared.eval_prompts.len(), 2);
        assert!(prepared.train.iter().all(|p| p.p_true.is_none()));
        let summary = prepared.data_summary.clone().expect("summary");
        assert!(summary.contains("layout:   standard"), "{summary}");
        assert!(
            summary.contains("train 10 pairs, validation 2, test 3"),
            "{summary}"
        );
        // The same config again reads the stage back.
        assert_eq!(prepare(&task, &cache)?.train, prepared.train);
        // The data changed under the same name: the stage is rebuilt from it.
        write_rows(&data, 24);
        let again = prepare(&task, &cache)?;
        // Three pairs a prompt now: two prompts on the test side (6 pairs, 3 kept), one for
        // validation (3 pairs, 2 kept; the third is on no side, so no prompt crosses).
        assert_eq!(again.train.len(), 24 - 6 - 3);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn keys_are_checked() {
        let err = |yaml: &str| {
            serde_yaml::from_str::<RawPreferences>(yaml)
                .map_err(anyhow::Error::from)
                .and_then(RawPreferences::resolve)
                .map(|_| ())
                .expect_err(yaml)
                .to_string()
        };
        let base = "data: d.jsonl, reference: m.gguf";
        assert!(err(&format!("{{{base}, layout: tabular}}")).contains("task.layout"));
        assert!(err(&format!("{{{base}, skip: [nonesuch]}}")).contains("task.skip"));
        assert!(err(&format!("{{{base}, tokenization: bpe}}")).contains("task.tokenization"));
        assert!(
            err(&format!("{{{base}, max_length: 8, max_prompt_length: 8}}"))
                .contains("task.max_prompt_length")
        );
        assert!(err(&format!("{{{base}, val_pairs: 0}}")).contains("task.val_pairs"));
        assert!(err("{reference: m.gguf}").contains("data"));
    }
}
