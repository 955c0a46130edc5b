//! End-to-end tests of the `edpo` binary: the score command's output, and bad input giving a
//! non-zero exit with one clear message naming the file and the key, tensor or line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden")
}

fn scratch(name: &str) -> common::Scratch {
    common::scratch("cli", name)
}

fn copy_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("model dir");
    for entry in std::fs::read_dir(from).expect("read model dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

fn score(policy: &Path, reference: &Path, data: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edpo"))
        .args(["score", "--policy"])
        .arg(policy)
        .arg("--reference")
        .arg(reference)
        .arg("--data")
        .arg(data)
        .args(["--beta", "0.1", "--epsilon", "0.01"])
        .output()
        .expect("run edpo");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn expect_error(policy: &Path, data: &Path, needles: &[&str]) {
    let reference = golden().join("gpt2/reference");
    let (code, stdout, stderr) = score(policy, &reference, data);
    assert_ne!(code, 0, "expected failure; stdout: {stdout}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(stdout.is_empty(), "nothing on stdout on failure: {stdout}");
    for n in needles {
        assert!(stderr.contains(n), "`{n}` not in: {stderr}");
    }
}

#[test]
fn score_prints_the_documented_json() {
    let g = golden();
    let (code, stdout, stderr) = score(
        &g.join("llama/policy"),
        &g.join("llama/reference"),
        &g.join("pairs.jsonl"),
    );
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    let pairs = v["pairs"].as_array().expect("pairs");
    assert_eq!(pairs.len(), 24);
    for key in [
        "chosen_logp",
        "rejected_logp",
        "ref_chosen_logp",
        "ref_rejected_logp",
        "step",
        "beta_i",
    ] {
        assert!(pairs[0].get(key).is_some(), "missing {key}");
    }
    for key in ["dpo_loss", "epsilon_dpo_loss", "next_beta"] {
        assert!(v[key].as_f64().is_some_and(f64::is_finite), "missing {key}");
    }
}

#[test]
fn missing_and_malformed_config() {
    let g = golden();
    let dir = scratch("config");
    let model = dir.join("model");
    copy_model(&g.join("gpt2/policy"), &model);
    std::fs::remove_file(model.join("config.json")).expect("rm");
    expect_error(
        &model,
        &g.join("pairs.jsonl"),
        &["config.json", "No such file"],
    );
    std::fs::write(model.join("config.json"), "{\"model_type\": \"gpt2\", ").expect("write");
    expect_error(
        &model,
        &g.join("pairs.jsonl"),
        &["config.json", "malformed JSON", "line 1"],
    );
    std::fs::write(
        model.join("config.json"),
        "{\"model_type\": \"gpt2\", \"n_embd\": \"wide\"}",
    )
    .expect("write");
    expect_error(
        &model,
        &g.join("pairs.jsonl"),
        &["config.json", "key `n_embd`"],
    );
    std::fs::write(model.join("config.json"), "{\"model_type\": \"t5\"}").expect("write");
    expect_error(
        &model,
        &g.join("pairs.jsonl"),
        &["config.json", "unknown architecture `t5`"],
    );
}

#[test]
fn wrong_and_missing_tensors() {
    let g = golden();
    let dir = scratch("tensors");
    let model = dir.join("model");
    copy_model(&g.join("gpt2/policy"), &model);
    // A config that implies a wider MLP than the checkpoint holds.
    let cfg = std::fs::read_to_string(model.join("config.json")).expect("read");
    let mut v: serde_json::Value = serde_json::from_str(&cfg).expect("json");
    v["n_inner"] = serde_json::json!(64);
    std::fs::write(model.join("config.json"), v.to_string()).expect("write");
    expect_error(
        &model,
        &g.join("pairs.jsonl"),
        &[
            "model.safetensors",
            "transformer.h.0.mlp.c_fc.weight",
            "shape [32, 128], expected [32, 64]",
        ],
    );
    // A config with one more layer than the checkpoint.
    v["n_inner"] = serde_json::Value::Null;
    v["n_layer"] = serde_json::json!(3);
    std::fs::write(model.join("config.json"), v.to_string()).expect("write");
    expect_error(
        &model,
        &g.join("pairs.jsonl"),
        &[
            "model.safetensors",
            "tensor `transformer.h.2.ln_1.weight` is missing",
        ],
    );
    // A truncated safetensors file.
    v["n_layer"] = serde_json::json!(2);
    std::fs::write(model.join("config.json"), v.to_string()).expect("write");
    let bytes = std::fs::read(model.join("model.safetensors")).expect("read");
    std::fs::write(model.join("model.safetensors"), &bytes[..bytes.len() / 2]).expect("write");
    expect_error(
        &model,
        &g.join("pairs.jsonl"),
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn malformed_jsonl_row() {
    let g = golden();
    let dir = scratch("jsonl");
    let data = dir.join("pairs.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \n").expect("write");
    expect_error(
        &g.join("gpt2/policy"),
        &data,
        &["pairs.jsonl:2", "malformed JSON"],
    );
    std::fs::write(&data, "{\"prompt\": \"a\", \"chosen\": \"b\"}\n").expect("write");
    expect_error(
        &g.join("gpt2/policy"),
        &data,
        &["pairs.jsonl:1", "field `rejected` is missing"],
    );
    std::fs::write(&data, "\n").expect("write");
    expect_error(&g.join("gpt2/policy"), &data, &["pairs.jsonl", "no pairs"]);
}

/// `edpo sweep GRID --dry-run | head -1`: a reader that closes the pipe ends the command
/// quietly with success, not with a panic.
#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edpo"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(["sweep", "experiments/label-noise.yaml", "--dry-run"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Close the read end before the command writes its 40 lines.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?} {stderr}", out.status);
}

/// Runs `edpo` in the repository root with `PATH` emptied (so no Slurm command is found).
fn edpo_without_slurm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edpo"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args(args)
        .env("PATH", "")
        .output()
        .expect("run edpo");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The Slurm launcher's errors on a machine without Slurm, and its dry run (the job script),
/// which needs none; the sweep subcommands name the directory, file or index that is wrong.
#[test]
fn the_slurm_launcher_without_slurm_and_bad_sweep_directories() {
    let dir = scratch("slurm-less");
    let out = dir.to_str().expect("utf-8");
    let (ok, _, err) = edpo_without_slurm(&[
        "sweep",
        "experiments/smoke.yaml",
        "--launcher",
        "slurm",
        "--out",
        out,
    ]);
    assert!(
        !ok && err.contains("sbatch") && err.contains("--launcher local"),
        "{err}"
    );
    assert!(!dir.join("smoke").exists(), "nothing written without Slurm");

    let (ok, script, err) = edpo_without_slurm(&[
        "sweep",
        "experiments/smoke.yaml",
        "--launcher",
        "slurm",
        "--dry-run",
        "--out",
        out,
        "--time",
        "00:30:00",
        "--max-parallel",
        "2",
    ]);
    assert!(ok, "{err}");
    assert!(
        script.starts_with("#!/bin/bash\n#SBATCH --array=0-5%2\n"),
        "{script}"
    );
    assert!(script.contains("#SBATCH --time=00:30:00"), "{script}");
    assert!(
        script.contains("sweep task") && script.contains("6 of 6 runs to submit"),
        "{script}"
    );

    let (ok, _, err) = edpo_without_slurm(&[
        "sweep",
        "experiments/smoke.yaml",
        "--partition",
        "gpu",
        "--out",
        out,
    ]);
    assert!(!ok && err.contains("apply to --launcher slurm"), "{err}");

    let (ok, _, err) = edpo_without_slurm(&["sweep", "status", out]);
    assert!(
        !ok && err.contains("sweep.json") && err.contains("sweep directory"),
        "{err}"
    );

    // A planned sweep (run locally) and a task index it does not have.
    let (ok, _, err) = edpo_without_slurm(&[
        "sweep",
        "experiments/smoke.yaml",
        "--out",
        out,
        "--report-out",
        dir.join("report").to_str().expect("utf-8"),
    ]);
    assert!(ok, "{err}");
    let sweep = dir.join("smoke");
    let (ok, _, err) = edpo_without_slurm(&[
        "sweep",
        "task",
        sweep.to_str().expect("utf-8"),
        "--index",
        "6",
    ]);
    assert!(
        !ok && err.contains("has no run 6") && err.contains("0 to 5"),
        "{err}"
    );
    let (ok, table, err) = edpo_without_slurm(&["sweep", "status", sweep.to_str().expect("utf-8")]);
    assert!(
        ok && table.contains("6 runs: 6 completed, 0 running, 0 pending, 0 failed"),
        "{table}{err}"
    );
    // A task of a completed run leaves it alone and succeeds.
    let (ok, _, err) = edpo_without_slurm(&[
        "sweep",
        "task",
        sweep.to_str().expect("utf-8"),
        "--index",
        "2",
    ]);
    assert!(ok && err.contains("already completed"), "{err}");
    // A planned config edited after planning is refused, naming it.
    let plan = std::fs::read_dir(sweep.join("plan"))
        .expect("plan")
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("seed: 0")))
        .expect("a plan of seed 0");
    let text = std::fs::read_to_string(&plan).expect("plan file");
    std::fs::write(&plan, text.replace("seed: 0", "seed: 9")).expect("edit");
    let refused: Vec<String> = (0..6)
        .map(|i| {
            edpo_without_slurm(&[
                "sweep",
                "task",
                sweep.to_str().expect("utf-8"),
                "--index",
                &i.to_string(),
            ])
            .2
        })
        .filter(|e| e.contains("was planned as"))
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains(plan.to_str().expect("utf-8")),
        "{}",
        refused[0]
    );
}

/// `edpo data inspect`: the UltraFeedback-shaped sample from a hub cache tree by split, and a
/// bad row as an error naming file, row and rule unless its rule is skipped.
#[test]
fn data_inspect_prints_layout_counts_rules_and_an_example() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_edpo"))
            .current_dir(root)
            .env("HF_HUB_CACHE", "testdata/preferences/hub")
            .args(args)
            .output()
            .expect("run edpo")
    };
    let o = run(&[
        "data",
        "inspect",
        "hf:HuggingFaceH4/ultrafeedback_binarized",
        "--split",
        "train_prefs",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for needle in [
        "layout:   conversational",
        "rows:     6 read, 6 kept, 0 skipped",
        "chosen mean 8.500",
        "<|im_start|>user\\nWrite a tagline for film number 0.<|im_end|>",
    ] {
        assert!(out.contains(needle), "`{needle}` not in\n{out}");
    }
    let o = run(&["data", "inspect", "testdata/preferences/bad.jsonl"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("bad.jsonl:2: missing-field"),
        "{err}"
    );
    let o = run(&[
        "data",
        "inspect",
        "testdata/preferences/bad.jsonl",
        "--skip",
        "all",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("5 read, 1 kept, 4 skipped") && out.contains("identical-responses 1"),
        "{out}"
    );
    // With a model: its tokenizer and template, the prompt-over-budget rule counted (the tiny
    // vocabulary spells ChatML's markers out, so every prompt is over 32 tokens).
    let o = run(&[
        "data",
        "inspect",
        "hf:HuggingFaceH4/ultrafeedback_binarized",
        "--split",
        "train_prefs",
        "--model",
        "testdata/gguf/tiny-llama-f32.gguf",
        "--template",
        "model",
        "--max-prompt-length",
        "32",
        "--max-length",
        "48",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for needle in [
        "budget:   max_length 48, max_prompt_length 32, separate tokenisation",
        "tokenised: 0 kept; prompt-over-budget 6 (skip; 6 skipped)",
        "token lengths:",
    ] {
        assert!(out.contains(needle), "`{needle}` not in\n{out}");
    }
}

/// `edpo generate` for each public judge, from the tiny Llama checkpoint and the question
/// samples of `testdata/judges/`: every field each judge reads, MT-Bench's two turns, and the
/// same answers from the same seed.
#[test]
fn generate_writes_each_judges_answer_format() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let dir = scratch("generate");
    let run = |benchmark: &str, questions: &str, out: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_edpo"))
            .current_dir(root)
            .args([
                "generate",
                "--model",
                "testdata/golden/llama/policy",
                "--template",
                "chatml",
            ])
            .args([
                "--benchmark",
                benchmark,
                "--questions",
                questions,
                "--name",
                "tiny-dpo",
            ])
            .args(["--max-new-tokens", "6", "--threads", "1", "--out"])
            .arg(out)
            .output()
            .expect("run edpo");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let lines = |path: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .expect("answers")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    };
    let alpaca = dir.join("alpaca.json");
    run("alpaca-eval", "testdata/judges/alpaca_eval.json", &alpaca);
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&alpaca).expect("alpaca")).expect("json");
    assert_eq!(list.len(), 3);
    assert_eq!(list[0]["instruction"], "Name a film by Akira Kurosawa.");
    assert_eq!(list[0]["generator"], "tiny-dpo");
    assert_eq!(list[0]["dataset"], "helpful_base");
    assert!(list[0]["output"].is_string());

    run(
        "arena-hard",
        "testdata/judges/arena_hard_question.jsonl",
        &dir.join("arena"),
    );
    let arena = lines(&dir.join("arena/model_answer/tiny-dpo.jsonl"));
    assert_eq!(arena.len(), 2);
    assert_eq!(arena[0]["uid"], "0a1b2c3d");
    assert_eq!(arena[0]["model"], "tiny-dpo");
    assert_eq!(arena[0]["messages"][0]["role"], "user");
    assert_eq!(
        arena[0]["messages"][0]["content"],
        "Explain recursion to a child."
    );
    assert!(arena[0]["messages"][1]["content"]["answer"].is_string());
    assert!(arena[0]["metadata"]["token_len"]
        .as_u64()
        .is_some_and(|n| n > 0));
    assert!(arena[0]["ans_id"].is_string() && arena[0]["tstamp"].is_number());

    for out in ["mt1", "mt2"] {
        run(
            "mt-bench",
            "testdata/judges/mt_bench_question.jsonl",
            &dir.join(out),
        );
    }
    let (a, b) = (
        lines(&dir.join("mt1/model_answer/tiny-dpo.jsonl")),
        lines(&dir.join("mt2/model_answer/tiny-dpo.jsonl")),
    );
    assert_eq!(a.len(), 3);
    assert_eq!(a[1]["question_id"], 111);
    assert_eq!(a[1]["model_id"], "tiny-dpo");
    assert_eq!(a[1]["choices"][0]["index"], 0);
    assert_eq!(
        a[1]["choices"][0]["turns"].as_array().map(Vec::len),
        Some(2)
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["choices"], y["choices"], "same seed, same answers");
        assert_eq!(x["answer_id"], y["answer_id"]);
    }
}

/// `edpo bandit` on a small problem: both label kinds, every method, the paired differences.
#[test]
fn bandit_prints_methods_and_paired_differences() {
    let o = Command::new(env!("CARGO_BIN_EXE_edpo"))
        .args(["bandit", "--seeds", "3", "--prompts", "4", "--steps", "20"])
        .output()
        .expect("run edpo");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for needle in [
        "| Bradley–Terry | DPO β=0.5 |",
        "| deterministic | IPO β=0.5 |",
        "| deterministic | ε-DPO β₀=0.5, ε=0.05 |",
        "Each method − DPO, paired by seed",
        "| deterministic | rDPO β=0.5, ℓ=0.1 |",
        "3 seeds × 4 prompts",
    ] {
        assert!(out.contains(needle), "`{needle}` not in\n{out}");
    }
}
