//! Aggregation over seeds with polars: per method and setting, the mean of each metric and a
//! 95% confidence interval `t_{0.975, n−1} · s / √n` (Student's t; no interval for one seed).

use crate::Result;
use polars::prelude::*;
use std::collections::BTreeMap;

/// The metrics aggregated, as named in `eval.json`.
pub const METRICS: &[&str] = &[
    "win_rate",
    "reward_diff",
    "gold_reward",
    "kl",
    "kl_se",
    "kl_sampled",
    "label_noise",
    "preference_accuracy",
    "preference_accuracy_se",
    "logratio_margin",
    "win_rate_vs_chosen",
    "second_judge_win_rate",
    "mean_length",
    "entropy_per_token",
    "final_beta",
    "val_win_rate",
    "val_gold_reward",
    "val_preference_accuracy",
];

/// The order methods are listed in, by label: the objective catalogue's (DPO, ε-DPO, then the
/// baselines as the spec lists them).
pub fn method_order() -> Vec<&'static str> {
    edpo_objectives::CATALOGUE.iter().map(|e| e.label).collect()
}

/// A metric's mean over seeds and the half-width of its 95% interval (NaN for one seed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Mean over seeds.
    pub mean: f64,
    /// Half-width of the 95% interval.
    pub ci: f64,
}

/// One method at one setting, aggregated over its seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct SettingSummary {
    /// Display name of the method.
    pub method: String,
    /// The objective kind.
    pub kind: String,
    /// The setting label.
    pub setting: String,
    /// Number of seeds.
    pub n: usize,
    /// Objective parameters (`param_*` columns, first seed's values).
    pub params: BTreeMap<String, f64>,
    /// Aggregated metrics.
    pub metrics: BTreeMap<String, Estimate>,
}

impl SettingSummary {
    /// A metric, if the runs reported it.
    pub fn get(&self, name: &str) -> Option<Estimate> {
        self.metrics
            .get(name)
            .copied()
            .filter(|e| e.mean.is_finite())
    }
}

/// `t_{0.975, df}`: the table to 30 degrees of freedom, an expansion beyond.
pub fn t_quantile(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        d if d <= 30 => T[d - 1],
        d => {
            // Cornish–Fisher expansion around the normal quantile: within 1e-4 of the exact
            // value from 31 degrees of freedom on (2.0395 at 31, 1.9600 in the limit).
            let (z, n) = (1.959_964_f64, d as f64);
            z + (z.powi(3) + z) / (4.0 * n)
                + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * n * n)
        }
    }
}

