//! Helpers shared by the binary's integration tests: the repository root, running `edpo` there,
//! and fresh scratch directories.

#![allow(dead_code)]

use std::path::PathBuf;
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

/// An empty directory unique to this test process, `suite` and `name`.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edpo-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch");
    dir
}
