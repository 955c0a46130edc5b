//! Reports from sweep directories: figures and tables that can go into a paper unchanged.
//!
//! # Overview
//! - [`runs`]: reads every run directory of a sweep (`config.json`, `eval.json`,
//!   `metrics.jsonl`, `status.json`) into one polars DataFrame, one row per completed run.
//! - [`aggregate`]: mean and a 95% confidence interval over seeds (Student's t), per method
//!   and setting, with polars.
//! - [`figures`]: the KL-vs-win-rate frontier, the ε ablation, ε-DPO's base β and step
//!   fractions over training, and step decisions against label confusion, as SVG and PNG
//!   (plotters; the font is embedded so PNGs render the same everywhere).
//! - [`tables`]: Markdown, HTML, LaTeX (`booktabs`) and CSV.
//! - [`build_report`]: all of it into `report.md`, a self-contained `report.html` (figures
//!   inline as SVG), `figures/` and `tables/`.
//!
//! Architecture invariant: this crate reads run directories only. It never loads a model,
//! never reads YAML, and depends on no other edpo crate but `edpo-rundir` (the schema of what
//! it reads) and `edpo-objectives` (the catalogue of method names).

pub mod aggregate;
pub mod figures;
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

pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::File {
            path: parent.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    let tmp = path.with_extension("tmp-report");
    std::fs::write(&tmp, bytes).map_err(|e| Error::File {
        path: tmp.clone(),
        message: e.to_string(),
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
pub fn build_report(sweep_dir: &Path, out: &Path) -> Result<ReportSummary> {
    let loaded = runs::load_sweep(sweep_dir)?;
    if loaded.runs.height() == 0 {
        return Err(Error::Empty(format!(
            "{}: no completed runs to report",
            sweep_dir.display()
        )));
    }
    let summary = aggregate::by_setting(&loaded.runs)?;
    let mut files = Vec::new();
    let mut svgs: Vec<(String, String, String)> = Vec::new();
    for fig in figures::all(&loaded, &summary)? {
        let svg_path = out.join("figures").join(format!("{}.svg", fig.name));
        write(&svg_path, fig.svg.as_bytes())?;
        let png_path = out.join("figures").join(format!("{}.png", fig.name));
        figures::render_png(&fig, &png_path)?;
        files.extend([svg_path, png_path]);
        svgs.push((fig.name.clone(), fig.title.clone(), fig.svg));
    }
    let main = tables::main_table(&summary)?;
    let best = tables::best_per_method(&summary)?;
    for (name, table) in [("results", &main), ("best_per_method", &best)] {
        let csv = out.join("tables").join(format!("{name}.csv"));
        write(&csv, table.to_csv().as_bytes())?;
        let tex = out.join("tables").join(format!("{name}.tex"));
        write(&tex, table.to_latex().as_bytes())?;
        files.extend([csv, tex]);
    }
    let chosen_by = tables::selection_metric(&summary);
    let md = tables::report_markdown(sweep_dir, &loaded, &main, &best, chosen_by, &svgs);
    let html = tables::report_html(sweep_dir, &loaded, &main, &best, chosen_by, &svgs);
    write(&out.join("report.md"), md.as_bytes())?;
    write(&out.join("report.html"), html.as_bytes())?;
    files.extend([out.join("report.md"), out.join("report.html")]);
    Ok(ReportSummary {
        runs: loaded.runs.height(),
        skipped: loaded.skipped.clone(),
        table_markdown: main.to_markdown(),
        files,
    })
}
