//! The sweep-directory schema. A sweep directory `OUT/<name>/` holds
//! - [`MANIFEST`]: the planned runs in grid order ([`SweepManifest`]), written before any
//!   run starts, so that a reader knows which runs are still pending;
//! - [`PLAN`]`/<hash>.yaml`: each run's config tree as the grid expanded it, which a
//!   launcher's task resolves again (and checks against the hash) to run one grid point;
//! - [`RUNS`]`/<hash>/`: the run directories;
//! - [`SLURM`]`/`: the Slurm launcher's job scripts, submissions and task logs.

use crate::{write_atomic, Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The manifest file.
pub const MANIFEST: &str = "sweep.json";
/// The directory of planned configs.
pub const PLAN: &str = "plan";
/// The directory of run directories.
pub const RUNS: &str = "runs";
/// The Slurm launcher's directory.
pub const SLURM: &str = "slurm";

/// One planned run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedEntry {
    /// Position in the grid's expansion order (a Slurm array task's index).
    pub index: usize,
    /// The resolved config's hash (its run directory's name).
    pub hash: String,
    /// The overrides that make it, `key=value …`.
    pub overrides: String,
}

/// `sweep.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepManifest {
    /// The sweep's name (its directory's name).
    pub name: String,
    /// The grid file it was expanded from.
    pub grid: PathBuf,
    /// The shared-stage cache its runs read.
    pub cache: PathBuf,
    /// The planned runs, in grid order.
    pub runs: Vec<PlannedEntry>,
}

impl SweepManifest {
    /// Reads `sweep_dir/sweep.json`.
    pub fn read(sweep_dir: &Path) -> Result<Self> {
        let path = sweep_dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Malformed {
            path: path.clone(),
            message: format!("cannot read it ({e}); is this a sweep directory?"),
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Malformed {
            path,
            message: e.to_string(),
        })
    }

    /// Writes `sweep_dir/sweep.json` (atomically).
    pub fn write(&self, sweep_dir: &Path) -> Result<()> {
        write_atomic(
            &sweep_dir.join(MANIFEST),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }

    /// The planned run with grid index `index`.
    pub fn run(&self, index: usize) -> Option<&PlannedEntry> {
        self.runs.iter().find(|r| r.index == index)
    }
}

/// The run directory of `hash` in a sweep directory.
pub fn run_dir(sweep_dir: &Path, hash: &str) -> PathBuf {
    sweep_dir.join(RUNS).join(hash)
}

/// The planned config tree of `hash` in a sweep directory.
pub fn plan_path(sweep_dir: &Path, hash: &str) -> PathBuf {
    sweep_dir.join(PLAN).join(format!("{hash}.yaml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_round_trips_and_a_missing_one_is_named() {
        let tmp_dir = tempfile::Builder::new()
            .prefix("edpo-manifest-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp_dir.path().join("manifest");
        std::fs::create_dir_all(&dir).unwrap();
        let m = SweepManifest {
            name: "smoke".into(),
            grid: "experiments/smoke.yaml".into(),
            cache: "runs/cache".into(),
            runs: vec![PlannedEntry {
                index: 0,
                hash: "0123456789ab".into(),
                overrides: "objective.beta=0.1".into(),
            }],
        };
        m.write(&dir).unwrap();
        assert_eq!(SweepManifest::read(&dir).unwrap(), m);
        assert_eq!(m.run(0).unwrap().hash, "0123456789ab");
        assert!(m.run(1).is_none());
        let err = SweepManifest::read(&dir.join("nothing"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sweep.json") && err.contains("sweep directory"),
            "{err}"
        );
    }
}
