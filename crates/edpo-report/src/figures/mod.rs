//! Figures as data ([`Figure`]: panels of series of points with error bars) rendered by one
//! plotters routine to SVG (inline in the HTML report) and PNG.
//!
//! - `frontiers` (and `frontiers_2`, … when there are more than six methods besides DPO, each
//!   with DPO again, so that every method has a colour of its own): every evaluation checkpoint
//!   (KL, win rate) and (KL, reward gain) of every method, each method's frontier chosen on the
//!   validation prompts, and best-of-n from the reference as the yardstick.
//! - `frontier`: final KL(π‖π_ref) against win rate for every method and setting, error bars
//!   over seeds both ways, points labelled with their β / ε, each method's points joined in
//!   order of KL.
//! - `epsilon_ablation`: ε-DPO's win rate and KL against ε, with each DPO setting as a
//!   horizontal reference line.
//! - `trajectories`: KL, win rate and gold reward at every evaluation over training (the DPO
//!   paper's evaluation every N steps).
//! - `beta_dynamics`: ε-DPO's base β and the fractions of pairs stepped up / down over training.
//! - `steps_vs_confusion`: the share of pairs ε-DPO stepped +1 and −1, by bins of the pair's
//!   true preference probability — how its decisions relate to label confusion (the first
//!   step's decisions, taken while the policy is the reference, left out).
//! - `steps_by_gap_and_margin`: the same shares by the pair's gold gap and by the policy's
//!   implicit margin when the step scored it.
//! - `margins_accuracy`: implicit reward margins and preference accuracy on the training
//!   batches over training.
//! - `across_tasks` (the index of a sweep over tasks): each setting's win rate and KL, and
//!   ε-DPO's decisions on mislabelled against correctly labelled pairs, against the tasks'
//!   label noise.
//!
//! Every legend sits in a strip beside its plot, never over the data. Figures with traces
//! draw every setting when they fit the palette, else each method at its best setting.
//!
//! [`draw`] renders a [`Figure`] (plotters, SVG and PNG); [`catalogue`] builds each figure of
//! the report from a sweep; this module holds the data they share.

mod catalogue;
mod draw;

pub use draw::render_png;

use crate::aggregate::SettingSummary;
use crate::runs::Sweep;
use crate::Result;

/// A point with optional error bars (NaN: none) and label.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// x value.
    pub x: f64,
    /// y value.
    pub y: f64,
    /// Half-width of the x error bar.
    pub x_err: f64,
    /// Half-width of the y error bar.
    pub y_err: f64,
    /// A label drawn beside the point.
    pub text: Option<String>,
}

/// A named series.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub label: String,
    /// Index into the palette.
    pub color: usize,
    /// Points.
    pub points: Vec<Point>,
    /// Join the points with a line.
    pub line: bool,
}

/// One chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// x-axis title.
    pub x_label: String,
    /// y-axis title.
    pub y_label: String,
    /// The data.
    pub series: Vec<Series>,
    /// Horizontal reference lines: label, y, palette index.
    pub hlines: Vec<(String, f64, usize)>,
    /// Logarithmic x axis (for values spanning more than a decade); positive x only.
    pub log_x: bool,
}

/// A figure: panels side by side.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// File stem.
    pub name: String,
    /// Caption.
    pub title: String,
    /// Panels, left to right.
    pub panels: Vec<Panel>,
    /// The rendered SVG.
    pub svg: String,
}

/// One task of a sweep over tasks, as the `across_tasks` figure reads it.
#[derive(Debug, Clone)]
pub struct TaskNumbers {
    /// The share of training labels that contradict the gold ordering.
    pub label_noise: f64,
    /// Every setting, aggregated over its seeds.
    pub settings: Vec<SettingSummary>,
    /// Per ε-DPO setting (after the first step): the +1 share on mislabelled minus on correctly
    /// labelled pairs, and its standard error.
    pub relaxed_on_mislabelled: Vec<(String, f64, f64)>,
}

/// The figure of a sweep over tasks, rendered; `None` without at least two tasks with label
/// noise and win rates.
pub fn across_tasks(tasks: &[TaskNumbers]) -> Result<Option<Figure>> {
    catalogue::across_tasks(tasks).map(draw::finish).transpose()
}

/// Renders a figure built elsewhere (the bandit's) to SVG, as the report's own figures are.
pub fn render(fig: Figure) -> Result<Figure> {
    draw::finish(fig)
}

/// Every figure the sweep has data for, rendered to SVG.
pub fn all(
    sweep: &Sweep,
    summary: &[SettingSummary],
    frontiers: &[crate::paired::Frontier],
    best_of_n: &[crate::BestOfN],
) -> Result<Vec<Figure>> {
    let mut figures = catalogue::checkpoint_frontiers(frontiers, best_of_n);
    figures.extend(
        [
            catalogue::frontier(summary),
            catalogue::epsilon_ablation(summary),
            catalogue::trajectories(sweep, summary),
            catalogue::beta_dynamics(sweep, summary),
            catalogue::steps_vs_confusion(sweep, summary),
            catalogue::steps_by_gap_and_margin(sweep, summary),
            catalogue::margins_accuracy(sweep, summary),
        ]
        .into_iter()
        .flatten(),
    );
    figures.into_iter().map(draw::finish).collect()
}
