//! Tests of the experiment engine through the binary: config resolution and grid expansion
//! snapshots, config errors, determinism, resume after a real kill, and the non-finite guard.
//!
//! Snapshots live in `testdata/snapshots/`; to accept a change, rerun with
//! `UPDATE_SNAPSHOTS=1 cargo test -p edpo --test engine` and review the diff.

mod common;

use common::{edpo, root};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn scratch(name: &str) -> common::Scratch {
    common::scratch("engine", name)
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

fn snapshot(name: &str, actual: &str) {
    let path = root().join("testdata/snapshots").join(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).expect("write snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        actual, expected,
        "snapshot {name} differs (UPDATE_SNAPSHOTS=1 to accept)"
    );
}

#[test]
fn resolved_config_snapshot() {
    let out = edpo(&["train", "experiments/synthetic.yaml", "--print-config"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    snapshot("synthetic.resolved.yaml", &text(&out.stdout));
    let with_set = edpo(&[
        "train",
        "experiments/synthetic.yaml",
        "--print-config",
        "--set",
        "objective={kind: dpo, beta: 0.3}",
        "--set",
        "optim.lr=2e-3",
    ]);
    assert!(with_set.status.success(), "{}", text(&with_set.stderr));
    snapshot(
        "synthetic.dpo-override.resolved.yaml",
        &text(&with_set.stdout),
    );
}

#[test]
fn grid_expansion_snapshot() {
    let out = edpo(&["sweep", "experiments/synthetic-ablation.yaml", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    snapshot("synthetic-ablation.dry-run.txt", &text(&out.stdout));
    let zipped = scratch("zip");
    std::fs::copy(
        root().join("experiments/synthetic.yaml"),
        zipped.join("base.yaml"),
    )
    .expect("copy");
    std::fs::write(
        zipped.join("grid.yaml"),
        "base: base.yaml\nname: z\nseeds: [7]\naxes:\n  objective.beta: [0.1, 0.2]\nzip:\n  optim.lr: [1.0e-3, 2.0e-3]\n  optim.epochs: [1, 2]\ninclude:\n  - {objective.epsilon: 0.5}\nexclude:\n  - {objective.beta: 0.2, optim.lr: 2.0e-3}\n",
    )
    .expect("grid");
    let out = edpo(&[
        "sweep",
        zipped.join("grid.yaml").to_str().expect("utf8"),
        "--dry-run",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table: Vec<String> = text(&out.stdout)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().skip(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        &table[..4],
        [
            "objective.beta=0.1 optim.lr=0.001 optim.epochs=1 run.seed=7",
            "objective.beta=0.1 optim.lr=0.002 optim.epochs=2 run.seed=7",
            "objective.beta=0.2 optim.lr=0.001 optim.epochs=1 run.seed=7",
            "objective.epsilon=0.5 run.seed=7",
        ]
    );
}

fn expect_config_error(yaml: &str, needles: &[&str]) {
    let dir = scratch("cfg");
    let path = dir.join("bad.yaml");
    std::fs::write(&path, yaml).expect("write");
    let out = edpo(&["train", path.to_str().expect("utf8"), "--print-config"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

#[test]
fn config_errors_name_file_line_and_key() {
    let base = std::fs::read_to_string(root().join("experiments/synthetic.yaml")).expect("base");
    expect_config_error(
        &base.replace("  lr: 1.0e-3", "  lrr: 1.0e-3"),
        &["bad.yaml", "optim: unknown field `lrr`", "line 25"],
    );
    expect_config_error(
        &base.replace("  batch_size: 16", "  batch_size: many"),
        &["bad.yaml", "optim.batch_size: invalid type", "line 28"],
    );
    expect_config_error(
        &base.replace("  epsilon: 0.01", "  epsilon: 1.5"),
        &["bad.yaml:23", "key `objective.epsilon`", "(0, 1)"],
    );
    expect_config_error(
        &base.replace("  kind: synthetic", "  kind: \"synthetic"),
        &["bad.yaml", "line"],
    );
    expect_config_error(
        &base.replace("  kind: epsilon_dpo", "  kind: ppo"),
        &[
            "bad.yaml",
            "key `objective.kind`: unknown objective `ppo`",
            "bad.yaml:21",
        ],
    );
    let out = edpo(&[
        "train",
        "experiments/synthetic.yaml",
        "--print-config",
        "--set",
        "optim.lr=abc",
    ]);
    assert!(
        text(&out.stderr).contains("optim.lr: invalid type"),
        "{}",
        text(&out.stderr)
    );
    let out = edpo(&[
        "train",
        "experiments/synthetic.yaml",
        "--print-config",
        "--set",
        "optim.lrr=1",
    ]);
    assert!(
        text(&out.stderr).contains("unknown field `lrr`"),
        "{}",
        text(&out.stderr)
    );
    let out = edpo(&[
        "train",
        "experiments/synthetic.yaml",
        "--print-config",
        "--set",
        "optim.lr",
    ]);
    assert!(
        text(&out.stderr).contains("not of the form key=value"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn same_config_and_seed_give_identical_metrics() {
    let (a, b) = (scratch("det-a"), scratch("det-b"));
    let small = [
        "--set",
        "task.train_pairs=64",
        "--set",
        "task.sft_steps=30",
        "--set",
        "task.eval_prompts=16",
        "--set",
        "task.eval_pairs=8",
    ];
    let mut metrics = Vec::new();
    for dir in [&a, &b] {
        let mut args = vec![
            "train",
            "experiments/synthetic.yaml",
            "--out",
            dir.to_str().expect("utf8"),
        ];
        args.extend(small);
        let out = edpo(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let run = synthetic_run_dir(dir);
        metrics.push((
            std::fs::read(run.join("metrics.jsonl")).expect("metrics"),
            std::fs::read(run.join("eval.json")).expect("eval"),
        ));
    }
    assert!(!metrics[0].0.is_empty());
    assert!(
        metrics[0] == metrics[1],
        "metrics.jsonl or eval.json differ between identical runs"
    );
    // `--print-stages` names exactly the cache entries the run built.
    let mut args = vec!["train", "experiments/synthetic.yaml", "--print-stages"];
    args.extend(small);
    let printed = edpo(&args);
    assert!(printed.status.success(), "{}", text(&printed.stderr));
    let mut printed: Vec<String> = text(&printed.stdout).lines().map(str::to_string).collect();
    printed.sort();
    let mut built: Vec<String> = std::fs::read_dir(a.join("cache"))
        .expect("cache")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    built.sort();
    assert_eq!(printed, built);
}

/// Overrides that shrink the synthetic task to a run of a fraction of a second.
const TINY: [&str; 12] = [
    "--set",
    "task.train_pairs=32",
    "--set",
    "task.sft_steps=10",
    "--set",
    "task.eval_prompts=8",
    "--set",
    "task.val_prompts=4",
    "--set",
    "task.eval_pairs=4",
    "--set",
    "optim.epochs=1",
];

/// The run directory `edpo train experiments/synthetic.yaml --out DIR` made in `dir`.
fn synthetic_run_dir(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .expect("out")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("synthetic-"))
        .expect("run dir")
        .path()
}

/// What the damage test expects to be told, and how it does the damage.
type Damage<'a> = (&'a str, Box<dyn Fn() + 'a>);

/// A cached stage truncated, altered or extended after it was built is detected, reported and
/// rebuilt, never used, and the run on the rebuilt stage gives the same numbers.
#[test]
fn a_damaged_stage_is_detected_and_rebuilt() {
    let dir = scratch("damaged");
    let out = dir.to_str().expect("utf8");
    let mut args = vec!["train", "experiments/synthetic.yaml", "--out", out];
    args.extend(TINY);
    let first = edpo(&args);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let run = synthetic_run_dir(&dir);
    let eval = std::fs::read(run.join("eval.json")).expect("eval");
    let stage = |prefix: &str| {
        std::fs::read_dir(dir.join("cache"))
            .expect("cache")
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .expect("stage")
            .path()
    };
    let model = stage("reference-").join("model.safetensors");
    let pairs = stage("pairs-").join("train.jsonl");
    let damage: [Damage<'_>; 3] = [
        (
            "bytes, 0 were written",
            Box::new(|| {
                let bytes = std::fs::read(&model).expect("model");
                std::fs::write(&model, &bytes[..bytes.len() / 2]).expect("truncate");
            }),
        ),
        (
            "was altered",
            Box::new(|| {
                let mut t = std::fs::read(&pairs).expect("pairs");
                t[10] ^= 1;
                std::fs::write(&pairs, t).expect("flip");
            }),
        ),
        (
            "was added after it was built",
            Box::new(|| std::fs::write(stage("pairs-").join("stray.txt"), "x").expect("add")),
        ),
    ];
    for (why, harm) in damage {
        harm();
        std::fs::remove_dir_all(&run).expect("remove run");
        let again = edpo(&args);
        let err = text(&again.stderr);
        assert!(again.status.success(), "{err}");
        assert!(
            err.contains("failed its check") && err.contains(why.split(',').next().unwrap_or(why)),
            "{why}: {err}"
        );
        assert!(
            std::fs::read(run.join("eval.json")).expect("eval") == eval,
            "{why}: the rebuilt stage gave other numbers"
        );
    }
}

fn statuses(sweep_root: &Path) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(sweep_root.join("runs")) {
        for e in entries.flatten() {
            if let Ok(t) = std::fs::read_to_string(e.path().join("status.json")) {
                if let Ok(v) = serde_json::from_str(&t) {
                    out.push((e.file_name().to_string_lossy().into_owned(), v));
                }
            }
        }
    }
    out
}

/// Every file in the tree parses as what its name says (no truncated or half-written file).
/// Temporary files of a killed writer are allowed only when `allow_temporary` (they are never
/// read, and the next run in that directory clears them).
fn assert_tree_well_formed(dir: &Path, allow_temporary: bool) {
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        let p = e.path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        if name.contains(".tmp-") {
            assert!(allow_temporary, "temporary file left: {}", p.display());
            continue;
        }
        if p.is_dir() {
            assert_tree_well_formed(&p, allow_temporary);
            continue;
        }
        let t = std::fs::read_to_string(&p).unwrap_or_default();
        if name.ends_with(".json") {
            serde_json::from_str::<serde_json::Value>(&t)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        } else if name.ends_with(".jsonl") {
            for l in t.lines() {
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
        }
    }
}

#[test]
fn killed_sweep_resumes_where_it_stopped() {
    let out = scratch("kill");
    let grid = out.join("grid.yaml");
    std::fs::copy(
        root().join("experiments/synthetic.yaml"),
        out.join("base.yaml"),
    )
    .expect("copy");
    std::fs::write(&grid, "base: base.yaml\nname: k\nset: {task.train_pairs: 256, task.sft_steps: 30, optim.epochs: 6}\nseeds: [0, 1, 2, 3]\n").expect("grid");
    let report = out.join("report");
    let args = [
        "sweep",
        grid.to_str().expect("utf8"),
        "--jobs",
        "1",
        "--out",
        out.to_str().expect("utf8"),
        "--report-out",
        report.to_str().expect("utf8"),
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_edpo"))
        .args(args)
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let sweep_root = out.join("k");
    let start = Instant::now();
    // Wait until one run has completed and the next is running, then kill (SIGKILL).
    loop {
        let s = statuses(&sweep_root);
        let done = s.iter().filter(|(_, v)| v["state"] == "completed").count();
        let running = s.iter().filter(|(_, v)| v["state"] == "running").count();
        if done >= 1 && running >= 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "sweep made no progress"
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "sweep finished before it could be killed; make its runs longer"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("kill");
    child.wait().expect("reap");
    let before = statuses(&sweep_root);
    assert_tree_well_formed(&out, true);
    let completed: Vec<(String, serde_json::Value)> = before
        .iter()
        .filter(|(_, v)| v["state"] == "completed")
        .cloned()
        .collect();
    let interrupted: Vec<String> = before
        .iter()
        .filter(|(_, v)| v["state"] == "running")
        .map(|(h, _)| h.clone())
        .collect();
    assert!(!completed.is_empty() && !interrupted.is_empty());

    let again = edpo(&args);
    assert!(again.status.success(), "{}", text(&again.stderr));
    let table = text(&again.stdout);
    let after = statuses(&sweep_root);
    assert_eq!(after.len(), 4);
    assert!(
        after.iter().all(|(_, v)| v["state"] == "completed"),
        "{after:?}"
    );
    for (hash, v) in &completed {
        let now = after.iter().find(|(h, _)| h == hash).expect("run");
        assert_eq!(
            now.1["started_unix"], v["started_unix"],
            "completed run {hash} was rerun"
        );
        assert!(
            table
                .lines()
                .any(|l| l.contains(hash.as_str()) && l.contains("skipped")),
            "{table}"
        );
    }
    for hash in &interrupted {
        assert!(
            table
                .lines()
                .any(|l| l.contains(hash.as_str()) && l.contains("completed")),
            "{table}"
        );
    }
    assert_tree_well_formed(&out, false);
}

#[test]
fn a_diverging_run_fails_alone_and_the_sweep_reports_it() {
    let out = scratch("nan");
    std::fs::copy(
        root().join("experiments/synthetic.yaml"),
        out.join("base.yaml"),
    )
    .expect("copy");
    let grid = out.join("grid.yaml");
    std::fs::write(&grid, "base: base.yaml\nname: n\nset: {task.train_pairs: 64, task.sft_steps: 20, optim.max_grad_norm: 0, optim.schedule: constant, optim.warmup_ratio: 0.0}\naxes:\n  optim.lr: [1.0e-3, 1.0e+30]\n").expect("grid");
    let report = out.join("report");
    let o = edpo(&[
        "sweep",
        grid.to_str().expect("utf8"),
        "--jobs",
        "2",
        "--out",
        out.to_str().expect("utf8"),
        "--report-out",
        report.to_str().expect("utf8"),
    ]);
    assert!(!o.status.success(), "a failed run must fail the sweep");
    let err = text(&o.stderr);
    assert!(
        err.contains("1 of 2 runs failed") && err.contains("non-finite"),
        "{err}"
    );
    let s = statuses(&out.join("n"));
    assert_eq!(
        s.iter().filter(|(_, v)| v["state"] == "completed").count(),
        1
    );
    let failed = s
        .iter()
        .find(|(_, v)| v["state"] == "failed")
        .expect("failed run");
    assert!(
        failed.1["error"].to_string().contains("non-finite"),
        "{:?}",
        failed.1
    );
    // The shared stages were built once, whatever the number of runs using them.
    let stages: Vec<String> = std::fs::read_dir(out.join("cache"))
        .expect("cache")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        stages
            .iter()
            .filter(|n| n.starts_with("reference-"))
            .count(),
        1,
        "{stages:?}"
    );
    assert_eq!(
        stages.iter().filter(|n| n.starts_with("pairs-")).count(),
        1,
        "{stages:?}"
    );
    assert!(stages.iter().all(|n| !n.starts_with(".tmp")), "{stages:?}");
}

/// A run with LoRA adapters (`lora` section): it trains, moves the policy away from the
/// reference, records the section in its config; TR-DPO, which moves the reference the LoRA
/// policy shares its base with, is refused; a target no module has fails the run by name.
#[test]
fn lora_runs_train_adapters_from_the_config() {
    let dir = scratch("lora");
    let out = dir.to_str().expect("utf8");
    let run = |lora: &str, objective: Option<&str>| {
        let mut args = vec!["train", "experiments/synthetic.yaml", "--out", out];
        args.extend(TINY);
        args.extend(["--set", "optim.lr=1e-2"]);
        let set = format!("lora={lora}");
        args.extend(["--set", set.as_str()]);
        let objective = objective.map(|o| format!("objective={o}"));
        if let Some(o) = &objective {
            args.extend(["--set", o.as_str()]);
        }
        edpo(&args)
    };
    let ok = run("{r: 2, alpha: 4, targets: [c_attn, c_fc]}", None);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let eval: serde_json::Value = serde_json::from_str(&text(&ok.stdout)).expect("eval json");
    assert!(eval["kl"].as_f64().expect("kl") > 0.0, "{eval}");
    let run_dir = synthetic_run_dir(&dir);
    let yaml = std::fs::read_to_string(run_dir.join("config.yaml")).expect("config");
    assert!(yaml.contains("lora:") && yaml.contains("c_attn"), "{yaml}");
    let tr = run(
        "{r: 2, targets: [c_attn]}",
        Some("{kind: tr_dpo, beta: 0.1}"),
    );
    assert!(!tr.status.success());
    assert!(
        text(&tr.stderr).contains("key `lora`"),
        "{}",
        text(&tr.stderr)
    );
    let missing = run("{r: 2, targets: [q_proj]}", None);
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("q_proj"),
        "{}",
        text(&missing.stderr)
    );
}

/// On-policy rounds: the label budget of offline training in two rounds, the second on pairs
/// drawn from the policy and labelled by the task's rule. With the reference reset to the
/// policy that ended round 0, DPO's first loss of round 1 is exactly log 2 (policy and
/// reference agree, Δ = 0); with the reference fixed it is not. Bad keys are errors naming
/// them.
#[test]
fn online_rounds_sample_label_and_train_on_the_policys_pairs() {
    // The tiny synthetic task with 64 pairs (a later `--set` wins) and DPO.
    let mut base: Vec<&str> = TINY.to_vec();
    base.extend([
        "--set",
        "task.train_pairs=64",
        "--set",
        r#"objective={"kind":"dpo","beta":0.1}"#,
    ]);
    let mut first_losses = Vec::new();
    for reference in ["fixed", "previous"] {
        let dir = scratch(&format!("online-{reference}"));
        let online = format!(r#"online={{"rounds":2,"reference":"{reference}"}}"#);
        let mut args = vec![
            "train",
            "experiments/synthetic.yaml",
            "--out",
            dir.to_str().expect("utf8"),
            "--set",
            &online,
        ];
        args.extend(&base);
        let out = edpo(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let run = synthetic_run_dir(&dir);
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        // 32 pairs a round, 16 a step: round 1 starts at step 2.
        let round: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l.get("online/round").is_some())
            .collect();
        assert_eq!(round.len(), 1, "{lines:?}");
        assert_eq!(round[0]["step"], 2);
        let made = round[0]["online/pairs"].as_u64().expect("pairs");
        let left = round[0]["online/left_out"].as_u64().expect("left out");
        assert_eq!(made + left, 32);
        let noise = round[0]["online/label_noise"].as_f64().expect("noise");
        assert!((0.0..=0.5).contains(&noise), "{noise}");
        let eval: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).expect("eval"))
                .expect("json");
        assert_eq!(eval["steps"], 4);
        let loss_at_2 = lines
            .iter()
            .find(|l| l["step"] == 2 && l.get("loss").is_some())
            .and_then(|l| l["loss"].as_f64())
            .expect("loss at step 2");
        first_losses.push(loss_at_2);
    }
    let ln2 = std::f64::consts::LN_2;
    assert!((first_losses[1] - ln2).abs() < 1e-6, "{first_losses:?}");
    assert!((first_losses[0] - ln2).abs() > 1e-4, "{first_losses:?}");
    for (set, needle) in [
        (r#"online={"rounds":1}"#, "online.rounds"),
        (
            r#"online={"rounds":2,"reference":"latest"}"#,
            "online.reference",
        ),
    ] {
        let out = edpo(&[
            "train",
            "experiments/synthetic.yaml",
            "--print-config",
            "--set",
            set,
        ]);
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains(needle), "{}", text(&out.stderr));
    }
}
