//! The public judges' results read back in and matched to runs: the paper's main table
//! (model × AlpacaEval 2 LC and raw win rate, Arena-Hard score, MT-Bench score, with the run's
//! KL beside them where the model is a run of the sweep).
//!
//! `edpo report` reads them from `SWEEP_DIR/judges/` when it exists:
//! - AlpacaEval's leaderboard CSV (`*leaderboard*.csv` with a `length_controlled_winrate`
//!   column; the model name is the first column): LC win rate, win rate, standard error, and
//!   the average length;
//! - Arena-Hard's score table (`arena*.csv` with `model` and `score`, and the interval as
//!   `lower` / `upper`, `rating_q025` / `rating_q975`, or a `CI` text `(-a, +b)`);
//! - MT-Bench judgments (`*judgment*.jsonl`, FastChat's `{question_id, model, score, turn}`):
//!   the mean score over questions and turns with its standard error, scores of −1 (a judgment
//!   FastChat could not parse) left out and counted.
//!
//! A model whose name contains a run's directory name (its config hash) is that run: its
//! method, setting, seed and final KL come from the sweep. The others are listed by name.

use crate::runs::Sweep;
use crate::tables::Table;
use crate::{Error, Result};
use polars::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// The directory of judge results in a sweep directory.
pub const JUDGES: &str = "judges";

/// One model's results.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelResults {
    /// AlpacaEval 2 length-controlled win rate (%).
    pub alpaca_lc: Option<f64>,
    /// AlpacaEval 2 win rate (%).
    pub alpaca_wr: Option<f64>,
    /// AlpacaEval 2 standard error of the win rate (%).
    pub alpaca_se: Option<f64>,
    /// AlpacaEval average answer length (characters).
    pub alpaca_length: Option<f64>,
    /// Arena-Hard score.
    pub arena: Option<f64>,
    /// Arena-Hard 95% interval, lower and upper.
    pub arena_ci: Option<(f64, f64)>,
    /// MT-Bench mean score over questions and turns.
    pub mt_bench: Option<f64>,
    /// Its standard error.
    pub mt_bench_se: Option<f64>,
    /// Judgments used, and those left out (score −1).
    pub mt_bench_n: (usize, usize),
}

fn file_error(path: &Path, message: String) -> Error {
    Error::File {
        path: path.to_path_buf(),
        message,
    }
}

fn read_csv(path: &Path) -> Result<DataFrame> {
    CsvReadOptions::default()
        .with_has_header(true)
        .try_into_reader_with_file_path(Some(path.to_path_buf()))
        .and_then(|r| r.finish())
        .map_err(|e| file_error(path, format!("cannot read it as CSV: {e}")))
}

fn floats(df: &DataFrame, name: &str, path: &Path) -> Result<Option<Vec<Option<f64>>>> {
    let Ok(c) = df.column(name) else {
        return Ok(None);
    };
    let c = c
        .cast(&DataType::Float64)
        .map_err(|e| file_error(path, format!("column `{name}`: {e}")))?;
    let ca = c
        .f64()
        .map_err(|e| file_error(path, format!("column `{name}`: {e}")))?;
    Ok(Some(ca.iter().collect()))
}

fn names(df: &DataFrame, column: &str, path: &Path) -> Result<Vec<String>> {
    let c = df
        .column(column)
        .map_err(|_| file_error(path, format!("no column `{column}`")))?
        .cast(&DataType::String)
        .map_err(|e| file_error(path, format!("column `{column}`: {e}")))?;
    let ca = c
        .str()
        .map_err(|e| file_error(path, format!("column `{column}`: {e}")))?;
    Ok(ca
        .iter()
        .map(|v| v.unwrap_or_default().to_string())
        .collect())
}

