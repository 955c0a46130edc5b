//! The baselines in the training loop: reference-free methods never run the reference model,
//! cached reference log-probs are computed once, reused across runs and rebuilt when what they
//! depend on changes, TR-DPO updates its reference on schedule, and every method trains.

mod common;

use common::{edpo, root};
use std::path::Path;

fn scratch(name: &str) -> common::Scratch {
    let dir = common::scratch("baselines", name);
    std::fs::copy(
        root().join("experiments/synthetic.yaml"),
        dir.join("base.yaml"),
    )
    .expect("copy");
    dir
}

const SMALL: &str = "set: {task.train_pairs: 64, task.sft_steps: 20, task.eval_prompts: 16, task.eval_pairs: 8, optim.epochs: 1}";

fn sweep(dir: &Path, grid: &str) -> Vec<serde_json::Value> {
    std::fs::write(dir.join("grid.yaml"), grid).expect("grid");
    let report = dir.join("report");
    let o = edpo(&[
        "sweep",
        dir.join("grid.yaml").to_str().expect("utf8"),
        "--out",
        dir.to_str().expect("utf8"),
        "--report-out",
        report.to_str().expect("utf8"),
    ]);
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("g/sweep.json")).expect("manifest"))
            .expect("json");
    manifest["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| {
            let hash = r["hash"].as_str().expect("hash");
            let t = std::fs::read_to_string(dir.join("g/runs").join(hash).join("eval.json"))
                .expect("eval");
            serde_json::from_str(&t).expect("json")
        })
        .collect()
}

fn stages(dir: &Path, prefix: &str) -> usize {
    std::fs::read_dir(dir.join("cache"))
        .expect("cache")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .count()
}

#[test]
fn every_method_trains_and_reference_free_methods_never_run_the_reference() {
    let dir = scratch("all");
    let grid = format!(
        "base: base.yaml\nname: g\n{SMALL}\naxes:\n  objective:\n{}",
        [
            "{kind: slic}",
            "{kind: simpo}",
            "{kind: cpo}",
            "{kind: orpo}",
            "{kind: repo}",
            "{kind: cdpo, beta: 0.1}",
            "{kind: rdpo, beta: 0.1}",
            "{kind: ipo, beta: 0.5}",
            "{kind: hinge, beta: 0.1}",
            "{kind: rdpo_len, beta: 0.1}",
            "{kind: kto, beta: 0.1}",
            "{kind: beta_dpo}",
            "{kind: tr_dpo, beta: 0.1, tau: 2}",
            "{kind: epsilon_dpo, beta: 0.1, epsilon: 0.05, sft_weight: 0.1}",
            // The related objectives; ODPO reads the pairs' gold rewards as their scores (the
            // plain difference: Bradley–Terry labels leave some chosen responses below).
            "{kind: odpo, beta: 0.1, log_offset: false}",
            "{kind: hdpo, beta: 0.1, alpha: 0.9}",
            "{kind: chipo, beta: 0.1}",
            "{kind: sppo_hard, beta: 0.5}",
            "{kind: bpo, beta: 0.1}",
            "{kind: alpha_dpo}",
        ]
        .iter()
        .map(|o| format!("    - {o}\n"))
        .collect::<String>()
    );
    let evals = sweep(&dir, &grid);
    assert_eq!(evals.len(), 20);
    for (i, e) in evals.iter().enumerate() {
        assert!(
            e["win_rate"].as_f64().is_some_and(f64::is_finite),
            "run {i}: {e}"
        );
        let passes = e["training_reference_forward_passes"]
            .as_u64()
            .expect("passes");
        if i < 5 {
            assert_eq!(passes, 0, "reference-free run {i} ran the reference");
        } else {
            assert!(passes > 0, "run {i} needs its reference");
        }
    }
    // TR-DPO, 4 optimizer steps with tau 2: two reference updates.
    assert_eq!(evals[12]["reference_updates"], 2);
}

#[test]
fn cached_reference_logps_are_reused_and_invalidated() {
    let dir = scratch("cache");
    let grid = |pairs: usize| {
        format!(
            "base: base.yaml\nname: g\nset: {{task.train_pairs: {pairs}, task.sft_steps: 20, task.eval_prompts: 16, task.eval_pairs: 8, optim.epochs: 1}}\naxes:\n  objective:\n    - {{kind: dpo, beta: 0.1, reference_logps: cached}}\n    - {{kind: dpo, beta: 0.2, reference_logps: cached}}\n    - {{kind: dpo, beta: 0.1}}\n"
        )
    };
    let evals = sweep(&dir, &grid(64));
    assert_eq!(evals[0]["training_reference_forward_passes"], 0);
    assert_eq!(evals[1]["training_reference_forward_passes"], 0);
    assert!(evals[2]["training_reference_forward_passes"].as_u64() > Some(0));
    assert_eq!(
        stages(&dir, "reference-logps-"),
        1,
        "two runs, one cached computation"
    );
    // Cached and online reference log-probs train the same policy.
    for k in ["win_rate", "kl", "preference_accuracy"] {
        let (a, b) = (
            evals[0][k].as_f64().expect("a"),
            evals[2][k].as_f64().expect("b"),
        );
        assert!((a - b).abs() < 1e-4, "{k}: cached {a} vs online {b}");
    }
    // Different data: a new cache entry, the old one kept.
    sweep(&dir, &grid(80));
    assert_eq!(stages(&dir, "reference-logps-"), 2);
    assert_eq!(stages(&dir, "pairs-"), 2);
    assert_eq!(
        stages(&dir, "reference-"),
        2 + 1,
        "one reference model, two log-prob caches"
    );
}
