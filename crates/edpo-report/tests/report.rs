//! A report rendered from a small sweep directory written here (three DPO and ε-DPO settings,
//! two seeds, plus a failed and an unfinished run): the tables' numbers against the inputs,
//! every figure written as a non-empty PNG and SVG with drawn content, and the skipped runs listed.

use serde_json::json;
use std::path::{Path, PathBuf};

fn write(dir: &Path, name: &str, value: &serde_json::Value) {
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(
        dir.join(name),
        serde_json::to_string_pretty(value).expect("json"),
    )
    .expect("write");
}

fn run(
    root: &Path,
    hash: &str,
    objective: serde_json::Value,
    seed: u64,
    win: f64,
    kl: f64,
    state: &str,
) {
    let dir = root.join("runs").join(hash);
    write(&dir, "status.json", &json!({"state": state}));
    write(
        &dir,
        "config.json",
        &json!({"objective": objective, "run": {"seed": seed}}),
    );
    if state == "completed" {
        write(
            &dir,
            "eval.json",
            &json!({"win_rate": win, "kl": kl, "gold_reward": win - 0.5, "preference_accuracy": 0.6}),
        );
        let lines: Vec<String> = (0..4)
            .map(|s| {
                json!({"step": s, "loss": 0.69, "kl/beta": 0.1 - 0.001 * s as f64, "kl/p_epsilon_steps": 0.5,
                       "kl/n_epsilon_steps": 0.25, "kl/p_true_relaxed": 0.7, "kl/p_true_strengthened": 0.6, "kl/p_true_kept": 0.55})
                .to_string()
            })
            .collect();
        std::fs::write(dir.join("metrics.jsonl"), lines.join("\n") + "\n").expect("metrics");
    }
}

fn fixture() -> PathBuf {
    let root = std::env::temp_dir().join(format!("edpo-report-fixture-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dpo =
        |b: f64| json!({"kind": "dpo", "beta": b, "sft_weight": 0.0, "reference_logps": "online"});
    let eps = |e: f64| json!({"kind": "epsilon_dpo", "beta": 0.1, "epsilon": e, "sft_weight": 0.0, "reference_logps": "online"});
    run(&root, "a0", dpo(0.1), 0, 0.60, 2.0, "completed");
    run(&root, "a1", dpo(0.1), 1, 0.70, 3.0, "completed");
    run(&root, "b0", dpo(0.5), 0, 0.55, 1.0, "completed");
    run(&root, "b1", dpo(0.5), 1, 0.55, 1.2, "completed");
    run(&root, "c0", eps(0.01), 0, 0.65, 2.5, "completed");
    run(&root, "c1", eps(0.01), 1, 0.75, 2.7, "completed");
    run(&root, "d0", eps(0.05), 0, 0.5, 9.0, "failed");
    run(&root, "e0", eps(0.05), 1, 0.5, 9.0, "running");
    root
}

#[test]
fn report_from_a_fixture_sweep() -> Result<(), Box<dyn std::error::Error>> {
    let sweep = fixture();
    let out = sweep.join("report");
    let summary = edpo_report::build_report(&sweep, &out)?;
    assert_eq!(summary.runs, 6);
    assert_eq!(summary.skipped.len(), 2, "{:?}", summary.skipped);
    assert!(
        summary.skipped.iter().any(|s| s.contains("failed"))
            && summary.skipped.iter().any(|s| s.contains("running"))
    );
    // DPO β=0.1: win rates 0.60 and 0.70 → mean 0.650, interval t(1)·s/√2 = 12.706·0.0707/1.414 = 0.635.
    let csv = std::fs::read_to_string(out.join("tables/results.csv"))?;
    let row = csv
        .lines()
        .find(|l| l.starts_with("DPO,β=0.1"))
        .ok_or("DPO β=0.1 row")?;
    assert!(row.contains("0.650 ± 0.635"), "{row}");
    assert!(row.contains("2.500 ± 6.353"), "{row}");
    let best = std::fs::read_to_string(out.join("tables/best_per_method.csv"))?;
    assert!(
        best.lines()
            .any(|l| l.starts_with("ε-DPO") && l.contains("0.700")),
        "{best}"
    );
    let tex = std::fs::read_to_string(out.join("tables/results.tex"))?;
    assert!(tex.contains("\\toprule") && tex.contains("\\bottomrule"));
    for name in [
        "frontier",
        "epsilon_ablation",
        "beta_dynamics",
        "steps_vs_confusion",
    ] {
        let png = std::fs::read(out.join("figures").join(format!("{name}.png")))?;
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 5_000,
            "{name}.png"
        );
        let svg = std::fs::read_to_string(out.join("figures").join(format!("{name}.svg")))?;
        assert!(
            svg.contains("<circle") || svg.contains("<polyline"),
            "{name}.svg has no drawn data"
        );
    }
    let html = std::fs::read_to_string(out.join("report.html"))?;
    assert_eq!(html.matches("<svg").count(), 4, "every figure inline");
    assert!(std::fs::read_to_string(out.join("report.md"))?.contains("figures/frontier.svg"));
    Ok(())
}