fn alpaca(path: &Path, out: &mut BTreeMap<String, ModelResults>) -> Result<()> {
    let df = read_csv(path)?;
    let first = df
        .get_column_names()
        .first()
        .map(|n| n.to_string())
        .ok_or_else(|| file_error(path, "no columns".into()))?;
    let models = names(&df, &first, path)?;
    let lc = floats(&df, "length_controlled_winrate", path)?
        .ok_or_else(|| file_error(path, "no column `length_controlled_winrate`".into()))?;
    let wr = floats(&df, "win_rate", path)?;
    let se = floats(&df, "standard_error", path)?;
    let len = floats(&df, "avg_length", path)?;
    for (i, m) in models.iter().enumerate() {
        let r = out.entry(m.clone()).or_default();
        r.alpaca_lc = lc[i];
        r.alpaca_wr = wr.as_ref().and_then(|v| v[i]);
        r.alpaca_se = se.as_ref().and_then(|v| v[i]);
        r.alpaca_length = len.as_ref().and_then(|v| v[i]);
    }
    Ok(())
}

/// `(-1.2, +1.4)` → `(-1.2, 1.4)`.
fn parse_ci(text: &str) -> Option<(f64, f64)> {
    let inner = text.trim().trim_start_matches('(').trim_end_matches(')');
    let (a, b) = inner.split_once(',')?;
    Some((
        a.trim().parse().ok()?,
        b.trim().trim_start_matches('+').parse().ok()?,
    ))
}

fn arena(path: &Path, out: &mut BTreeMap<String, ModelResults>) -> Result<()> {
    let df = read_csv(path)?;
    let models = names(&df, "model", path)?;
    let score =
        floats(&df, "score", path)?.ok_or_else(|| file_error(path, "no column `score`".into()))?;
    let bounds = match (floats(&df, "lower", path)?, floats(&df, "upper", path)?) {
        (Some(l), Some(u)) => Some((l, u)),
        _ => match (
            floats(&df, "rating_q025", path)?,
            floats(&df, "rating_q975", path)?,
        ) {
            (Some(l), Some(u)) => Some((l, u)),
            _ => None,
        },
    };
    let ci_text = if bounds.is_none() && df.column("CI").is_ok() {
        Some(names(&df, "CI", path)?)
    } else {
        None
    };
    for (i, m) in models.iter().enumerate() {
        let r = out.entry(m.clone()).or_default();
        r.arena = score[i];
        r.arena_ci = match (&bounds, &ci_text, score[i]) {
            (Some((l, u)), _, _) => l[i].zip(u[i]),
            (None, Some(t), Some(s)) => parse_ci(&t[i]).map(|(a, b)| (s + a, s + b)),
            _ => None,
        };
    }
    Ok(())
}

fn mt_bench(path: &Path, out: &mut BTreeMap<String, ModelResults>) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e.to_string()))?;
    let mut scores: BTreeMap<String, (Vec<f64>, usize)> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| file_error(path, format!("line {}: malformed JSON: {e}", i + 1)))?;
        let (Some(model), Some(score)) = (v["model"].as_str(), v["score"].as_f64()) else {
            return Err(file_error(
                path,
                format!(
                    "line {}: a judgment needs `model` and a numeric `score`",
                    i + 1
                ),
            ));
        };
        let e = scores.entry(model.to_string()).or_default();
        if score < 0.0 {
            e.1 += 1;
        } else {
            e.0.push(score);
        }
    }
    for (model, (s, dropped)) in scores {
        let r = out.entry(model).or_default();
        let n = s.len();
        if n > 0 {
            let mean = s.iter().sum::<f64>() / n as f64;
            let var = if n > 1 {
                s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
            } else {
                0.0
            };
            r.mt_bench = Some(mean);
            r.mt_bench_se = Some((var / n as f64).sqrt());
        }
        r.mt_bench_n = (n, dropped);
    }
    Ok(())
}

/// Every model's results in `dir` (the formats of the module documentation).
pub fn read(dir: &Path) -> Result<BTreeMap<String, ModelResults>> {
    let mut out = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| file_error(dir, e.to_string()))?;
    let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    for path in files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if name.ends_with(".csv") && name.contains("leaderboard") && !name.starts_with("arena") {
            alpaca(&path, &mut out)?;
        } else if name.ends_with(".csv") && name.starts_with("arena") {
            arena(&path, &mut out)?;
        } else if name.ends_with(".jsonl") && name.contains("judgment") {
            mt_bench(&path, &mut out)?;
        }
    }
    Ok(out)
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

