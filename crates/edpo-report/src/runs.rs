//! Reading a sweep's run directories into a DataFrame.
//!
//! Each `runs/<hash>/` with a `status.json` in state `completed` contributes one row: the
//! objective's kind and parameters from `config.json`, the run seed, every number of
//! `eval.json`, and a `setting` label naming the method's varied hyper-parameters (and the
//! LoRA rank of a run that trains adapters). A run on RSO's pairs (`task.rso`) is the method
//! "RSO (<loss>)", its setting naming the sampling's candidates and β; a run in on-policy
//! rounds (`online`) is "<method> (online, fixed ref.)" or "(online, reset ref.)", its setting
//! naming the rounds. A grid that varies the task itself (the label noise's Bradley–Terry
//! temperature, say) gives each run a `task` label naming the task keys that differ; runs of
//! different tasks are never compared with each other, and [`Sweep::subset`] narrows the sweep
//! to one task. Runs that are not completed (planned in the sweep's manifest and not started:
//! pending), or were written by another config version, are listed as skipped; a malformed
//! file is an error naming it.

use crate::{Error, Result};
use polars::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use edpo_rundir::{Binned, Decisions, PerPrompt, CONFIG_VERSION};

/// The decisions of every trace of `method` at `setting`, summed over seeds (traces whose bins
/// differ from the first one's are left out); `None` when none wrote any.
pub fn decisions_of(traces: &[Trace], method: &str, setting: &str) -> Option<Decisions> {
    let mut total: Option<Decisions> = None;
    for d in traces
        .iter()
        .filter(|t| t.method == method && t.setting == setting)
        .filter_map(|t| t.decisions.as_ref())
    {
        match &mut total {
            None => total = Some(d.clone()),
            Some(t) => {
                t.merge(d);
            }
        }
    }
    total
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
    /// Per-prompt paired numbers of every evaluation (`per_prompt.jsonl`), when written.
    pub per_prompt: Vec<PerPrompt>,
    /// The final evaluation's validation win rate.
    pub final_val_win: Option<f64>,
    /// The run's task label (see [`Sweep::tasks`]).
    pub task: String,
}

impl Trace {
    /// The validation win rate of the evaluation after `step`: from its `eval/` line, or
    /// from `eval.json` for the final one.
    pub fn val_win_at(&self, step: usize) -> Option<f64> {
        self.lines
            .iter()
            .find(|l| l.get("step") == Some(&(step as f64)) && l.contains_key("eval/val_win_rate"))
            .and_then(|l| l.get("eval/val_win_rate").copied())
            .or_else(|| {
                let last = self.per_prompt.iter().map(|p| p.step).max()?;
                (last == step).then_some(self.final_val_win).flatten()
            })
    }
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
    /// The tasks the runs train on, as labels naming the task keys that differ between runs
    /// (`bt_temperature=0.5`), distinct and in order of their values; one empty label when
    /// every run shares its task.
    pub tasks: Vec<String>,
    /// The task this sweep was narrowed to by [`Sweep::subset`]; `None` for the whole sweep.
    pub task: Option<String>,
}

/// Task keys that do not make a task of their own: a run on RSO's pairs is already the
/// method "RSO (<loss>)", compared on the same prompts as the rest.
const TASK_KEYS_OF_METHODS: [&str; 1] = ["rso"];

