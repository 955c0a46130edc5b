//! Tables in Markdown, HTML, LaTeX (`booktabs`) and CSV, and the report pages.

use crate::aggregate::{Estimate, SettingSummary};
use crate::paired::{mde80, Frontier, Interval, Metric, Paired};
use crate::runs::Sweep;
use crate::Result;
use std::path::Path;

/// A table of strings with a header row; cells may be marked bold (the best value of a
/// column), which each format renders its own way (CSV drops it).
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Column headers.
    pub headers: Vec<String>,
    /// Rows, one cell per header.
    pub rows: Vec<Vec<String>>,
    /// `(row, column)` of the bold cells.
    pub bold: Vec<(usize, usize)>,
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn latex_escape(s: &str) -> String {
    s.replace('\\', "\\textbackslash{}")
        .replace('&', "\\&")
        .replace('%', "\\%")
        .replace('_', "\\_")
        .replace('#', "\\#")
        .replace('±', "$\\pm$")
        .replace('β', "$\\beta$")
        .replace('ε', "$\\varepsilon$")
        .replace('α', "$\\alpha$")
        .replace('λ', "$\\lambda$")
        .replace('δ', "$\\delta$")
        .replace('τ', "$\\tau$")
        .replace('γ', "$\\gamma$")
        .replace('ℓ', "$\\ell$")
        .replace('₀', "$_0$")
        .replace('Δ', "$\\Delta$")
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Table {
    /// GitHub-flavoured Markdown.
    pub fn to_markdown(&self) -> String {
        let mut out = format!(
            "| {} |\n|{}|\n",
            self.headers.join(" | "),
            self.headers
                .iter()
                .map(|_| "---")
                .collect::<Vec<_>>()
                .join("|")
        );
        for (i, r) in self.rows.iter().enumerate() {
            let cells: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    if self.is_bold(i, j) {
                        format!("**{c}**")
                    } else {
                        c.clone()
                    }
                })
                .collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        out
    }

    fn is_bold(&self, row: usize, col: usize) -> bool {
        self.bold.contains(&(row, col))
    }

    /// CSV with a header line.
    pub fn to_csv(&self) -> String {
        let mut out = self
            .headers
            .iter()
            .map(|h| csv_cell(h))
            .collect::<Vec<_>>()
            .join(",")
            + "\n";
        for r in &self.rows {
            out.push_str(&(r.iter().map(|c| csv_cell(c)).collect::<Vec<_>>().join(",") + "\n"));
        }
        out
    }

    /// A LaTeX `tabular` with `booktabs` rules.
    pub fn to_latex(&self) -> String {
        let cols = format!("l{}", "r".repeat(self.headers.len().saturating_sub(1)));
        let mut out = format!(
            "% requires \\usepackage{{booktabs}}\n\\begin{{tabular}}{{{cols}}}\n\\toprule\n"
        );
        out.push_str(
            &(self
                .headers
                .iter()
                .map(|h| latex_escape(h))
                .collect::<Vec<_>>()
                .join(" & ")
                + " \\\\\n\\midrule\n"),
        );
        for (i, r) in self.rows.iter().enumerate() {
            out.push_str(
                &(r.iter()
                    .enumerate()
                    .map(|(j, c)| {
                        if self.is_bold(i, j) {
                            format!("\\textbf{{{}}}", latex_escape(c))
                        } else {
                            latex_escape(c)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" & ")
                    + " \\\\\n"),
            );
        }
        out.push_str("\\bottomrule\n\\end{tabular}\n");
        out
    }

    /// An HTML table.
    pub fn to_html(&self) -> String {
        let mut out = String::from("<table>\n<thead><tr>");
        for h in &self.headers {
            out.push_str(&format!("<th>{}</th>", html_escape(h)));
        }
        out.push_str("</tr></thead>\n<tbody>\n");
        for (i, r) in self.rows.iter().enumerate() {
            out.push_str("<tr>");
            for (j, c) in r.iter().enumerate() {
                if self.is_bold(i, j) {
                    out.push_str(&format!("<td><b>{}</b></td>", html_escape(c)));
                } else {
                    out.push_str(&format!("<td>{}</td>", html_escape(c)));
                }
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</tbody>\n</table>\n");
        out
    }
}

fn cell(e: Option<Estimate>, digits: usize) -> String {
    match e {
        None => "–".into(),
        Some(e) if e.ci.is_finite() => format!("{:.*} ± {:.*}", digits, e.mean, digits, e.ci),
        Some(e) => format!("{:.*}", digits, e.mean),
    }
}

/// Which way a column is better, and the per-prompt metric a paired test of it compares,
/// for the bold best value; columns without a paired test are never bold.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Better {
    Higher(Metric),
    Lower(Metric),
    Neither,
}

/// The reported columns: key in `eval.json`, header, digits, which way is better.
const COLUMNS: [(&str, &str, usize, Better); 13] = [
    ("win_rate", "win rate", 3, Better::Higher(Metric::Win)),
    (
        "reward_diff",
        "reward gain",
        3,
        Better::Higher(Metric::RewardGain),
    ),
    (
        "gold_reward",
        "gold reward",
        3,
        Better::Higher(Metric::RewardGain),
    ),
    ("kl", "KL", 3, Better::Lower(Metric::Kl)),
    ("kl_se", "KL s.e. (run)", 3, Better::Neither),
    ("kl_sampled", "KL (sampled)", 3, Better::Neither),
    ("preference_accuracy", "pref. acc.", 3, Better::Neither),
    ("logratio_margin", "log-ratio margin", 3, Better::Neither),
    ("mean_length", "length", 1, Better::Neither),
    ("win_rate_vs_chosen", "win vs chosen", 3, Better::Neither),
    ("second_judge_win_rate", "lexicon win", 3, Better::Neither),
    ("val_win_rate", "val. win rate", 3, Better::Neither),
    (
        "val_preference_accuracy",
        "val. pref. acc.",
        3,
        Better::Neither,
    ),
];

type Column = (&'static str, &'static str, usize, Better);

/// The metric a method's best setting is chosen by: the validation win rate when the runs
/// have one (never the test numbers the table reports); for runs without a gold reward (user
/// data), the validation pairs' preference accuracy; else the reported win rate.
pub fn selection_metric(summary: &[SettingSummary]) -> &'static str {
    let has = |k: &str| summary.iter().any(|s| s.get(k).is_some());
    if has("val_win_rate") {
        "val_win_rate"
    } else if has("val_preference_accuracy") {
        "val_preference_accuracy"
    } else {
        "win_rate"
    }
}

fn row(s: &SettingSummary, columns: &[Column]) -> Vec<String> {
    let mut r = vec![s.method.clone(), s.setting.clone(), s.n.to_string()];
    r.extend(columns.iter().map(|(k, _, d, _)| cell(s.get(k), *d)));
    r
}

fn present_columns(summary: &[SettingSummary]) -> Vec<Column> {
    COLUMNS
        .iter()
        .copied()
        .filter(|(k, _, _, _)| summary.iter().any(|s| s.get(k).is_some()))
        .collect()
}

fn headers(columns: &[Column]) -> Vec<String> {
    let mut h = vec![
        "method".to_string(),
        "setting".to_string(),
        "seeds".to_string(),
    ];
    h.extend(columns.iter().map(|(_, name, _, _)| (*name).to_string()));
    h
}

/// The cells of the best mean of each testable column among `rows`, kept only where a paired
/// test separates the best from the runner-up: the 95% interval of their difference (paired
/// bootstrap over seeds and prompts of the final evaluations) excludes 0. Values that print
/// the same are never separated.
fn best_cells(
    rows: &[&SettingSummary],
    columns: &[Column],
    paired: Option<&Paired<'_>>,
) -> Vec<(usize, usize)> {
    let mut bold = Vec::new();
    let Some(paired) = paired else {
        return bold;
    };
    if rows.len() < 2 {
        return bold;
    }
    for (c, (key, _, digits, better)) in columns.iter().enumerate() {
        let (sign, metric) = match better {
            Better::Higher(m) => (1.0, *m),
            Better::Lower(m) => (-1.0, *m),
            Better::Neither => continue,
        };
        let shown = |s: &SettingSummary| {
            s.get(key).map(|e| {
                let scale = 10f64.powi(*digits as i32);
                sign * (e.mean * scale).round()
            })
        };
        let mut ranked: Vec<(usize, f64)> = rows
            .iter()
            .enumerate()
            .filter_map(|(r, s)| shown(s).map(|v| (r, v)))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let [(best, vb), (second, vs), ..] = ranked[..] else {
            continue;
        };
        if vb == vs {
            continue;
        }
        let (a, b) = (rows[best], rows[second]);
        let test = paired.diff_final(
            (a.method.as_str(), a.setting.as_str()),
            (b.method.as_str(), b.setting.as_str()),
            metric,
        );
        if test.is_some_and(|t| t.excludes_zero()) {
            bold.push((best, 3 + c));
        }
    }
    bold
}

/// Every method and setting: mean ± 95% interval over seeds.
pub fn main_table(summary: &[SettingSummary]) -> Result<Table> {
    let columns = present_columns(summary);
    Ok(Table {
        headers: headers(&columns),
        rows: summary.iter().map(|s| row(s, &columns)).collect(),
        bold: Vec::new(),
    })
}

/// Each method at its best setting, chosen by [`selection_metric`] (the ε-DPO paper compares
/// methods at their best settings); the best value of a column among the methods in bold
/// where a paired test separates it from the runner-up ([`best_cells`]).
pub fn best_per_method(summary: &[SettingSummary], paired: Option<&Paired<'_>>) -> Result<Table> {
    let chosen = chosen_settings(summary);
    let columns = present_columns(summary);
    Ok(Table {
        headers: headers(&columns),
        rows: chosen.iter().map(|s| row(s, &columns)).collect(),
        bold: best_cells(&chosen, &columns, paired),
    })
}

/// Each method's setting with the best [`selection_metric`], in the summary's method order.
pub fn chosen_settings(summary: &[SettingSummary]) -> Vec<&SettingSummary> {
    let metric = selection_metric(summary);
    let mut methods: Vec<&str> = Vec::new();
    for s in summary {
        if !methods.contains(&s.method.as_str()) {
            methods.push(&s.method);
        }
    }
    methods
        .iter()
        .filter_map(|m| {
            summary.iter().filter(|s| s.method == *m).max_by(|a, b| {
                let w =
                    |s: &SettingSummary| s.get(metric).map(|e| e.mean).unwrap_or(f64::NEG_INFINITY);
                w(a).total_cmp(&w(b))
            })
        })
        .collect()
}

/// `mean [lo, hi]` of an interval.
fn interval_cell(i: Option<Interval>, digits: usize) -> String {
    match i {
        None => "–".into(),
        Some(i) => format!(
            "{:+.*} [{:+.*}, {:+.*}]",
            digits, i.mean, digits, i.lo, digits, i.hi
        ),
    }
}

/// The minimum detectable difference at 80% power of a paired difference, or – without one.
fn mde_cell(d: Option<Interval>) -> String {
    d.map_or_else(|| "–".into(), |d| format!("{:.3}", mde80(d.se)))
}

/// The method every other is compared with: DPO.
pub const BASELINE_METHOD: &str = "DPO";

/// KL values at which methods are compared along their frontiers: four evenly spaced values
/// over the range every compared frontier covers with checkpoints of its own (from the largest
/// first-checkpoint KL to the smallest last-checkpoint KL), so that no value is interpolated
/// between the reference and a method's first checkpoint when the others have points there;
/// rounded to 0.05 nats. When the ranges do not overlap, DPO's range (methods that have no
/// checkpoint there show no value).
pub fn matched_kls(frontiers: &[Frontier]) -> Vec<f64> {
    let first = |f: &Frontier| {
        f.frontier
            .iter()
            .map(|&i| &f.checkpoints[i])
            .find(|c| c.setting.is_some())
            .map(|c| c.kl)
    };
    // A method whose frontier is the reference alone (no checkpoint beats it on validation)
    // has no range to match; it shows – at every KL rather than emptying the table.
    let reaching: Vec<&Frontier> = frontiers.iter().filter(|f| f.max_kl() > 0.0).collect();
    let hi = reaching
        .iter()
        .map(|f| f.max_kl())
        .fold(f64::INFINITY, f64::min);
    let lo = reaching
        .iter()
        .filter_map(|f| first(f))
        .fold(0f64, f64::max);
    if !hi.is_finite() || hi <= 0.0 {
        return Vec::new();
    }
    let round = |k: f64| (k * 20.0).round() / 20.0;
    let (lo, hi) = if lo < hi {
        (lo, hi)
    } else {
        // The frontiers do not overlap: DPO's own range, where the other methods show only
        // if they reach it.
        match frontiers.iter().find(|f| f.method == BASELINE_METHOD) {
            Some(b) => match first(b) {
                Some(first) if first < b.max_kl() => (first, b.max_kl()),
                _ => return vec![(hi * 20.0).floor() / 20.0],
            },
            None => return vec![(hi * 20.0).floor() / 20.0],
        }
    };
    let mut out: Vec<f64> = [0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0]
        .iter()
        .map(|q| round(lo + q * (hi - lo)).clamp(lo, hi))
        .filter(|k| *k > 0.0)
        .collect();
    out.dedup();
    out
}

/// Each method's win rate and reward gain at fixed KL along its frontier, and its difference
/// to DPO's at the same KL, paired by seed and prompt, with the minimum detectable difference
/// of the win-rate comparison at 80% power.
pub fn matched_kl_table(paired: &Paired<'_>, frontiers: &[Frontier]) -> Option<Table> {
    let baseline = frontiers.iter().find(|f| f.method == BASELINE_METHOD);
    let kls = matched_kls(frontiers);
    if kls.is_empty() {
        return None;
    }
    let mut rows = Vec::new();
    for &kl in &kls {
        for f in frontiers {
            let win = paired.at_kl(f, kl, Metric::Win);
            let gain = paired.at_kl(f, kl, Metric::RewardGain);
            let (dwin, dgain) = match baseline {
                Some(b) if b.method != f.method => (
                    paired.diff_at_kl(f, b, kl, Metric::Win),
                    paired.diff_at_kl(f, b, kl, Metric::RewardGain),
                ),
                _ => (None, None),
            };
            rows.push(vec![
                format!("{kl:.2}"),
                f.method.clone(),
                interval_cell(win, 3).replace('+', ""),
                interval_cell(gain, 3),
                interval_cell(dwin, 3),
                interval_cell(dgain, 3),
                mde_cell(dwin),
            ]);
        }
    }
    Some(Table {
        headers: [
            "KL",
            "method",
            "win rate",
            "reward gain",
            "Δ win vs DPO",
            "Δ reward gain vs DPO",
            "MDE (Δ win)",
        ]
        .map(String::from)
        .to_vec(),
        rows,
        bold: Vec::new(),
    })
}

/// Each method's chosen setting against DPO's chosen setting, final evaluations paired by
/// seed and prompt.
pub fn versus_baseline_table(paired: &Paired<'_>, summary: &[SettingSummary]) -> Option<Table> {
    let chosen = chosen_settings(summary);
    let base = chosen.iter().find(|s| s.method == BASELINE_METHOD)?;
    let b = (base.method.as_str(), base.setting.as_str());
    let rows: Vec<Vec<String>> = chosen
        .iter()
        .filter(|s| s.method != BASELINE_METHOD)
        .map(|s| {
            let a = (s.method.as_str(), s.setting.as_str());
            let dwin = paired.diff_final(a, b, Metric::Win);
            vec![
                s.method.clone(),
                s.setting.clone(),
                interval_cell(dwin, 3),
                interval_cell(paired.diff_final(a, b, Metric::RewardGain), 3),
                interval_cell(paired.diff_final(a, b, Metric::Kl), 3),
                mde_cell(dwin),
            ]
        })
        .collect();
    (!rows.is_empty()).then(|| Table {
        headers: [
            "method",
            "setting",
            "Δ win vs DPO",
            "Δ reward gain vs DPO",
            "Δ KL vs DPO",
            "MDE (Δ win)",
        ]
        .map(String::from)
        .to_vec(),
        rows,
        bold: Vec::new(),
    })
}

/// Every setting of every other method against DPO's frontier at the setting's own KL: its
/// final evaluation minus DPO's frontier interpolated at that KL, paired by seed and prompt
/// (the comparison at matched KL for a method with a single checkpoint).
pub fn versus_frontier_table(
    paired: &Paired<'_>,
    summary: &[SettingSummary],
    frontiers: &[Frontier],
) -> Option<Table> {
    let baseline = frontiers.iter().find(|f| f.method == BASELINE_METHOD)?;
    let kls = baseline.kls();
    let reach = match (kls.get(1), kls.last()) {
        (Some(lo), Some(hi)) => (*lo, *hi),
        _ => return None,
    };
    let rows: Vec<Vec<String>> = summary
        .iter()
        .filter(|s| s.method != BASELINE_METHOD)
        .filter_map(|s| {
            let a = (s.method.as_str(), s.setting.as_str());
            let (kl, dwin) = paired.diff_at_own_kl(a, baseline, Metric::Win)?;
            let dgain = paired
                .diff_at_own_kl(a, baseline, Metric::RewardGain)
                .and_then(|(_, d)| d);
            let outside = if kl < reach.0 {
                "below DPO's frontier"
            } else {
                "beyond DPO's frontier"
            };
            Some(vec![
                s.method.clone(),
                s.setting.clone(),
                format!("{kl:.2}"),
                dwin.map_or_else(|| outside.to_string(), |d| interval_cell(Some(d), 3)),
                dgain.map_or_else(|| "–".to_string(), |d| interval_cell(Some(d), 3)),
                mde_cell(dwin),
            ])
        })
        .collect();
    (!rows.is_empty()).then(|| Table {
        headers: [
            "method",
            "setting",
            "KL",
            "Δ win vs DPO's frontier",
            "Δ reward gain vs DPO's frontier",
            "MDE (Δ win)",
        ]
        .map(String::from)
        .to_vec(),
        rows,
        bold: Vec::new(),
    })
}

/// What the columns of the settings tables mean.
pub const NOTE: &str = "Mean over seeds ± half-width of the 95% interval (Student's t over seeds; none with one seed). \
Win rate: share of test-prompt samples whose gold reward beats the reference's sample drawn from the same random stream (ties ½), \
averaged per prompt first. Reward gain: mean gold reward of the policy's samples minus the reference's, paired the same way. \
KL: exact sequence KL(π‖π_ref) along the policy's samples (sum over tokens of the full-vocabulary KL); KL s.e. (run): \
a run's standard error of its KL over prompts, mean over seeds; KL (sampled): the log-ratio estimator along the same samples. Pref. acc.: share of held-out pairs whose implicit reward \
margin favours the chosen response; log-ratio margin: their mean (log π/π_ref)(chosen) − (log π/π_ref)(rejected). Win vs chosen: policy sample against the chosen response of held-out pairs. \
Lexicon win: win rate under the second, lexicon-based judge. Length: mean response tokens, EOS included. \
Val. win rate: win rate on the validation prompts, by which each method's best setting is chosen (val. pref. acc.: \
preference accuracy on the validation pairs, by which runs on user data, which have no gold reward, are chosen); every other number \
is measured on the test prompts and pairs. Bold: the best value of a column among the methods at their chosen settings, only where a \
paired bootstrap over seeds and prompts puts the 95% interval of its difference to the runner-up away from 0; \
columns without per-prompt pairing (accuracy, length, judges) are never bold.";

/// Describes how a method's best setting was chosen.
pub fn chosen_by_text(metric: &str) -> &'static str {
    if metric == "val_win_rate" {
        "mean win rate on the validation prompts (the table's numbers are on the test prompts)"
    } else if metric == "val_preference_accuracy" {
        "mean preference accuracy on the validation pairs (these runs have no gold reward; the \
         table's numbers are on the test pairs and prompts)"
    } else {
        "mean win rate on the evaluation prompts (these runs have no validation numbers)"
    }
}

/// One section of a report page: a heading, paragraphs, and optionally a table with a note.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    /// The heading.
    pub heading: String,
    /// Paragraphs before the table (Markdown inline syntax: backticks only).
    pub paragraphs: Vec<String>,
    /// The table, with the file stem it is also written under (`tables/<stem>.csv` and `.tex`).
    pub table: Option<(&'static str, Table)>,
    /// Paragraphs after the table.
    pub after: Vec<String>,
}

/// The title's suffix naming the task a report was narrowed to (` — task bt_temperature=0.5`).
fn task_title(sweep: &Sweep) -> String {
    match &sweep.task {
        Some(task) => format!(" — task {task}"),
        None => String::new(),
    }
}

/// `report.md`: sections in order, figures as links to their SVG files.
pub fn report_markdown(
    sweep_dir: &Path,
    sweep: &Sweep,
    sections: &[Section],
    figures: &[(String, String, String)],
) -> String {
    let mut out = format!(
        "# Report: {}{}\n\nRegenerate with `edpo report {}`. {} completed runs",
        sweep_dir.display(),
        task_title(sweep),
        sweep_dir.display(),
        sweep.runs.height()
    );
    if !sweep.skipped.is_empty() {
        out.push_str(&format!(
            "; {} not reported ({})",
            sweep.skipped.len(),
            sweep.skipped.join("; ")
        ));
    }
    out.push_str(".\n\n");
    for s in sections {
        out.push_str(&format!("## {}\n\n", s.heading));
        for p in &s.paragraphs {
            out.push_str(&format!("{p}\n\n"));
        }
        if let Some((_, t)) = &s.table {
            out.push_str(&t.to_markdown());
            out.push('\n');
        }
        for p in &s.after {
            out.push_str(&format!("{p}\n\n"));
        }
    }
    if !figures.is_empty() {
        out.push_str("## Figures\n\n");
    }
    for (name, title, _) in figures {
        out.push_str(&format!(
            "### {title}\n\n![{title}](figures/{name}.svg)\n\n"
        ));
    }
    out
}

/// `report.html`: self-contained, figures inline as SVG.
pub fn report_html(
    sweep_dir: &Path,
    sweep: &Sweep,
    sections: &[Section],
    figures: &[(String, String, String)],
) -> String {
    let mut out = String::from("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>edpo report</title>\n<style>body{font-family:sans-serif;max-width:1300px;margin:2em auto;}table{border-collapse:collapse;margin:1em 0;}th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right;}th:first-child,td:first-child,th:nth-child(2),td:nth-child(2){text-align:left;}figure{margin:2em 0;}</style></head><body>\n");
    out.push_str(&format!(
        "<h1>Report: {}{}</h1>\n<p>{} completed runs",
        html_escape(&sweep_dir.display().to_string()),
        html_escape(&task_title(sweep)),
        sweep.runs.height()
    ));
    if !sweep.skipped.is_empty() {
        out.push_str(&html_escape(&format!(
            "; {} not reported ({})",
            sweep.skipped.len(),
            sweep.skipped.join("; ")
        )));
    }
    out.push_str(".</p>\n");
    for s in sections {
        out.push_str(&format!("<h2>{}</h2>\n", html_escape(&s.heading)));
        for p in &s.paragraphs {
            out.push_str(&format!("<p>{}</p>\n", html_escape(p)));
        }
        if let Some((_, t)) = &s.table {
            out.push_str(&t.to_html());
        }
        for p in &s.after {
            out.push_str(&format!("<p>{}</p>\n", html_escape(p)));
        }
    }
    if !figures.is_empty() {
        out.push_str("<h2>Figures</h2>\n");
    }
    for (_, title, svg) in figures {
        let body = svg.find("<svg").map(|i| &svg[i..]).unwrap_or(svg);
        out.push_str(&format!(
            "<figure>{body}<figcaption>{}</figcaption></figure>\n",
            html_escape(title)
        ));
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_escape_their_special_characters() {
        let t = Table {
            headers: vec!["method".into(), "win".into()],
            rows: vec![vec!["ε-DPO, β=0.1".into(), "0.6 ± 0.1".into()]],
            bold: vec![(0, 1)],
        };
        assert!(t.to_csv().contains("\"ε-DPO, β=0.1\""));
        let tex = t.to_latex();
        assert!(
            tex.contains("\\toprule")
                && tex.contains("$\\varepsilon$-DPO")
                && tex.contains("$\\pm$")
        );
        assert!(tex.contains("\\textbf{0.6 $\\pm$ 0.1}"), "{tex}");
        assert!(t.to_markdown().starts_with("| method | win |\n|---|---|\n"));
        assert!(t.to_markdown().contains("| **0.6 ± 0.1** |"));
        assert!(t.to_html().contains("<td><b>0.6 ± 0.1</b></td>"));
        assert!(t.to_csv().contains(",0.6 ± 0.1\n"));
    }

    fn summary(method: &str, win: f64) -> SettingSummary {
        SettingSummary {
            method: method.into(),
            kind: method.to_lowercase(),
            setting: "β=0.1".into(),
            n: 4,
            params: Default::default(),
            metrics: [(
                "win_rate".to_string(),
                Estimate {
                    mean: win,
                    ci: 0.01,
                },
            )]
            .into_iter()
            .collect(),
        }
    }

    fn trace(method: &str, seed: u64, win: Vec<f64>) -> crate::runs::Trace {
        let n = win.len();
        crate::runs::Trace {
            method: method.into(),
            setting: "β=0.1".into(),
            seed,
            lines: Vec::new(),
            decisions: None,
            per_prompt: vec![edpo_rundir::PerPrompt {
                step: 10,
                win,
                reward_diff: vec![0.0; n],
                kl: vec![1.0; n],
            }],
            final_val_win: None,
            task: String::new(),
        }
    }

    #[test]
    fn the_best_value_is_bold_only_where_a_paired_test_separates_it() {
        // Prompt-level noise shared by both methods (the paired design cancels it), and a
        // method-specific wobble of ±0.05 around a gap of `gap`.
        let runs = |gap: f64| -> Vec<crate::runs::Trace> {
            let mut out = Vec::new();
            for seed in 0..4u64 {
                let base: Vec<f64> = (0..256)
                    .map(|p| ((p * 37 + seed as usize * 11) % 100) as f64 / 100.0)
                    .collect();
                let wobble = |p: usize, k: usize| {
                    if (p * 7 + k + seed as usize).is_multiple_of(2) {
                        0.05
                    } else {
                        -0.05
                    }
                };
                out.push(trace(
                    "A",
                    seed,
                    base.iter()
                        .enumerate()
                        .map(|(p, b)| b + gap + wobble(p, 1))
                        .collect(),
                ));
                out.push(trace(
                    "B",
                    seed,
                    base.iter()
                        .enumerate()
                        .map(|(p, b)| b + wobble(p, 2))
                        .collect(),
                ));
            }
            out
        };
        let columns: Vec<Column> = COLUMNS[..1].to_vec();
        let rows = [summary("A", 0.61), summary("B", 0.60)];
        let refs: Vec<&SettingSummary> = rows.iter().collect();
        // A gap far inside the noise: no bold, although A's mean is higher.
        let noise = runs(0.001);
        let paired = Paired::new(&noise).expect("paired");
        assert!(best_cells(&refs, &columns, Some(&paired)).is_empty());
        // A clear gap: A is bold.
        let clear = runs(0.05);
        let paired = Paired::new(&clear).expect("paired");
        assert_eq!(best_cells(&refs, &columns, Some(&paired)), vec![(0, 3)]);
        // No paired data: nothing is bold.
        assert!(best_cells(&refs, &columns, None).is_empty());
    }

    fn frontier(method: &str, kls: &[f64]) -> Frontier {
        let mut checkpoints = vec![crate::paired::Checkpoint::reference()];
        for (i, &kl) in kls.iter().enumerate() {
            checkpoints.push(crate::paired::Checkpoint {
                setting: Some(format!("s{i}")),
                step: 10,
                last: true,
                kl,
                val_win: 0.6 + 0.01 * i as f64,
                win: 0.6,
                reward_gain: 0.1,
            });
        }
        Frontier {
            method: method.into(),
            frontier: (0..checkpoints.len()).collect(),
            checkpoints,
        }
    }

    #[test]
    fn matched_kls_stay_where_every_frontier_has_checkpoints() {
        // A covers 2…8 nats, B 3…6: compared at 3, 4, 5 and 6.
        let kls = matched_kls(&[frontier("A", &[2.0, 5.0, 8.0]), frontier("B", &[3.0, 6.0])]);
        assert_eq!(kls, vec![3.0, 4.0, 5.0, 6.0]);
        // No overlap: only the smaller largest KL.
        assert_eq!(
            matched_kls(&[frontier("A", &[1.0, 2.0]), frontier("B", &[4.0])]),
            vec![2.0]
        );
        assert!(matched_kls(&[frontier("A", &[])]).is_empty());
        // A frontier that is the reference alone does not empty the others' range.
        assert_eq!(
            matched_kls(&[
                frontier("A", &[2.0, 5.0, 8.0]),
                frontier("B", &[3.0, 6.0]),
                frontier("C", &[])
            ]),
            vec![3.0, 4.0, 5.0, 6.0]
        );
    }
}
