//! The launcher: runs planned runs in parallel (rayon, `--jobs`), skipping completed ones,
//! and reports failures at the end.
//!
//! Resume rule ([`edpo_experiment::runner::is_complete`]): a run whose directory holds
//! `status.json` with state `completed` and the same config hash, and a `config.yaml` equal to
//! the resolved config, is skipped; any other run (absent, failed, or killed while running)
//! starts again from scratch.

use crate::grid::{describe, Sweep};
use anyhow::Result;
use edpo_experiment::config::ReferenceLogps;
use edpo_experiment::runner::{run_one, Outcome, SharedTasks};
use edpo_rundir::write_atomic;
use rayon::prelude::*;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Runs a whole sweep under `out/<name>/`. Returns the outcomes in run order.
pub fn run_sweep(sweep: &Sweep, out: &Path, jobs: usize) -> Result<Vec<(usize, Outcome)>> {
    let root = out.join(&sweep.name);
    std::fs::create_dir_all(root.join("runs"))?;
    let plan: Vec<_> = sweep
        .runs
        .iter()
        .map(|r| json!({"index": r.index, "hash": r.hash, "overrides": describe(&r.overrides)}))
        .collect();
    let manifest = json!({"name": sweep.name, "grid": sweep.grid_path, "runs": plan});
    write_atomic(
        &root.join("sweep.yaml"),
        serde_yaml::to_string(&manifest)?.as_bytes(),
    )?;
    let shared = SharedTasks::new(&out.join("cache"));
    // Build every shared stage before any run starts, outside the run pool: stage builders may
    // use rayon themselves (polars does), and a pool thread waiting on them could steal another
    // run that then waits on the same stage.
    for r in &sweep.runs {
        let data = shared.get(&r.config)?;
        if r.config.objective.reference_logps == ReferenceLogps::Cached {
            data.cached_reference_logps(shared.cache())?;
        }
    }
    let bar = indicatif::ProgressBar::new(sweep.runs.len() as u64).with_message(sweep.name.clone());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs.max(1))
        .build()?;
    let outcomes: Vec<(usize, Outcome)> = pool.install(|| {
        sweep
            .runs
            .par_iter()
            .map(|r| {
                let dir = run_dir(&root, &r.hash);
                let quiet = indicatif::ProgressBar::hidden();
                let outcome = shared
                    .get(&r.config)
                    .and_then(|data| run_one(&r.config, &dir, &data, shared.cache(), &quiet))
                    .unwrap_or_else(|e| Outcome::Failed(format!("{e:#}")));
                match &outcome {
                    Outcome::Skipped => {
                        tracing::info!(run = r.index, hash = %r.hash, "skipped: already completed")
                    }
                    Outcome::Completed => {
                        tracing::info!(run = r.index, hash = %r.hash, "completed")
                    }
                    Outcome::Failed(m) => {
                        tracing::error!(run = r.index, hash = %r.hash, error = %m, "failed")
                    }
                }
                bar.inc(1);
                (r.index, outcome)
            })
            .collect()
    });
    bar.finish_and_clear();
    Ok(outcomes)
}

/// The directory of a run.
pub fn run_dir(sweep_root: &Path, hash: &str) -> PathBuf {
    sweep_root.join("runs").join(hash)
}
