//! The Slurm launcher against a real Slurm: `tools/slurm/cluster.sh start` brings up a
//! single-node cluster (munged, MariaDB, slurmdbd, slurmctld, slurmd), and `.ci/run` starts it
//! and sets `EDPO_SLURM_REQUIRED=1`, so CI always runs these tests. Without `sbatch` (a
//! laptop) they are skipped with a message; with `EDPO_SLURM_REQUIRED` set, a missing cluster
//! is a failure instead.
//!
//! - the smoke grid through `--launcher slurm` (stages in a first job the array depends on)
//!   completes, and every file of its runs is byte-identical to the local launcher's;
//! - `scancel` of a running task and a task past its time limit leave retryable failed
//!   statuses; a second submission while the first runs submits nothing; a task started by
//!   hand on a run another task holds refuses it; resubmission runs exactly the missing runs,
//!   and their files equal the local launcher's;
//! - `edpo sweep status` agrees with `sacct` during and after the runs.

mod common;

use common::{edpo, root, same_run_files, scratch};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Whether a Slurm cluster answers; a skip message otherwise (a failure under
/// `EDPO_SLURM_REQUIRED`).
fn slurm_available(test: &str) -> bool {
    let why = if Command::new("sbatch").arg("--version").output().is_err() {
        Some("`sbatch` is not installed".to_string())
    } else {
        match Command::new("sinfo").args(["-h", "-o", "%T"]).output() {
            Ok(o) if o.status.success() && !o.stdout.is_empty() => None,
            Ok(o) => Some(format!(
                "`sinfo` does not answer: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Some(format!("`sinfo` cannot run: {e}")),
        }
    };
    match why {
        None => true,
        Some(why) if std::env::var_os("EDPO_SLURM_REQUIRED").is_some() => {
            panic!("{test}: EDPO_SLURM_REQUIRED is set but {why}; start one with `tools/slurm/cluster.sh start`")
        }
        Some(why) => {
            eprintln!(
                "SKIPPED {test}: {why} (start a single-node cluster with `tools/slurm/cluster.sh start`)"
            );
            false
        }
    }
}

fn edpo_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_edpo"));
    c.args(args)
        .current_dir(root())
        .env_remove("EDPO_FAULT_STEP_DELAY_MS");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run edpo")
}

fn ok(o: &Output) -> String {
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{text}");
    text
}

fn status(sweep: &Path) -> Vec<Value> {
    let o = edpo(&[
        "sweep",
        "status",
        sweep.to_str().expect("utf-8 path"),
        "--json",
    ]);
    let text = ok(&o);
    serde_json::from_str::<Vec<Value>>(&String::from_utf8_lossy(&o.stdout))
        .unwrap_or_else(|e| panic!("status JSON: {e}\n{text}"))
}

/// `sacct`'s state of every task of `jobs` (`JOBID_TASK` → state), asked directly.
fn sacct(jobs: &[String]) -> BTreeMap<String, String> {
    let o = Command::new("sacct")
        .args([
            "-n",
            "-P",
            "-X",
            "--format=JobID,State",
            "-j",
            &jobs.join(","),
        ])
        .output()
        .expect("sacct");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_once('|'))
        .filter(|(id, _)| !id.contains('['))
        .map(|(id, st)| {
            let st = st.split_whitespace().next().unwrap_or_default();
            (id.to_string(), st.to_string())
        })
        .collect()
}

/// `squeue`'s state of every task of `jobs` the controller still holds.
fn squeue(jobs: &[String]) -> BTreeMap<String, String> {
    let o = Command::new("squeue")
        .args([
            "-h",
            "-r",
            "-t",
            "all",
            "-o",
            "%i|%T",
            "-j",
            &jobs.join(","),
        ])
        .output()
        .expect("squeue");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.trim().split_once('|'))
        .map(|(id, st)| (id.to_string(), st.to_string()))
        .collect()
}

/// The states `edpo sweep status` may give a run whose latest task `sacct` reports in
/// `state` (a task still running may have just completed its run and not yet exited).
fn agrees(sacct_state: &str, ours: &str) -> bool {
    match sacct_state {
        "PENDING" => ours == "pending",
        "RUNNING" | "COMPLETING" => ours == "running" || ours == "completed",
        "COMPLETED" => ours == "completed",
        _ => ours == "failed",
    }
}

