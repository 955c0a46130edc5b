//! Reading a sweep's run directories into a DataFrame.
//!
//! Each `runs/<hash>/` with a `status.json` in state `completed` contributes one row: the
//! objective's kind and parameters from `config.json`, the run seed, every number of
//! `eval.json`, and a `setting` label naming the method's varied hyper-parameters. Runs that
//! are not completed, or were written by another config version, are listed as skipped; a
//! malformed file is an error naming it.

use crate::{Error, Result};
use polars::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The run-directory format this crate reads (`config_version` in `config.json`; a run
/// without the key is version 1). Runs of other versions are listed as skipped.
pub const CONFIG_VERSION: u64 = 2;

/// ε-DPO's step decisions over one run, counted by bins of the pairs' true preference
/// probability (`decisions.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct Decisions {
    /// Bin edges, `bins + 1` values.
    pub p_true_edges: Vec<f64>,
    /// Pairs stepped +1 (β relaxed) per bin, over every step of the run.
    pub relaxed: Vec<u64>,
    /// Pairs left at step 0 per bin.
    pub kept: Vec<u64>,
    /// Pairs stepped −1 (β strengthened) per bin.
    pub strengthened: Vec<u64>,
}

/// One run's metrics over training (the lines of `metrics.jsonl`).
#[derive(Debug, Clone)]
pub struct Trace {
    /// Method name.
    pub method: String,
    /// Setting label.
    pub setting: String,
    /// Seed.
    pub seed: u64,
    /// The metric lines: training lines, and evaluation lines (keys `eval/…`) every
    /// `eval.every` steps.
    pub lines: Vec<BTreeMap<String, f64>>,
    /// ε-DPO's decisions by true preference probability, when the run wrote them.
    pub decisions: Option<Decisions>,
}

/// A loaded sweep.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// One row per completed run.
    pub runs: DataFrame,
    /// Training traces of the completed runs.
    pub traces: Vec<Trace>,
    /// Runs not reported, with why.
    pub skipped: Vec<String>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::File {
        path: path.to_path_buf(),
        message: format!("malformed JSON: {e}"),
    })
}

fn read_decisions(path: &Path) -> Result<Decisions> {
    let v = read_json(path)?;
    let bad = |what: &str| Error::File {
        path: path.to_path_buf(),
        message: format!("`{what}` missing or malformed"),
    };
    let floats = |key: &str| -> Result<Vec<f64>> {
        v[key]
            .as_array()
            .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad(key))
    };
    let counts = |key: &str| -> Result<Vec<u64>> {
        v[key]
            .as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad(key))
    };
    let d = Decisions {
        p_true_edges: floats("p_true_edges")?,
        relaxed: counts("relaxed")?,
        kept: counts("kept")?,
        strengthened: counts("strengthened")?,
    };
    let bins = d.p_true_edges.len().saturating_sub(1);
    if bins == 0
        || [&d.relaxed, &d.kept, &d.strengthened]
            .iter()
            .any(|c| c.len() != bins)
    {
        return Err(bad("p_true_edges"));
    }
    Ok(d)
}

/// Human label of a method: its kind, with the display names the papers use.
pub fn method_label(kind: &str) -> String {
    match kind {
        "dpo" => "DPO",
        "epsilon_dpo" => "ε-DPO",
        "cdpo" => "cDPO",
        "rdpo" => "rDPO",
        "ipo" => "IPO",
        "hinge" => "Hinge",
        "slic" => "SLiC",
        "simpo" => "SimPO",
        "rdpo_len" => "R-DPO",
        "cpo" => "CPO",
        "orpo" => "ORPO",
        "kto" => "KTO",
        "beta_dpo" => "β-DPO",
        "tr_dpo" => "TR-DPO",
        other => other,
    }
    .to_string()
}

/// The symbol a parameter is shown with (β, ε, λ, …).
pub(crate) fn symbol(name: &str) -> &str {
    match name {
        "beta" => "β",
        "epsilon" => "ε",
        "beta0" => "β₀",
        "alpha" => "α",
        "lambda" => "λ",
        "delta" => "δ",
        "tau" => "τ",
        "gamma_ratio" => "γ/β",
        "label_smoothing" => "ℓ",
        other => other,
    }
}

