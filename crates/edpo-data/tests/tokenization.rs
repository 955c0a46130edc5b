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