/// A task value as a label shows it: numbers as `f64`, strings bare, a missing key as –.
fn task_value(v: Option<&Value>) -> String {
    match v {
        None => "–".into(),
        Some(Value::Number(n)) => format!("{}", n.as_f64().unwrap_or(f64::NAN)),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Orders two task values: numbers by value, anything else by its JSON text.
fn task_order(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    match (a.and_then(Value::as_f64), b.and_then(Value::as_f64)) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        _ => task_value(a).cmp(&task_value(b)),
    }
}

/// Each run's task label (the task keys that differ between runs, `key=value`), and the
/// distinct labels in order of their values.
fn task_labels(tasks: &[Value]) -> (Vec<String>, Vec<String>) {
    let keys: std::collections::BTreeSet<&str> = tasks
        .iter()
        .filter_map(Value::as_object)
        .flat_map(|m| m.keys().map(String::as_str))
        .filter(|k| !TASK_KEYS_OF_METHODS.contains(k))
        .collect();
    let varying: Vec<&str> = keys
        .into_iter()
        .filter(|k| tasks.iter().any(|t| t.get(k) != tasks[0].get(k)))
        .collect();
    let label = |t: &Value| {
        varying
            .iter()
            .map(|k| format!("{k}={}", task_value(t.get(k))))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let labels: Vec<String> = tasks.iter().map(label).collect();
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    order.sort_by(|&a, &b| {
        varying
            .iter()
            .map(|k| task_order(tasks[a].get(k), tasks[b].get(k)))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut distinct: Vec<String> = Vec::new();
    for i in order {
        if !distinct.contains(&labels[i]) {
            distinct.push(labels[i].clone());
        }
    }
    (labels, distinct)
}

impl Sweep {
    /// The runs of one task (a label of [`Sweep::tasks`]): a sweep of its own, since runs
    /// on different tasks share no pairs, labels or reference samples to be compared by. The
    /// skipped runs stay with the whole sweep.
    pub fn subset(&self, task: &str) -> Result<Sweep> {
        let mask = self.runs.column("task")?.str()?.equal(task);
        let runs = self.runs.filter(&mask)?;
        Ok(Sweep {
            runs,
            traces: self
                .traces
                .iter()
                .filter(|t| t.task == task)
                .cloned()
                .collect(),
            skipped: Vec::new(),
            tasks: vec![task.to_string()],
            task: Some(task.to_string()),
        })
    }
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
    Decisions::read(path).map_err(|e| match e {
        edpo_rundir::Error::Malformed { path, message } => Error::File { path, message },
        other => Error::File {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    })
}

/// Human label of a method: its kind, with the display names the papers use (from the
/// objective catalogue).
pub fn method_label(kind: &str) -> String {
    edpo_objectives::catalogue::label(kind).to_string()
}

/// The symbol a parameter is shown with (β, ε, λ, …).
pub(crate) fn symbol(name: &str) -> &str {
    edpo_objectives::catalogue::symbol(name)
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
    let mut task_configs = Vec::new();
    let mut skipped = Vec::new();
    // Planned runs (the sweep's manifest) that have not started: a report rendered while a
    // sweep runs (on Slurm, say) names what it does not include yet.
    if let Ok(manifest) = edpo_rundir::SweepManifest::read(sweep_dir) {
        for entry in &manifest.runs {
            if !runs_dir.join(&entry.hash).is_dir() {
                skipped.push(format!("{}: pending (run {})", entry.hash, entry.index));
            }
        }
    }
    for dir in dirs {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let status = match read_json(&dir.join(edpo_rundir::STATUS)) {
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
        let config = read_json(&dir.join(edpo_rundir::CONFIG_JSON))?;
        let version = config["config_version"].as_u64().unwrap_or(1);
        if version != u64::from(CONFIG_VERSION) {
            skipped.push(format!(
                "{name}: config version {version} (this report reads version {CONFIG_VERSION})"
            ));
            continue;
        }
        let eval = read_json(&dir.join(edpo_rundir::EVAL))?;
        task_configs.push(config["task"].clone());
        let objective = &config["objective"];
        let k = objective["kind"].as_str().unwrap_or("unknown").to_string();
        let seed = config["run"]["seed"].as_u64().unwrap_or(0);
        let label = match config["lora"]["r"].as_u64() {
            // LoRA and full fine-tuning of one objective are different settings.
            Some(r) => format!("{} · LoRA r={r}", setting_label(objective)),
            None => setting_label(objective),
        };
        // An objective trained on RSO's pairs is a method of its own: RSO with that loss.
        let rso = &config["task"]["rso"];
        let (display, label) = if rso.is_object() {
            (
                format!("RSO ({})", method_label(&k)),
                format!(
                    "{label}, RSO n={}, β_rso={}",
                    rso["candidates"],
                    rso["beta"].as_f64().unwrap_or(f64::NAN)
                ),
            )
        } else {
            (method_label(&k), label)
        };
        // On-policy rounds likewise: the method trained in rounds, its reference named.
        let online = &config["online"];
        let (display, label) = if online.is_object() {
            let reference = match online["reference"].as_str() {
                Some("previous") => "reset ref.",
                _ => "fixed ref.",
            };
            (
                format!("{display} (online, {reference})"),
                format!("{label}, {} rounds", online["rounds"]),
            )
        } else {
            (display, label)
        };
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
        let metrics_path = dir.join(edpo_rundir::METRICS);
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
        let decisions_path = dir.join(edpo_rundir::DECISIONS);
        let decisions = if decisions_path.exists() {
            Some(read_decisions(&decisions_path)?)
        } else {
            None
        };
        let per_prompt_path = dir.join(edpo_rundir::PER_PROMPT);
        let per_prompt = if per_prompt_path.exists() {
            PerPrompt::read_all(&per_prompt_path).map_err(|e| match e {
                edpo_rundir::Error::Malformed { path, message } => Error::File { path, message },
                other => Error::File {
                    path: per_prompt_path.clone(),
                    message: other.to_string(),
                },
            })?
        } else {
            Vec::new()
        };
        traces.push(Trace {
            method: display.clone(),
            setting: label.clone(),
            seed,
            lines,
            decisions,
            per_prompt,
            final_val_win: eval["val_win_rate"].as_f64(),
            task: String::new(),
        });
        method.push(display);
        kind.push(k);
        setting.push(label);
        hash.push(name);
    }
    let (task_of_run, tasks) = task_labels(&task_configs);
    for (trace, task) in traces.iter_mut().zip(&task_of_run) {
        trace.task = task.clone();
    }
    let mut cols: Vec<Column> = vec![
        Column::new("method".into(), method),
        Column::new("kind".into(), kind),
        Column::new("setting".into(), setting),
        Column::new("hash".into(), hash),
        Column::new("task".into(), task_of_run),
    ];
    for (name, values) in columns {
        cols.push(Column::new(name.as_str().into(), values));
    }
    let runs = DataFrame::new_infer_height(cols)?;
    Ok(Sweep {
        runs,
        traces,
        skipped,
        tasks,
        task: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn task_labels_name_the_keys_that_differ_in_the_order_of_their_values() {
        let tasks = [
            json!({"bt_temperature": 10.0, "seed": 0, "rso": null}),
            json!({"bt_temperature": 2.0, "seed": 0, "rso": {"candidates": 8}}),
            json!({"bt_temperature": 2.0, "seed": 0}),
        ];
        let (of_run, distinct) = task_labels(&tasks);
        assert_eq!(
            of_run,
            ["bt_temperature=10", "bt_temperature=2", "bt_temperature=2"]
        );
        assert_eq!(distinct, ["bt_temperature=2", "bt_temperature=10"]);
        // One task (RSO's sampling aside): one empty label.
        let (of_run, distinct) = task_labels(&tasks[1..]);
        assert_eq!(
            (of_run, distinct),
            (vec![String::new(); 2], vec![String::new()])
        );
    }
}
