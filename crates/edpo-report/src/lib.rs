//! Reports from sweep directories: figures and tables that can go into a paper unchanged.
//!
//! # Overview
//! - [`runs`]: reads every run directory of a sweep (`config.json`, `eval.json`,
//!   `metrics.jsonl`, `status.json`) into one polars DataFrame, one row per completed run.
//! - [`aggregate`]: mean and a 95% confidence interval over seeds (Student's t), per method
//!   and setting, with polars.
//! - [`figures`]: the KL-vs-win-rate frontier, the ε ablation, ε-DPO's base β and step
//!   fractions over training, and step decisions against label confusion, gold gap and
//!   implicit margin, as SVG and PNG
//!   (plotters; the font is embedded so PNGs render the same everywhere).
//! - [`paired`]: frontiers over checkpoints, values at matched KL, each setting against
//!   DPO's frontier at its own KL, paired bootstrap intervals and minimum detectable
//!   differences.
//! - [`tables`]: Markdown, HTML, LaTeX (`booktabs`) and CSV.
//! - [`judges`]: AlpacaEval 2, Arena-Hard and MT-Bench results from `SWEEP_DIR/judges/`,
//!   matched to runs: the paper's main table.
//! - [`build_report`]: all of it into `report.md`, a self-contained `report.html` (figures
//!   inline as SVG), `figures/` and `tables/`.
//!
//! Architecture invariant: this crate reads run directories only. It never loads a model,
//! never reads YAML, and depends on no other edpo crate but `edpo-rundir` (the schema of what
//! it reads) and `edpo-objectives` (the catalogue of method names).

pub mod aggregate;
pub mod figures;
pub mod judges;
pub mod paired;
pub mod runs;
pub mod tables;

use std::path::{Path, PathBuf};

/// Everything that can go wrong building a report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// The file at fault.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A dataframe operation failed.
    #[error("aggregation: {0}")]
    Polars(String),
    /// A figure could not be drawn.
    #[error("figure `{name}`: {message}")]
    Figure {
        /// The figure.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// The sweep has nothing to report.
    #[error("{0}")]
    Empty(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl From<polars::prelude::PolarsError> for Error {
    fn from(e: polars::prelude::PolarsError) -> Self {
        Error::Polars(e.to_string())
    }
}

/// A hidden sibling of `path` to write before renaming it into place, ending in `suffix` and
/// named after this process, so that two processes writing one report (two sweeps sharing a
/// directory) never write or rename each other's half-written file.
pub(crate) fn temporary_sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("report");
    path.with_file_name(format!(".{name}.{}.tmp-report{suffix}", std::process::id()))
}

pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::File {
            path: parent.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    let tmp = temporary_sibling(path, "");
    std::fs::write(&tmp, bytes).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::File {
            path: tmp.clone(),
            message: e.to_string(),
        }
    })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// What a report contains, for the caller to print.
#[derive(Debug, Clone)]
pub struct ReportSummary {
    /// Completed runs read.
    pub runs: usize,
    /// Runs skipped (not completed), with the reason.
    pub skipped: Vec<String>,
    /// The main table in Markdown.
    pub table_markdown: String,
    /// Files written.
    pub files: Vec<PathBuf>,
}

