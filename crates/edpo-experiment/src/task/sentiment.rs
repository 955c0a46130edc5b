//! The default experiment: controlled sentiment generation on real movie-review text.
//!
//! The CPU-sized counterpart of the DPO paper's IMDb experiment. Stages, each cached by a hash
//! of what it depends on:
//! 1. snippets: the rated Rotten Tomatoes snippets, checksum-verified, cleaned and split by a
//!    stable hash (polars; Parquet out, with counts and length statistics);
//! 2. tokenizer: a byte-level BPE trained on the training split;
//! 3. gold: ridge regression on word n-grams fitted to the training split's human ratings,
//!    its penalty chosen on the validation split and its correlation reported on the test
//!    split;
//! 4. reference: a small GPT-2 pre-trained on the training texts (saved in the Hugging Face
//!    layout, tokenizer included) — π_ref and the starting policy;
//! 5. pairs: prompts are the first few words of training snippets, two continuations each are
//!    sampled from π_ref, scored by the gold model on prompt + continuation, and labelled by a
//!    Bradley–Terry draw. Held-out pairs and the test prompts every reported number uses
//!    come from the test split; the validation prompts that settings are chosen on come from
//!    the validation split.
//!
//! With `reference:` set to a pretrained model (a GGUF file, a Hugging Face directory or
//! `hf:ORG/NAME[@REV]`), stages 2 and 4 are replaced by that model (converted once to the
//! Hugging Face layout, its own tokenizer kept; `reference_sha256` pins a file's contents), and
//! the prompts can be given as a chat message: `prompt_format` writes the user's message
//! around the prefix (`{prefix}`), `chat_template` (`model`: the checkpoint's own, or
//! `chatml`, `llama3`, `smollm2`) renders it with the generation prompt, and the response is
//! the assistant's turn. The gold reward always reads the prefix followed by the response, so
//! a chat model is judged on the review it continues, not on the template around it.

use super::ModelShape;
use super::{check_pairs, gpt2_config, pretrained, write_pairs, Judge, TaskData};
use crate::check::check;
use crate::pairs::{pair_sampling, rso_pairs, sample_pairs, RsoSampling};
use crate::stages::StageCache;
use anyhow::{anyhow, bail, Context, Result};
use edpo_data::bpe::{train_bpe, EOS};
use edpo_data::chat::{ChatTemplate, Message};
use edpo_data::rng::SplitMix64;
use edpo_data::snippets::{self, Snippet};
use edpo_data::PairTokenizer;
use edpo_eval::gold::{pearson, GoldModel, Lexicon};
use edpo_model::CausalLm;
use edpo_train::{AdamWConfig, SftTrainer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The sentiment task's section as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSentiment {
    data: Option<String>,
    sha256: Option<String>,
    lexicon: Option<String>,
    vocab_size: Option<usize>,
    prompt_words_min: Option<usize>,
    prompt_words_max: Option<usize>,
    response_tokens: Option<usize>,
    train_pairs: Option<usize>,
    eval_pairs: Option<usize>,
    eval_prompts: Option<usize>,
    val_prompts: Option<usize>,
    bt_temperature: Option<f64>,
    pretrain_steps: Option<usize>,
    gold_buckets: Option<usize>,
    seed: Option<u64>,
    reference: Option<String>,
    reference_sha256: Option<String>,
    chat_template: Option<String>,
    prompt_format: Option<String>,
    rso: Option<RsoSampling>,
}

/// The resolved sentiment task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SentimentTask {
    /// The snippets file (TSV: id, mean rating, text).
    pub data: String,
    /// Its expected SHA-256 (`None`: not checked).
    pub sha256: Option<String>,
    /// The VADER lexicon, for the second judge.
    pub lexicon: String,
    /// BPE vocabulary size, EOS included.
    pub vocab_size: usize,
    /// Prompts are the first `prompt_words_min..=prompt_words_max` words of a snippet.
    pub prompt_words_min: usize,
    /// See `prompt_words_min`.
    pub prompt_words_max: usize,
    /// Maximum response length in tokens, EOS included.
    pub response_tokens: usize,
    /// Training pairs.
    pub train_pairs: usize,
    /// Held-out pairs.
    pub eval_pairs: usize,
    /// Test prompts: every reported number is measured on them.
    pub eval_prompts: usize,
    /// Validation prompts: settings are chosen on them, never on the test prompts.
    pub val_prompts: usize,
    /// τ of the Bradley–Terry labels, in rating units.
    pub bt_temperature: f64,
    /// Optimizer steps of the reference LM's pre-training.
    pub pretrain_steps: usize,
    /// Hash buckets of the gold model's n-gram features.
    pub gold_buckets: usize,
    /// Seed of the tokenizer, reference and pairs.
    pub seed: u64,
    /// A pretrained reference (GGUF file, Hugging Face directory, `hf:ORG/NAME[@REV]`) in
    /// place of the GPT-2 the task pre-trains; `None`: pre-train one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Expected SHA-256 of the pretrained reference file (checked when it is converted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_sha256: Option<String>,
    /// The chat template the prompts are rendered with: `model` (the reference's own) or a
    /// name ([`edpo_data::chat::ChatTemplate::named`]); `None`: plain text prompts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// The prompt text around the review prefix (`{prefix}`).
    #[serde(skip_serializing_if = "is_plain_format")]
    pub prompt_format: String,
    /// RSO's pair sampling for the training pairs (`{candidates, beta}`): on the same training
    /// prompts as the plain pairs, the two responses accepted by statistical rejection
    /// sampling towards `π_ref·exp(r/β)`; held-out pairs, validation and test prompts are the
    /// plain stage's. `None`: two independent draws from the reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rso: Option<RsoSampling>,
}

