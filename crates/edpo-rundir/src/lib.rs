//! The run-directory schema: the one definition of what a run writes, shared by the crate that
//! writes run directories (`edpo-experiment`) and the one that reads them (`edpo-report`).
//!
//! A run directory holds
//! - [`CONFIG_YAML`]: the resolved config; [`CONFIG_JSON`]: the same as JSON, with
//!   `config_version` ([`CONFIG_VERSION`]);
//! - [`METRICS`]: one JSON object per logged step, evaluation lines (`eval/…` keys) included;
//! - [`EVAL`]: the final evaluation (with the best-of-n yardstick as [`BestOfN`] keys);
//! - [`DECISIONS`]: ε-DPO's step decisions by bins of the pairs' true preference probability
//!   ([`Decisions`]);
//! - [`PER_PROMPT`]: at every evaluation, each test prompt's paired numbers against the
//!   reference ([`PerPrompt`]), what the report's paired comparisons resample;
//! - [`STATUS`]: running / completed / failed, with the error chain and timings ([`Status`]).
//!
//! A sweep directory's files are in [`sweep`]; the lock that keeps two processes out of one
//! run directory is [`lock`].
//!
//! Every file is written whole to a temporary sibling and renamed into place
//! ([`write_atomic`]), so a run killed at any moment leaves each file either absent or
//! complete as of its last write.
//!
//! Architecture invariant: depends on `serde` and `serde_json` only; no model, no YAML, no
//! polars, so that the reader of run directories needs nothing of the writer.

pub mod decisions;
pub mod lock;
pub mod sweep;

pub use decisions::{Binned, DecisionContext, Decisions, P_TRUE_BINS};
pub use lock::{read_lock, Acquired, LockOwner, RunLock};
pub use sweep::{PlannedEntry, SweepManifest};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The version of resolved configs and of the run files they produce. 2: validation prompts
/// apart from the test prompts, `decisions.json`, evaluation lines over training. 3: paired
/// evaluation (policy and reference on common random numbers, several samples per prompt)
/// and `per_prompt.jsonl`. A run without the key in its `config.json` is version 1.
pub const CONFIG_VERSION: u32 = 3;

/// The resolved config as YAML.
pub const CONFIG_YAML: &str = "config.yaml";
/// The resolved config as JSON, for readers that know no YAML.
pub const CONFIG_JSON: &str = "config.json";
/// Training and evaluation lines.
pub const METRICS: &str = "metrics.jsonl";
/// The final evaluation.
pub const EVAL: &str = "eval.json";
/// ε-DPO's step decisions.
pub const DECISIONS: &str = "decisions.json";
/// Per-prompt paired evaluation numbers, one line per evaluation.
pub const PER_PROMPT: &str = "per_prompt.jsonl";
/// A LoRA run's trained adapters (a PEFT adapter directory).
pub const ADAPTER: &str = "adapter";
/// The run's state.
pub const STATUS: &str = "status.json";
/// What preparing user data read, skipped and truncated (tasks on user data only).
pub const DATA_SUMMARY: &str = "data_summary.txt";

/// Errors reading or writing a run directory; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A temporary file could not be renamed into place.
    #[error("cannot rename {from} to {to}")]
    Rename {
        /// The temporary file.
        from: PathBuf,
        /// Its destination.
        to: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A directory could not be created, listed or cleaned.
    #[error("cannot {action} {path}")]
    Dir {
        /// What was attempted.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file exists but is not what the schema says.
    #[error("{path}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value could not be serialised.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(
        ".{name}.tmp-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&tmp, bytes).map_err(|source| Error::Write {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Rename {
        from: tmp.clone(),
        to: path.to_path_buf(),
        source,
    })
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

/// Reads `status.json` of a run directory, if present and well-formed.
pub fn read_status(dir: &Path) -> Option<Status> {
    let text = std::fs::read_to_string(dir.join(STATUS)).ok()?;
    serde_json::from_str(&text).ok()
}

/// A run directory being written.
pub struct RunDir {
    /// Its path.
    pub path: PathBuf,
    metrics: String,
    per_prompt: String,
    status: Status,
    status_written: f64,
}

