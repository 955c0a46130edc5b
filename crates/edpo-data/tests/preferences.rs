//! Preference data in the layouts users have, read from the committed samples
//! (`testdata/preferences/`, written by `tools/make_preference_samples.py`): every layout and
//! format into the same records, the implicit prompt's tricky cases, UltraFeedback-binarized
//! from a Hugging Face cache tree by split, one test per bad-row rule (error and counted
//! skip), rows mixing layouts, and a damaged Parquet file.

use edpo_data::chat::Message;
use edpo_data::preferences::{
    read_preferences, BadRows, Layout, PreferenceRecord, ReadOptions, Rule, Turns,
};
use std::path::PathBuf;

fn sample(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/preferences")
        .join(name)
        .display()
        .to_string()
}

fn read(name: &str) -> edpo_data::preferences::Preferences {
    read_preferences(&sample(name), &ReadOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn text(t: &Turns) -> &str {
    match t {
        Turns::Text(s) => s,
        other => panic!("not text: {other:?}"),
    }
}

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

#[test]
fn the_standard_layout_reads_the_same_from_json_lines_json_and_csv() {
    let jsonl = read("standard.jsonl");
    assert_eq!(jsonl.layout, Layout::Standard);
    assert_eq!(jsonl.records.len(), 3);
    assert_eq!(text(&jsonl.records[0].prompt), "The movie was");
    assert_eq!(text(&jsonl.records[0].chosen), " wonderful and moving.");
    assert_eq!(jsonl.records[2].row, 3);
    assert!(jsonl
        .records
        .iter()
        .all(|r| r.file.ends_with("standard.jsonl")));
    for other in ["standard.json", "standard.csv"] {
        let mut r = read(other);
        assert_eq!(r.layout, Layout::Standard, "{other}");
        // Each record names its own file; everything else is the same.
        for rec in &mut r.records {
            assert!(rec.file.ends_with(other), "{other}: {}", rec.file.display());
            rec.file = jsonl.records[0].file.clone();
        }
        assert_eq!(r.records, jsonl.records, "{other}");
    }
}

#[test]
fn implicit_prompts_are_the_shared_prefix_cut_at_a_word() {
    let r = read("implicit.jsonl");
    assert_eq!(r.layout, Layout::Implicit);
    let got: Vec<(&str, &str, &str)> = r
        .records
        .iter()
        .map(|x| (text(&x.prompt), text(&x.chosen), text(&x.rejected)))
        .collect();
    assert_eq!(
        got,
        [
            ("Was it good? It is ", "yes", "yesterday's news"),
            ("Q: Best scene? A: ", "The ending.", "None."),
            ("Summary: a ", "triumph of style", "waste of time"),
        ]
    );
}

#[test]
fn conversations_with_system_turns_and_implicit_multi_turn_prompts() {
    let r = read("conversational.jsonl");
    assert_eq!(r.layout, Layout::Conversational);
    assert_eq!(
        r.records[0].prompt,
        Turns::Messages(vec![
            msg("system", "You are a film critic."),
            msg("user", "Review Alien in one line.")
        ])
    );
    assert_eq!(
        r.records[0].chosen,
        Turns::Messages(vec![msg("assistant", "A taut, terrifying classic.")])
    );
    assert_eq!(
        r.records[1].prompt,
        Turns::Messages(vec![
            msg("user", "Hi"),
            msg("assistant", "Hello!"),
            msg("user", "Name a comedy.")
        ])
    );
    assert_eq!(
        r.records[1].rejected,
        Turns::Messages(vec![msg("assistant", "No.")])
    );
}

#[test]
fn ultrafeedback_binarized_from_the_hub_cache_by_split() {
    let hub = sample("hub");
    std::env::set_var("HF_HUB_CACHE", &hub);
    let options = |split: &str| ReadOptions {
        split: Some(split.into()),
        ..ReadOptions::default()
    };
    let name = "hf:HuggingFaceH4/ultrafeedback_binarized";
    let train = read_preferences(name, &options("train_prefs")).expect("train_prefs");
    let test = read_preferences(name, &options("test_prefs")).expect("test_prefs");
    assert_eq!((train.records.len(), test.records.len()), (6, 3));
    assert_eq!(train.layout, Layout::Conversational);
    let first: &PreferenceRecord = &train.records[0];
    // The prompt string becomes a user turn; the copy of it heading each response is removed.
    assert_eq!(
        first.prompt,
        Turns::Messages(vec![msg("user", "Write a tagline for film number 0.")])
    );
    assert_eq!(
        first.chosen,
        Turns::Messages(vec![msg("assistant", "Film 0: you will never forget it.")])
    );
    assert_eq!(
        (first.score_chosen, first.score_rejected),
        (Some(8.5), Some(3.0))
    );
    assert_eq!(first.id.as_deref(), Some(format!("{:064x}", 0).as_str()));
    // Without a split, the choice is asked for, naming the splits.
    let e = read_preferences(name, &ReadOptions::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("test_prefs") && e.contains("train_prefs"), "{e}");
    let e = read_preferences(name, &options("validation"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("`validation`"), "{e}");
}

#[test]
fn hh_dialogues_split_at_the_last_assistant_turn() {
    let r = read("hh.jsonl");
    assert_eq!(r.layout, Layout::Hh);
    assert_eq!(
        text(&r.records[1].prompt),
        "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Is Jaws scary?\n\nAssistant:"
    );
    assert_eq!(text(&r.records[1].chosen), " Yes, famously so.");
    assert_eq!(text(&r.records[1].rejected), " Sharks are fish.");
}

#[test]
fn pre_tokenised_columns_from_parquet() {
    let r = read("tokenized.parquet");
    assert_eq!(r.layout, Layout::Tokenized);
    assert_eq!(r.records[0].prompt, Turns::Tokens(vec![1, 2, 3]));
    assert_eq!(r.records[1].rejected, Turns::Tokens(vec![10, 11, 0]));
}

#[test]
fn every_bad_row_rule_is_an_error_naming_file_and_row_or_a_counted_skip() {
    let path = sample("bad.jsonl");
    for (row, rule) in [
        (2, Rule::MissingField),
        (3, Rule::WrongType),
        (4, Rule::EmptyResponse),
        (5, Rule::IdenticalResponses),
    ] {
        // Skipping every earlier rule reaches this row's.
        let skip: Vec<Rule> = [
            Rule::MissingField,
            Rule::WrongType,
            Rule::EmptyResponse,
            Rule::IdenticalResponses,
        ]
        .into_iter()
        .take_while(|r| *r != rule)
        .collect();
        let options = ReadOptions {
            layout: Some(Layout::Standard),
            bad_rows: BadRows { skip },
            ..ReadOptions::default()
        };
        let e = read_preferences(&path, &options)
            .err()
            .map(|e| e.to_string());
        let e = e.unwrap_or_else(|| panic!("{} was not caught", rule.name()));
        assert!(
            e.contains(&format!("bad.jsonl:{row}:")) && e.contains(rule.name()),
            "{e}"
        );
    }
    let all = ReadOptions {
        bad_rows: BadRows {
            skip: Rule::ALL.map(|(_, r)| r).to_vec(),
        },
        ..ReadOptions::default()
    };
    let r = read_preferences(&path, &all).expect("every rule skipped");
    assert_eq!(r.records.len(), 1);
    assert_eq!(r.rows, 5);
    assert_eq!(r.skipped.values().sum::<usize>(), 4);
    assert!(r.skipped.values().all(|&n| n == 1), "{:?}", r.skipped);

    let e = read_preferences(&sample("bad-conversational.jsonl"), &ReadOptions::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("bad-conversational.jsonl:2:") && e.contains("roles-not-alternating"),
        "{e}"
    );
}

#[test]
fn rows_of_different_layouts_are_named_and_a_forced_layout_reads_them() {
    let e = read_preferences(&sample("mixed.jsonl"), &ReadOptions::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("mixed.jsonl:3:") && e.contains("conversational") && e.contains("standard"),
        "{e}"
    );
    let forced = ReadOptions {
        layout: Some(Layout::Standard),
        bad_rows: BadRows {
            skip: vec![Rule::WrongType],
        },
        ..ReadOptions::default()
    };
    let r = read_preferences(&sample("mixed.jsonl"), &forced).expect("forced");
    assert_eq!(
        (r.records.len(), r.skipped.get(&Rule::WrongType)),
        (2, Some(&1))
    );
}

#[test]
fn a_damaged_parquet_file_is_a_named_error() {
    let e = read_preferences(&sample("damaged.parquet"), &ReadOptions::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("damaged.parquet"), "{e}");
}