/// The setting label: `name=value` of every objective parameter, in a fixed order.
pub fn setting_label(objective: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(map) = objective.as_object() {
        let mut keys: Vec<&String> = map
            .keys()
            .filter(|k| !matches!(k.as_str(), "kind" | "reference_logps" | "sft_weight"))
            .collect();
        // ε first for ε-DPO, then the rest alphabetically.
        keys.sort_by_key(|k| (k.as_str() != "epsilon", k.as_str()));
        for k in keys {
            let v = &map[k];
            let shown = match v {
                Value::Number(n) => format!("{}", n.as_f64().unwrap_or(f64::NAN)),
                other => other.to_string(),
            };
            parts.push(format!("{}={shown}", symbol(k)));
        }
        if let Some(w) = map
            .get("sft_weight")
            .and_then(Value::as_f64)
            .filter(|w| *w > 0.0)
        {
            parts.push(format!("sft={w}"));
        }
    }
    parts.join(", ")
}

/// Reads every run directory under `sweep_dir/runs`.
pub fn load_sweep(sweep_dir: &Path) -> Result<Sweep> {
    let runs_dir = sweep_dir.join("runs");
    let entries = std::fs::read_dir(&runs_dir).map_err(|e| Error::File {
        path: runs_dir.clone(),
        message: e.to_string(),
    })?;
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let mut columns: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
    let (mut method, mut kind, mut setting, mut hash) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut traces = Vec::new();
    let mut skipped = Vec::new();
    for dir in dirs {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let status = match read_json(&dir.join("status.json")) {
            Ok(s) => s,
            Err(_) => {
                skipped.push(format!("{name}: no status.json"));
                continue;
            }
        };
        if status["state"] != "completed" {
            skipped.push(format!(
                "{name}: {}",
                status["state"].as_str().unwrap_or("unknown state")
            ));
            continue;
        }
        let config = read_json(&dir.join("config.json"))?;
        let version = config["config_version"].as_u64().unwrap_or(1);
        if version != CONFIG_VERSION {
            skipped.push(format!(
                "{name}: config version {version} (this report reads version {CONFIG_VERSION})"
            ));
            continue;
        }
        let eval = read_json(&dir.join("eval.json"))?;
        let objective = &config["objective"];
        let k = objective["kind"].as_str().unwrap_or("unknown").to_string();
        let seed = config["run"]["seed"].as_u64().unwrap_or(0);
        let label = setting_label(objective);
        let row = method.len();
        let mut numbers: BTreeMap<String, f64> = BTreeMap::new();
        if let Some(map) = eval.as_object() {
            for (key, v) in map {
                if let Some(x) = v.as_f64() {
                    numbers.insert(key.clone(), x);
                }
            }
        }
        if let Some(map) = objective.as_object() {
            for (key, v) in map {
                if let Some(x) = v.as_f64() {
                    numbers.insert(format!("param_{key}"), x);
                }
            }
        }
        numbers.insert("seed".into(), seed as f64);
        for (key, value) in numbers {
            let col = columns.entry(key).or_insert_with(|| vec![None; row]);
            col.push(Some(value));
        }
        for col in columns.values_mut() {
            col.resize(row + 1, None);
        }
        let metrics_path = dir.join("metrics.jsonl");
        let mut lines = Vec::new();
        if let Ok(text) = std::fs::read_to_string(&metrics_path) {
            for (i, l) in text.lines().enumerate() {
                let v: Value = serde_json::from_str(l).map_err(|e| Error::File {
                    path: metrics_path.clone(),
                    message: format!("line {}: {e}", i + 1),
                })?;
                let line: BTreeMap<String, f64> = v
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
                            .collect()
                    })
                    .unwrap_or_default();
                lines.push(line);
            }
        }
        let decisions_path = dir.join("decisions.json");
        let decisions = if decisions_path.exists() {
            Some(read_decisions(&decisions_path)?)
        } else {
            None
        };
        traces.push(Trace {
            method: method_label(&k),
            setting: label.clone(),
            seed,
            lines,
            decisions,
        });
        method.push(method_label(&k));
        kind.push(k);
        setting.push(label);
        hash.push(name);
    }
    let mut cols: Vec<Column> = vec![
        Column::new("method".into(), method),
        Column::new("kind".into(), kind),
        Column::new("setting".into(), setting),
        Column::new("hash".into(), hash),
    ];
    for (name, values) in columns {
        cols.push(Column::new(name.as_str().into(), values));
    }
    let runs = DataFrame::new_infer_height(cols)?;
    Ok(Sweep {
        runs,
        traces,
        skipped,
    })
}