impl RunDir {
    /// Creates (or resets) the directory and writes the config files and a running status.
    pub fn start(path: &Path, hash: &str, config_yaml: &str, config_json: &str) -> Result<Self> {
        let dir_error = |action, source| Error::Dir {
            action,
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(path).map_err(|e| dir_error("create", e))?;
        // Temporary files left by a process killed mid-write are never read; clear them.
        for entry in std::fs::read_dir(path)
            .map_err(|e| dir_error("list", e))?
            .flatten()
        {
            if entry.file_name().to_string_lossy().contains(".tmp-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        for stale in [METRICS, EVAL, PER_PROMPT] {
            let p = path.join(stale);
            if p.exists() {
                std::fs::remove_file(&p).map_err(|source| Error::Dir {
                    action: "remove",
                    path: p.clone(),
                    source,
                })?;
            }
        }
        write_atomic(&path.join(CONFIG_YAML), config_yaml.as_bytes())?;
        write_atomic(&path.join(CONFIG_JSON), config_json.as_bytes())?;
        let mut dir = Self {
            path: path.to_path_buf(),
            metrics: String::new(),
            per_prompt: String::new(),
            status: Status {
                state: RunState::Running,
                hash: hash.to_string(),
                started_unix: now_unix(),
                finished_unix: None,
                wall_s: None,
                steps_done: 0,
                error: Vec::new(),
            },
            status_written: 0.0,
        };
        dir.write_status()?;
        Ok(dir)
    }

    fn write_status(&mut self) -> Result<()> {
        self.status_written = now_unix();
        let json = serde_json::to_string_pretty(&self.status)?;
        write_atomic(&self.path.join(STATUS), json.as_bytes())
    }

    /// Appends one metrics object (the whole file is rewritten atomically).
    pub fn log(&mut self, record: &Value) -> Result<()> {
        self.metrics.push_str(&serde_json::to_string(record)?);
        self.metrics.push('\n');
        write_atomic(&self.path.join(METRICS), self.metrics.as_bytes())
    }

    /// Appends one evaluation's per-prompt numbers to [`PER_PROMPT`] (rewritten atomically).
    pub fn log_per_prompt(&mut self, record: &PerPrompt) -> Result<()> {
        self.per_prompt.push_str(&serde_json::to_string(record)?);
        self.per_prompt.push('\n');
        write_atomic(&self.path.join(PER_PROMPT), self.per_prompt.as_bytes())
    }

    /// Writes a text file of the run (atomically).
    pub fn write_text(&self, name: &str, text: &str) -> Result<()> {
        write_atomic(&self.path.join(name), text.as_bytes())
    }

    /// Writes another JSON file of the run (atomically).
    pub fn write_file(&self, name: &str, value: &Value) -> Result<()> {
        write_atomic(
            &self.path.join(name),
            serde_json::to_string_pretty(value)?.as_bytes(),
        )
    }

    /// Records progress; `status.json` is rewritten with it at most once a second, so that a
    /// reader (`edpo sweep status`) sees how far a running run is.
    pub fn set_steps_done(&mut self, steps: usize) -> Result<()> {
        self.status.steps_done = steps;
        let now = now_unix();
        if now - self.status_written >= 1.0 {
            self.write_status()?;
        }
        Ok(())
    }

    /// Writes `eval.json` and marks the run completed.
    pub fn complete(self, eval: &Value) -> Result<()> {
        write_atomic(
            &self.path.join(EVAL),
            serde_json::to_string_pretty(eval)?.as_bytes(),
        )?;
        self.finish(RunState::Completed, Vec::new())
    }

    /// Marks the run failed with its error chain, outermost first.
    pub fn fail(self, chain: Vec<String>) -> Result<()> {
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

/// One evaluation's paired numbers on the test prompts (a line of [`PER_PROMPT`]): for
/// prompt `i`, the means over its samples `j` of the policy's win against the reference's
/// sample drawn from the same random stream (1, ½ on a tie, 0), of the gold-reward
/// difference policy − reference, and of the exact sequence KL(π‖π_ref) of the policy's
/// sample. Prompts are in the task's test-prompt order, the same for every run of a task, so
/// runs of the same seed are paired prompt by prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerPrompt {
    /// The optimizer step evaluated after.
    pub step: usize,
    /// Win against the reference, per prompt.
    pub win: Vec<f64>,
    /// Gold reward of the policy minus the reference's, per prompt.
    pub reward_diff: Vec<f64>,
    /// Exact sequence KL, per prompt.
    pub kl: Vec<f64>,
}

impl PerPrompt {
    /// Reads [`PER_PROMPT`]; a malformed line, or lines of different prompt counts, is an
    /// error naming the file and line.
    pub fn read_all(path: &Path) -> Result<Vec<Self>> {
        let malformed = |message: String| Error::Malformed {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| malformed(e.to_string()))?;
        let mut out: Vec<Self> = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let rec: Self = serde_json::from_str(line)
                .map_err(|e| malformed(format!("line {}: {e}", i + 1)))?;
            let n = rec.win.len();
            if rec.reward_diff.len() != n
                || rec.kl.len() != n
                || out.first().is_some_and(|f| f.win.len() != n)
            {
                return Err(malformed(format!(
                    "line {}: per-prompt arrays of different lengths",
                    i + 1
                )));
            }
            out.push(rec);
        }
        Ok(out)
    }
}

/// One n of the best-of-n yardstick from the reference. `eval.json` carries it as the keys
/// `best_of_n/<n>/<field>` ([`BestOfN::eval_keys`], read back by [`BestOfN::from_eval`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestOfN {
    /// n.
    pub n: usize,
    /// Win rate against the reference (mean over prompts).
    pub win_rate: f64,
    /// Its standard error over prompts.
    pub win_rate_se: f64,
    /// Gold-reward gain over the reference, mean over prompts.
    pub reward_gain: f64,
    /// Its standard error over prompts.
    pub reward_gain_se: f64,
    /// log n − (n−1)/n.
    pub kl_bound: f64,
    /// Beirami et al.'s estimator, mean over prompts.
    pub kl_estimate: f64,
}

impl BestOfN {
    /// The `eval.json` keys and values of this n.
    pub fn eval_keys(&self) -> Vec<(String, f64)> {
        [
            ("win_rate", self.win_rate),
            ("win_rate_se", self.win_rate_se),
            ("reward_gain", self.reward_gain),
            ("reward_gain_se", self.reward_gain_se),
            ("kl_bound", self.kl_bound),
            ("kl_estimate", self.kl_estimate),
        ]
        .into_iter()
        .map(|(k, v)| (format!("best_of_n/{}/{k}", self.n), v))
        .collect()
    }