/// The prompt format that is the prefix alone.
const PLAIN_FORMAT: &str = "{prefix}";

fn is_plain_format(f: &str) -> bool {
    f == PLAIN_FORMAT
}

/// The snippets shipped in `datasets/` and their recorded checksum.
pub const SNIPPETS_PATH: &str = "datasets/movie-snippets/movieReviewSnippets_GroundTruth.txt";
/// SHA-256 of the snippets file as `vaderSentiment` 3.3.2 ships it.
pub const SNIPPETS_SHA256: &str =
    "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350";
/// The VADER lexicon shipped in `datasets/`.
pub const LEXICON_PATH: &str = "datasets/movie-snippets/vader_lexicon.txt";

/// The reference's shape when the config gives none.
pub const DEFAULT_SHAPE: ModelShape = ModelShape {
    n_embd: 128,
    n_layer: 4,
    n_head: 4,
};

impl RawSentiment {
    /// Fills defaults and validates.
    pub fn resolve(self) -> Result<SentimentTask> {
        let shipped = self.data.is_none();
        let task = SentimentTask {
            data: self.data.unwrap_or_else(|| SNIPPETS_PATH.into()),
            // The shipped file is always checked; a user's own file when a digest is given.
            sha256: self
                .sha256
                .or_else(|| shipped.then(|| SNIPPETS_SHA256.into())),
            lexicon: self.lexicon.unwrap_or_else(|| LEXICON_PATH.into()),
            vocab_size: self.vocab_size.unwrap_or(2048),
            prompt_words_min: self.prompt_words_min.unwrap_or(2),
            prompt_words_max: self.prompt_words_max.unwrap_or(8),
            response_tokens: self.response_tokens.unwrap_or(24),
            train_pairs: self.train_pairs.unwrap_or(512),
            eval_pairs: self.eval_pairs.unwrap_or(128),
            eval_prompts: self.eval_prompts.unwrap_or(256),
            val_prompts: self.val_prompts.unwrap_or(128),
            bt_temperature: self.bt_temperature.unwrap_or(0.5),
            pretrain_steps: self.pretrain_steps.unwrap_or(1200),
            gold_buckets: self.gold_buckets.unwrap_or(1 << 16),
            seed: self.seed.unwrap_or(0),
            reference: self.reference,
            reference_sha256: self.reference_sha256.map(|d| d.to_ascii_lowercase()),
            chat_template: self.chat_template,
            prompt_format: self.prompt_format.unwrap_or_else(|| PLAIN_FORMAT.into()),
            rso: self.rso,
        };
        if let Some(rso) = task.rso {
            check(
                rso.candidates >= 2,
                "task.rso.candidates",
                "must be at least 2",
            )?;
            check(
                rso.beta > 0.0 && rso.beta.is_finite(),
                "task.rso.beta",
                "must be positive and finite (the gold reward's units)",
            )?;
        }
        check(
            task.prompt_format.contains("{prefix}"),
            "task.prompt_format",
            "must contain `{prefix}`, where the review's first words go",
        )?;
        pretrained::check_keys(
            task.reference.as_deref(),
            task.reference_sha256.as_deref(),
            task.chat_template.as_deref(),
        )?;
        check(
            task.vocab_size >= 300,
            "task.vocab_size",
            "must be at least 300 (256 bytes, EOS and merges)",
        )?;
        check(
            task.prompt_words_min >= 1 && task.prompt_words_min <= task.prompt_words_max,
            "task.prompt_words_min",
            "must be at least 1 and at most prompt_words_max",
        )?;
        check_pairs(
            task.response_tokens,
            task.train_pairs,
            task.eval_pairs,
            task.eval_prompts,
            task.val_prompts,
            task.bt_temperature,
        )?;
        check(
            task.gold_buckets >= 16,
            "task.gold_buckets",
            "must be at least 16",
        )?;
        Ok(task)
    }
}

/// Context of the reference LM, in tokens.
const CONTEXT: usize = 64;

/// Gold model and lexicon on decoded text.
pub struct TextJudge {
    tokenizer: PairTokenizer,
    gold: GoldModel,
    lexicon: Lexicon,
    /// The review prefix of every prompt rendered from one (chat prompts), by its ids; a
    /// plain prompt is its own prefix and is decoded with the response.
    prefixes: Mutex<HashMap<Vec<u32>, String>>,
}

impl TextJudge {
    fn text(&self, prompt: &[u32], response: &[u32]) -> String {
        let eos = self.tokenizer.eos_id();
        let known = self
            .prefixes
            .lock()
            .ok()
            .and_then(|m| m.get(prompt).cloned());
        if let Some(prefix) = known {
            let ids: Vec<u32> = response.iter().copied().filter(|&t| t != eos).collect();
            let response = self.tokenizer.decode(&ids).unwrap_or_default();
            return format!("{prefix} {}", response.trim_start());
        }
        let ids: Vec<u32> = prompt
            .iter()
            .chain(response)
            .copied()
            .filter(|&t| t != eos)
            .collect();
        self.tokenizer.decode(&ids).unwrap_or_default()
    }

    fn remember(&self, ids: &[u32], prefix: &str) -> Result<()> {
        self.prefixes
            .lock()
            .map_err(|_| anyhow!("judge lock poisoned"))?
            .insert(ids.to_vec(), prefix.to_string());
        Ok(())
    }
}

impl Judge for TextJudge {
    fn gold(&self, prompt: &[u32], response: &[u32]) -> f64 {
        self.gold.predict(&self.text(prompt, response))
    }

