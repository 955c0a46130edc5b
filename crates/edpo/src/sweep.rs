//! Sweeps: what every launcher shares (the sweep directory's manifest and planned configs,
//! the shared stages built once, one run under its lock, one grid point run from the sweep
//! directory alone) and the local launcher, which runs planned runs one after another or,
//! with `--jobs` above 1, that many at a time each in a process of its own (`edpo sweep task`),
//! skipping completed ones, and reports failures at the end. The Slurm launcher is in
//! [`crate::slurm`].
//!
//! Resume rule ([`edpo_experiment::runner::is_complete`]): a run whose directory holds
//! `status.json` with state `completed` and the same config hash, and a `config.yaml` equal to
//! the resolved config, is skipped; any other run (absent, failed, or killed while running)
//! starts again from scratch. A run is written by one process at a time, whichever launcher
//! started it: each takes the run directory's lock ([`edpo_rundir::lock`]) first.

use crate::config::{read_yaml, resolve_tree};
use crate::grid::{describe, Sweep};
use crate::holders::{lock_is_stale, this_owner};
use anyhow::{anyhow, bail, Context, Result};
use edpo_experiment::config::ReferenceLogps;
use edpo_experiment::runner::{run_one, Outcome, SharedTasks};
use edpo_experiment::RunConfig;
use edpo_rundir::sweep::{plan_path, run_dir, PLAN, RUNS};
use edpo_rundir::{write_atomic, Acquired, PlannedEntry, RunLock, SweepManifest};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Writes the sweep directory's manifest and planned configs under `out/<name>/`; returns
/// the sweep directory.
pub fn prepare(sweep: &Sweep, out: &Path) -> Result<PathBuf> {
    let root = out.join(&sweep.name);
    for dir in [RUNS, PLAN] {
        std::fs::create_dir_all(root.join(dir))
            .with_context(|| format!("cannot create {}", root.join(dir).display()))?;
    }
    for r in &sweep.runs {
        write_atomic(
            &plan_path(&root, &r.hash),
            serde_yaml::to_string(&r.tree)?.as_bytes(),
        )?;
    }
    let manifest = SweepManifest {
        name: sweep.name.clone(),
        grid: sweep.grid_path.clone(),
        cache: std::path::absolute(out.join("cache"))?,
        runs: sweep
            .runs
            .iter()
            .map(|r| PlannedEntry {
                index: r.index,
                hash: r.hash.clone(),
                overrides: describe(&r.overrides),
            })
            .collect(),
    };
    manifest.write(&root)?;
    Ok(root)
}

/// Builds every shared stage the configs read, before any run starts and outside any run
/// pool: stage builders may use rayon themselves (polars does), and a pool thread waiting on
/// them could steal another run that then waits on the same stage.
pub fn build_stages<'a>(
    shared: &SharedTasks,
    configs: impl IntoIterator<Item = &'a RunConfig>,
) -> Result<()> {
    for config in configs {
        let data = shared.get(config)?;
        if config.objective.reference_logps == ReferenceLogps::Cached {
            data.cached_reference_logps(shared.cache())?;
        }
    }
    Ok(())
}

/// Runs `config` in `dir` under the run's lock: a run held by a live process is left to it.
pub fn run_locked(
    config: &RunConfig,
    dir: &Path,
    shared: &SharedTasks,
    progress: &indicatif::ProgressBar,
) -> Result<Outcome> {
    if edpo_experiment::runner::stop_flag().load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(Outcome::Failed("not started: stopped by a signal".into()));
    }
    let _lock = match RunLock::acquire(dir, &this_owner(), lock_is_stale)? {
        Acquired::Held(lock) => lock,
        Acquired::Busy(owner) => return Ok(Outcome::Busy(owner.describe())),
    };
    let data = shared.get(config)?;
    run_one(config, dir, &data, shared.cache(), progress)
}

