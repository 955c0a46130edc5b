//! Both tokenisation conventions and truncation against `transformers`
//! (`testdata/preferences/tokenization.json`, from `tools/make_tokenization_golden.py`): the
//! golden GPT-2 byte-level BPE, conversations rendered with the ChatML template, plain-text
//! rows including two whose prompt merges with the response under joint tokenisation.

use edpo_data::chat::ChatTemplate;
use edpo_data::preferences::{read_preferences, ReadOptions};
use edpo_data::tokenization::{tokenize, Budget, Convention};
use edpo_data::PairTokenizer;
use std::path::PathBuf;

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

#[test]
fn both_conventions_and_truncation_match_transformers() {
    let cases: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(testdata().join("preferences/tokenization.json")).expect("golden"),
    )
    .expect("json");
    let tokenizer =
        PairTokenizer::from_file(&testdata().join("golden/gpt2/policy/tokenizer.json"), 0)
            .expect("tokenizer");
    let template = ChatTemplate::named("chatml").expect("chatml");
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    let mut mismatches = 0;
    for case in &cases {
        let file = case["file"].as_str().expect("file");
        let read = read_preferences(
            &testdata()
                .join("preferences")
                .join(file)
                .display()
                .to_string(),
            &ReadOptions::default(),
        )
        .expect("read");
        let row = case["row"].as_u64().expect("row") as usize;
        let record = read.records.iter().find(|r| r.row == row).expect("row");
        let convention = Convention::parse(case["convention"].as_str().expect("c")).expect("c");
        let budget = match &case["budget"] {
            serde_json::Value::Null => Budget::default(),
            b => Budget {
                max_length: b["max_length"].as_u64().map(|x| x as usize),
                max_prompt_length: b["max_prompt_length"].as_u64().map(|x| x as usize),
            },
        };
        let got =
            tokenize(record, &tokenizer, Some(&template), convention, budget).expect("tokenize");
        let what = format!("{file} row {row} {convention:?} {budget:?}");
        assert_eq!(got.pair.prompt, ids(&case["prompt"]), "prompt of {what}");
        assert_eq!(got.pair.chosen, ids(&case["chosen"]), "chosen of {what}");
        assert_eq!(
            got.pair.rejected,
            ids(&case["rejected"]),
            "rejected of {what}"
        );
        assert_eq!(
            got.prefix_mismatch,
            case["prefix_mismatch"] == true,
            "{what}"
        );
        if budget.max_prompt_length.is_some() {
            assert!(got.prompt_truncated || got.pair.prompt.len() <= 3, "{what}");
        }
        mismatches += usize::from(got.prefix_mismatch);
    }
    assert_eq!(cases.len(), 18);
    assert_eq!(
        mismatches, 2,
        "the boundary rows merge across the prompt's end"
    );
}

#[test]
fn the_prompt_over_budget_rule_errs_skips_or_truncates_and_counts() {
    use edpo_data::tokenization::{tokenize_all, OverBudget};
    let path = testdata().join("preferences/standard.jsonl");
    let read =
        read_preferences(&path.display().to_string(), &ReadOptions::default()).expect("read");
    let tokenizer =
        PairTokenizer::from_file(&testdata().join("golden/gpt2/policy/tokenizer.json"), 0)
            .expect("tokenizer");
    let run = |budget: Budget, outcome: OverBudget| {
        tokenize_all(
            &read.records,
            &tokenizer,
            None,
            Convention::Separate,
            budget,
            outcome,
        )
    };
    let (all, counts) = run(Budget::default(), OverBudget::Error).expect("no budget");
    assert_eq!(all.len(), read.records.len());
    assert_eq!(counts.prompt_over_budget, 0);
    let lengths: Vec<usize> = all.iter().map(|(_, p)| p.prompt.len()).collect();
    let (shortest, longest) = (
        *lengths.iter().min().expect("rows"),
        *lengths.iter().max().expect("rows"),
    );
    assert!(shortest < longest, "the sample's prompts differ in length");
    let budget = Budget {
        max_length: None,
        max_prompt_length: Some(shortest),
    };
    let over = lengths.iter().filter(|&&n| n > shortest).count();
    // Error: the first row over budget, named by file and row.
    let first = lengths
        .iter()
        .position(|&n| n > shortest)
        .expect("one over");
    let err = run(budget, OverBudget::Error)
        .expect_err("over budget")
        .to_string();
    let row = read.records[first].row;
    assert!(
        err.contains(&format!("standard.jsonl:{row}:")) && err.contains("prompt-over-budget"),
        "{err}"
    );
    // Skip: counted, and the kept records are the others, in order.
    let (kept, counts) = run(budget, OverBudget::Skip).expect("skip");
    assert_eq!((counts.prompt_over_budget, counts.skipped), (over, over));
    assert_eq!(kept.len(), read.records.len() - over);
    assert!(kept.iter().all(|(_, p)| p.prompt.len() <= shortest));
    // Truncate: every record kept, each prompt keeping its end.
    let (cut, counts) = run(budget, OverBudget::Truncate).expect("truncate");
    assert_eq!((counts.prompt_over_budget, counts.skipped), (over, 0));
    assert_eq!(cut.len(), read.records.len());
    for ((_, whole), (_, short)) in all.iter().zip(&cut) {
        assert!(whole.prompt.ends_with(&short.prompt) && short.prompt.len() <= shortest);
        assert_eq!(whole.chosen, short.chosen);
    }
    // A prompt that leaves no room for a response within max_length is over budget too.
    let tight = Budget {
        max_length: Some(longest),
        max_prompt_length: None,
    };
    let (_, counts) = run(tight, OverBudget::Skip).expect("tight");
    assert_eq!(
        counts.skipped,
        lengths.iter().filter(|&&n| n >= longest).count()
    );
}