    fn second(&self, prompt: &[u32], response: &[u32]) -> Option<f64> {
        Some(self.lexicon.score(&self.text(prompt, response)))
    }
}

/// How prompts are written: the plain prefix, or a user message in a chat template.
struct PromptWriter {
    format: String,
    template: Option<ChatTemplate>,
}

impl PromptWriter {
    /// The prompt text for a review prefix; `None` when it is the prefix itself.
    fn render(&self, prefix: &str) -> Result<Option<String>> {
        let text = self.format.replace("{prefix}", prefix);
        Ok(match &self.template {
            None if text == prefix => None,
            None => Some(text),
            Some(t) => Some(t.render(
                &[Message {
                    role: "user".into(),
                    content: text,
                }],
                true,
            )?),
        })
    }
}

/// File of a pairs stage that maps rendered prompts back to their review prefixes.
const PROMPT_TEXTS: &str = "prompt_texts.jsonl";

fn load_tokenizer(dir: &Path) -> Result<PairTokenizer> {
    let path = dir.join("tokenizer.json");
    let probe = PairTokenizer::from_file(&path, 0)?;
    let eos = probe
        .token_to_id(EOS)
        .ok_or_else(|| anyhow!("{}: no {EOS} token", path.display()))?;
    Ok(PairTokenizer::from_file(&path, eos)?)
}

/// Fits the gold model: penalty chosen by validation correlation, test correlation reported.
pub fn fit_gold(
    train: &[Snippet],
    validation: &[Snippet],
    test: &[Snippet],
    buckets: usize,
) -> (GoldModel, serde_json::Value) {
    let texts: Vec<&str> = train.iter().map(|s| s.text.as_str()).collect();
    let ratings: Vec<f64> = train.iter().map(|s| s.rating).collect();
    let corr = |m: &GoldModel, split: &[Snippet]| {
        let p: Vec<f64> = split.iter().map(|s| m.predict(&s.text)).collect();
        let r: Vec<f64> = split.iter().map(|s| s.rating).collect();
        pearson(&p, &r)
    };
    let mut tried = Vec::new();
    let mut best: Option<(f64, GoldModel)> = None;
    for lambda in [0.1, 0.3, 1.0, 3.0] {
        let m = GoldModel::fit(&texts, &ratings, buckets, lambda);
        let c = corr(&m, validation);
        tried.push(json!({"lambda": lambda, "validation_correlation": c}));
        if best.as_ref().is_none_or(|(b, _)| c > *b) {
            best = Some((c, m));
        }
    }
    let (validation_correlation, model) =
        best.unwrap_or_else(|| (f64::NAN, GoldModel::fit(&texts, &ratings, buckets, 1.0)));
    let report = json!({
        "lambda": model.lambda,
        "validation_correlation": validation_correlation,
        "test_correlation": corr(&model, test),
        "train_correlation": corr(&model, train),
        "tried": tried,
        "n_train": train.len(), "n_validation": validation.len(), "n_test": test.len(),
    });
    (model, report)
}

fn pretrain(
    task: &SentimentTask,
    shape: &ModelShape,
    tokenizer: &PairTokenizer,
    texts: &[Snippet],
    dir: &Path,
) -> Result<()> {
    let vocab = task.vocab_size;
    let (cfg, raw) = gpt2_config(vocab, CONTEXT, shape, tokenizer.eos_id());
    let model = CausalLm::random(cfg, raw, task.seed ^ 0x5EED, &crate::device(), true)?;
    let mut sequences = Vec::with_capacity(texts.len());
    for s in texts {
        let mut ids = tokenizer.encode(&s.text)?;
        ids.truncate(CONTEXT - 1);
        ids.push(tokenizer.eos_id());
        if ids.len() >= 2 {
            sequences.push(ids);
        }
    }
    let mut trainer = SftTrainer::new(
        &model,
        AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
        Some(1.0),
    )?;
    let mut rng = SplitMix64(task.seed ^ 0xBEEF);
    let warmup = (task.pretrain_steps / 20).max(1);
    let bar = indicatif::ProgressBar::new(task.pretrain_steps as u64)
        .with_message("pre-training the reference");
    let mut last = f64::NAN;
    for step in 0..task.pretrain_steps {
        let batch: Vec<&Vec<u32>> = (0..32)
            .map(|_| &sequences[(rng.next_u64() % sequences.len() as u64) as usize])
            .collect();
        let views: Vec<(&[u32], &[u32])> = batch.iter().map(|s| (&s[..1], &s[1..])).collect();
        let progress = step as f64 / task.pretrain_steps as f64;
        let lr = 2e-3
            * ((step + 1) as f64 / warmup as f64).min(1.0)
            * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()));
        last = trainer.step(&model, &views, lr)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    tracing::info!(loss = last, "reference pre-training done");
    model.save(dir)?;
    std::fs::write(
        dir.join("pretrain.json"),
        serde_json::to_string_pretty(
            &json!({"final_loss": last, "steps": task.pretrain_steps, "sequences": sequences.len()}),
        )?,
    )?;
    Ok(())
}