/// Builds the whole report of the sweep in `sweep_dir` into `out`.
///
/// A sweep whose grid varies the task itself (see [`runs::Sweep::tasks`]) gets one full
/// report per task in `out/<task>/` (runs on different tasks share no pairs, labels or
/// reference samples, so nothing is compared across them), and at `out/` an index whose
/// tables put the tasks' own tables side by side.
pub fn build_report(sweep_dir: &Path, out: &Path) -> Result<ReportSummary> {
    let loaded = runs::load_sweep(sweep_dir)?;
    if loaded.runs.height() == 0 {
        return Err(Error::Empty(format!(
            "{}: no completed runs to report",
            sweep_dir.display()
        )));
    }
    if loaded.tasks.len() <= 1 {
        return Ok(build_task_report(sweep_dir, &loaded, out)?.0);
    }
    let mut files = Vec::new();
    let mut per_task = Vec::new();
    let mut numbers = Vec::new();
    for task in &loaded.tasks {
        let sub = loaded.subset(task)?;
        let dir = task_dir(task);
        let (summary, sections, settings) = build_task_report(sweep_dir, &sub, &out.join(&dir))?;
        files.extend(summary.files);
        per_task.push(TaskReport {
            task: task.clone(),
            dir,
            runs: summary.runs,
            label_noise: shown_range(&sub, "label_noise", |x| format!("{:.1}%", 100.0 * x)),
            sections,
        });
        if let Some(label_noise) = shared_number(&sub, "label_noise") {
            let relaxed_on_mislabelled = settings
                .iter()
                .filter(|s| s.kind == "epsilon_dpo")
                .filter_map(|s| {
                    let d = runs::decisions_of(&sub.traces, &s.method, &s.setting)?;
                    let (diff, se) = Confusion::of(&d.by_p_true)?.difference(0);
                    Some((s.setting.clone(), diff, se))
                })
                .collect();
            numbers.push(figures::TaskNumbers {
                label_noise,
                settings,
                relaxed_on_mislabelled,
            });
        }
    }
    let sections = across_tasks(&per_task);
    let mut svgs = Vec::new();
    if numbers.len() == per_task.len() {
        if let Some(fig) = figures::across_tasks(&numbers)? {
            svgs.push(write_figure(out, fig, &mut files)?);
        }
    }
    write_tables(out, &sections, &mut files)?;
    let md = tables::report_markdown(sweep_dir, &loaded, &sections, &svgs);
    let html = tables::report_html(sweep_dir, &loaded, &sections, &svgs);
    write(&out.join("report.md"), md.as_bytes())?;
    write(&out.join("report.html"), html.as_bytes())?;
    files.extend([out.join("report.md"), out.join("report.html")]);
    let table_markdown = sections
        .iter()
        .find_map(|s| match &s.table {
            Some(("results", t)) => Some(t.to_markdown()),
            _ => None,
        })
        .unwrap_or_default();
    Ok(ReportSummary {
        runs: loaded.runs.height(),
        skipped: loaded.skipped.clone(),
        table_markdown,
        files,
    })
}

/// A figure as `out/figures/<name>.svg` and `.png` (both added to `files`); its name, title
/// and SVG for the report's pages.
fn write_figure(
    out: &Path,
    fig: figures::Figure,
    files: &mut Vec<PathBuf>,
) -> Result<(String, String, String)> {
    let svg_path = out.join("figures").join(format!("{}.svg", fig.name));
    write(&svg_path, fig.svg.as_bytes())?;
    let png_path = out.join("figures").join(format!("{}.png", fig.name));
    figures::render_png(&fig, &png_path)?;
    files.extend([svg_path, png_path]);
    Ok((fig.name, fig.title, fig.svg))
}

/// Each section's table as `out/tables/<stem>.csv` and `.tex` (both added to `files`).
fn write_tables(out: &Path, sections: &[tables::Section], files: &mut Vec<PathBuf>) -> Result<()> {
    for (name, table) in sections.iter().filter_map(|s| s.table.as_ref()) {
        let csv = out.join("tables").join(format!("{name}.csv"));
        write(&csv, table.to_csv().as_bytes())?;
        let tex = out.join("tables").join(format!("{name}.tex"));
        write(&tex, table.to_latex().as_bytes())?;
        files.extend([csv, tex]);
    }
    Ok(())
}

/// One task's report, as the index of a sweep over tasks reads it.
struct TaskReport {
    task: String,
    dir: String,
    runs: usize,
    label_noise: Option<String>,
    sections: Vec<tables::Section>,
}

