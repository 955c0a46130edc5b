//! `edpo data inspect SOURCE`: what the readers make of a preference file, a directory or
//! `hf:ORG/NAME` in the hub cache — the detected layout, counts, every bad-row rule's count,
//! length statistics, scores and the first record rendered ([`edpo_data::preferences`]); with
//! `--model`, also what tokenising it with that model's tokenizer and template within a budget
//! does ([`edpo_data::tokenization`]: the prompt-over-budget rule's count, truncations, the
//! joint convention's prefix mismatches, token lengths), as a run of the `preferences` task
//! would.

use anyhow::{anyhow, Context, Result};
use edpo_data::chat::ChatTemplate;
use edpo_data::preferences::{read_preferences, BadRows, Layout, ReadOptions, Rule};
use edpo_data::tokenization::{length_summary, tokenize_all, Budget, Convention, OverBudget};
use edpo_data::PairTokenizer;
use std::path::PathBuf;

/// `edpo data …`.
#[derive(clap::Subcommand)]
pub enum DataCommand {
    /// Read a preference file (JSON lines, JSON, Parquet, CSV), a directory of them, or
    /// `hf:ORG/NAME` from the Hugging Face cache, and print what was read.
    Inspect {
        /// The file, directory or `hf:ORG/NAME`.
        source: String,
        /// Force the layout: standard, implicit, conversational, hh, tokenized.
        #[arg(long)]
        layout: Option<String>,
        /// The split to read (`train_prefs`, `test`, …) when there are several.
        #[arg(long)]
        split: Option<String>,
        /// Skip and count the rows a rule catches instead of failing (repeatable; `all` for
        /// every rule): missing-field, wrong-type, empty-response, identical-responses,
        /// roles-not-alternating, no-shared-prompt.
        #[arg(long = "skip", value_name = "RULE")]
        skip: Vec<String>,
        /// The chat template that renders a conversation: chatml, llama3, smollm2, or `model`
        /// (the `--model`'s own).
        #[arg(long, default_value = "chatml")]
        template: String,
        /// Also tokenise with this model's tokenizer (a GGUF file, a Hugging Face directory or
        /// `hf:ORG/NAME`): the prompt-over-budget count, truncations and token lengths.
        #[arg(long)]
        model: Option<PathBuf>,
        /// With `--model`: the budget of prompt plus response, in tokens.
        #[arg(long, default_value_t = 512)]
        max_length: usize,
        /// With `--model`: the budget of the prompt, in tokens.
        #[arg(long, default_value_t = 256)]
        max_prompt_length: usize,
        /// With `--model`: `separate` or `joint` tokenisation.
        #[arg(long, default_value = "separate")]
        tokenization: String,
    },
}

/// Runs a `data` subcommand.
pub fn run(command: &DataCommand) -> Result<()> {
    match command {
        DataCommand::Inspect {
            source,
            layout,
            split,
            skip,
            template,
            model,
            max_length,
            max_prompt_length,
            tokenization,
        } => {
            let skip = if skip.iter().any(|s| s == "all") {
                Rule::ALL.map(|(_, r)| r).to_vec()
            } else {
                skip.iter()
                    .map(|s| Rule::parse(s))
                    .collect::<edpo_data::Result<_>>()?
            };
            let options = ReadOptions {
                layout: layout.as_deref().map(Layout::parse).transpose()?,
                split: split.clone(),
                bad_rows: BadRows { skip },
            };
            let read = read_preferences(source, &options)?;
            let tokenizer = match model {
                Some(m) => {
                    let lm = edpo_model::CausalLm::load(m, &edpo_experiment::device(), false)?;
                    Some(model_tokenizer(&lm, m)?)
                }
                None => None,
            };
            let template = match (template.as_str(), &tokenizer) {
                ("model", Some((_, own))) => own.clone().ok_or_else(|| {
                    anyhow!("--template model: the model carries no chat template")
                })?,
                ("model", None) => anyhow::bail!("--template model needs --model"),
                (name, _) => ChatTemplate::named(name)?,
            };
            say!(
                "source:   {source}{}",
                split
                    .as_ref()
                    .map(|s| format!(" (split {s})"))
                    .unwrap_or_default()
            );
            say!("{}", read.summary(&template)?.trim_end());
            if let Some((tokenizer, _)) = &tokenizer {
                let budget = Budget {
                    max_length: Some(*max_length),
                    max_prompt_length: Some(*max_prompt_length),
                };
                // Counted, never an error: what a run would meet, rule by rule.
                let (pairs, counts) = tokenize_all(
                    &read.records,
                    tokenizer,
                    Some(&template),
                    Convention::parse(tokenization)?,
                    budget,
                    OverBudget::Skip,
                )?;
                say!(
                    "budget:   max_length {max_length}, max_prompt_length {max_prompt_length}, {tokenization} tokenisation"
                );
                say!("{}", counts.summary(OverBudget::Skip).trim_end());
                let ids: Vec<_> = pairs.iter().map(|(_, p)| p).collect();
                say!("{}", length_summary(&ids).trim_end());
            }
            Ok(())
        }
    }
}

/// The tokenizer (with the model's EOS) and chat template a loaded model carries, as its
/// source has them (`name`: the model's path, for errors). Shared by `data inspect --model` and
/// `generate`.
pub fn model_tokenizer(
    lm: &edpo_model::CausalLm,
    name: &std::path::Path,
) -> Result<(PairTokenizer, Option<ChatTemplate>)> {
    // A fresh private directory (removed when `tmp` drops), not a fixed name in `/tmp`.
    let tmp = tempfile::Builder::new()
        .prefix("edpo-tokenizer-")
        .tempdir()
        .context("a temporary directory for the model's tokenizer files")?;
    let files = tmp.path().join("tokenizer");
    lm.write_tokenizer_files(&files)?;
    let result = (|| -> Result<(PairTokenizer, Option<ChatTemplate>)> {
        let eos = lm.eos_token_id().ok_or_else(|| {
            anyhow!(
                "{}: the model's config has no `eos_token_id`",
                name.display()
            )
        })?;
        let tokenizer = PairTokenizer::from_file(&files.join("tokenizer.json"), eos)?;
        let config = files.join("tokenizer_config.json");
        let template = if config.exists() {
            ChatTemplate::from_tokenizer_config(&config)?
        } else {
            None
        };
        Ok((tokenizer, template))
    })();
    result
}
