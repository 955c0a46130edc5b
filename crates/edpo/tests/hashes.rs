//! Pins the identity of every committed experiment: the hash of each single config, the hash
//! of every run of every committed grid, and the names (hashes) of the stages the shipped
//! tasks cache. A run's hash names its directory and a stage's hash names its cache entry, so
//! a change to either silently orphans every completed run or cached stage a user has: a
//! refactoring must leave this file's snapshot untouched.
//!
//! The snapshot is `testdata/snapshots/hashes.txt`; to accept a deliberate change (one that
//! also bumps `config_version` or says why in the changelog), rerun with
//! `UPDATE_SNAPSHOTS=1 cargo test -p edpo --test hashes` and review the diff.

mod common;

use common::{edpo, root};

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

/// `name: hash` of a single config, from `train --print-config`.
fn config_hash(file: &str) -> String {
    let out = edpo(&["train", file, "--print-config"]);
    assert!(out.status.success(), "{file}: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let first = stdout.lines().next().unwrap_or_default();
    let hash = first.strip_prefix("# hash: ").unwrap_or_else(|| {
        panic!("{file}: first line `{first}` is not `# hash: …`");
    });
    format!("{file}: {hash}")
}

/// Every run of a grid: `file #index hash`.
fn grid_hashes(file: &str) -> Vec<String> {
    let out = edpo(&["sweep", file, "--dry-run"]);
    assert!(out.status.success(), "{file}: {}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| !l.ends_with(')') && !l.contains(" runs; output would go to "))
        .map(|l| {
            let mut cols = l.split_whitespace();
            let index = cols.next().unwrap_or_default();
            let hash = cols.next().unwrap_or_default();
            format!("{file} #{index}: {hash}")
        })
        .collect()
}

/// The stage cache entries `train --print-stages` names for a config.
fn stage_names(file: &str) -> Vec<String> {
    let out = edpo(&["train", file, "--print-stages"]);
    assert!(out.status.success(), "{file}: {}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| format!("{file} stage {l}"))
        .collect()
}

#[test]
fn committed_configs_grids_and_stages_keep_their_hashes() {
    let mut files: Vec<String> = std::fs::read_dir(root().join("experiments"))
        .expect("experiments/")
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".yaml")
                .then(|| format!("experiments/{name}"))
        })
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    let mut lines = Vec::new();
    for file in &files {
        let body = std::fs::read_to_string(root().join(file)).expect("read");
        let is_grid = body.lines().any(|l| l.starts_with("base:"));
        if is_grid {
            lines.extend(grid_hashes(file));
        } else {
            lines.push(config_hash(file));
            lines.extend(stage_names(file));
        }
    }
    let actual = lines.join("\n") + "\n";
    let path = root().join("testdata/snapshots/hashes.txt");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &actual).expect("write snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if actual != expected {
        let diff: Vec<String> = actual
            .lines()
            .zip(expected.lines())
            .filter(|(a, e)| a != e)
            .take(10)
            .map(|(a, e)| format!("now  {a}\nwas  {e}"))
            .collect();
        panic!(
            "hashes changed ({} lines now, {} pinned; UPDATE_SNAPSHOTS=1 to accept):\n{}",
            actual.lines().count(),
            expected.lines().count(),
            diff.join("\n")
        );
    }
}