/// Checks `edpo sweep status` against `sacct` for every task in a settled state: the same in
/// `sacct` before and after, and not contradicted by the controller (`squeue`), which `sacct`
/// follows with a lag. Returns how many were compared.
fn check_against_sacct(sweep: &Path, jobs: &[String]) -> usize {
    let (before, live_before) = (sacct(jobs), squeue(jobs));
    let ours = status(sweep);
    let (after, live_after) = (sacct(jobs), squeue(jobs));
    let mut compared = 0;
    for run in &ours {
        let Some(job) = run["slurm"]["job"].as_str() else {
            continue;
        };
        let (Some(a), Some(b)) = (before.get(job), after.get(job)) else {
            continue;
        };
        let settled = |live: &BTreeMap<String, String>| live.get(job).is_none_or(|x| x == a);
        if a != b || !settled(&live_before) || !settled(&live_after) {
            continue;
        }
        let state = run["state"].as_str().expect("a string field");
        assert!(
            agrees(a, state),
            "run {} is `{state}` ({}) but sacct says {job} is {a}",
            run["index"],
            run["detail"]
        );
        compared += 1;
    }
    compared
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn submissions(sweep: &Path) -> Vec<Value> {
    std::fs::read_to_string(sweep.join("slurm/submissions.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a submission line"))
        .collect()
}

fn job_ids(sweep: &Path) -> Vec<String> {
    submissions(sweep)
        .iter()
        .map(|s| s["job_id"].as_str().expect("a string field").to_string())
        .collect()
}

#[test]
fn the_smoke_grid_through_slurm_equals_the_local_launcher_byte_for_byte() {
    if !slurm_available("the_smoke_grid_through_slurm_equals_the_local_launcher_byte_for_byte") {
        return;
    }
    let dir = scratch("slurm", "smoke");
    let (local, cluster) = (dir.join("local"), dir.join("cluster"));
    ok(&edpo(&[
        "sweep",
        "experiments/smoke.yaml",
        "--out",
        local.to_str().expect("utf-8 path"),
        "--report-out",
        dir.join("report").to_str().expect("utf-8 path"),
    ]));
    // A cold cache: the stages are built by the first job, which the array depends on.
    let text = ok(&edpo(&[
        "sweep",
        "experiments/smoke.yaml",
        "--launcher",
        "slurm",
        "--stages-job",
        "--max-parallel",
        "2",
        "--out",
        cluster.to_str().expect("utf-8 path"),
    ]));
    assert!(text.contains("submitted stage job"), "{text}");
    let sweep = cluster.join("smoke");
    wait_until("the array to finish", Duration::from_secs(180), || {
        status(&sweep)
            .iter()
            .all(|r| r["state"] == "completed" || r["state"] == "failed")
    });
    let all = status(&sweep);
    assert!(
        all.iter().all(|r| r["state"] == "completed"),
        "{}",
        serde_json::to_string_pretty(&all).unwrap_or_default()
    );
    wait_until("sacct to record the array", Duration::from_secs(60), || {
        sacct(&job_ids(&sweep))
            .values()
            .filter(|s| *s == "COMPLETED")
            .count()
            == all.len()
    });
    assert_eq!(check_against_sacct(&sweep, &job_ids(&sweep)), all.len());
    assert_eq!(same_run_files(&local.join("smoke"), &sweep), 6);
    assert!(
        std::fs::read_dir(sweep.join("slurm"))
            .expect("slurm directory")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with("-stages.out")),
        "the stage job's log is beside the task logs"
    );
    // Everything is completed: a second submission submits nothing.
    let again = ok(&edpo(&[
        "sweep",
        "experiments/smoke.yaml",
        "--launcher",
        "slurm",
        "--out",
        cluster.to_str().expect("utf-8 path"),
    ]));
    assert!(again.contains("nothing to submit"), "{again}");
    assert_eq!(submissions(&sweep).len(), 1);
}

/// Four runs: grid points 0 and 1 take 100 optimizer steps, 2 and 3 take 4; with the fault
/// delay every step takes a second, so 0 and 1 run long enough to be cancelled and timed out.
const GRID: &str = "base: BASE
name: kills
set: {task.vocab_size: 400, task.pretrain_steps: 40, task.train_pairs: 32, task.eval_pairs: 8,
      task.eval_prompts: 24, task.val_prompts: 16, task.response_tokens: 8, model.n_embd: 32,
      model.n_layer: 1, model.n_head: 2, optim.batch_size: 8, eval.every: 0}
zip:
  objective: [{kind: dpo, beta: 0.1}, {kind: epsilon_dpo, beta: 0.1, epsilon: 0.01},
              {kind: dpo, beta: 0.1}, {kind: epsilon_dpo, beta: 0.1, epsilon: 0.01}]
  optim.epochs: [25, 25, 1, 1]
";

