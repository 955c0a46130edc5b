//! Grids: a base config and the axes to vary, expanded into runs in a stable order.
//!
//! ```yaml
//! base: base.yaml            # relative to the grid file
//! name: eps-ablation         # sweep directory name (default: the grid file's stem)
//! set: {optim.epochs: 2}     # applied to every run
//! seeds: [0, 1]              # varies run.seed, fastest of all axes
//! grids:                     # sub-grids, expanded in order and concatenated
//!   - axes:                  # cartesian product; the first axis varies slowest
//!       objective: [{kind: dpo, beta: 0.05}, {kind: dpo, beta: 0.2}]
//!   - axes: {objective.epsilon: [0.01, 0.05]}
//!     zip: {optim.lr: [1e-3, 2e-3], optim.epochs: [2, 1]}   # move together, after axes
//! include: [{objective.beta: 0.5}]     # extra runs
//! exclude: [{objective.epsilon: 0.05, optim.lr: 2e-3}]   # drop runs matching every key
//! ```
//! A top-level `axes` / `zip` is shorthand for a single sub-grid. Every expanded run is
//! resolved and validated before any starts (the sweeper decides what to run; the launcher in
//! `sweep` decides how).

use crate::config::{apply_set, get_path, read_yaml, resolve_tree, set_path};
use anyhow::{anyhow, bail, Context, Result};
use edpo_experiment::RunConfig;
use serde::Deserialize;
use serde_yaml::{Mapping, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    #[serde(default)]
    axes: Mapping,
    #[serde(default)]
    zip: Mapping,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrid {
    base: PathBuf,
    name: Option<String>,
    #[serde(default)]
    set: Mapping,
    #[serde(default)]
    seeds: Vec<u64>,
    #[serde(default)]
    grids: Vec<RawGroup>,
    #[serde(default)]
    axes: Mapping,
    #[serde(default)]
    zip: Mapping,
    #[serde(default)]
    include: Vec<Mapping>,
    #[serde(default)]
    exclude: Vec<Mapping>,
}

/// One expanded run.
#[derive(Debug, Clone)]
pub struct PlannedRun {
    /// Position in the stable expansion order.
    pub index: usize,
    /// The overrides that make this run, in the order applied.
    pub overrides: Vec<(String, Value)>,
    /// The config tree before resolution (base, overrides and `--set`s applied): what a
    /// launcher's task resolves again to run this grid point (`plan/<hash>.yaml`).
    pub tree: Value,
    /// The resolved config.
    pub config: RunConfig,
    /// Its identity.
    pub hash: String,
}

/// An expanded grid.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// Sweep name (its directory).
    pub name: String,
    /// The grid file.
    pub grid_path: PathBuf,
    /// The runs, in order.
    pub runs: Vec<PlannedRun>,
}

fn key_of(k: &Value, file: &Path) -> Result<String> {
    k.as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{}: axis keys must be strings, found {k:?}", file.display()))
}

fn values_of(key: &str, v: &Value, file: &Path) -> Result<Vec<Value>> {
    match v {
        Value::Sequence(s) if !s.is_empty() => Ok(s.clone()),
        _ => bail!(
            "{}: axis `{key}` must be a non-empty list of values",
            file.display()
        ),
    }
}

/// Expands one sub-grid into override lists.
fn expand_group(group: &RawGroup, file: &Path) -> Result<Vec<Vec<(String, Value)>>> {
    let mut combos: Vec<Vec<(String, Value)>> = vec![Vec::new()];
    for (k, v) in &group.axes {
        let key = key_of(k, file)?;
        let values = values_of(&key, v, file)?;
        let mut next = Vec::with_capacity(combos.len() * values.len());
        for c in &combos {
            for x in &values {
                let mut c = c.clone();
                c.push((key.clone(), x.clone()));
                next.push(c);
            }
        }
        combos = next;
    }
    if !group.zip.is_empty() {
        let mut columns = Vec::new();
        for (k, v) in &group.zip {
            let key = key_of(k, file)?;
            columns.push((key.clone(), values_of(&key, v, file)?));
        }
        let n = columns[0].1.len();
        if let Some((key, vals)) = columns.iter().find(|(_, v)| v.len() != n) {
            bail!(
                "{}: zipped axis `{key}` has {} values, `{}` has {n}",
                file.display(),
                vals.len(),
                columns[0].0
            );
        }
        let mut next = Vec::with_capacity(combos.len() * n);
        for c in &combos {
            for i in 0..n {
                let mut c = c.clone();
                c.extend(columns.iter().map(|(k, v)| (k.clone(), v[i].clone())));
                next.push(c);
            }
        }
        combos = next;
    }
    Ok(combos)
}