/// The paper's main table from the judges' results, models matched to the sweep's runs.
pub fn table(results: &BTreeMap<String, ModelResults>, sweep: &Sweep) -> Table {
    // Run directory name → (method, setting, seed, KL).
    let mut runs: Vec<(String, String, String, String, Option<f64>)> = Vec::new();
    let column = |name: &str| sweep.runs.column(name).ok().cloned();
    if let (Some(hash), Some(method), Some(setting)) =
        (column("hash"), column("method"), column("setting"))
    {
        let text = |c: &Column, i: usize| {
            c.get(i)
                .map(|v| v.str_value().to_string())
                .unwrap_or_default()
        };
        let kl = column("kl");
        let seed = column("seed");
        for i in 0..sweep.runs.height() {
            runs.push((
                text(&hash, i),
                text(&method, i),
                text(&setting, i),
                seed.as_ref()
                    .and_then(|c| c.get(i).ok())
                    .and_then(|v| v.extract::<f64>())
                    .map(|s| format!("{s:.0}"))
                    .unwrap_or_default(),
                kl.as_ref()
                    .and_then(|c| c.get(i).ok())
                    .and_then(|v| v.extract::<f64>()),
            ));
        }
    }
    let mut rows: Vec<(String, Vec<String>)> = results
        .iter()
        .map(|(model, r)| {
            let run = runs
                .iter()
                .find(|(h, ..)| !h.is_empty() && model.contains(h.as_str()));
            let (method, setting, seed, kl) = match run {
                Some((_, m, s, seed, kl)) => (m.clone(), s.clone(), seed.clone(), *kl),
                None => ("–".into(), "–".into(), "–".into(), None),
            };
            let pm = |v: Option<f64>, se: Option<f64>| match (v, se) {
                (Some(v), Some(se)) => format!("{v:.2} ± {:.2}", 1.96 * se),
                (v, _) => cell(v, 2),
            };
            let arena = match (r.arena, r.arena_ci) {
                (Some(s), Some((l, u))) => format!("{s:.1} ({l:.1}, {u:.1})"),
                (s, _) => cell(s, 1),
            };
            let mt = match (r.mt_bench, r.mt_bench_se) {
                (Some(m), Some(se)) => format!(
                    "{m:.2} ± {:.2} (n={}{})",
                    1.96 * se,
                    r.mt_bench_n.0,
                    if r.mt_bench_n.1 > 0 {
                        format!(", {} unparsed", r.mt_bench_n.1)
                    } else {
                        String::new()
                    }
                ),
                _ => "–".into(),
            };
            let key = format!("{method}\u{0}{setting}\u{0}{seed}\u{0}{model}");
            (
                key,
                vec![
                    model.clone(),
                    method,
                    setting,
                    seed,
                    cell(r.alpaca_lc, 2),
                    pm(r.alpaca_wr, r.alpaca_se),
                    cell(r.alpaca_length, 0),
                    arena,
                    mt,
                    cell(kl, 3),
                ],
            )
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    Table {
        headers: [
            "model",
            "method",
            "setting",
            "seed",
            "AlpacaEval 2 LC (%)",
            "AlpacaEval 2 WR (%)",
            "length",
            "Arena-Hard",
            "MT-Bench",
            "KL",
        ]
        .map(String::from)
        .to_vec(),
        rows: rows.into_iter().map(|(_, r)| r).collect(),
        bold: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_results_name_their_file_and_line() {
        let tmp_dir = tempfile::Builder::new()
            .prefix("edpo-judges-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp_dir.path().join("judges");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("mt_bench_judgment.jsonl"),
            "{\"model\": \"m\", \"score\": 5}\n{\"model\": \"m\"}\n",
        )
        .expect("write");
        let e = read(&dir)
            .expect_err("a judgment without a score")
            .to_string();
        assert!(
            e.contains("mt_bench_judgment.jsonl") && e.contains("line 2"),
            "{e}"
        );
        std::fs::remove_file(dir.join("mt_bench_judgment.jsonl")).expect("rm");
        std::fs::write(dir.join("arena_hard.csv"), "name,points\nm,3\n").expect("write");
        let e = read(&dir).expect_err("no model column").to_string();
        assert!(e.contains("arena_hard.csv") && e.contains("`model`"), "{e}");
        assert_eq!(parse_ci("(-1.5, +2.0)"), Some((-1.5, 2.0)));
    }
}
