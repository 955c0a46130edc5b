//! The Slurm launcher: a sweep handed to the cluster's scheduler as one job array, results
//! read back from the run directories on the shared filesystem.
//!
//! `edpo sweep GRID --launcher slurm` resolves and validates every run, writes the sweep
//! directory (manifest and planned configs, [`crate::sweep::prepare`]), builds the shared
//! stages (here, or in a first job the array depends on with `afterok`), and submits one
//! array, `--array=<indices>%<max parallel>`, whose task `i` runs grid point `i` with
//! `edpo sweep task SWEEP_DIR --index i`. Only runs that are neither completed nor already
//! queued or running are submitted, so submitting again after a time limit, a preemption, a
//! node failure or `scancel` runs exactly what is missing. A task writes its run directory as
//! any run does (each file atomically, under the run's lock), stops cleanly on the SIGTERM
//! Slurm sends before killing it, and exits non-zero unless its run completed.
//!
//! Every submission is recorded in `slurm/submissions.jsonl` ([`Submission`]); task states
//! come from `squeue` while the controller remembers a job and from `sacct` after
//! ([`task_states`]).

use crate::grid::Sweep;
use crate::holders::{command_path, lock_is_stale, state_active};
use crate::sweep::{build_stages, prepare};
use anyhow::{anyhow, bail, Context, Result};
use edpo_experiment::runner::{is_complete, SharedTasks};
use edpo_rundir::sweep::{run_dir, SLURM};
use edpo_rundir::{read_lock, write_atomic};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The record of submissions in a sweep directory.
pub const SUBMISSIONS: &str = "submissions.jsonl";

/// Resources and options of the Slurm launcher (`edpo sweep GRID --launcher slurm …`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SlurmArgs {
    /// Slurm partition (`--partition`).
    #[arg(long)]
    pub partition: Option<String>,
    /// Time limit of each task (`--time`, e.g. `02:00:00`).
    #[arg(long)]
    pub time: Option<String>,
    /// CPUs per task (`--cpus-per-task`); the task's run uses them all.
    #[arg(long, default_value_t = 1)]
    pub cpus_per_task: usize,
    /// Memory per task (`--mem`, e.g. `8G`).
    #[arg(long)]
    pub mem: Option<String>,
    /// Generic resources per task (`--gres`, e.g. `gpu:1`).
    #[arg(long)]
    pub gres: Option<String>,
    /// Tasks of the array running at once (`%N`); unlimited by default.
    #[arg(long)]
    pub max_parallel: Option<usize>,
    /// Any other `sbatch` option, passed as given (repeatable), e.g. `--sbatch-arg=--qos=low`.
    #[arg(long = "sbatch-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub sbatch_args: Vec<String>,
    /// Build the shared stages in a first job the array depends on (`afterok`), instead of
    /// here before submitting.
    #[arg(long)]
    pub stages_job: bool,
    /// Where task logs go (default: `SWEEP_DIR/slurm`); one `slurm-<job>_<task>.out` each.
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
}

impl SlurmArgs {
    /// Whether any option differs from its default (they apply to the Slurm launcher only).
    pub fn is_set(&self) -> bool {
        self.partition.is_some()
            || self.time.is_some()
            || self.cpus_per_task != 1
            || self.mem.is_some()
            || self.gres.is_some()
            || self.max_parallel.is_some()
            || !self.sbatch_args.is_empty()
            || self.stages_job
            || self.log_dir.is_some()
    }
}

/// One submitted array (a line of `slurm/submissions.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submission {
    /// The array's job id.
    pub job_id: String,
    /// The stage job it depends on, if any.
    pub stages_job: Option<String>,
    /// The grid indices submitted (the array's task ids).
    pub indices: Vec<usize>,
    /// The job script.
    pub script: PathBuf,
    /// When it was submitted.
    pub submitted_unix: f64,
}

/// A Slurm array task's state, as `squeue` or `sacct` reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskState {
    /// `JOBID_TASK`.
    pub job: String,
    /// Slurm's state name (`PENDING`, `RUNNING`, `COMPLETED`, `TIMEOUT`, …).
    pub state: String,
    /// The exit code `code:signal`, when `sacct` gave it.
    pub exit_code: Option<String>,
}

impl TaskState {
    /// Whether the task is queued or still running.
    pub fn active(&self) -> bool {
        state_active(&self.state)
    }
}

