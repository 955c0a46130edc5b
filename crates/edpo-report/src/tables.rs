//! Tables in Markdown, HTML, LaTeX (`booktabs`) and CSV, and the report pages.

use crate::aggregate::{Estimate, SettingSummary};
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

/// Which way a column is better, for the bold best value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
    Neither,
}

/// The reported columns: key in `eval.json`, header, digits, which way is better.
const COLUMNS: [(&str, &str, usize, Better); 8] = [
    ("win_rate", "win rate", 3, Better::Higher),
    ("gold_reward", "gold reward", 3, Better::Higher),
    ("kl", "KL", 3, Better::Lower),
    ("preference_accuracy", "pref. acc.", 3, Better::Higher),
    ("mean_length", "length", 1, Better::Neither),
    ("win_rate_vs_chosen", "win vs chosen", 3, Better::Higher),
    ("second_judge_win_rate", "lexicon win", 3, Better::Higher),
    ("val_win_rate", "val. win rate", 3, Better::Neither),
];

type Column = (&'static str, &'static str, usize, Better);

/// The metric a method's best setting is chosen by: the validation win rate when the runs
/// have one (never the test numbers the table reports), else the reported win rate.
pub fn selection_metric(summary: &[SettingSummary]) -> &'static str {
    if summary.iter().any(|s| s.get("val_win_rate").is_some()) {
        "val_win_rate"
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

/// The best mean of each column among `rows` (ties all bold), as `(row, column)` cells.
fn best_cells(rows: &[&SettingSummary], columns: &[Column]) -> Vec<(usize, usize)> {
    let mut bold = Vec::new();
    if rows.len() < 2 {
        return bold;
    }
    for (c, (key, _, digits, better)) in columns.iter().enumerate() {
        let sign = match better {
            Better::Higher => 1.0,
            Better::Lower => -1.0,
            Better::Neither => continue,
        };
        // Compared as printed, so values that print the same are equally best.
        let shown = |s: &SettingSummary| {
            s.get(key).map(|e| {
                let scale = 10f64.powi(*digits as i32);
                sign * (e.mean * scale).round()
            })
        };
        let Some(best) = rows
            .iter()
            .filter_map(|s| shown(s))
            .max_by(|a, b| a.total_cmp(b))
        else {
            continue;
        };
        for (r, s) in rows.iter().enumerate() {
            if shown(s) == Some(best) {
                bold.push((r, 3 + c));
            }
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
/// methods at their best settings); the best value of each column among the methods in bold.
pub fn best_per_method(summary: &[SettingSummary]) -> Result<Table> {
    let columns = present_columns(summary);
    let metric = selection_metric(summary);
    let mut methods: Vec<&str> = Vec::new();
    for s in summary {
        if !methods.contains(&s.method.as_str()) {
            methods.push(&s.method);
        }
    }
    let chosen: Vec<&SettingSummary> = methods
        .iter()
        .filter_map(|m| {
            summary.iter().filter(|s| s.method == *m).max_by(|a, b| {
                let w =
                    |s: &SettingSummary| s.get(metric).map(|e| e.mean).unwrap_or(f64::NEG_INFINITY);
                w(a).total_cmp(&w(b))
            })
        })
        .collect();
    Ok(Table {
        headers: headers(&columns),
        rows: chosen.iter().map(|s| row(s, &columns)).collect(),
        bold: best_cells(&chosen, &columns),
    })
}

const NOTE: &str = "Mean over seeds ± half-width of the 95% interval (Student's t over seeds; none with one seed). \
Win rate: share of held-out prompts where the policy's sample has a higher gold reward than the reference's (ties ½). \
KL: exact sequence KL(π‖π_ref) summed over sampled responses. Pref. acc.: share of held-out pairs whose implicit reward \
margin favours the chosen response. Win vs chosen: policy sample against the chosen response of held-out pairs. \
Lexicon win: win rate under the second, lexicon-based judge. Length: mean response tokens, EOS included. \
Val. win rate: win rate on the validation prompts, by which each method's best setting is chosen; every other number \
is measured on the test prompts. Bold: the best value of a column among the methods at their best settings \
(highest, or lowest for KL).";

fn chosen_by_text(metric: &str) -> &'static str {
    if metric == "val_win_rate" {
        "mean win rate on the validation prompts (the table's numbers are on the test prompts)"
    } else {
        "mean win rate on the evaluation prompts (these runs have no validation numbers)"
    }
}

/// `report.md`: tables inline, figures as links to their SVG files.
pub fn report_markdown(
    sweep_dir: &Path,
    sweep: &Sweep,
    main: &Table,
    best: &Table,
    chosen_by: &str,
    figures: &[(String, String, String)],
) -> String {
    let mut out = format!(
        "# Report: {}\n\nRegenerate with `edpo report {}`. {} completed runs",
        sweep_dir.display(),
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
    out.push_str(&format!(
        ".\n\n## Each method at its best setting\n\nChosen by {}.\n\n",
        chosen_by_text(chosen_by)
    ));
    out.push_str(&best.to_markdown());
    out.push_str("\n## All settings\n\n");
    out.push_str(&main.to_markdown());
    out.push_str(&format!("\n{NOTE}\n\n## Figures\n\n"));
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
    main: &Table,
    best: &Table,
    chosen_by: &str,
    figures: &[(String, String, String)],
) -> String {
    let mut out = String::from("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>edpo report</title>\n<style>body{font-family:sans-serif;max-width:1300px;margin:2em auto;}table{border-collapse:collapse;margin:1em 0;}th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right;}th:first-child,td:first-child,th:nth-child(2),td:nth-child(2){text-align:left;}figure{margin:2em 0;}</style></head><body>\n");
    out.push_str(&format!(
        "<h1>Report: {}</h1>\n<p>{} completed runs.</p>\n",
        html_escape(&sweep_dir.display().to_string()),
        sweep.runs.height()
    ));
    out.push_str(&format!(
        "<h2>Each method at its best setting</h2>\n<p>Chosen by {}.</p>\n",
        html_escape(chosen_by_text(chosen_by))
    ));
    out.push_str(&best.to_html());
    out.push_str("<h2>All settings</h2>\n");
    out.push_str(&main.to_html());
    out.push_str(&format!("<p>{}</p>\n<h2>Figures</h2>\n", html_escape(NOTE)));
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
}