/// Validation or test prompts, drawn without replacement: the texts in an order shuffled by
/// `seed`, each giving its first `w` words for a `w` drawn from `words`; a prefix equal to one
/// in `exclude` (the training prompts) or to one already taken is lengthened word by word up to
/// the longest allowed, and a text that never becomes distinct is passed over. `candidate`
/// turns a prefix into prompt ids (and whether a template rendered it; `None`: it cannot be a
/// prompt), `taken` is told of each prompt taken. Stops at `n` prompts; fewer when the texts
/// run out.
fn distinct_prompts(
    texts: &[&str],
    words: std::ops::RangeInclusive<usize>,
    n: usize,
    seed: u64,
    exclude: &HashSet<Vec<u32>>,
    candidate: impl Fn(&str) -> Option<(Vec<u32>, bool)>,
    mut taken: impl FnMut(&[u32], &str, bool) -> Result<()>,
) -> Result<Vec<Vec<u32>>> {
    let (shortest, longest) = (*words.start(), *words.end());
    let span = (longest + 1).saturating_sub(shortest).max(1) as u64;
    let mut rng = SplitMix64(seed);
    let mut order: Vec<usize> = (0..texts.len()).collect();
    rng.shuffle(&mut order);
    let mut chosen: Vec<Vec<u32>> = Vec::with_capacity(n);
    let mut seen: HashSet<Vec<u32>> = HashSet::new();
    for &i in &order {
        if chosen.len() == n {
            break;
        }
        let first = shortest + (rng.next_u64() % span) as usize;
        for w in first..=longest {
            let prefix = prompt_of(texts[i], w);
            let Some((ids, templated)) = candidate(&prefix) else {
                break;
            };
            if exclude.contains(&ids) || seen.contains(&ids) {
                continue;
            }
            taken(&ids, &prefix, templated)?;
            seen.insert(ids.clone());
            chosen.push(ids);
            break;
        }
    }
    Ok(chosen)
}

fn prompt_of(text: &str, words: usize) -> String {
    text.split(' ').take(words).collect::<Vec<_>>().join(" ")
}

/// The sentiment task's stage keys, in build order: snippets, tokenizer, gold, reference, pairs
/// (with a pretrained reference: snippets, gold, reference, pairs), then RSO's pairs when the
/// task samples them.
pub fn stage_keys(
    task: &SentimentTask,
    shape: &ModelShape,
) -> Vec<(&'static str, serde_json::Value)> {
    let snippets_key = json!({"stage": "snippets", "data": task.data, "sha256": task.sha256, "split": "sha256-80-10-10"});
    let tokenizer_key =
        json!({"stage": "tokenizer", "snippets": snippets_key, "vocab_size": task.vocab_size});
    let gold_key = json!({"stage": "gold", "snippets": snippets_key, "buckets": task.gold_buckets});
    let reference_key = match &task.reference {
        None => json!({"stage": "sentiment-reference", "tokenizer": tokenizer_key, "model": shape,
            "pretrain_steps": task.pretrain_steps, "seed": task.seed, "context": CONTEXT}),
        Some(source) => pretrained::stage_key(source, task.reference_sha256.as_deref()),
    };
    let mut pairs_key = json!({"stage": "sentiment-pairs", "reference": reference_key, "gold": gold_key,
        "prompt_words": [task.prompt_words_min, task.prompt_words_max], "response_tokens": task.response_tokens,
        "train_pairs": task.train_pairs, "eval_pairs": task.eval_pairs, "eval_prompts": task.eval_prompts,
        "val_prompts": task.val_prompts, "held_out_split": "test", "eval_prompts_drawn": "without-replacement-excluding-train", "bt_temperature": task.bt_temperature});
    // Keys a plain task has not, so its stage names stay what they were.
    if let Some(template) = &task.chat_template {
        pairs_key["chat_template"] = json!(template);
    }
    if !is_plain_format(&task.prompt_format) {
        pairs_key["prompt_format"] = json!(task.prompt_format);
    }
    let rso_key = task.rso.map(|rso| {
        json!({"stage": "sentiment-rso-pairs", "pairs": pairs_key, "candidates": rso.candidates,
            "beta": rso.beta, "algorithm": "rso-1"})
    });
    let mut keys = match task.reference {
        None => vec![
            ("snippets", snippets_key),
            ("tokenizer", tokenizer_key),
            ("gold", gold_key),
            ("reference", reference_key),
            ("pairs", pairs_key),
        ],
        Some(_) => vec![
            ("snippets", snippets_key),
            ("gold", gold_key),
            ("reference", reference_key),
            ("pairs", pairs_key),
        ],
    };
    if let Some(key) = rso_key {
        keys.push(("rso-pairs", key));
    }
    keys
}