/// Runs a Slurm command; its standard output, or an error with its standard error.
fn slurm(name: &str, args: &[String]) -> Result<String> {
    let out = Command::new(name)
        .args(args)
        .output()
        .with_context(|| format!("cannot run `{name}`"))?;
    if !out.status.success() {
        bail!(
            "`{name} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Indices as a Slurm array spec: `0-3,7,9-12`.
pub fn array_spec(indices: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let start = indices[i];
        let mut end = start;
        while i + 1 < indices.len() && indices[i + 1] == end + 1 {
            end += 1;
            i += 1;
        }
        parts.push(if end > start {
            format!("{start}-{end}")
        } else {
            start.to_string()
        });
        i += 1;
    }
    parts.join(",")
}

/// The task ids of an array spec as `sacct` prints a group of pending tasks (`2-5,7%2`,
/// brackets removed); `None` if it is not one.
pub fn parse_array_spec(spec: &str) -> Option<Vec<usize>> {
    let spec = spec.split('%').next()?;
    let mut out = Vec::new();
    for part in spec.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// `--name=value` lines of the job script for the launcher's options.
fn sbatch_options(args: &SlurmArgs, name: &str, log_dir: &Path, cwd: &Path) -> Vec<String> {
    let mut o = vec![
        format!("--job-name={name}"),
        format!("--output={}", log_dir.join("slurm-%A_%a.out").display()),
        format!("--chdir={}", cwd.display()),
        format!("--cpus-per-task={}", args.cpus_per_task.max(1)),
        "--nodes=1".to_string(),
        "--ntasks=1".to_string(),
    ];
    let mut push = |flag: &str, v: &Option<String>| {
        if let Some(v) = v {
            o.push(format!("--{flag}={v}"));
        }
    };
    push("partition", &args.partition);
    push("time", &args.time);
    push("mem", &args.mem);
    push("gres", &args.gres);
    o.extend(args.sbatch_args.iter().cloned());
    o
}

fn quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-=:,%+@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The array's job script: task `i` runs grid point `i` of the sweep in `root`.
pub fn job_script(
    root: &Path,
    exe: &Path,
    cwd: &Path,
    name: &str,
    indices: &[usize],
    args: &SlurmArgs,
    log_dir: &Path,
) -> String {
    let mut array = array_spec(indices);
    if let Some(n) = args.max_parallel {
        array.push_str(&format!("%{}", n.max(1)));
    }
    let mut s = String::from("#!/bin/bash\n");
    s.push_str(&format!("#SBATCH --array={array}\n"));
    for o in sbatch_options(args, &format!("edpo-{name}"), log_dir, cwd) {
        s.push_str(&format!("#SBATCH {o}\n"));
    }
    s.push_str(&format!(
        "# Written by `edpo sweep --launcher slurm`: array task i runs grid point i of\n\
         # {root} and exits 0 only if its run completed. Resubmit with the same command to run\n\
         # what is missing; `edpo sweep status {root}` shows where every run is.\n\
         set -euo pipefail\n\
         exec {exe} sweep task {root} --index \"$SLURM_ARRAY_TASK_ID\" --threads \"${{SLURM_CPUS_PER_TASK:-1}}\"\n",
        root = quote(&root.display().to_string()),
        exe = quote(&exe.display().to_string()),
    ));
    s
}

/// The stage job's script: builds every shared stage the sweep's runs read.
fn stages_script(
    root: &Path,
    exe: &Path,
    cwd: &Path,
    name: &str,
    args: &SlurmArgs,
    log_dir: &Path,
) -> String {
    let mut s = String::from("#!/bin/bash\n");
    for o in sbatch_options(args, &format!("edpo-{name}-stages"), log_dir, cwd) {
        let o = o.replace("slurm-%A_%a.out", "slurm-%j-stages.out");
        s.push_str(&format!("#SBATCH {o}\n"));
    }
    s.push_str(&format!(
        "set -euo pipefail\nexec {} sweep stages {} --threads \"${{SLURM_CPUS_PER_TASK:-1}}\"\n",
        quote(&exe.display().to_string()),
        quote(&root.display().to_string())
    ));
    s
}

/// The submissions recorded in a sweep directory, oldest first.
pub fn submissions(root: &Path) -> Result<Vec<Submission>> {
    let path = root.join(SLURM).join(SUBMISSIONS);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| anyhow!("{} line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

fn record(root: &Path, s: &Submission) -> Result<()> {
    let path = root.join(SLURM).join(SUBMISSIONS);
    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    text.push_str(&serde_json::to_string(s)?);
    text.push('\n');
    Ok(write_atomic(&path, text.as_bytes())?)
}

/// The state of the latest Slurm task of each grid index submitted from the sweep in `root`:
/// `squeue` for jobs the controller still holds, `sacct` for the rest. Empty when nothing was
/// submitted; an error when Slurm cannot be asked.
pub fn task_states(root: &Path) -> Result<BTreeMap<usize, TaskState>> {
    let subs = submissions(root)?;
    if subs.is_empty() {
        return Ok(BTreeMap::new());
    }
    let jobs: Vec<String> = subs.iter().map(|s| s.job_id.clone()).collect();
    let mut by_job: BTreeMap<(String, usize), TaskState> = BTreeMap::new();
    if command_path("sacct").is_some() {
        let out = slurm(
            "sacct",
            &[
                "-n".into(),
                "-P".into(),
                "-X".into(),
                "--format=JobID,State,ExitCode".into(),
                "-j".into(),
                jobs.join(","),
            ],
        )?;
        for line in out.lines() {
            let f: Vec<&str> = line.split('|').collect();
            let [id, state, exit] = f[..] else { continue };
            let Some((job, task)) = id.split_once('_') else {
                continue;
            };
            let state = state.split_whitespace().next().unwrap_or_default();
            let tasks = match task.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
                Some(spec) => parse_array_spec(spec).unwrap_or_default(),
                None => task.parse().map(|t| vec![t]).unwrap_or_default(),
            };
            for t in tasks {
                by_job.insert(
                    (job.to_string(), t),
                    TaskState {
                        job: format!("{job}_{t}"),
                        state: state.to_string(),
                        exit_code: Some(exit.to_string()),
                    },
                );
            }
        }
    }
    let out = slurm(
        "squeue",
        &[
            "-h".into(),
            "-r".into(),
            "-t".into(),
            "all".into(),
            "-o".into(),
            "%i|%T".into(),
            "-j".into(),
            jobs.join(","),
        ],
    )
    .or_else(|e| {
        // squeue refuses a list in which every job is forgotten; sacct has them.
        if e.to_string().contains("Invalid job id") {
            Ok(String::new())
        } else {
            Err(e)
        }
    })?;
    for line in out.lines() {
        let Some((id, state)) = line.trim().split_once('|') else {
            continue;
        };
        let Some((job, task)) = id.split_once('_') else {
            continue;
        };
        let Ok(t) = task.parse::<usize>() else {
            continue;
        };
        let exit_code = by_job
            .get(&(job.to_string(), t))
            .and_then(|s| s.exit_code.clone());
        by_job.insert(
            (job.to_string(), t),
            TaskState {
                job: format!("{job}_{t}"),
                state: state.to_string(),
                exit_code: if state_active(state) { None } else { exit_code },
            },
        );
    }
    let mut latest = BTreeMap::new();
    for s in &subs {
        for &i in &s.indices {
            if let Some(state) = by_job.get(&(s.job_id.clone(), i)) {
                latest.insert(i, state.clone());
            }
        }
    }
    Ok(latest)
}

/// `sbatch --parsable` output to a job id (`123` or `123;cluster`).
fn job_id(out: &str) -> Result<String> {
    let id = out.trim().split(';').next().unwrap_or_default().to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!("sbatch printed `{}`, not a job id", out.trim());
    }
    Ok(id)
}

/// Hands the sweep to Slurm (see the module documentation); prints what it submitted.
pub fn launch(sweep: &Sweep, out: &Path, args: &SlurmArgs, dry_run: bool) -> Result<()> {
    let root = std::path::absolute(out.join(&sweep.name))?;
    let exe = std::env::current_exe().context("cannot find the edpo executable")?;
    let cwd = std::env::current_dir()?;
    let log_dir = match &args.log_dir {
        Some(d) => std::path::absolute(d)?,
        None => root.join(SLURM),
    };
    // What is still to run: neither completed, nor queued or running under Slurm, nor held by
    // a live process.
    let states = if root.exists() && !dry_run {
        task_states(&root)?
    } else {
        BTreeMap::new()
    };
    let mut todo = Vec::new();
    let (mut done, mut active) = (0, Vec::new());
    for r in &sweep.runs {
        let dir = run_dir(&root, &r.hash);
        if is_complete(&dir, &r.config) {
            done += 1;
        } else if let Some(s) = states.get(&r.index).filter(|s| s.active()) {
            active.push(format!("run {} ({}, {})", r.index, s.job, s.state));
        } else if let Some(owner) = read_lock(&dir)
            .and_then(|f| f.owner.map(|o| (o, f.age_s)))
            .filter(|(o, age)| !lock_is_stale(o, *age))
        {
            active.push(format!("run {} (held by {})", r.index, owner.0.describe()));
        } else {
            todo.push(r.index);
        }
    }
    if dry_run && todo.is_empty() {
        say!(
            "# nothing to submit: {done} of {} runs completed, {} queued or running; sweep directory {}",
            sweep.runs.len(),
            active.len(),
            root.display()
        );
        return Ok(());
    }
    if dry_run {
        say!(
            "{}",
            job_script(&root, &exe, &cwd, &sweep.name, &todo, args, &log_dir).trim_end()
        );
        say!(
            "# {} of {} runs to submit ({done} completed); sweep directory {}",
            todo.len(),
            sweep.runs.len(),
            root.display()
        );
        return Ok(());
    }
    if command_path("sbatch").is_none() {
        bail!(
            "--launcher slurm needs Slurm's `sbatch` on PATH, and it is not there; run on a \
             cluster's login node, or use `--launcher local` (the default)"
        );
    }
    let root = std::path::absolute(prepare(sweep, out)?)?;
    std::fs::create_dir_all(root.join(SLURM))?;
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("cannot create {}", log_dir.display()))?;
    if !active.is_empty() {
        say!(
            "{} runs are already queued or running, not submitted again: {}",
            active.len(),
            active.join(", ")
        );
    }
    if todo.is_empty() {
        say!(
            "nothing to submit: {done} of {} runs completed, {} queued or running",
            sweep.runs.len(),
            active.len()
        );
        return Ok(());
    }
    let count = submissions(&root)?.len();
    let stages_job = if args.stages_job {
        let script = root.join(SLURM).join(format!("stages-{count}.sh"));
        write_atomic(
            &script,
            stages_script(&root, &exe, &cwd, &sweep.name, args, &log_dir).as_bytes(),
        )?;
        let id = job_id(&slurm(
            "sbatch",
            &["--parsable".into(), script.display().to_string()],
        )?)?;
        say!("submitted stage job {id}");
        Some(id)
    } else {
        let shared = SharedTasks::new(&out.join("cache"));
        build_stages(&shared, sweep.runs.iter().map(|r| &r.config))?;
        None
    };
    let script = root.join(SLURM).join(format!("array-{count}.sh"));
    write_atomic(
        &script,
        job_script(&root, &exe, &cwd, &sweep.name, &todo, args, &log_dir).as_bytes(),
    )?;
    let mut sbatch = vec!["--parsable".to_string()];
    if let Some(id) = &stages_job {
        sbatch.push(format!("--dependency=afterok:{id}"));
        sbatch.push("--kill-on-invalid-dep=yes".into());
    }
    sbatch.push(script.display().to_string());
    let job = job_id(&slurm("sbatch", &sbatch)?)?;
    record(
        &root,
        &Submission {
            job_id: job.clone(),
            stages_job,
            indices: todo.clone(),
            script: script.clone(),
            submitted_unix: edpo_rundir::now_unix(),
        },
    )?;
    say!(
        "submitted array job {job}: {} of {} runs ({done} completed), tasks {}",
        todo.len(),
        sweep.runs.len(),
        array_spec(&todo)
    );
    say!("script: {}", script.display());
    say!(
        "logs:   {}",
        log_dir.join(format!("slurm-{job}_<task>.out")).display()
    );
    say!("status: edpo sweep status {}", root.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_specs_compress_runs_and_parse_back() {
        assert_eq!(array_spec(&[0, 1, 2, 3, 7, 9, 10, 11, 12]), "0-3,7,9-12");
        assert_eq!(array_spec(&[5]), "5");
        assert_eq!(array_spec(&[]), "");
        assert_eq!(
            parse_array_spec("0-3,7,9-12%2").unwrap(),
            vec![0, 1, 2, 3, 7, 9, 10, 11, 12]
        );
        assert_eq!(parse_array_spec("x"), None);
    }

    #[test]
    fn the_job_script_runs_one_grid_point_per_task_with_every_option() {
        let args = SlurmArgs {
            partition: Some("gpu".into()),
            time: Some("01:00:00".into()),
            cpus_per_task: 4,
            mem: Some("8G".into()),
            gres: Some("gpu:1".into()),
            max_parallel: Some(3),
            sbatch_args: vec!["--qos=low".into()],
            ..Default::default()
        };
        let s = job_script(
            Path::new("/shared/runs/default"),
            Path::new("/opt/edpo/bin/edpo"),
            Path::new("/home/me/edpo"),
            "default",
            &[0, 1, 2, 5],
            &args,
            Path::new("/shared/runs/default/slurm"),
        );
        for line in [
            "#SBATCH --array=0-2,5%3",
            "#SBATCH --partition=gpu",
            "#SBATCH --time=01:00:00",
            "#SBATCH --cpus-per-task=4",
            "#SBATCH --mem=8G",
            "#SBATCH --gres=gpu:1",
            "#SBATCH --qos=low",
            "#SBATCH --chdir=/home/me/edpo",
            "#SBATCH --output=/shared/runs/default/slurm/slurm-%A_%a.out",
            "exec /opt/edpo/bin/edpo sweep task /shared/runs/default --index \"$SLURM_ARRAY_TASK_ID\"",
        ] {
            assert!(s.contains(line), "missing `{line}` in\n{s}");
        }
        assert!(quote("a b").starts_with('\''));
    }

    #[test]
    fn job_ids_are_read_from_parsable_output() {
        assert_eq!(job_id("123\n").unwrap(), "123");
        assert_eq!(job_id("77;cluster\n").unwrap(), "77");
        assert!(job_id("Submitted batch job 5").is_err());
    }
}
