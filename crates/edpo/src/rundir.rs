//! Run directories and atomic files.
//!
//! A run directory holds `config.yaml` (the resolved config, also as `config.json`),
//! `metrics.jsonl` (one object per
//! logged step, evaluations included), `eval.json` (the final evaluation) and `status.json`
//! (running / completed / failed, with the error chain and timings). Every file is written
//! whole to a temporary sibling and renamed into place, so a run killed at any moment leaves
//! each file either absent, or complete as of its last write.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(
        ".{name}.tmp-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The state of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Started and not finished (or killed).
    Running,
    /// Finished with its final evaluation written.
    Completed,
    /// Stopped by an error.
    Failed,
}

/// `status.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Where the run is.
    pub state: RunState,
    /// The config hash (the directory name).
    pub hash: String,
    /// When it started.
    pub started_unix: f64,
    /// When it finished, if it did.
    pub finished_unix: Option<f64>,
    /// Wall time in seconds, if finished.
    pub wall_s: Option<f64>,
    /// Optimizer steps completed.
    pub steps_done: usize,
    /// The error chain, outermost first, if it failed.
    pub error: Vec<String>,
}

/// A run directory being written.
pub struct RunDir {
    /// Its path.
    pub path: PathBuf,
    metrics: String,
    status: Status,
}

impl RunDir {
    /// Creates (or resets) the directory and writes `config.yaml` and a running status.
    pub fn start(path: &Path, hash: &str, config_yaml: &str, config_json: &str) -> Result<Self> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        // Temporary files left by a process killed mid-write are never read; clear them.
        for entry in std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .flatten()
        {
            if entry.file_name().to_string_lossy().contains(".tmp-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        for stale in ["metrics.jsonl", "eval.json"] {
            let p = path.join(stale);
            if p.exists() {
                std::fs::remove_file(&p)
                    .with_context(|| format!("cannot remove {}", p.display()))?;
            }
        }
        write_atomic(&path.join("config.yaml"), config_yaml.as_bytes())?;
        // The same config as JSON, for readers that know no YAML (the report crate, scripts).
        write_atomic(&path.join("config.json"), config_json.as_bytes())?;
        let mut dir = Self {
            path: path.to_path_buf(),
            metrics: String::new(),
            status: Status {
                state: RunState::Running,
                hash: hash.to_string(),
                started_unix: now_unix(),
                finished_unix: None,
                wall_s: None,
                steps_done: 0,
                error: Vec::new(),
            },
        };
        dir.write_status()?;
        Ok(dir)
    }

    fn write_status(&mut self) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.status)?;
        write_atomic(&self.path.join("status.json"), json.as_bytes())
    }

    /// Appends one metrics object (the whole file is rewritten atomically).
    pub fn log(&mut self, record: &serde_json::Value) -> Result<()> {
        self.metrics.push_str(&serde_json::to_string(record)?);
        self.metrics.push('\n');
        write_atomic(&self.path.join("metrics.jsonl"), self.metrics.as_bytes())
    }

    /// Writes another JSON file of the run (atomically).
    pub fn write_file(&self, name: &str, value: &serde_json::Value) -> Result<()> {
        write_atomic(
            &self.path.join(name),
            serde_json::to_string_pretty(value)?.as_bytes(),
        )
    }

    /// Records progress.
    pub fn set_steps_done(&mut self, steps: usize) {
        self.status.steps_done = steps;
    }

    /// Writes `eval.json` and marks the run completed.
    pub fn complete(self, eval: &serde_json::Value) -> Result<()> {
        write_atomic(
            &self.path.join("eval.json"),
            serde_json::to_string_pretty(eval)?.as_bytes(),
        )?;
        self.finish(RunState::Completed, Vec::new())
    }

    /// Marks the run failed with the error chain.
    pub fn fail(self, error: &anyhow::Error) -> Result<()> {
        let chain = error.chain().map(|c| c.to_string()).collect();
        self.finish(RunState::Failed, chain)
    }

    fn finish(mut self, state: RunState, error: Vec<String>) -> Result<()> {
        let now = now_unix();
        self.status.state = state;
        self.status.finished_unix = Some(now);
        self.status.wall_s = Some(now - self.status.started_unix);
        self.status.error = error;
        self.write_status()
    }
}

/// Reads `status.json` of a run directory, if present and well-formed.
pub fn read_status(dir: &Path) -> Option<Status> {
    let text = std::fs::read_to_string(dir.join("status.json")).ok()?;
    serde_json::from_str(&text).ok()
}