/// The planned config of grid point `index` of the sweep in `root` (whose manifest is
/// `manifest`), resolved again and checked against its planned hash.
pub fn planned_config(
    root: &Path,
    manifest: &SweepManifest,
    index: usize,
) -> Result<(PlannedEntry, RunConfig)> {
    let entry = manifest.run(index).cloned().ok_or_else(|| {
        anyhow!(
            "{}: the sweep has no run {index} (it plans runs 0 to {})",
            root.join(edpo_rundir::sweep::MANIFEST).display(),
            manifest.runs.len().saturating_sub(1)
        )
    })?;
    let path = plan_path(root, &entry.hash);
    let config = resolve_tree(read_yaml(&path)?, &path.display().to_string())?;
    let hash = config.hash()?;
    if hash != entry.hash {
        bail!(
            "{}: resolves to config {hash}, but run {index} was planned as {}: this edpo \
             resolves configs differently from the one that planned the sweep; plan it again \
             with `edpo sweep {}`",
            path.display(),
            entry.hash,
            manifest.grid.display()
        );
    }
    Ok((entry, config))
}

/// Runs a whole sweep under `out/<name>/` on this machine, `jobs` runs at a time with
/// `threads` threads each. Returns the outcomes in run order.
///
/// With one job the runs go one after another in this process. With more, each run is a
/// process of its own (`edpo sweep task`, as a Slurm array task runs it), `jobs` at a time:
/// runs side by side in one process share its allocator, whose single arena
/// ([`crate::malloc`]) they then wait on (a grid of runs of 0.15 s gained 1.3× from two jobs
/// that way, against 2× for two processes).
pub fn run_local(
    sweep: &Sweep,
    out: &Path,
    jobs: usize,
    threads: usize,
) -> Result<Vec<(usize, Outcome)>> {
    let root = prepare(sweep, out)?;
    let shared = SharedTasks::new(&out.join("cache"));
    build_stages(&shared, sweep.runs.iter().map(|r| &r.config))?;
    let bar = indicatif::ProgressBar::new(sweep.runs.len() as u64).with_message(sweep.name.clone());
    // With several jobs, this binary again for each run's process.
    let exe = match jobs {
        0 | 1 => None,
        _ => Some(std::env::current_exe().context("the path of this edpo binary")?),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs.max(1))
        .build()?;
    let outcomes = each_on_pool(&pool, &sweep.runs, |r| {
        let dir = run_dir(&root, &r.hash);
        let outcome = match &exe {
            Some(exe) => run_as_process(exe, &root, r.index, threads, &dir, &r.config),
            None => run_locked(&r.config, &dir, &shared, &indicatif::ProgressBar::hidden()),
        }
        .unwrap_or_else(|e| Outcome::Failed(format!("{e:#}")));
        log_outcome(r.index, &r.hash, &outcome);
        bar.inc(1);
        (r.index, outcome)
    });
    bar.finish_and_clear();
    Ok(outcomes)
}

/// The words of `edpo sweep task`'s messages that the local launcher reads back from a task's
/// standard error ([`run_as_process`]): after `run <index>` for a skipped run; around the
/// holder for a busy one; after `run <index> (<hash>)` for a failed one.
const TASK_SKIPPED: &str = ": already completed";
const TASK_BUSY: [&str; 2] = [" is being run by ", "; not run twice"];
const TASK_FAILED: &str = " failed: ";

/// What `edpo sweep task` makes of grid point `index` (config `hash`) once run: `Ok` with its
/// line for a completed or skipped run, else the error its process ends with.
pub fn task_result(index: usize, hash: &str, outcome: Outcome) -> Result<String> {
    let [busy, twice] = TASK_BUSY;
    match outcome {
        Outcome::Skipped => Ok(format!("run {index}{TASK_SKIPPED}")),
        Outcome::Completed => Ok(format!("run {index}: completed")),
        Outcome::Busy(owner) => bail!("run {index}{busy}{owner}{twice}"),
        Outcome::Failed(m) => bail!("run {index} ({hash}){TASK_FAILED}{m}"),
    }
}

