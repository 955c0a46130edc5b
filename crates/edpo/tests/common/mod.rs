//! Helpers shared by the binary's integration tests: the repository root, running `edpo` there,
//! and fresh scratch directories.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (experiments and datasets are addressed from it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `edpo` with `args` in the repository root.
pub fn edpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edpo"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run edpo")
}

/// A fresh empty directory for one test, removed with everything in it when the value is
/// dropped (at the end of the test, passed or failed). Read it as a [`Path`].
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.dir.path()
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        self.dir.path()
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.dir.path().as_os_str()
    }
}

/// A fresh empty directory named after `suite` and `name` (under the system's temporary
/// directory), removed when the returned guard is dropped.
pub fn scratch(suite: &str, name: &str) -> Scratch {
    let dir = tempfile::Builder::new()
        .prefix(&format!("edpo-{suite}-{name}-"))
        .tempdir()
        .expect("scratch directory");
    Scratch { dir }
}

/// The files of a run directory that hold its numbers.
pub const RUN_FILES: [&str; 5] = [
    "config.yaml",
    "metrics.jsonl",
    "eval.json",
    "per_prompt.jsonl",
    "decisions.json",
];

/// Asserts that every run file of every run under sweep root `a` equals the same file under
/// `b` (or both lack it); returns the number of runs compared.
pub fn same_run_files(a: &Path, b: &Path) -> usize {
    let mut compared = 0;
    for entry in std::fs::read_dir(a.join("runs")).expect("runs").flatten() {
        for f in RUN_FILES {
            let x = entry.path().join(f);
            let y = b.join("runs").join(entry.file_name()).join(f);
            assert_eq!(
                std::fs::read(&x).ok(),
                std::fs::read(&y).ok(),
                "{} differs from {}",
                y.display(),
                x.display()
            );
        }
        compared += 1;
    }
    compared
}

/// The arguments of `edpo sweep` on the smoke grid under `out` (its report under
/// `out/report`), then `extra`.
pub fn smoke_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "sweep".to_string(),
        "experiments/smoke.yaml".into(),
        "--out".into(),
        out.display().to_string(),
        "--report-out".into(),
        out.join("report").display().to_string(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_string()));
    args
}

/// Runs the smoke grid under `out`, asserting success.
pub fn smoke_sweep(out: &Path, extra: &[&str]) {
    let args = smoke_args(out, extra);
    let o = edpo(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
