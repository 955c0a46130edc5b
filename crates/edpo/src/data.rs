//! `edpo data inspect SOURCE`: what the readers make of a preference file, a directory or
//! `hf:ORG/NAME` in the hub cache — the detected layout, counts, every bad-row rule's count,
//! length statistics, scores and the first record rendered ([`edpo_data::preferences`]).

use anyhow::Result;
use edpo_data::chat::ChatTemplate;
use edpo_data::preferences::{read_preferences, BadRows, Layout, ReadOptions, Rule};

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
        /// The chat template that renders a conversation's example: chatml, llama3, smollm2.
        #[arg(long, default_value = "chatml")]
        template: String,
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
            let template = ChatTemplate::named(template)?;
            say!(
                "source:   {source}{}",
                split
                    .as_ref()
                    .map(|s| format!(" (split {s})"))
                    .unwrap_or_default()
            );
            say!("{}", read.summary(&template)?.trim_end());
            Ok(())
        }
    }
}
