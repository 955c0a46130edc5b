//! The launcher: runs planned runs in parallel (rayon, `--jobs`), skipping completed ones,
//! and reports failures at the end.
//!
//! Resume rule: a run whose directory holds `status.json` with state `completed` and the same
//! config hash, and a `config.yaml` equal to the resolved config, is skipped; any other run
//! (absent, failed, or killed while running) starts again from scratch.

use crate::config::RunConfig;
use crate::grid::{describe, Sweep};
use crate::rundir::{read_status, write_atomic, RunDir, RunState};
use crate::stages::StageCache;
use crate::task::{prepare, TaskData};
use anyhow::{anyhow, Result};
use rayon::prelude::*;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What happened to one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Already completed before this invocation.
    Skipped,
    /// Trained now.
    Completed,
    /// Stopped by an error (message).
    Failed(String),
}

/// Whether `dir` holds a completed run of exactly `config`.
pub fn is_complete(dir: &Path, config: &RunConfig) -> bool {
    let Some(status) = read_status(dir) else {
        return false;
    };
    let yaml = std::fs::read_to_string(dir.join("config.yaml")).unwrap_or_default();
    status.state == RunState::Completed
        && status.hash == config.hash()
        && config.to_yaml().is_ok_and(|y| y == yaml)
        && dir.join("eval.json").exists()
}

/// Runs one config in `dir` (unless complete), writing its status whatever happens.
pub fn run_one(
    config: &RunConfig,
    dir: &Path,
    data: &TaskData,
    cache: &StageCache,
    progress: &indicatif::ProgressBar,
) -> Result<Outcome> {
    if is_complete(dir, config) {
        return Ok(Outcome::Skipped);
    }
    let mut rundir = RunDir::start(
        dir,
        &config.hash(),
        &config.to_yaml()?,
        &serde_json::to_string_pretty(config)?,
    )?;
    let span = tracing::info_span!("run", hash = %config.hash());
    let _enter = span.enter();
    match crate::runner::run(config, data, cache, &mut rundir, progress) {
        Ok(eval) => {
            rundir.complete(&eval)?;
            Ok(Outcome::Completed)
        }
        Err(e) => {
            let message = format!("{e:#}");
            rundir.fail(&e)?;
            Ok(Outcome::Failed(message))
        }
    }
}

/// One task's data, filled by whichever run asks first.
type TaskSlot = Arc<Mutex<Option<Arc<TaskData>>>>;

/// Task data shared by runs with the same task and model, prepared once.
pub struct SharedTasks {
    cache: StageCache,
    prepared: Mutex<HashMap<String, TaskSlot>>,
}

impl SharedTasks {
    /// Stages cached under `cache_dir`.
    pub fn new(cache_dir: &Path) -> Self {
        Self {
            cache: StageCache::new(cache_dir),
            prepared: Mutex::new(HashMap::new()),
        }
    }

    /// The stage cache.
    pub fn cache(&self) -> &StageCache {
        &self.cache
    }

    /// The task data of `config`, prepared at most once per process.
    pub fn get(&self, config: &RunConfig) -> Result<Arc<TaskData>> {
        let key = serde_json::to_string(&(&config.task, &config.model))?;
        let slot = {
            let mut map = self
                .prepared
                .lock()
                .map_err(|_| anyhow!("task lock poisoned"))?;
            map.entry(key).or_default().clone()
        };
        let mut slot = slot.lock().map_err(|_| anyhow!("task lock poisoned"))?;
        if let Some(data) = slot.as_ref() {
            return Ok(data.clone());
        }
        let data = Arc::new(prepare(&config.task, &config.model, &self.cache)?);
        *slot = Some(data.clone());
        Ok(data)
    }
}

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
        if r.config.objective.reference_logps == "cached" {
            data.cached_reference_logps(&shared.cache)?;
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