    /// This n read back through `get` (an `eval.json` key to its number), if present.
    pub fn from_eval(n: usize, get: impl Fn(&str) -> Option<f64>) -> Option<Self> {
        let field = |k: &str| get(&format!("best_of_n/{n}/{k}"));
        Some(Self {
            n,
            win_rate: field("win_rate")?,
            win_rate_se: field("win_rate_se").unwrap_or(f64::NAN),
            reward_gain: field("reward_gain")?,
            reward_gain_se: field("reward_gain_se").unwrap_or(f64::NAN),
            kl_bound: field("kl_bound")?,
            kl_estimate: field("kl_estimate")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_run_directory_ends_completed_or_failed_with_its_chain() {
        let tmp_dir = tempfile::Builder::new()
            .prefix("edpo-rundir-run-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp_dir.path().join("rundir-run");
        let _ = std::fs::remove_dir_all(&dir);
        let mut run = RunDir::start(&dir, "abc", "a: 1\n", "{\"a\": 1}").expect("start");
        assert_eq!(read_status(&dir).map(|s| s.state), Some(RunState::Running));
        run.log(&json!({"step": 0})).expect("log");
        run.set_steps_done(1).unwrap();
        run.fail(vec!["outer".into(), "inner".into()])
            .expect("fail");
        let status = read_status(&dir).expect("status");
        assert_eq!(status.state, RunState::Failed);
        assert_eq!(status.error, ["outer", "inner"]);
        assert_eq!(status.steps_done, 1);
        // Restarting clears the old metrics; completing writes eval.json.
        let run = RunDir::start(&dir, "abc", "a: 1\n", "{}").expect("restart");
        assert!(!dir.join(METRICS).exists());
        run.complete(&json!({"win_rate": 0.5})).expect("complete");
        assert_eq!(
            read_status(&dir).map(|s| s.state),
            Some(RunState::Completed)
        );
        assert!(dir.join(EVAL).is_file());
    }

    #[test]
    fn per_prompt_lines_round_trip_and_unequal_lengths_are_named() {
        let tmp_dir = tempfile::Builder::new()
            .prefix("edpo-rundir-pp-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp_dir.path().join("rundir-pp");
        let _ = std::fs::remove_dir_all(&dir);
        let mut run = RunDir::start(&dir, "abc", "a: 1\n", "{}").expect("start");
        let a = PerPrompt {
            step: 4,
            win: vec![1.0, 0.5],
            reward_diff: vec![0.25, 0.0],
            kl: vec![0.1, 0.2],
        };
        let b = PerPrompt {
            step: 8,
            ..a.clone()
        };
        run.log_per_prompt(&a).expect("log");
        run.log_per_prompt(&b).expect("log");
        let path = dir.join(PER_PROMPT);
        assert_eq!(PerPrompt::read_all(&path).expect("read"), vec![a, b]);
        std::fs::write(
            &path,
            "{\"step\":1,\"win\":[1],\"reward_diff\":[0],\"kl\":[0]}\n{\"step\":2,\"win\":[1,0],\"reward_diff\":[0,0],\"kl\":[0,0]}\n",
        )
        .expect("write");
        let err = PerPrompt::read_all(&path).expect_err("lengths").to_string();
        assert!(
            err.contains("per_prompt.jsonl") && err.contains("line 2"),
            "{err}"
        );
    }

    #[test]
    fn best_of_n_round_trips_through_eval_keys() {
        let b = BestOfN {
            n: 8,
            win_rate: 0.9,
            win_rate_se: 0.01,
            reward_gain: 1.0,
            reward_gain_se: 0.02,
            kl_bound: 1.2,
            kl_estimate: 1.1,
        };
        let keys: std::collections::HashMap<String, f64> = b.eval_keys().into_iter().collect();
        assert_eq!(keys["best_of_n/8/kl_estimate"], 1.1);
        assert_eq!(BestOfN::from_eval(8, |k| keys.get(k).copied()), Some(b));
        assert_eq!(BestOfN::from_eval(4, |k| keys.get(k).copied()), None);
    }
}
