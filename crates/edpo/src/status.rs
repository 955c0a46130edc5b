//! `edpo sweep status SWEEP_DIR`: where every planned run of a sweep is — pending, running,
//! completed or failed — from its run directory, its lock and, for a sweep handed to Slurm,
//! its latest array task's state.
//!
//! The rules, in order: a run whose directory holds a completed evaluation of its planned
//! config is `completed`; one whose lock a live process holds is `running`; one whose latest
//! Slurm task is queued is `pending`, and `running` once the task runs; one whose directory
//! says failed, or says running with no live holder (killed: a time limit, a preemption, a
//! node failure, `kill -9`), is `failed`, with why; anything else is `pending`. A `failed` or
//! `pending` run is what the next launch runs.

use crate::holders::lock_is_stale;
use crate::slurm::{task_states, TaskState};
use anyhow::Result;
use edpo_rundir::sweep::run_dir;
use edpo_rundir::{read_lock, read_status, RunState, SweepManifest};
use serde::Serialize;
use std::path::Path;

/// Where one planned run is.
#[derive(Debug, Clone, Serialize)]
pub struct RunStatus {
    /// Grid index.
    pub index: usize,
    /// Config hash.
    pub hash: String,
    /// `pending`, `running`, `completed` or `failed`.
    pub state: &'static str,
    /// Optimizer steps done, when the run has started.
    pub steps_done: Option<usize>,
    /// Wall time of a finished run.
    pub wall_s: Option<f64>,
    /// Its latest Slurm task, when it was submitted to Slurm.
    pub slurm: Option<TaskState>,
    /// Why it is in that state, when there is more to say.
    pub detail: String,
    /// The overrides that make it.
    pub overrides: String,
}

/// The status of every planned run of the sweep in `root`, in grid order. Slurm is asked only
/// when the sweep was submitted to it.
pub fn statuses(root: &Path) -> Result<Vec<RunStatus>> {
    let manifest = SweepManifest::read(root)?;
    let slurm = task_states(root)?;
    Ok(manifest
        .runs
        .iter()
        .map(|entry| {
            let dir = run_dir(root, &entry.hash);
            let status = read_status(&dir);
            let task = slurm.get(&entry.index).cloned();
            let holder = read_lock(&dir)
                .and_then(|f| f.owner.map(|o| (o, f.age_s)))
                .filter(|(o, age)| !lock_is_stale(o, *age))
                .map(|(o, _)| o);
            let (state, detail) = phase(
                status.as_ref(),
                &entry.hash,
                dir.join(edpo_rundir::EVAL).exists(),
                holder.map(|o| o.describe()),
                task.as_ref(),
            );
            RunStatus {
                index: entry.index,
                hash: entry.hash.clone(),
                state,
                steps_done: status.as_ref().map(|s| s.steps_done),
                wall_s: status.as_ref().and_then(|s| s.wall_s),
                slurm: task,
                detail,
                overrides: entry.overrides.clone(),
            }
        })
        .collect())
}

/// The rules of the module documentation.
fn phase(
    status: Option<&edpo_rundir::Status>,
    hash: &str,
    has_eval: bool,
    holder: Option<String>,
    task: Option<&TaskState>,
) -> (&'static str, String) {
    if let Some(s) = status {
        if s.state == RunState::Completed && s.hash == hash && has_eval {
            return ("completed", String::new());
        }
    }
    if let Some(h) = holder {
        return ("running", format!("held by {h}"));
    }
    if let Some(t) = task.filter(|t| t.active()) {
        let earlier = match status.map(|s| s.state) {
            Some(RunState::Failed | RunState::Running) => " (an earlier attempt did not complete)",
            _ => "",
        };
        return if t.state == "PENDING" {
            ("pending", format!("queued as {}{earlier}", t.job))
        } else {
            ("running", format!("{} {}{earlier}", t.job, t.state))
        };
    }
    let ended = task
        .filter(|t| t.state != "COMPLETED")
        .map(|t| format!("; Slurm task {} ended {}", t.job, t.state))
        .unwrap_or_default();
    match status.map(|s| (s.state, s)) {
        Some((RunState::Failed, s)) => (
            "failed",
            format!(
                "{}{ended}",
                s.error.first().map(String::as_str).unwrap_or("failed")
            ),
        ),
        Some((RunState::Running, _)) => (
            "failed",
            format!("interrupted: no live process holds it{ended}"),
        ),
        Some((RunState::Completed, _)) => (
            "pending",
            "its directory holds another config's results".to_string(),
        ),
        None if !ended.is_empty() => ("failed", format!("never started{ended}")),
        None => ("pending", String::new()),
    }
}

/// Prints the status table (or JSON) of the sweep in `root`.
pub fn print(root: &Path, json: bool) -> Result<()> {
    let all = statuses(root)?;
    if json {
        say!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    say!(
        "{:>4}  {:<12}  {:<9}  {:>6}  {:<22}  detail",
        "run",
        "hash",
        "state",
        "steps",
        "slurm"
    );
    for r in &all {
        let slurm = r
            .slurm
            .as_ref()
            .map(|t| format!("{} {}", t.job, t.state))
            .unwrap_or_else(|| "-".into());
        let detail = if r.detail.is_empty() {
            r.overrides.clone()
        } else {
            r.detail.clone()
        };
        say!(
            "{:>4}  {:<12}  {:<9}  {:>6}  {:<22}  {}",
            r.index,
            r.hash,
            r.state,
            r.steps_done
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into()),
            slurm,
            detail
        );
    }
    let count = |s: &str| all.iter().filter(|r| r.state == s).count();
    say!(
        "{} runs: {} completed, {} running, {} pending, {} failed",
        all.len(),
        count("completed"),
        count("running"),
        count("pending"),
        count("failed")
    );
    Ok(())
}