#[test]
fn cancelled_and_timed_out_tasks_are_retried_and_nothing_runs_twice() {
    if !slurm_available("cancelled_and_timed_out_tasks_are_retried_and_nothing_runs_twice") {
        return;
    }
    let dir = scratch("slurm", "kills");
    let grid = dir.join("grid.yaml");
    let base = root().join("experiments/sentiment.yaml");
    std::fs::write(
        &grid,
        GRID.replace("BASE", base.to_str().expect("utf-8 path")),
    )
    .expect("grid file");
    let (local, cluster) = (dir.join("local"), dir.join("cluster"));
    let grid = grid.to_str().expect("utf-8 path");
    ok(&edpo(&[
        "sweep",
        grid,
        "--out",
        local.to_str().expect("utf-8 path"),
        "--report-out",
        dir.join("report").to_str().expect("utf-8 path"),
    ]));
    let submit = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "sweep",
            grid,
            "--launcher",
            "slurm",
            "--out",
            cluster.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        ok(&edpo_env(&args, env))
    };
    let slow = [("EDPO_FAULT_STEP_DELAY_MS", "1000")];
    let first = submit(&["--time", "1"], &slow);
    assert!(first.contains("4 of 4 runs"), "{first}");
    let sweep = cluster.join("kills");
    let jobs = job_ids(&sweep);
    let job = jobs[0].clone();

    // While the first array runs, submitting again submits nothing.
    let again = submit(&[], &slow);
    assert!(again.contains("already queued or running"), "{again}");
    assert_eq!(submissions(&sweep).len(), 1, "{again}");

    // Grid point 0 is running; a task started by hand on it is refused.
    let steps = |i: usize| status(&sweep)[i]["steps_done"].as_u64().unwrap_or(0);
    wait_until("run 0 to take steps", Duration::from_secs(120), || {
        steps(0) >= 3
    });
    let twice = edpo(&[
        "sweep",
        "task",
        sweep.to_str().expect("utf-8 path"),
        "--index",
        "0",
    ]);
    assert!(!twice.status.success());
    let err = String::from_utf8_lossy(&twice.stderr);
    assert!(
        err.contains("not run twice") && err.contains(&format!("{job}_0")),
        "{err}"
    );

    // scancel of the running task: it stops at its next step and says why.
    let o = Command::new("scancel")
        .arg(format!("{job}_0"))
        .output()
        .expect("scancel");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_until("run 0 to fail", Duration::from_secs(60), || {
        status(&sweep)[0]["state"] == "failed"
    });
    let run0 = &status(&sweep)[0];
    assert!(
        run0["detail"]
            .as_str()
            .expect("detail")
            .contains("stopped by a signal"),
        "{run0}"
    );

    // Grid point 1 reaches its one-minute limit (Slurm checks limits every 30 s or so);
    // meanwhile 2 and 3 complete. Status agrees with sacct throughout.
    let mut compared = 0;
    wait_until("the first array to end", Duration::from_secs(240), || {
        compared += check_against_sacct(&sweep, &jobs);
        status(&sweep)
            .iter()
            .all(|r| r["state"] == "completed" || r["state"] == "failed")
    });
    assert!(compared > 0, "no task was stable enough to compare");
    wait_until("sacct to record the ends", Duration::from_secs(60), || {
        let s = sacct(&jobs);
        s.get(&format!("{job}_1")).is_some_and(|x| x == "TIMEOUT")
            && s.get(&format!("{job}_0")).is_some_and(|x| x == "CANCELLED")
    });
    check_against_sacct(&sweep, &jobs);
    let after_first = status(&sweep);
    let states: Vec<&str> = after_first
        .iter()
        .map(|r| r["state"].as_str().expect("a string field"))
        .collect();
    assert_eq!(states, ["failed", "failed", "completed", "completed"]);
    assert!(
        after_first[1]["detail"]
            .as_str()
            .expect("detail")
            .contains("TIMEOUT"),
        "{}",
        after_first[1]
    );
    let kept: Vec<Vec<u8>> = [2, 3]
        .iter()
        .map(|&i| {
            let hash = after_first[i]["hash"].as_str().expect("a string field");
            std::fs::read(sweep.join("runs").join(hash).join("status.json")).expect("status.json")
        })
        .collect();

    // Resubmission (no delay, no limit) runs exactly grid points 0 and 1.
    let second = submit(&[], &[]);
    assert!(
        second.contains("2 of 4 runs (2 completed), tasks 0-1"),
        "{second}"
    );
    wait_until(
        "the second array to finish",
        Duration::from_secs(120),
        || status(&sweep).iter().all(|r| r["state"] == "completed"),
    );
    for (k, &i) in [2, 3].iter().enumerate() {
        let hash = after_first[i]["hash"].as_str().expect("a string field");
        assert_eq!(
            std::fs::read(sweep.join("runs").join(hash).join("status.json")).expect("status.json"),
            kept[k],
            "completed run {i} was run again"
        );
    }
    let jobs = job_ids(&sweep);
    assert_eq!(jobs.len(), 2);
    wait_until(
        "sacct to record the second array",
        Duration::from_secs(60),
        || {
            let s = sacct(&jobs);
            (0..2).all(|t| {
                s.get(&format!("{}_{t}", jobs[1]))
                    .is_some_and(|x| x == "COMPLETED")
            })
        },
    );
    // The latest task of every run: 0 and 1 from the second array, 2 and 3 from the first.
    assert_eq!(check_against_sacct(&sweep, &jobs), 4);
    assert_eq!(same_run_files(&local.join("kills"), &sweep), 4);
}