/// Grid point `index` of the sweep in `root` run by `edpo sweep task` in a process of its own
/// (its standard error kept in a temporary file): skipped without one when `dir` already
/// holds it completed; a signal to this process is passed on to the child, which stops its
/// run as a signal to it would.
fn run_as_process(
    exe: &Path,
    root: &Path,
    index: usize,
    threads: usize,
    dir: &Path,
    config: &RunConfig,
) -> Result<Outcome> {
    use std::io::{Read, Seek};
    use std::sync::atomic::Ordering;
    let stop = edpo_experiment::runner::stop_flag();
    if stop.load(Ordering::Relaxed) {
        return Ok(Outcome::Failed("not started: stopped by a signal".into()));
    }
    if edpo_experiment::runner::is_complete(dir, config) {
        return Ok(Outcome::Skipped);
    }
    let mut log = tempfile::tempfile().context("a temporary file for a run's messages")?;
    let mut child = std::process::Command::new(exe)
        .arg("sweep")
        .arg("task")
        .arg(root)
        .args([
            "--index",
            &index.to_string(),
            "--threads",
            &threads.to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log.try_clone()?)
        .spawn()
        .with_context(|| format!("starting {} sweep task for run {index}", exe.display()))?;
    let mut passed_on = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if stop.load(Ordering::Relaxed) && !passed_on {
            terminate(child.id());
            passed_on = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let mut text = String::new();
    log.rewind()?;
    log.read_to_string(&mut text)?;
    if status.success() {
        let skipped = format!("run {index}{TASK_SKIPPED}");
        return Ok(match text.lines().any(|l| l == skipped) {
            true => Outcome::Skipped,
            false => Outcome::Completed,
        });
    }
    // The child's error: its `error:` line and the `caused by:` lines under it.
    let error: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("error: "))
        .map(|l| {
            l.trim_start_matches("error: ")
                .trim_start()
                .trim_start_matches("caused by: ")
        })
        .collect();
    let error = error.join(": ");
    let [busy, twice] = TASK_BUSY;
    let holder = error
        .strip_prefix(&format!("run {index}{busy}"))
        .and_then(|o| o.strip_suffix(twice));
    if let Some(owner) = holder {
        return Ok(Outcome::Busy(owner.to_string()));
    }
    // A failed run: its own message, as the run's status has it.
    let failed_run = format!("run {index} ({}){TASK_FAILED}", config.hash()?);
    let failed = edpo_rundir::read_status(dir)
        .map(|s| s.error.join(": "))
        .filter(|e| !e.is_empty() && error.starts_with(&failed_run));
    Ok(Outcome::Failed(failed.unwrap_or_else(|| {
        if error.is_empty() {
            format!("`edpo sweep task` ended with {status} and no message")
        } else {
            error
        }
    })))
}

/// Sends SIGTERM to process `pid` (a run's child process), as a terminal or a scheduler
/// would: the child stops its run and writes its status.
#[allow(unsafe_code)]
fn terminate(pid: u32) {
    #[cfg(unix)]
    // SAFETY: `kill` takes a process id and a signal number and touches no memory of ours;
    // `pid` is a child this process started and has not yet reaped, so it names that child.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
    #[cfg(not(unix))]
    let _ = pid;
}

/// `f` of every item, in item order, computed on `pool` with every item its own task, so a
/// free thread can take any item not yet started. (A plain `par_iter` hands each thread a
/// contiguous block of items that it then runs in order: when one block is mostly completed
/// runs, skipped at once, its thread falls idle while another works through its own block run
/// by run — a resumed sweep then ran one run at a time on a `--jobs 2` pool.)
pub fn each_on_pool<T: Sync, R: Send>(
    pool: &rayon::ThreadPool,
    items: &[T],
    f: impl Fn(&T) -> R + Sync + Send,
) -> Vec<R> {
    pool.install(|| items.par_iter().with_max_len(1).map(f).collect())
}

/// Logs what happened to one run.
pub fn log_outcome(index: usize, hash: &str, outcome: &Outcome) {
    match outcome {
        Outcome::Skipped => tracing::info!(run = index, hash, "skipped: already completed"),
        Outcome::Completed => tracing::info!(run = index, hash, "completed"),
        Outcome::Busy(owner) => tracing::warn!(run = index, hash, owner, "left to its holder"),
        Outcome::Failed(m) => tracing::error!(run = index, hash, error = %m, "failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    /// The last two of eight items only finish once both are running at the same time (or
    /// after a 10 s timeout, reported as `false`): a pool that ran them in order on one thread
    /// (the first six, "completed", returning at once) fails.
    #[test]
    fn a_free_thread_takes_any_pending_item() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
        let running = AtomicUsize::new(0);
        let items: Vec<usize> = (0..8).collect();
        let met = each_on_pool(&pool, &items, |&i| {
            if i < 6 {
                return true;
            }
            running.fetch_add(1, Ordering::SeqCst);
            let start = Instant::now();
            while running.load(Ordering::SeqCst) < 2 {
                if start.elapsed() > Duration::from_secs(10) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            true
        });
        assert_eq!(
            met,
            vec![true; 8],
            "the two pending items never ran together"
        );
        Ok(())
    }
}