/// Reads a grid file, expands it, and resolves every run (with `sets` applied last).
pub fn expand(grid_path: &Path, sets: &[String]) -> Result<Sweep> {
    let tree = read_yaml(grid_path)?;
    let raw: RawGrid =
        serde_yaml::from_value(tree).map_err(|e| anyhow!("{}: {e}", grid_path.display()))?;
    let dir = grid_path.parent().unwrap_or(Path::new("."));
    let base_path = dir.join(&raw.base);
    let base = read_yaml(&base_path)
        .with_context(|| format!("{}: its `base` config", grid_path.display()))?;
    let name = raw.name.clone().unwrap_or_else(|| {
        grid_path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("sweep")
            .to_string()
    });
    let mut groups: Vec<&RawGroup> = raw.grids.iter().collect();
    let top = RawGroup {
        axes: raw.axes.clone(),
        zip: raw.zip.clone(),
    };
    if !top.axes.is_empty() || !top.zip.is_empty() {
        if !groups.is_empty() {
            bail!(
                "{}: use either top-level `axes`/`zip` or `grids`, not both",
                grid_path.display()
            );
        }
        groups.push(&top);
    }
    let mut combos: Vec<Vec<(String, Value)>> = Vec::new();
    for g in &groups {
        combos.extend(expand_group(g, grid_path)?);
    }
    if combos.is_empty() {
        combos.push(Vec::new());
    }
    for inc in &raw.include {
        let mut c = Vec::new();
        for (k, v) in inc {
            c.push((key_of(k, grid_path)?, v.clone()));
        }
        combos.push(c);
    }
    let seeds: Vec<Option<u64>> = if raw.seeds.is_empty() {
        vec![None]
    } else {
        raw.seeds.iter().map(|&s| Some(s)).collect()
    };
    let mut runs: Vec<PlannedRun> = Vec::new();
    let mut rejected = 0;
    for combo in &combos {
        for seed in &seeds {
            let mut overrides = Vec::new();
            for (k, v) in &raw.set {
                overrides.push((key_of(k, grid_path)?, v.clone()));
            }
            overrides.extend(combo.iter().cloned());
            if let Some(s) = seed {
                overrides.push(("run.seed".to_string(), Value::from(*s)));
            }
            let mut tree = base.clone();
            for (k, v) in &overrides {
                set_path(&mut tree, k, v.clone())?;
            }
            let excluded = raw.exclude.iter().any(|rule| {
                rule.iter()
                    .all(|(k, v)| k.as_str().and_then(|k| get_path(&tree, k)) == Some(v))
            });
            if excluded {
                rejected += 1;
                continue;
            }
            for s in sets {
                apply_set(&mut tree, s)?;
            }
            let index = runs.len();
            let described = describe(&overrides);
            let config = resolve_tree(
                tree.clone(),
                &format!("{} run {index} ({described})", grid_path.display()),
            )?;
            let hash = config.hash()?;
            if let Some(twin) = runs.iter().find(|r| r.hash == hash) {
                bail!(
                    "{}: runs {} and {index} resolve to the same config ({})",
                    grid_path.display(),
                    twin.index,
                    described
                );
            }
            runs.push(PlannedRun {
                index,
                overrides,
                tree,
                config,
                hash,
            });
        }
    }
    tracing::debug!(runs = runs.len(), excluded = rejected, "grid expanded");
    Ok(Sweep {
        name,
        grid_path: grid_path.to_path_buf(),
        runs,
    })
}

/// `key=value` pairs of a run, for tables and messages.
pub fn describe(overrides: &[(String, Value)]) -> String {
    overrides
        .iter()
        .map(|(k, v)| format!("{k}={}", serde_json::to_string(v).unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(" ")
}