/// Aggregates runs by method and setting, in order of method then first appearance.
pub fn by_setting(runs: &DataFrame) -> Result<Vec<SettingSummary>> {
    let names: Vec<String> = runs
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let metrics: Vec<&str> = METRICS
        .iter()
        .copied()
        .filter(|m| names.iter().any(|n| n == m))
        .collect();
    let params: Vec<String> = names
        .iter()
        .filter(|n| n.starts_with("param_"))
        .cloned()
        .collect();
    // The rows of each (method, kind, setting), in order of first appearance.
    let keys = |name: &str| -> Result<Vec<String>> {
        let column = runs.column(name)?;
        (0..runs.height())
            .map(|i| Ok(column.get(i)?.str_value().to_string()))
            .collect()
    };
    let (method, kind, setting) = (keys("method")?, keys("kind")?, keys("setting")?);
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut index: BTreeMap<(&str, &str, &str), usize> = BTreeMap::new();
    for row in 0..runs.height() {
        let key = (
            method[row].as_str(),
            kind[row].as_str(),
            setting[row].as_str(),
        );
        let g = *index.entry(key).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(row);
    }
    // Each metric as f64 (missing values as None).
    let mut values: BTreeMap<&str, Vec<Option<f64>>> = BTreeMap::new();
    for m in &metrics {
        let column = runs.column(m)?.cast(&DataType::Float64)?;
        values.insert(*m, column.f64()?.iter().collect());
    }
    let mut out = Vec::with_capacity(groups.len());
    for rows in &groups {
        let first = rows[0];
        let mut summary = SettingSummary {
            method: method[first].clone(),
            kind: kind[first].clone(),
            setting: setting[first].clone(),
            n: rows.len(),
            params: BTreeMap::new(),
            metrics: BTreeMap::new(),
        };
        for p in &params {
            let v = runs
                .column(p)?
                .get(first)?
                .extract::<f64>()
                .unwrap_or(f64::NAN);
            if v.is_finite() {
                summary
                    .params
                    .insert(p.trim_start_matches("param_").to_string(), v);
            }
        }
        for m in &metrics {
            let present: Vec<f64> = rows.iter().filter_map(|&r| values[m][r]).collect();
            let n = present.len();
            if n >= 1 {
                let mean = present.iter().sum::<f64>() / n as f64;
                let ci = if n >= 2 {
                    let ss: f64 = present.iter().map(|x| (x - mean).powi(2)).sum();
                    t_quantile(n - 1) * (ss / (n - 1) as f64).sqrt() / (n as f64).sqrt()
                } else {
                    f64::NAN
                };
                summary
                    .metrics
                    .insert((*m).to_string(), Estimate { mean, ci });
            }
        }
        out.push(summary);
    }
    // Methods in the order of [`method_order`] (others after, in order of first appearance),
    // each method's settings by their main parameter.
    let mut methods: Vec<String> = method_order().iter().map(|m| m.to_string()).collect();
    for s in &out {
        if !methods.contains(&s.method) {
            methods.push(s.method.clone());
        }
    }
    let main_param = |s: &SettingSummary| {
        ["epsilon", "beta", "beta0", "lambda", "delta"]
            .iter()
            .find_map(|k| s.params.get(*k).copied())
            .unwrap_or(0.0)
    };
    out.sort_by(|a, b| {
        let pos = |s: &SettingSummary| {
            methods
                .iter()
                .position(|m| *m == s.method)
                .unwrap_or(usize::MAX)
        };
        pos(a)
            .cmp(&pos(b))
            .then(main_param(a).total_cmp(&main_param(b)))
            .then(a.setting.cmp(&b.setting))
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_t_interval_over_seeds() -> Result<()> {
        let df = df!(
            "method" => ["DPO", "DPO", "DPO", "ε-DPO"],
            "kind" => ["dpo", "dpo", "dpo", "epsilon_dpo"],
            "setting" => ["β=0.1", "β=0.1", "β=0.1", "ε=0.01"],
            "win_rate" => [0.5, 0.6, 0.7, 0.55],
            "param_beta" => [0.1, 0.1, 0.1, 0.1]
        )?;
        let s = by_setting(&df)?;
        assert_eq!(s.len(), 2);
        let w = s[0].get("win_rate").expect("win rate");
        assert!((w.mean - 0.6).abs() < 1e-12);
        // s = 0.1, n = 3: 4.303 · 0.1 / √3.
        assert!((w.ci - 4.303 * 0.1 / 3f64.sqrt()).abs() < 1e-9);
        assert_eq!(s[1].n, 1);
        assert!(s[1].get("win_rate").expect("one seed").ci.is_nan());
        assert_eq!(s[0].params.get("beta"), Some(&0.1));
        Ok(())
    }
}

#[cfg(test)]
mod t_tests {
    #[test]
    fn t_quantiles_beyond_the_table_follow_the_exact_values() {
        // Exact t_{0.975}: 31 → 2.0395, 40 → 2.0211, 60 → 2.0003, 120 → 1.9799.
        for (df, exact) in [(31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799)] {
            assert!(
                (super::t_quantile(df) - exact).abs() < 2e-4,
                "{df}: {}",
                super::t_quantile(df)
            );
        }
    }
}