/// The sentiment task's stages.
pub fn prepare(task: &SentimentTask, shape: &ModelShape, cache: &StageCache) -> Result<TaskData> {
    let data_path = PathBuf::from(&task.data);
    let keys: std::collections::BTreeMap<&str, serde_json::Value> =
        stage_keys(task, shape).into_iter().collect();
    let key = |name: &str| keys.get(name).cloned().unwrap_or_default();
    let (snippets_dir, _) = cache.get_or_build("snippets", &key("snippets"), |dir| {
        let (df, summary) = snippets::read(&data_path, task.sha256.as_deref())?;
        snippets::write_splits(&df, dir)?;
        std::fs::write(
            dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)?,
        )?;
        tracing::info!(
            "prepared {}: {}",
            data_path.display(),
            serde_json::to_string(&summary)?
        );
        Ok(())
    })?;
    let train = snippets::read_split(&snippets_dir, "train")?;
    let validation = snippets::read_split(&snippets_dir, "validation")?;
    let test = snippets::read_split(&snippets_dir, "test")?;

    let (gold_dir, _) = cache.get_or_build("gold", &key("gold"), |dir| {
        let (model, report) = fit_gold(&train, &validation, &test, task.gold_buckets);
        tracing::info!("gold model: {report}");
        std::fs::write(dir.join("gold.json"), serde_json::to_string(&model)?)?;
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
        Ok(())
    })?;
    let gold_path = gold_dir.join("gold.json");
    let gold: GoldModel = serde_json::from_str(
        &std::fs::read_to_string(&gold_path)
            .with_context(|| format!("cannot read {}", gold_path.display()))?,
    )
    .with_context(|| format!("{}: malformed", gold_path.display()))?;
    let lexicon = Lexicon::from_file(Path::new(&task.lexicon)).map_err(|e| anyhow!(e))?;

    let (reference_dir, tokenizer, context) = match &task.reference {
        None => {
            let (tokenizer_dir, _) = cache.get_or_build("tokenizer", &key("tokenizer"), |dir| {
                train_bpe(
                    train.iter().map(|s| s.text.as_str()),
                    task.vocab_size,
                    &dir.join("tokenizer.json"),
                )?;
                Ok(())
            })?;
            let tokenizer = load_tokenizer(&tokenizer_dir)?;
            let (reference_dir, _) = cache.get_or_build("reference", &key("reference"), |dir| {
                std::fs::copy(
                    tokenizer_dir.join("tokenizer.json"),
                    dir.join("tokenizer.json"),
                )?;
                pretrain(task, shape, &tokenizer, &train, dir)
            })?;
            (reference_dir, tokenizer, CONTEXT)
        }
        Some(source) => {
            let (reference_dir, _) = cache.get_or_build("reference", &key("reference"), |dir| {
                pretrained::convert(source, task.reference_sha256.as_deref(), dir)
            })?;
            let (tokenizer, context) = pretrained::tokenizer(&reference_dir)?;
            (reference_dir, tokenizer, context)
        }
    };
    let writer = PromptWriter {
        format: task.prompt_format.clone(),
        template: pretrained::template(
            task.chat_template.as_deref(),
            &reference_dir,
            task.reference.as_deref().unwrap_or("the reference"),
        )?,
    };
    // A template that fails fails here, once, with its message.
    writer.render("A sample prefix")?;

    let eos = tokenizer.eos_id();
    let judge = TextJudge {
        tokenizer,
        gold,
        lexicon,
        prefixes: Mutex::new(HashMap::new()),
    };
    let settings = pair_sampling(task.response_tokens, eos);
    let (pairs_dir, _) = cache.get_or_build("pairs", &key("pairs"), |dir| {
        let reference = CausalLm::load(&reference_dir, &crate::device(), false)?;
        let span = (task.prompt_words_max - task.prompt_words_min + 1) as u64;
        // A prefix as prompt ids (rendered through the template, if any; `true` when it was),
        // or `None` when it cannot be one: the template fails, it tokenises to nothing, or it
        // leaves no room for a response.
        let candidate = |prefix: &str| -> Option<(Vec<u32>, bool)> {
            let rendered = writer.render(prefix).ok()?;
            let ids = judge
                .tokenizer
                .encode(rendered.as_deref().unwrap_or(prefix))
                .ok()?;
            (!ids.is_empty() && ids.len() + task.response_tokens <= context)
                .then_some((ids, rendered.is_some()))
        };
        let prompts_from = |split: &[Snippet], seed: u64| {
            let mut rng = SplitMix64(seed);
            let (judge, candidate) = (&judge, &candidate);
            let split = split.to_vec();
            move || -> Vec<u32> {
                loop {
                    let s = &split[(rng.next_u64() % split.len() as u64) as usize];
                    let words = task.prompt_words_min + (rng.next_u64() % span) as usize;
                    let prefix = prompt_of(&s.text, words);
                    if let Some((ids, templated)) = candidate(&prefix) {
                        if !templated || judge.remember(&ids, &prefix).is_ok() {
                            return ids;
                        }
                    }
                }
            }
        };
        let mut train_prompts = prompts_from(&train, task.seed ^ 0x4444);
        let train_pairs = sample_pairs(
            &reference,
            &judge,
            &mut train_prompts,
            &settings,
            task.bt_temperature,
            task.train_pairs,
            task.seed ^ 0x1111,
        )?;
        // Validation and test prompts: drawn without replacement, one per snippet, none equal
        // to a training prompt (nor a test prompt to a validation prompt).
        let distinct = |split: &[Snippet],
                        name: &str,
                        key: &str,
                        n: usize,
                        seed: u64,
                        exclude: &HashSet<Vec<u32>>|
         -> Result<Vec<Vec<u32>>> {
            let texts: Vec<&str> = split.iter().map(|s| s.text.as_str()).collect();
            let words = task.prompt_words_min..=task.prompt_words_max;
            let chosen = distinct_prompts(
                &texts,
                words,
                n,
                seed,
                exclude,
                candidate,
                |ids, prefix, templated| {
                    if templated {
                        judge.remember(ids, prefix)?;
                    }
                    Ok(())
                },
            )?;
            if chosen.len() < n {
                bail!(
                    "key `task.{key}`: {n} prompts asked, but the {name} split gives only {} \
                     distinct prompts that equal no training prompt",
                    chosen.len()
                );
            }
            Ok(chosen)
        };
        let mut exclude: HashSet<Vec<u32>> = train_pairs
            .iter()
            .map(|p| p.prompt_input_ids.clone())
            .collect();
        let val = distinct(
            &validation,
            "validation",
            "val_prompts",
            task.val_prompts,
            task.seed ^ 0x6666,
            &exclude,
        )?;
        exclude.extend(val.iter().cloned());
        let prompts = distinct(
            &test,
            "test",
            "eval_prompts",
            task.eval_prompts,
            task.seed ^ 0x5555,
            &exclude,
        )?;
        // Held-out pairs: on the test prompts, in turn (a prompt may carry several pairs).
        let mut next_test = prompts.iter().cycle().cloned();
        let mut held_prompts = move || next_test.next().unwrap_or_default();
        let held_out = sample_pairs(
            &reference,
            &judge,
            &mut held_prompts,
            &settings,
            task.bt_temperature,
            task.eval_pairs,
            task.seed ^ 0x2222,
        )?;
        write_pairs(dir, &train_pairs, &held_out, &prompts, &val)?;
        let texts: std::collections::BTreeMap<Vec<u32>, String> = judge
            .prefixes
            .lock()
            .map_err(|_| anyhow!("judge lock poisoned"))?
            .clone()
            .into_iter()
            .collect();
        if !texts.is_empty() {
            let rows: Vec<serde_json::Value> = texts
                .into_iter()
                .map(|(ids, prefix)| json!({"prompt_input_ids": ids, "prefix": prefix}))
                .collect();
            super::write_jsonl(&dir.join(PROMPT_TEXTS), &rows)?;
        }
        Ok(())
    })?;
    let texts_path = pairs_dir.join(PROMPT_TEXTS);
    if texts_path.exists() {
        #[derive(Deserialize)]
        struct Row {
            prompt_input_ids: Vec<u32>,
            prefix: String,
        }
        for row in super::read_jsonl::<Row>(&texts_path)? {
            judge.remember(&row.prompt_input_ids, &row.prefix)?;
        }
    }
    // RSO: the plain stage's training prompts, in order, each with a pair accepted from its
    // candidates; everything evaluated on is the plain stage's, so runs pair with its runs.
    let (stage_dir, stage_key) = match task.rso {
        None => (pairs_dir.clone(), key("pairs")),
        Some(rso) => (
            rso_stage(
                task,
                rso,
                &key("rso-pairs"),
                &pairs_dir,
                &reference_dir,
                &judge,
                cache,
            )?,
            key("rso-pairs"),
        ),
    };
    let mut data = TaskData::from_pairs_stage(
        Some(Box::new(judge)),
        eos,
        reference_dir,
        &stage_dir,
        task.response_tokens,
        stage_key,
    )?;
    // The test prompts are the plain stage's, RSO or not, and do not depend on how its pairs
    // are labelled (the prompts and responses are drawn before and apart from the labels): so
    // is their best-of-n curve, one for every Bradley–Terry temperature.
    data.prompts_key = key("pairs");
    if let Some(fields) = data.prompts_key.as_object_mut() {
        fields.remove("bt_temperature");
    }
    data.bt_temperature = Some(task.bt_temperature);
    Ok(data)
}

