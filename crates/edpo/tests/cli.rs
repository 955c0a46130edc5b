//! End-to-end tests of the `edpo` binary: the score command's output, and bad input giving a
//! non-zero exit with one clear message naming the file and the key, tensor or line.

use std::path::{Path, PathBuf};
use std::process::Command;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edpo-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
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
    // Close the read end before the command writes its 80 lines.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?} {stderr}", out.status);
}
