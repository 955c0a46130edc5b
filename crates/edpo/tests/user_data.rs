//! Training on a user's own preference data (task `preferences`): UltraFeedback-binarized rows
//! as the Hugging Face cache stores them (`testdata/preferences/hub`), the tiny Llama GGUF
//! with its ChatML template as the pretrained reference, through the committed
//! `experiments/ultrafeedback-base.yaml` with smaller sizes. The tiny model's context is 64
//! tokens and its vocabulary spells ChatML's markers out byte by byte, so every prompt is over
//! budget and keeps its last 44 tokens (which still tell the prompts apart). The runs have no gold reward: the
//! report must take them as they are, and every run directory holds the preparation summary.

mod common;

use common::{edpo, root, scratch};
use std::path::Path;
use std::process::{Command, Output};

/// `edpo` with the test hub cache.
fn edpo_hub(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edpo"))
        .args(args)
        .current_dir(root())
        .env("HF_HUB_CACHE", root().join("testdata/preferences/hub"))
        .output()
        .expect("run edpo")
}

/// The `set:` lines that shrink ultrafeedback-base.yaml onto the tiny GGUF.
fn sets() -> Vec<(String, String)> {
    let gguf = root().join("testdata/gguf/tiny-llama-f32.gguf");
    [
        ("task.reference", gguf.display().to_string()),
        ("task.reference_sha256", "null".into()),
        ("task.max_length", "64".into()),
        ("task.max_prompt_length", "44".into()),
        ("task.eval_pairs", "3".into()),
        ("task.val_pairs", "2".into()),
        ("task.eval_prompts", "2".into()),
        ("task.response_tokens", "4".into()),
        ("optim.batch_size", "2".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn write_grid(dir: &Path) -> std::path::PathBuf {
    let base = root().join("experiments/ultrafeedback-base.yaml");
    let mut text = format!(
        "base: {:?}\nname: user-data\nset:\n",
        base.display().to_string()
    );
    for (k, v) in sets() {
        // Paths quoted; numbers and null as they are.
        if v == "null" || v.parse::<f64>().is_ok() {
            text.push_str(&format!("  {k}: {v}\n"));
        } else {
            text.push_str(&format!("  {k}: {v:?}\n"));
        }
    }
    text.push_str(
        "seeds: [0, 1]\ngrids:\n  - axes:\n      objective:\n        - {kind: dpo, beta: 0.1}\n        - {kind: epsilon_dpo, beta: 0.1, epsilon: 0.01}\n        - {kind: odpo, beta: 0.1}\n",
    );
    let path = dir.join("grid.yaml");
    std::fs::write(&path, text).expect("grid");
    path
}

#[test]
fn a_sweep_on_user_data_without_a_gold_reward_reports_kl_and_preference_accuracy() {
    let dir = scratch("user-data", "sweep");
    let grid = write_grid(&dir);
    let out = dir.join("runs");
    let report = dir.join("report");
    let o = edpo_hub(&[
        "sweep".into(),
        grid.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--report-out".into(),
        report.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let runs: Vec<_> = std::fs::read_dir(out.join("user-data/runs"))
        .expect("runs")
        .flatten()
        .map(|e| e.path())
        .collect();
    // ODPO's offset reads the data's own scores (`score_chosen`, `score_rejected`).
    assert_eq!(runs.len(), 6);
    for run in &runs {
        let summary =
            std::fs::read_to_string(run.join("data_summary.txt")).expect("data_summary.txt");
        for needle in [
            "layout:   conversational",
            "(split train_prefs)",
            "(split test_prefs)",
            "prompt-over-budget 6 (truncate; 0 skipped)",
            "prompt-over-budget 3 (truncate; 0 skipped)",
            "split by prompt (seed 0): train 4 pairs, validation 2, test 3",
            "test prompts for KL: 2",
        ] {
            assert!(summary.contains(needle), "{needle:?} in\n{summary}");
        }
        let eval: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("eval.json")).expect("eval.json"),
        )
        .expect("json");
        for key in [
            "kl",
            "preference_accuracy",
            "logratio_margin",
            "val_preference_accuracy",
        ] {
            assert!(
                eval[key].as_f64().is_some_and(f64::is_finite),
                "{key}: {eval}"
            );
        }
        assert!(eval["kl"].as_f64().is_some_and(|kl| kl > 0.0), "{eval}");
        for key in ["win_rate", "gold_reward", "label_noise"] {
            assert!(eval.get(key).is_none(), "{key} without a gold reward");
        }
        assert!(!run.join("per_prompt.jsonl").exists());
        assert!(run.join("adapter/adapter_model.safetensors").exists());
    }
    let md = std::fs::read_to_string(report.join("report.md")).expect("report.md");
    for needle in [
        "val. pref. acc.",
        "log-ratio margin",
        "3 test pairs for preference accuracy",
        "2 validation pairs, on whose preference accuracy settings are chosen",
        "no gold reward: no win rate",
        "ε-DPO",
    ] {
        assert!(md.contains(needle), "{needle:?} in the report");
    }
    assert!(
        !md.contains("win rate |"),
        "no win-rate column without a gold reward"
    );
}

#[test]
fn a_prompt_over_budget_is_an_error_naming_the_file_row_and_rule_unless_asked() {
    let dir = scratch("user-data", "budget");
    let mut args: Vec<String> = vec![
        "train".into(),
        "experiments/ultrafeedback-base.yaml".into(),
        "--out".into(),
        dir.display().to_string(),
    ];
    for (k, v) in sets() {
        args.push("--set".into());
        args.push(format!("{k}={v}"));
    }
    for s in ["task.max_prompt_length=3", "task.prompt_over_budget=error"] {
        args.push("--set".into());
        args.push(s.into());
    }
    let o = edpo_hub(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("train_prefs-00000-of-00001.parquet:1:")
            && stderr.contains("prompt-over-budget")
            && stderr.contains("task.data"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // An unknown outcome is a config error naming the key.
    let o = edpo(&[
        "train",
        "experiments/ultrafeedback-base.yaml",
        "--set",
        "task.prompt_over_budget=drop",
        "--print-config",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("task.prompt_over_budget"),
        "{stderr}"
    );
}