/// RSO's pairs stage: [`rso_pairs`] on the plain stage's training prompts, with the plain
/// stage's held-out pairs, test and validation prompts (and prompt texts) copied.
fn rso_stage(
    task: &SentimentTask,
    rso: RsoSampling,
    stage_key: &serde_json::Value,
    pairs_dir: &Path,
    reference_dir: &Path,
    judge: &TextJudge,
    cache: &StageCache,
) -> Result<PathBuf> {
    let settings = &pair_sampling(task.response_tokens, judge.tokenizer.eos_id());
    let (rso_dir, _) = cache.get_or_build("rso-pairs", stage_key, |dir| {
        let reference = CausalLm::load(reference_dir, &crate::device(), false)?;
        let plain: Vec<super::LabelledPair> = super::read_jsonl(&pairs_dir.join("train.jsonl"))?;
        let prompts: Vec<Vec<u32>> = plain.into_iter().map(|p| p.prompt_input_ids).collect();
        let (pairs, summary) = rso_pairs(
            &reference,
            judge,
            &prompts,
            settings,
            task.bt_temperature,
            rso,
            task.seed ^ 0x7777,
        )?;
        super::write_jsonl(&dir.join("train.jsonl"), &pairs)?;
        for file in [
            "eval_pairs.jsonl",
            "eval_prompts.jsonl",
            "val_prompts.jsonl",
            PROMPT_TEXTS,
        ] {
            let from = pairs_dir.join(file);
            if from.exists() {
                std::fs::copy(&from, dir.join(file))
                    .with_context(|| format!("cannot copy {}", from.display()))?;
            }
        }
        std::fs::write(
            dir.join("rso_summary.json"),
            serde_json::to_string_pretty(&summary)?,
        )?;
        Ok(())
    })?;
    Ok(rso_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prefix as ids: its bytes (every prefix a prompt).
    fn bytes(prefix: &str) -> Option<(Vec<u32>, bool)> {
        Some((prefix.bytes().map(u32::from).collect(), false))
    }

    /// A prompt equal to a training prompt never enters the test set: it is lengthened to a
    /// longer prefix of its snippet, or its snippet is passed over; prompts are distinct and
    /// each a prefix of its snippet within the word range, whatever the seed.
    #[test]
    fn test_prompts_equal_no_training_prompt() -> Result<()> {
        let ids = |s: &str| bytes(s).map(|(ids, _)| ids).unwrap_or_default();
        let exclude: HashSet<Vec<u32>> = ["a b", "x y", "x y z"].into_iter().map(ids).collect();
        for seed in 0..32 {
            // "a b" is a training prompt: the snippet can only give "a b c".
            let only =
                distinct_prompts(
                    &["a b c"],
                    2..=3,
                    1,
                    seed,
                    &exclude,
                    bytes,
                    |_, _, _| Ok(()),
                )?;
            assert_eq!(only, [ids("a b c")]);
            // Every prefix of "x y z" is a training prompt: passed over, nothing left.
            let none =
                distinct_prompts(
                    &["x y z"],
                    2..=3,
                    1,
                    seed,
                    &exclude,
                    bytes,
                    |_, _, _| Ok(()),
                )?;
            assert!(none.is_empty());
            let texts = ["a b c d", "a b c e", "x y z w", "p q", "p q r s", "x y"];
            let mut told = Vec::new();
            let got = distinct_prompts(
                &texts,
                2..=3,
                10,
                seed,
                &exclude,
                bytes,
                |ids, prefix, _| {
                    told.push((ids.to_vec(), prefix.to_string()));
                    Ok(())
                },
            )?;
            assert!(got.iter().all(|p| !exclude.contains(p)), "seed {seed}");
            let unique: HashSet<&Vec<u32>> = got.iter().collect();
            assert_eq!(unique.len(), got.len(), "seed {seed}");
            assert_eq!(
                told.iter().map(|(ids, _)| ids.clone()).collect::<Vec<_>>(),
                got
            );
            for (_, prefix) in &told {
                let w = prefix.split(' ').count();
                assert!((2..=3).contains(&w), "{prefix}");
                assert!(
                    texts.iter().any(|t| t.starts_with(prefix.as_str())),
                    "{prefix}"
                );
            }
            // At most one per snippet: "x y" (a training prompt, not lengthened past its
            // snippet) never appears, and the other five snippets give at most five prompts.
            assert!(got.len() <= 5, "seed {seed}");
        }
        Ok(())
    }

    /// The gold model must track the human ratings it stands in for. The floor: 0.55 on the
    /// held-out test split, the correlation a bag-of-n-grams model reaches on these snippets
    /// with room to spare (it is printed on every run); below it, "gold reward" would mean
    /// little more than a coin with a bias.
    #[test]
    fn gold_model_correlates_with_held_out_human_ratings() -> Result<()> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let (df, _) = snippets::read(&root.join(SNIPPETS_PATH), Some(SNIPPETS_SHA256))?;
        let tmp_dir = tempfile::Builder::new()
            .prefix("edpo-gold-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp_dir.path().join("gold");
        std::fs::create_dir_all(&dir)?;
        snippets::write_splits(&df, &dir)?;
        let split = |s| snippets::read_split(&dir, s);
        let (_, report) = fit_gold(
            &split("train")?,
            &split("validation")?,
            &split("test")?,
            1 << 16,
        );
        println!("gold model: {report}");
        let test = report["test_correlation"].as_f64().unwrap_or(f64::NAN);
        assert!(
            test >= 0.55,
            "held-out correlation {test} is below the 0.55 floor"
        );
        Ok(())
    }

    fn raw(yaml: &str) -> Result<SentimentTask> {
        let raw: RawSentiment = serde_yaml::from_str(yaml)?;
        raw.resolve()
    }

    /// A pretrained reference (the tiny Llama GGUF fixture, which carries ChatML) with its
    /// own template: prompts are the rendered user message, the judge reads prefix + response,
    /// a second preparation reads the same stages back and judges the same way.
    #[test]
    fn a_pretrained_reference_with_its_chat_template() -> Result<()> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let gguf = root.join("testdata/gguf/tiny-llama-f32.gguf");
        let digest = snippets::sha256_hex(&std::fs::read(&gguf)?);
        let data = root.join(SNIPPETS_PATH);
        let lexicon = root.join(LEXICON_PATH);
        let task = raw(&format!(
            "{{data: {data:?}, lexicon: {lexicon:?}, reference: {gguf:?}, reference_sha256: {digest},
              chat_template: model, prompt_format: 'Continue: {{prefix}}', response_tokens: 4,
              train_pairs: 6, eval_pairs: 2, eval_prompts: 3, val_prompts: 2, gold_buckets: 256}}",
            data = data.display().to_string(),
            lexicon = lexicon.display().to_string(),
            gguf = gguf.display().to_string(),
        ))?;
        let names: Vec<&str> = stage_keys(&task, &DEFAULT_SHAPE)
            .iter()
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(names, ["snippets", "gold", "reference", "pairs"]);
        let tmp_dir = tempfile::Builder::new()
            .prefix("edpo-pretrained-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp_dir.path().join("pretrained");
        let cache = StageCache::new(&dir);
        let data = prepare(&task, &DEFAULT_SHAPE, &cache)?;
        assert!(data.reference_dir.join("tokenizer_config.json").exists());
        let (tokenizer, _) = pretrained::tokenizer(&data.reference_dir)?;
        assert_eq!(data.train.len(), 6);
        for pair in &data.train {
            let text = tokenizer.decode(&pair.prompt_input_ids)?;
            assert!(text.contains("Continue: "), "{text:?}");
            assert!(
                text.contains("user") && text.contains("assistant"),
                "{text:?}"
            );
            // The judge scores the prefix followed by the response, not the template.
            // (Read back from JSON lines, the stored reward may differ in the last bit.)
            let judged = data
                .judge
                .as_ref()
                .expect("a gold reward")
                .gold(&pair.prompt_input_ids, &pair.chosen_input_ids);
            let stored = pair.chosen_reward.expect("judged");
            assert!((judged - stored).abs() < 1e-12, "{judged} vs {stored}");
        }
        let again = prepare(&task, &DEFAULT_SHAPE, &cache)?;
        for p in data.eval_prompts.iter().chain(&data.val_prompts) {
            let r = [tokenizer.eos_id()];
            let (a, b) = (
                again.judge.as_ref().expect("gold"),
                data.judge.as_ref().expect("gold"),
            );
            assert_eq!(a.gold(p, &r), b.gold(p, &r));
            // Every test and validation prompt is known by its prefix after a cache read.
            let stage = cache_entry(&dir, "pairs");
            let rows: Vec<serde_json::Value> = super::super::read_jsonl(&stage.join(PROMPT_TEXTS))?;
            assert!(rows.iter().any(|r| r["prompt_input_ids"] == json!(p)));
        }
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    fn cache_entry(dir: &Path, name: &str) -> PathBuf {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(name))
            })
            .unwrap_or_default()
    }

    /// Two temperatures of the labels: other pairs stages, the same prompts and responses, the
    /// same test and validation prompts, so one best-of-n curve for both.
    #[test]
    fn the_labels_temperature_leaves_the_prompts_alone() -> Result<()> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let gguf = root.join("testdata/gguf/tiny-llama-f32.gguf");
        let yaml = |tau: f64| {
            format!(
                "{{data: {data:?}, lexicon: {lexicon:?}, reference: {gguf:?}, response_tokens: 4,
                  train_pairs: 8, eval_pairs: 2, eval_prompts: 3, val_prompts: 2,
                  gold_buckets: 256, bt_temperature: {tau}}}",
                data = root.join(SNIPPETS_PATH).display().to_string(),
                lexicon = root.join(LEXICON_PATH).display().to_string(),
                gguf = gguf.display().to_string(),
            )
        };
        let tmp_dir = tempfile::Builder::new()
            .prefix("edpo-tau-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp_dir.path().join("tau");
        let cache = StageCache::new(&dir);
        let a = prepare(&raw(&yaml(0.05))?, &DEFAULT_SHAPE, &cache)?;
        let b = prepare(&raw(&yaml(2.0))?, &DEFAULT_SHAPE, &cache)?;
        assert_ne!(a.pairs_key, b.pairs_key);
        assert_eq!(a.prompts_key, b.prompts_key);
        assert_eq!(a.eval_prompts, b.eval_prompts);
        assert_eq!(a.val_prompts, b.val_prompts);
        let responses = |d: &TaskData| -> Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> {
            d.train
                .iter()
                .map(|p| {
                    let (mut x, mut y) = (p.chosen_input_ids.clone(), p.rejected_input_ids.clone());
                    if x > y {
                        std::mem::swap(&mut x, &mut y);
                    }
                    (p.prompt_input_ids.clone(), x, y)
                })
                .collect()
        };
        assert_eq!(responses(&a), responses(&b));
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    /// RSO's pairs: the plain stage's training prompts in order, one accepted pair each, and
    /// its held-out pairs, test and validation prompts unchanged (so runs pair across the two),
    /// with the reference log-probs keyed on the RSO stage and best-of-n on the test prompts.
    #[test]
    fn rso_pairs_reuse_the_plain_stage_prompts() -> Result<()> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let gguf = root.join("testdata/gguf/tiny-llama-f32.gguf");
        let yaml = |rso: &str| {
            format!(
                "{{data: {data:?}, lexicon: {lexicon:?}, reference: {gguf:?}, response_tokens: 4,
                  train_pairs: 8, eval_pairs: 2, eval_prompts: 3, val_prompts: 2,
                  gold_buckets: 256{rso}}}",
                data = root.join(SNIPPETS_PATH).display().to_string(),
                lexicon = root.join(LEXICON_PATH).display().to_string(),
                gguf = gguf.display().to_string(),
            )
        };
        let plain = raw(&yaml(""))?;
        let rso = raw(&yaml(", rso: {candidates: 4, beta: 0.5}"))?;
        let names: Vec<&str> = stage_keys(&rso, &DEFAULT_SHAPE)
            .iter()
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(
            names,
            ["snippets", "gold", "reference", "pairs", "rso-pairs"]
        );
        let tmp_dir = tempfile::Builder::new()
            .prefix("edpo-rso-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp_dir.path().join("rso");
        let cache = StageCache::new(&dir);
        let a = prepare(&plain, &DEFAULT_SHAPE, &cache)?;
        let b = prepare(&rso, &DEFAULT_SHAPE, &cache)?;
        let prompts = |d: &TaskData| -> Vec<Vec<u32>> {
            d.train.iter().map(|p| p.prompt_input_ids.clone()).collect()
        };
        let (pa, pb) = (prompts(&a), prompts(&b));
        assert!(!pb.is_empty() && pb.len() <= pa.len());
        // In order: every RSO prompt is the next plain one that made a pair.
        let mut rest = pa.iter();
        assert!(pb.iter().all(|p| rest.any(|q| q == p)));
        assert_eq!(a.eval_prompts, b.eval_prompts);
        assert_eq!(a.val_prompts, b.val_prompts);
        assert_eq!(a.eval_pairs, b.eval_pairs);
        assert_ne!(a.pairs_key, b.pairs_key);
        assert_eq!(a.prompts_key, b.prompts_key);
        let summary = cache_entry(&dir, "rso-pairs").join("rso_summary.json");
        let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(summary)?)?;
        assert_eq!(summary["pairs"], json!(pb.len()));
        assert!(raw(&yaml(", rso: {candidates: 1, beta: 0.5}")).is_err());
        assert!(raw(&yaml(", rso: {candidates: 4, beta: 0}")).is_err());
        assert!(raw(&yaml(", rso: {candidates: 4, beta: 1, extra: 2}")).is_err());
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    #[test]
    fn pretrained_keys_are_checked() {
        let err = |yaml: &str| raw(yaml).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err("{chat_template: model}").contains("task.chat_template"));
        assert!(err("{chat_template: nonesuch}").contains("task.chat_template"));
        assert!(err("{reference_sha256: abc}").contains("task.reference_sha256"));
        assert!(err("{reference: x.gguf, reference_sha256: abc}").contains("64 hexadecimal"));
        assert!(err("{prompt_format: 'no slot'}").contains("task.prompt_format"));
        assert!(raw("{reference: x.gguf, chat_template: chatml}").is_ok());
    }
}
