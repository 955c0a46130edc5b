//! The default task end to end on the real snippets (shrunk to run in seconds), evaluation
//! sanity checks that cannot pass by accident, and bad data files.

mod common;

use common::{edpo, root};
use std::path::Path;
use std::process::Output;

fn scratch(name: &str) -> common::Scratch {
    common::scratch("sentiment", name)
}

/// A tiny sentiment config: real data, small tokenizer and model, few pairs.
const TINY: [&str; 20] = [
    "--set",
    "task.vocab_size=400",
    "--set",
    "task.pretrain_steps=40",
    "--set",
    "task.train_pairs=32",
    "--set",
    "task.eval_pairs=8",
    "--set",
    "task.eval_prompts=24",
    "--set",
    "task.response_tokens=8",
    "--set",
    "model.n_embd=32",
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_head=2",
    "--set",
    "optim.epochs=1",
];

fn train(out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "train",
        "experiments/sentiment.yaml",
        "--out",
        out.to_str().expect("utf8"),
    ];
    args.extend(TINY);
    args.extend(extra);
    let o = edpo(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn pipeline_runs_on_the_shipped_data_and_the_reference_matches_itself() {
    let out = scratch("pipeline");
    // Learning rate 0: the policy stays the reference, bit for bit.
    let same = train(&out, &["--set", "optim.lr=0"]);
    assert_eq!(same["kl"], 0.0, "KL of the reference to itself: {same}");
    assert_eq!(same["kl_sampled"], 0.0);
    // Common random numbers: the reference against itself wins exactly half and gains nothing.
    assert_eq!(same["win_rate"], 0.5, "{same}");
    assert_eq!(same["reward_diff"], 0.0, "{same}");
    assert_eq!(same["val_win_rate"], 0.5, "{same}");
    let (lo, hi) = (
        same["win_rate_lo"].as_f64().expect("lo"),
        same["win_rate_hi"].as_f64().expect("hi"),
    );
    assert!(
        lo <= 0.5 && 0.5 <= hi,
        "the reference against itself: [{lo}, {hi}] excludes 0.5"
    );
    for key in [
        "gold_reward",
        "second_judge_win_rate",
        "preference_accuracy",
        "win_rate_vs_chosen",
        "entropy_per_token",
        "mean_length",
    ] {
        assert!(
            same[key].as_f64().is_some_and(f64::is_finite),
            "{key} missing: {same}"
        );
    }
    let summary: serde_json::Value = std::fs::read_dir(out.join("cache"))
        .expect("cache")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("snippets-"))
        .and_then(|e| std::fs::read_to_string(e.path().join("summary.json")).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .expect("snippets summary");
    assert_eq!(summary["rows_read"], 10605, "{summary}");
    // The reference loads in the Hugging Face layout, tokenizer included.
    let reference = std::fs::read_dir(out.join("cache"))
        .expect("cache")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("reference-"))
        .expect("reference");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(reference.path().join(f).exists(), "{f}");
    }
}

#[test]
fn kl_grows_as_the_policy_is_pushed_away() {
    let out = scratch("kl");
    let mut last = -1.0;
    for lr in ["1e-4", "1e-3", "5e-3"] {
        let mut args = vec![
            "train",
            "experiments/synthetic.yaml",
            "--out",
            out.to_str().expect("utf8"),
        ];
        let set = format!("optim.lr={lr}");
        args.extend([
            "--set",
            set.as_str(),
            "--set",
            "optim.schedule=constant",
            "--set",
            "optim.warmup_ratio=0",
        ]);
        let o = edpo(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let eval: serde_json::Value = serde_json::from_slice(&o.stdout).expect("eval");
        let kl = eval["kl"].as_f64().expect("kl");
        assert!(kl >= 0.0 && kl > last, "KL {kl} at lr {lr} after {last}");
        last = kl;
    }
}

fn with_data(dir: &Path, text: &[u8], sha: Option<&str>) -> Output {
    let data = dir.join("snippets.txt");
    std::fs::write(&data, text).expect("write");
    let set_data = format!("task.data={}", data.display());
    let mut args = vec![
        "train",
        "experiments/sentiment.yaml",
        "--out",
        dir.to_str().expect("utf8"),
        "--set",
        set_data.as_str(),
    ];
    let set_sha;
    if let Some(s) = sha {
        set_sha = format!("task.sha256={s}");
        args.extend(["--set", set_sha.as_str()]);
    }
    args.extend(TINY);
    edpo(&args)
}

#[test]
fn bad_data_files_give_named_errors() {
    let dir = scratch("bad");
    let real =
        std::fs::read(root().join("datasets/movie-snippets/movieReviewSnippets_GroundTruth.txt"))
            .expect("data");
    let sha = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350";
    let cases: Vec<(Vec<u8>, Option<&str>, &str)> = vec![
        (
            real[..real.len() / 3].to_vec(),
            Some(sha),
            "checksum mismatch",
        ),
        (
            b"1\t0.5\tfine\r\n2\tnot-a-number\toops\r\n".to_vec(),
            None,
            "snippets.txt:2: rating `not-a-number`",
        ),
        (
            b"1\t0.5\tonly one snippet\r\n".to_vec(),
            None,
            "split is empty",
        ),
    ];
    for (bytes, sha, needle) in cases {
        let o = with_data(&dir, &bytes, sha);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle) && !err.contains("panicked"),
            "`{needle}` not in: {err}"
        );
    }
}

/// The CI smoke grid (`experiments/smoke.yaml`): six runs of the shrunk default task, then the
/// report with every figure.
#[test]
fn smoke_grid_runs_and_reports() {
    let out = scratch("smoke");
    let report = out.join("report");
    let start = std::time::Instant::now();
    let o = edpo(&[
        "sweep",
        "experiments/smoke.yaml",
        "--out",
        out.to_str().expect("utf8"),
        "--report-out",
        report.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eprintln!("smoke grid: {:.1} s", start.elapsed().as_secs_f64());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("report of 6 runs"), "{stdout}");
    for name in [
        "frontier",
        "epsilon_ablation",
        "trajectories",
        "beta_dynamics",
        "steps_vs_confusion",
        "margins_accuracy",
    ] {
        assert!(
            report.join("figures").join(format!("{name}.png")).is_file(),
            "{name}.png missing"
        );
    }
    let md = std::fs::read_to_string(report.join("report.md")).expect("report.md");
    assert!(md.contains("Chosen by mean win rate on the validation prompts"));
    let decisions = std::fs::read_dir(out.join("smoke/runs"))
        .expect("runs")
        .flatten()
        .filter(|e| e.path().join("decisions.json").is_file())
        .count();
    assert_eq!(decisions, 4, "every ε-DPO run writes its decisions");
}