/// The directory of a task's report: its label with `key-value` pairs joined by `_`, and
/// nothing but ASCII letters, digits, `.`, `_` and `-`.
fn task_dir(task: &str) -> String {
    task.replace(", ", "_")
        .replace('=', "-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The tables of a sweep over tasks that are read side by side, by file stem.
const ACROSS_TASKS: [&str; 6] = [
    "matched_kl",
    "versus_dpo_frontier",
    "versus_dpo",
    "confusion",
    "memorisation",
    "results",
];

/// The index of a sweep over tasks: which tasks, where their reports are, and each table of
/// [`ACROSS_TASKS`] with the tasks' rows one after another (a leading `task` column; bold
/// cells stay those of their own task's test).
fn across_tasks(per_task: &[TaskReport]) -> Vec<tables::Section> {
    let mut headers = vec!["task".to_string(), "runs".into()];
    if per_task.iter().any(|t| t.label_noise.is_some()) {
        headers.push("label noise".into());
    }
    headers.push("report".into());
    let rows = per_task
        .iter()
        .map(|t| {
            let mut row = vec![t.task.clone(), t.runs.to_string()];
            if headers.len() == 4 {
                row.push(t.label_noise.clone().unwrap_or_else(|| "–".into()));
            }
            row.push(format!("{}/report.md", t.dir));
            row
        })
        .collect();
    let mut sections = vec![tables::Section {
        heading: "Tasks".into(),
        paragraphs: vec![
            "The grid varies the task itself. Runs on different tasks share no training pairs, labels or \
             reference samples, so every comparison (frontiers, matched KL, paired differences, bold values, \
             the choice of settings on validation prompts) is made within a task: each task has its full \
             report, with its figures, in its own directory. The tables below put the tasks' own tables side \
             by side; read a difference between tasks as the difference of two separate experiments (same \
             seeds, same evaluation prompts), not as a paired one. Label noise: the share of training labels \
             that contradict the gold ordering."
                .into(),
        ],
        table: Some((
            "tasks",
            tables::Table {
                headers,
                rows,
                bold: Vec::new(),
            },
        )),
        after: Vec::new(),
    }];
    for stem in ACROSS_TASKS {
        let mut combined: Option<(tables::Section, tables::Table)> = None;
        let mut other_columns: Vec<String> = Vec::new();
        for t in per_task {
            let Some(section) = t
                .sections
                .iter()
                .find(|s| matches!(&s.table, Some((name, _)) if *name == stem))
            else {
                continue;
            };
            let Some((_, table)) = &section.table else {
                continue;
            };
            let (_, into) = combined.get_or_insert_with(|| {
                let mut headers = vec!["task".to_string()];
                headers.extend(table.headers.iter().cloned());
                (
                    tables::Section {
                        heading: section.heading.clone(),
                        paragraphs: section.paragraphs.clone(),
                        table: None,
                        after: section.after.clone(),
                    },
                    tables::Table {
                        headers,
                        rows: Vec::new(),
                        bold: Vec::new(),
                    },
                )
            });
            if into.headers[1..] != table.headers[..] {
                // The same table with other columns (a task whose runs lack a number):
                // its own report has it.
                other_columns.push(t.task.clone());
                continue;
            }
            let offset = into.rows.len();
            into.bold
                .extend(table.bold.iter().map(|&(r, c)| (r + offset, c + 1)));
            into.rows.extend(table.rows.iter().map(|row| {
                let mut r = vec![t.task.clone()];
                r.extend(row.iter().cloned());
                r
            }));
        }
        if let Some((mut section, table)) = combined {
            // A paragraph written for one task's frontier names that task's checkpoints:
            // those stay in its own report.
            if stem == "matched_kl" {
                section.after.clear();
            }
            if !other_columns.is_empty() {
                section.after.push(format!(
                    "Not in this table (its columns differ; see its own report): {}.",
                    other_columns.join("; ")
                ));
            }
            section.table = Some((stem, table));
            sections.push(section);
        }
    }
    sections
}

/// One task's report (the whole sweep's when it has one task) into `out`, its sections and
/// its settings aggregated over seeds.
fn build_task_report(
    sweep_dir: &Path,
    loaded: &runs::Sweep,
    out: &Path,
) -> Result<(
    ReportSummary,
    Vec<tables::Section>,
    Vec<aggregate::SettingSummary>,
)> {
    let summary = aggregate::by_setting(&loaded.runs)?;
    let mut files = Vec::new();
    let mut svgs: Vec<(String, String, String)> = Vec::new();
    let paired = paired::Paired::new(&loaded.traces);
    let frontiers: Vec<paired::Frontier> = match &paired {
        Some(p) => {
            let order: Vec<String> = summary.iter().map(|s| s.method.clone()).collect();
            p.methods(&order).iter().map(|m| p.frontier(m)).collect()
        }
        None => Vec::new(),
    };
    let bon = best_of_n(loaded);
    for fig in figures::all(loaded, &summary, &frontiers, &bon)? {
        svgs.push(write_figure(out, fig, &mut files)?);
    }
    let main = tables::main_table(&summary)?;
    let table_markdown = main.to_markdown();
    let best = tables::best_per_method(&summary, paired.as_ref())?;
    let chosen_by = tables::selection_metric(&summary);
    let mut sections = vec![design_section(loaded, &summary)];
    sections.extend(memorisation_section(loaded, &summary));
    if let Some(p) = &paired {
        if let Some(t) = tables::matched_kl_table(p, &frontiers) {
            sections.push(tables::Section {
                heading: "Methods at matched KL, along their frontiers over checkpoints".into(),
                paragraphs: vec![format!(
                    "Every evaluation checkpoint of every setting is a point (KL, win rate); each method's frontier \
                     is chosen on the validation prompts among its points and the reference (KL 0, win rate ½), and its \
                     test numbers are interpolated along it at each KL, prompt by prompt and seed by seed, never between the reference and a method's first checkpoint (a method with no checkpoint at or below a KL shows –). Intervals: \
                     95% paired bootstrap over seeds and prompts ({} resamples), conditional on the chosen frontiers. \
                     MDE: the smallest true win-rate difference to DPO a two-sided 5% test detects with 80% power \
                     (2.80 × the bootstrap standard error).",
                    paired::RESAMPLES
                )],
                table: Some(("matched_kl", t)),
                after: frontier_points(&frontiers),
            });
        }
        if let Some(t) = tables::versus_frontier_table(p, &summary, &frontiers) {
            sections.push(tables::Section {
                heading: "Every setting against DPO's frontier at its own KL".into(),
                paragraphs: vec![
                    "Each setting's final evaluation against DPO's frontier (above) interpolated at the setting's own \
                     mean KL, prompt by prompt and seed by seed: the comparison at matched KL for a setting with a single \
                     checkpoint. A KL below DPO's first checkpoint or beyond its last is not compared (DPO's frontier is \
                     never interpolated from the reference). Intervals: 95% paired bootstrap over seeds and prompts, \
                     conditional on DPO's chosen frontier; MDE as above."
                        .into(),
                ],
                table: Some(("versus_dpo_frontier", t)),
                after: Vec::new(),
            });
        }
        if let Some(t) = tables::versus_baseline_table(p, &summary) {
            sections.push(tables::Section {
                heading: "Each method's chosen setting against DPO's".into(),
                paragraphs: vec![format!(
                    "Settings chosen by {}; final evaluations, differences paired by seed and prompt \
                     (95% paired bootstrap over seeds and prompts; MDE as above). A difference whose interval \
                     covers 0 is not a finding; with an MDE this small, it bounds how large a real difference can be.",
                    tables::chosen_by_text(chosen_by)
                )],
                table: Some(("versus_dpo", t)),
                after: Vec::new(),
            });
        }
    }
    sections.extend(confusion_section(loaded, &summary));
    if !bon.is_empty() {
        let t = tables::Table {
            headers: ["n", "win rate", "reward gain", "KL bound", "KL estimate"]
                .map(String::from)
                .to_vec(),
            rows: bon
                .iter()
                .map(|b| {
                    vec![
                        format!("{}", b.n),
                        format!("{:.3} ± {:.3}", b.win_rate, 1.96 * b.win_rate_se),
                        format!("{:.3} ± {:.3}", b.reward_gain, 1.96 * b.reward_gain_se),
                        format!("{:.3}", b.kl_bound),
                        format!("{:.3}", b.kl_estimate),
                    ]
                })
                .collect(),
            bold: Vec::new(),
        };
        sections.push(tables::Section {
            heading: "Best-of-n from the reference (the yardstick on the frontier figure)".into(),
            paragraphs: vec![
                "For each test prompt, n responses from π_ref and the gold-best kept; estimated without bias from \
                 more samples per prompt than the largest n (every n-subset at once). Win rate against one more \
                 reference sample (ties ½; n/(n+1) for distinct rewards); intervals ± 1.96 standard errors over \
                 prompts. KL bound: log n − (n−1)/n; KL estimate: Beirami et al. (arXiv 2401.01879, §4) from \
                 the reference probability of the chosen response, which the figure uses."
                    .into(),
            ],
            table: Some(("best_of_n", t)),
            after: Vec::new(),
        });
    }
    let judges_dir = sweep_dir.join(judges::JUDGES);
    if judges_dir.is_dir() {
        let results = judges::read(&judges_dir)?;
        if !results.is_empty() {
            sections.push(tables::Section {
                heading: "The public judges".into(),
                paragraphs: vec![format!(
                    "Read from `{}`: AlpacaEval 2's leaderboard (length-controlled and raw win rates against its reference, \
                     ± 1.96 standard errors as AlpacaEval reports them, and the average length), Arena-Hard's score with its \
                     95% interval, and MT-Bench's mean judge score over questions and turns (± 1.96 standard errors over \
                     judgments; unparsed judgments left out and counted). A model whose name contains a run's hash is that \
                     run, with its method, setting, seed and final KL; the judges' own noise is what these intervals show, \
                     not the seed-to-seed variation.",
                    judges_dir.display()
                )],
                table: Some(("judges", judges::table(&results, loaded))),
                after: Vec::new(),
            });
        }
    }
    sections.push(tables::Section {
        heading: "Each method at its best setting".into(),
        paragraphs: vec![format!("Chosen by {}.", tables::chosen_by_text(chosen_by))],
        table: Some(("best_per_method", best)),
        after: Vec::new(),
    });
    sections.push(tables::Section {
        heading: "All settings".into(),
        paragraphs: Vec::new(),
        table: Some(("results", main)),
        after: vec![tables::NOTE.to_string()],
    });
    write_tables(out, &sections, &mut files)?;
    let md = tables::report_markdown(sweep_dir, loaded, &sections, &svgs);
    let html = tables::report_html(sweep_dir, loaded, &sections, &svgs);
    write(&out.join("report.md"), md.as_bytes())?;
    write(&out.join("report.html"), html.as_bytes())?;
    files.extend([out.join("report.md"), out.join("report.html")]);
    Ok((
        ReportSummary {
            runs: loaded.runs.height(),
            skipped: loaded.skipped.clone(),
            table_markdown,
            files,
        },
        sections,
        summary,
    ))
}

/// The smallest and largest value of a numeric column of the runs table.
fn number_range(loaded: &runs::Sweep, column: &str) -> Option<(f64, f64)> {
    let series = loaded
        .runs
        .column(column)
        .ok()?
        .as_materialized_series()
        .clone();
    let values: Vec<f64> = series.f64().ok()?.iter().flatten().collect();
    let lo = values.iter().copied().reduce(f64::min)?;
    let hi = values.iter().copied().reduce(f64::max)?;
    Some((lo, hi))
}

/// A number every run shares (the smallest, should they differ).
fn shared_number(loaded: &runs::Sweep, column: &str) -> Option<f64> {
    number_range(loaded, column).map(|(lo, _)| lo)
}

/// A value every run shares, or the range the runs span (`lo–hi`), each through `show`.
fn shown_range(loaded: &runs::Sweep, column: &str, show: impl Fn(f64) -> String) -> Option<String> {
    let (lo, hi) = number_range(loaded, column)?;
    Some(if lo == hi {
        show(lo)
    } else {
        format!("{}–{}", show(lo), show(hi))
    })
}

/// What the runs share: seeds, training pairs and their label noise, test and validation
/// prompts, samples per prompt, and the pairing.
fn design_section(loaded: &runs::Sweep, summary: &[aggregate::SettingSummary]) -> tables::Section {
    let seeds = summary.iter().map(|s| s.n).max().unwrap_or(0);
    let mut parts = vec![format!(
        "{} settings of {} methods, up to {seeds} seeds each",
        summary.len(),
        {
            let mut m: Vec<&str> = summary.iter().map(|s| s.method.as_str()).collect();
            m.dedup();
            m.len()
        }
    )];
    let count = |x: f64| format!("{x:.0}");
    if let Some(n) = shown_range(loaded, "n_train_pairs", count) {
        parts.push(format!("{n} training pairs per run"));
    }
    if let Some(noise) = shown_range(loaded, "label_noise", |x| format!("{:.1}%", 100.0 * x)) {
        parts.push(format!(
            "label noise {noise} (training labels that contradict the gold ordering)"
        ));
    }
    // Runs on user data have no gold reward: no sample is compared with the reference's.
    let judged = shown_range(loaded, "win_rate", count).is_some();
    if let Some(n) = shown_range(loaded, "n_prompts", count) {
        let k = shown_range(loaded, "samples_per_prompt", count).unwrap_or_else(|| "1".into());
        parts.push(if judged {
            format!(
                "{n} test prompts × {k} samples, each policy sample paired with the reference's sample from the same random stream"
            )
        } else {
            format!(
                "{n} test prompts × {k} samples for KL, entropy and length (no gold reward: no win rate)"
            )
        });
    }
    if let Some(n) = shown_range(loaded, "n_pairs", count).filter(|_| !judged) {
        parts.push(format!("{n} test pairs for preference accuracy"));
    }
    if let Some(n) = shown_range(loaded, "n_val_pairs", count) {
        parts.push(format!(
            "{n} validation pairs, on whose preference accuracy settings are chosen"
        ));
    }
    if let Some(n) = shown_range(loaded, "n_val_prompts", count) {
        parts.push(format!(
            "{n} validation prompts, on which settings are chosen"
        ));
    }
    tables::Section {
        heading: "Design".into(),
        paragraphs: vec![if judged {
            format!(
                "{}. Runs of the same seed share the data order, the evaluation prompts and the sampling streams, \
                 so methods are compared prompt by prompt.",
                parts.join("; ")
            )
        } else {
            format!(
                "{}. Runs of the same seed share the data order, the test and validation pairs and the sampling streams.",
                parts.join("; ")
            )
        }],
        table: None,
        after: Vec::new(),
    }
}

/// Training-batch against held-out preference accuracy per setting: a gap above
/// [`MEMORISATION_GAP`] is called out.
fn memorisation_section(
    loaded: &runs::Sweep,
    summary: &[aggregate::SettingSummary],
) -> Option<tables::Section> {
    let mut rows = Vec::new();
    let mut flagged = Vec::new();
    let mut within_noise = Vec::new();
    for s in summary {
        let traces: Vec<&runs::Trace> = loaded
            .traces
            .iter()
            .filter(|t| t.method == s.method && t.setting == s.setting)
            .collect();
        let mut train = Vec::new();
        for t in &traces {
            let acc: Vec<f64> = t
                .lines
                .iter()
                .filter_map(|l| l.get("rewards/accuracies").copied())
                .collect();
            let tail = &acc[acc.len() - acc.len() / 4..];
            if !tail.is_empty() && acc.len() >= 4 {
                train.push(tail.iter().sum::<f64>() / tail.len() as f64);
            }
        }
        let (Some(held), false) = (s.get("preference_accuracy"), train.is_empty()) else {
            continue;
        };
        let t = train.iter().sum::<f64>() / train.len() as f64;
        let gap = t - held.mean;
        // The held-out pairs are the same for every seed: their sampling error is one run's,
        // not reduced by averaging seeds.
        let se = s.get("preference_accuracy_se").map(|e| e.mean);
        let beyond_noise = se.is_none_or(|se| gap > 1.96 * se);
        if gap > MEMORISATION_GAP && beyond_noise {
            flagged.push(format!("{} {} ({gap:+.3})", s.method, s.setting));
        } else if gap > MEMORISATION_GAP {
            within_noise.push(format!("{} {} ({gap:+.3})", s.method, s.setting));
        }
        rows.push(vec![
            s.method.clone(),
            s.setting.clone(),
            format!("{t:.3}"),
            format!("{:.3}", held.mean),
            se.map_or_else(|| "–".into(), |se| format!("{se:.3}")),
            format!("{gap:+.3}"),
        ]);
    }
    if rows.is_empty() {
        return None;
    }
    let mut verdict = if flagged.is_empty() {
        format!(
            "No setting's training-batch accuracy exceeds its held-out accuracy both by more than \
             {MEMORISATION_GAP} and by more than 1.96 standard errors of the held-out accuracy: no sign of \
             memorisation."
        )
    } else {
        format!(
            "Training-batch accuracy exceeds held-out accuracy by more than {MEMORISATION_GAP} and by more than \
             1.96 held-out standard errors in {}. Where pairs are seen more than once (more than one epoch) this is \
             memorisation; in a one-pass run no pair repeats, and the gap measures how the training pairs differ \
             from the held-out pairs: their prompts (training against test prompts), their source (the policy's own \
             samples in on-policy rounds, RSO's rejection sampling) and the held-out pairs' sampling error, which \
             every seed shares.",
            flagged.join(", ")
        )
    };
    if !within_noise.is_empty() {
        verdict.push_str(&format!(
            " Gaps above {MEMORISATION_GAP} but within 1.96 held-out standard errors (the held-out pairs are few \
             and the same for every seed): {}.",
            within_noise.join(", ")
        ));
    }
    Some(tables::Section {
        heading: "Memorisation check".into(),
        paragraphs: vec![
            "Preference accuracy on the training batches (the last quarter of steps, before each step's update) \
             against the held-out pairs at the end (means over seeds). In one pass over fresh pairs every \
             training batch is unseen when it is scored, so the two agree unless pairs repeat."
                .into(),
            verdict,
        ],
        table: Some(("memorisation", tables::Table {
            headers: [
                "method",
                "setting",
                "train-batch acc.",
                "held-out acc.",
                "held-out s.e.",
                "gap",
            ]
                .map(String::from)
                .to_vec(),
            rows,
            bold: Vec::new(),
        })),
        after: Vec::new(),
    })
}

/// A gap between training-batch and held-out preference accuracy above which the report
/// calls memorisation out.
pub const MEMORISATION_GAP: f64 = 0.05;

/// Each frontier's points, as text.
fn frontier_points(frontiers: &[paired::Frontier]) -> Vec<String> {
    frontiers
        .iter()
        .map(|f| {
            let pts: Vec<String> = f
                .frontier
                .iter()
                .map(|&i| {
                    let c = &f.checkpoints[i];
                    match &c.setting {
                        None => "π_ref".to_string(),
                        Some(s) => format!(
                            "{s} step {} (KL {:.2}, test win {:.3})",
                            c.step, c.kl, c.win
                        ),
                    }
                })
                .collect();
            format!(
                "{} frontier ({} of its {} checkpoints, after the reference): {}.",
                f.method,
                f.frontier.len().saturating_sub(1),
                f.checkpoints.len().saturating_sub(1),
                pts.join(" → ")
            )
        })
        .collect()
}

/// ε-DPO's decisions split by label: `[mislabelled, correct]` × `[relaxed (+1), kept,
/// strengthened (−1)]`.
pub(crate) struct Confusion {
    counts: [[u64; 3]; 2],
    /// Decisions on mislabelled and on correctly labelled pairs.
    pub n: [u64; 2],
}

impl Confusion {
    /// The split of binned decisions; `None` when either side has none.
    pub fn of(b: &runs::Binned) -> Option<Confusion> {
        let mut counts = [[0u64; 3]; 2];
        for k in 0..b.bins() {
            // Bins never straddle ½ when their edges include it; one that does counts as
            // correctly labelled only if its lower edge is at least ½.
            let side = usize::from(b.edges[k] >= 0.5);
            counts[side][0] += b.relaxed[k];
            counts[side][1] += b.kept[k];
            counts[side][2] += b.strengthened[k];
        }
        let n = [counts[0].iter().sum::<u64>(), counts[1].iter().sum::<u64>()];
        (n[0] > 0 && n[1] > 0).then_some(Confusion { counts, n })
    }

    /// The share of decision `what` (0: +1, 1: kept, 2: −1) on `side` (0: mislabelled).
    pub fn share(&self, side: usize, what: usize) -> f64 {
        self.counts[side][what] as f64 / self.n[side] as f64
    }

    /// Mislabelled minus correct share of decision `what`, and its standard error (two
    /// proportions, normal approximation).
    pub fn difference(&self, what: usize) -> (f64, f64) {
        let (a, b) = (self.share(0, what), self.share(1, what));
        let se = (a * (1.0 - a) / self.n[0] as f64 + b * (1.0 - b) / self.n[1] as f64).sqrt();
        (a - b, se)
    }
}

/// ε-DPO's decisions on mislabelled pairs (true preference probability of the chosen response
/// below ½: the Bradley–Terry draw contradicted the gold ordering) against correctly labelled
/// ones, per setting over all seeds, with the 95% interval of the difference of shares (normal
/// approximation for two proportions).
fn confusion_section(
    loaded: &runs::Sweep,
    summary: &[aggregate::SettingSummary],
) -> Option<tables::Section> {
    let mut rows = Vec::new();
    let mut apart = false;
    for s in summary.iter().filter(|s| s.kind == "epsilon_dpo") {
        let Some(d) = runs::decisions_of(&loaded.traces, &s.method, &s.setting) else {
            continue;
        };
        let phases: Vec<(&str, &runs::Binned)> = match &d.start {
            Some(start) => {
                apart = true;
                vec![
                    ("later steps", &d.by_p_true),
                    ("first step (π = π_ref)", start),
                ]
            }
            None => vec![("all steps", &d.by_p_true)],
        };
        for (phase, b) in phases {
            let Some(c) = Confusion::of(b) else {
                continue;
            };
            let diff = |what: usize| {
                let (d, se) = c.difference(what);
                format!("{d:+.3} [{:+.3}, {:+.3}]", d - 1.96 * se, d + 1.96 * se)
            };
            rows.push(vec![
                s.setting.clone(),
                phase.to_string(),
                format!("{}", c.n[0]),
                format!("{}", c.n[1]),
                format!("{:.3} / {:.3}", c.share(0, 0), c.share(1, 0)),
                diff(0),
                format!("{:.3} / {:.3}", c.share(0, 2), c.share(1, 2)),
                diff(2),
            ]);
        }
    }
    if rows.is_empty() {
        return None;
    }
    let mut paragraphs = vec![
        "Each decision is counted at the step that scored the pair (in a one-pass run, its only visit), over all \
         seeds. Mislabelled: the pair's true preference probability for its chosen response is below ½ (the \
         label contradicts the gold ordering). If the decisions tracked confusion, mislabelled pairs would be \
         stepped +1 (β relaxed) less often and −1 more often than correctly labelled ones. Differences with 95% \
         intervals (two proportions, normal approximation; pairs within a run are treated as independent)."
            .to_string(),
    ];
    if apart {
        paragraphs.push(
            "The first step's decisions are shown apart: the policy is still the reference, every implicit margin \
             is 0 and the three log-ratios ε-DPO compares differ only at rounding level, so those decisions say \
             nothing about the pairs. The figure `steps_by_gap_and_margin` bins the later decisions by the pair's \
             gold gap |r_w − r_l| and by the policy's implicit margin when it was scored."
                .to_string(),
        );
    }
    Some(tables::Section {
        heading: "Do ε-DPO's step decisions track label confusion?".into(),
        paragraphs,
        table: Some((
            "confusion",
            tables::Table {
                headers: [
                    "ε-DPO setting",
                    "steps",
                    "mislabelled decisions",
                    "correct decisions",
                    "+1 share (mislabelled / correct)",
                    "Δ +1 share",
                    "−1 share (mislabelled / correct)",
                    "Δ −1 share",
                ]
                .map(String::from)
                .to_vec(),
                rows,
                bold: Vec::new(),
            },
        )),
        after: Vec::new(),
    })
}

pub use edpo_rundir::BestOfN;

/// The best-of-n yardstick of the sweep (the same for every run of a task), from the first
/// run that has it.
fn best_of_n(loaded: &runs::Sweep) -> Vec<BestOfN> {
    (0..16)
        .filter_map(|k| BestOfN::from_eval(1 << k, |key| shared_number(loaded, key)))
        .collect()
}
