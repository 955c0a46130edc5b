//! Figures as data ([`Figure`]: panels of series of points with error bars) rendered by one
//! plotters routine to SVG (inline in the HTML report) and PNG.
//!
//! - `frontier`: final KL(π‖π_ref) against win rate for every method and setting, error bars
//!   over seeds both ways, points labelled with their β / ε, each method's points joined in
//!   order of KL.
//! - `epsilon_ablation`: ε-DPO's win rate and KL against ε, with each DPO setting as a
//!   horizontal reference line.
//! - `trajectories`: KL, win rate and gold reward at every evaluation over training (the DPO
//!   paper's evaluation every N steps).
//! - `beta_dynamics`: ε-DPO's base β and the fractions of pairs stepped up / down over training.
//! - `steps_vs_confusion`: the share of pairs ε-DPO stepped +1 and −1, by bins of the pair's
//!   true preference probability — how its decisions relate to label confusion.
//! - `margins_accuracy`: implicit reward margins and preference accuracy on the training
//!   batches over training.
//!
//! Every legend sits in a strip beside its plot, never over the data. Figures with traces
//! draw every setting when they fit the palette, else each method at its best setting.

use crate::aggregate::SettingSummary;
use crate::runs::{Decisions, Sweep};
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const PALETTE: [RGBColor; 14] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(188, 189, 34),
    RGBColor(127, 127, 127),
    RGBColor(174, 199, 232),
    RGBColor(255, 152, 150),
    RGBColor(152, 223, 138),
    RGBColor(197, 176, 213),
];

fn register_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Figure {
            name: "font".into(),
            message: "the embedded font could not be loaded".into(),
        })
    }
}

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

const PANEL_W: u32 = 780;
const LEGEND_W: u32 = 190;
const HEIGHT: u32 = 460;

/// Where `x` sits on the panel's x axis (its log10 on a logarithmic axis).
fn axis_x(panel: &Panel, x: f64) -> f64 {
    if panel.log_x {
        x.max(1e-12).log10()
    } else {
        x
    }
}

/// The drawn extent `(low, high)` of `x ± err` (no bar: `x`); on a logarithmic axis a lower end
/// at or below zero is drawn at a tenth of `x`.
fn x_extent(panel: &Panel, x: f64, err: f64) -> (f64, f64) {
    let e = if err.is_finite() { err } else { 0.0 };
    let low = if panel.log_x && x - e <= 0.0 {
        x / 10.0
    } else {
        x - e
    };
    (axis_x(panel, low), axis_x(panel, x + e))
}

fn bounds(panel: &Panel) -> ((f64, f64), (f64, f64)) {
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for s in &panel.series {
        for p in &s.points {
            let ye = if p.y_err.is_finite() { p.y_err } else { 0.0 };
            let (lo, hi) = x_extent(panel, p.x, p.x_err);
            x0 = x0.min(lo);
            x1 = x1.max(hi);
            y0 = y0.min(p.y - ye);
            y1 = y1.max(p.y + ye);
        }
    }
    for (_, y, _) in &panel.hlines {
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if !x0.is_finite() {
        return ((0.0, 1.0), (0.0, 1.0));
    }
    let pad = |a: f64, b: f64| {
        let w = (b - a).abs().max(1e-6);
        (a - 0.08 * w, b + 0.08 * w)
    };
    (pad(x0, x1), pad(y0, y1))
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
) -> std::result::Result<(), String> {
    let ((x0, x1), (y0, y1)) = bounds(panel);
    // The legend gets its own strip to the right, so it never covers data.
    let (width, _) = area.dim_in_pixel();
    let (plot_area, legend_area) = area.split_horizontally(width.saturating_sub(LEGEND_W));
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| format!("{e:?}"))?;
    // On a logarithmic axis the ticks sit at round log10 values; label them with the value.
    let log_label = |v: &f64| {
        let x = 10f64.powf(*v);
        let decimals = (2.0 - x.log10().floor()).clamp(0.0, 4.0) as usize;
        format!("{x:.decimals$}")
    };
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(panel.x_label.as_str())
        .y_desc(panel.y_label.as_str())
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(RGBColor(235, 235, 235));
    if panel.log_x {
        mesh.x_label_formatter(&log_label);
    }
    mesh.draw().map_err(|e| format!("{e:?}"))?;
    for (label, y, c) in &panel.hlines {
        let color = PALETTE[c % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(
                vec![(x0, *y), (x1, *y)],
                color.mix(0.6).stroke_width(1),
            ))
            .map_err(|e| format!("{e:?}"))?;
        chart
            .draw_series(std::iter::once(Text::new(
                label.clone(),
                (x0 + 0.01 * (x1 - x0), *y),
                ("sans-serif", 12).into_font().color(&color),
            )))
            .map_err(|e| format!("{e:?}"))?;
    }
    for s in &panel.series {
        let color = PALETTE[s.color % PALETTE.len()];
        if s.line && s.points.len() > 1 {
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().map(|p| (axis_x(panel, p.x), p.y)),
                    color.stroke_width(2),
                ))
                .map_err(|e| format!("{e:?}"))?;
        }
        for p in &s.points {
            let px = axis_x(panel, p.x);
            if p.y_err.is_finite() {
                chart
                    .draw_series(std::iter::once(ErrorBar::new_vertical(
                        px,
                        p.y - p.y_err,
                        p.y,
                        p.y + p.y_err,
                        color.stroke_width(1),
                        6,
                    )))
                    .map_err(|e| format!("{e:?}"))?;
            }
            if p.x_err.is_finite() {
                let (lo, hi) = x_extent(panel, p.x, p.x_err);
                chart
                    .draw_series(std::iter::once(ErrorBar::new_horizontal(
                        p.y,
                        lo,
                        px,
                        hi,
                        color.stroke_width(1),
                        6,
                    )))
                    .map_err(|e| format!("{e:?}"))?;
            }
            if let Some(t) = &p.text {
                chart
                    .draw_series(std::iter::once(Text::new(
                        t.clone(),
                        (px, p.y),
                        ("sans-serif", 12).into_font().color(&color),
                    )))
                    .map_err(|e| format!("{e:?}"))?;
            }
        }
        let radius = if s.points.len() > 12 { 2 } else { 4 };
        chart
            .draw_series(
                s.points
                    .iter()
                    .map(|p| Circle::new((axis_x(panel, p.x), p.y), radius, color.filled())),
            )
            .map_err(|e| format!("{e:?}"))?;
    }
    draw_legend(&legend_area, &panel.series)
}

/// Legend entries, one per series, top to bottom in the strip beside the plot.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    series: &[Series],
) -> std::result::Result<(), String> {
    let font = ("sans-serif", 13).into_font();
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[s.color % PALETTE.len()];
        let y = 24 + 20 * i as i32;
        if s.line {
            area.draw(&PathElement::new(
                vec![(2, y), (22, y)],
                color.stroke_width(2),
            ))
            .map_err(|e| format!("{e:?}"))?;
        }
        area.draw(&Circle::new((12, y), 4, color.filled()))
            .map_err(|e| format!("{e:?}"))?;
        area.draw(&Text::new(s.label.clone(), (28, y - 7), font.clone()))
            .map_err(|e| format!("{e:?}"))?;
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    fig: &Figure,
) -> std::result::Result<(), String> {
    root.fill(&WHITE).map_err(|e| format!("{e:?}"))?;
    let root = root
        .titled(&fig.title, ("sans-serif", 20))
        .map_err(|e| format!("{e:?}"))?;
    let areas = root.split_evenly((1, fig.panels.len().max(1)));
    for (area, panel) in areas.iter().zip(&fig.panels) {
        draw_panel(area, panel)?;
    }
    root.present().map_err(|e| format!("{e:?}"))
}

fn size(fig: &Figure) -> (u32, u32) {
    (PANEL_W * fig.panels.len().max(1) as u32, HEIGHT)
}

fn finish(mut fig: Figure) -> Result<Figure> {
    register_font()?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size(&fig)).into_drawing_area();
        draw(root, &fig).map_err(|message| Error::Figure {
            name: fig.name.clone(),
            message,
        })?;
    }
    fig.svg = svg;
    Ok(fig)
}

/// Writes the figure as PNG.
pub fn render_png(fig: &Figure, path: &Path) -> Result<()> {
    register_font()?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::File {
            path: parent.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    let root = BitMapBackend::new(path, size(fig)).into_drawing_area();
    draw(root, fig).map_err(|message| Error::Figure {
        name: fig.name.clone(),
        message,
    })
}

fn short_setting(s: &SettingSummary) -> String {
    if s.kind == "epsilon_dpo" {
        s.params
            .get("epsilon")
            .map(|e| format!("ε={e}"))
            .unwrap_or_else(|| s.setting.clone())
    } else if let Some(b) = s.params.get("beta") {
        format!("β={b}")
    } else {
        s.setting.clone()
    }
}

fn frontier(summary: &[SettingSummary]) -> Option<Figure> {
    let mut by_method: BTreeMap<String, Vec<&SettingSummary>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for s in summary {
        if s.get("kl").is_some() && s.get("win_rate").is_some() {
            if !order.contains(&s.method) {
                order.push(s.method.clone());
            }
            by_method.entry(s.method.clone()).or_default().push(s);
        }
    }
    if order.is_empty() {
        return None;
    }
    // Point labels name what varies within a method; with many points they would cover each
    // other (and the data), so they are left to the tables then.
    let n_points: usize = by_method.values().map(Vec::len).sum();
    let label = |m: &str, s: &SettingSummary| -> Option<String> {
        if n_points > 16 {
            return None;
        }
        let siblings = &by_method[m];
        let varied: Vec<String> = s
            .params
            .iter()
            .filter(|(k, v)| siblings.iter().any(|o| o.params.get(*k) != Some(v)))
            .map(|(k, v)| format!("{}={v}", crate::runs::symbol(k)))
            .collect();
        Some(if varied.is_empty() {
            short_setting(s)
        } else {
            varied.join(", ")
        })
    };
    let series = order
        .iter()
        .enumerate()
        .map(|(c, m)| {
            let mut points: Vec<Point> = by_method[m]
                .iter()
                .filter_map(|s| {
                    let (kl, win) = (s.get("kl")?, s.get("win_rate")?);
                    Some(Point {
                        x: kl.mean,
                        y: win.mean,
                        x_err: kl.ci,
                        y_err: win.ci,
                        text: label(m, s),
                    })
                })
                .collect();
            points.sort_by(|a, b| a.x.total_cmp(&b.x));
            Series {
                label: m.clone(),
                color: c,
                points,
                line: true,
            }
        })
        .collect::<Vec<Series>>();
    // One runaway setting (a policy that collapsed, say) would squeeze every other point into
    // a sliver of a linear axis: past a tenfold spread the KL axis turns logarithmic.
    let (lo, hi) = series
        .iter()
        .flat_map(|s: &Series| s.points.iter().map(|p| p.x))
        .filter(|x| *x > 0.0)
        .fold((f64::INFINITY, 0f64), |(a, b), x| (a.min(x), b.max(x)));
    let log_x = hi > 10.0 * lo;
    Some(Figure {
        name: "frontier".into(),
        title: "Win rate against the reference vs KL(π‖π_ref)".into(),
        panels: vec![Panel {
            x_label: if log_x {
                "KL(π‖π_ref), nats (exact, mean over prompts; log scale)".into()
            } else {
                "KL(π‖π_ref), nats (exact, mean over prompts)".into()
            },
            y_label: "win rate vs π_ref".into(),
            series,
            hlines: vec![],
            log_x,
        }],
        svg: String::new(),
    })
}

fn epsilon_ablation(summary: &[SettingSummary]) -> Option<Figure> {
    let eps: Vec<&SettingSummary> = summary
        .iter()
        .filter(|s| s.kind == "epsilon_dpo" && s.params.contains_key("epsilon"))
        .collect();
    if eps.is_empty() {
        return None;
    }
    let dpo: Vec<&SettingSummary> = summary.iter().filter(|s| s.kind == "dpo").collect();
    let panel = |metric: &str, y_label: &str| {
        let mut points: Vec<Point> = eps
            .iter()
            .filter_map(|s| {
                let m = s.get(metric)?;
                Some(Point {
                    x: s.params["epsilon"],
                    y: m.mean,
                    x_err: f64::NAN,
                    y_err: m.ci,
                    text: None,
                })
            })
            .collect();
        points.sort_by(|a, b| a.x.total_cmp(&b.x));
        let hlines = dpo
            .iter()
            .filter_map(|s| Some((format!("DPO {}", short_setting(s)), s.get(metric)?.mean, 0)))
            .collect();
        Panel {
            x_label: "ε".into(),
            y_label: y_label.into(),
            series: vec![Series {
                label: "ε-DPO".into(),
                color: 1,
                points,
                line: true,
            }],
            hlines,
            log_x: false,
        }
    };
    Some(Figure {
        name: "epsilon_ablation".into(),
        title: "ε ablation (DPO settings as reference lines)".into(),
        panels: vec![
            panel("win_rate", "win rate vs π_ref"),
            panel("kl", "KL(π‖π_ref), nats"),
        ],
        svg: String::new(),
    })
}

/// Mean of a metric at each step over the seeds of one method and setting.
fn trace_mean(sweep: &Sweep, method: &str, setting: &str, key: &str) -> Vec<Point> {
    let mut acc: BTreeMap<i64, (f64, usize)> = BTreeMap::new();
    for t in sweep
        .traces
        .iter()
        .filter(|t| t.method == method && t.setting == setting)
    {
        for line in &t.lines {
            if let (Some(step), Some(v)) = (line.get("step"), line.get(key)) {
                let e = acc.entry(*step as i64).or_insert((0.0, 0));
                e.0 += v;
                e.1 += 1;
            }
        }
    }
    acc.into_iter()
        .map(|(s, (sum, n))| Point {
            x: s as f64,
            y: sum / n as f64,
            x_err: f64::NAN,
            y_err: f64::NAN,
            text: None,
        })
        .collect()
}

/// Trailing moving average over `window` points.
fn smooth(points: Vec<Point>, window: usize) -> Vec<Point> {
    let ys: Vec<f64> = points.iter().map(|p| p.y).collect();
    points
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let from = (i + 1).saturating_sub(window);
            let w = &ys[from..=i];
            Point {
                y: w.iter().sum::<f64>() / w.len() as f64,
                ..p
            }
        })
        .collect()
}

/// The settings whose traces a figure draws: all of them when they fit the palette, else
/// each method at its best setting (chosen as the tables choose it).
fn shown_settings<'a>(
    summary: &'a [SettingSummary],
    sweep: &Sweep,
    key: &str,
) -> Vec<&'a SettingSummary> {
    let with_data: Vec<&SettingSummary> = summary
        .iter()
        .filter(|s| {
            sweep.traces.iter().any(|t| {
                t.method == s.method
                    && t.setting == s.setting
                    && t.lines.iter().any(|l| l.contains_key(key))
            })
        })
        .collect();
    if with_data.len() <= PALETTE.len() {
        return with_data;
    }
    let metric = crate::tables::selection_metric(summary);
    let mut best: Vec<&SettingSummary> = Vec::new();
    for s in with_data {
        let score = |s: &SettingSummary| s.get(metric).map_or(f64::NEG_INFINITY, |e| e.mean);
        match best.iter_mut().find(|b| b.method == s.method) {
            Some(b) if score(s) > score(b) => *b = s,
            Some(_) => {}
            None => best.push(s),
        }
    }
    best
}

fn series_label(s: &SettingSummary) -> String {
    format!("{} {}", s.method, short_setting(s))
}

/// One panel of a metric over training steps, a series per shown setting (mean over seeds),
/// smoothed by a trailing moving average over `window` points (1: none).
fn trace_panel(
    sweep: &Sweep,
    shown: &[&SettingSummary],
    key: &str,
    y_label: &str,
    window: usize,
) -> Panel {
    Panel {
        x_label: "optimizer step".into(),
        y_label: y_label.into(),
        series: shown
            .iter()
            .enumerate()
            .map(|(c, s)| Series {
                label: series_label(s),
                color: c,
                points: smooth(trace_mean(sweep, &s.method, &s.setting, key), window),
                line: true,
            })
            .filter(|s| !s.points.is_empty())
            .collect(),
        hlines: vec![],
        log_x: false,
    }
}

fn trajectories(sweep: &Sweep, summary: &[SettingSummary]) -> Option<Figure> {
    let shown = shown_settings(summary, sweep, "eval/kl");
    if shown.is_empty() {
        return None;
    }
    let panel = |key: &str, y_label: &str| trace_panel(sweep, &shown, key, y_label, 1);
    Some(Figure {
        name: "trajectories".into(),
        title: "Evaluation over training (test prompts, mean over seeds)".into(),
        panels: vec![
            panel("eval/kl", "KL(π‖π_ref), nats"),
            panel("eval/win_rate", "win rate vs π_ref"),
            panel("eval/gold_reward", "gold reward (rating units)"),
        ],
        svg: String::new(),
    })
}

/// Steps of the moving average in [`margins_accuracy`].
const SMOOTH: usize = 8;

fn margins_accuracy(sweep: &Sweep, summary: &[SettingSummary]) -> Option<Figure> {
    let shown = shown_settings(summary, sweep, "rewards/margins");
    if shown.is_empty() {
        return None;
    }
    let panel = |key: &str, y_label: &str| trace_panel(sweep, &shown, key, y_label, SMOOTH);
    Some(Figure {
        name: "margins_accuracy".into(),
        title: format!(
            "Implicit reward margin and preference accuracy on training batches \
             (mean over seeds, moving average over {SMOOTH} steps)"
        ),
        panels: vec![
            panel("rewards/margins", "reward margin r(chosen) − r(rejected)"),
            panel("rewards/accuracies", "share of pairs with margin > 0"),
        ],
        svg: String::new(),
    })
}

fn beta_dynamics(sweep: &Sweep, summary: &[SettingSummary]) -> Option<Figure> {
    let settings: Vec<&SettingSummary> =
        summary.iter().filter(|s| s.kind == "epsilon_dpo").collect();
    if settings.is_empty() {
        return None;
    }
    let mut beta = Vec::new();
    let mut fractions = Vec::new();
    for (i, s) in settings.iter().enumerate() {
        let label = short_setting(s);
        beta.push(Series {
            label: label.clone(),
            color: i,
            points: trace_mean(sweep, &s.method, &s.setting, "kl/beta"),
            line: true,
        });
        let up = trace_mean(sweep, &s.method, &s.setting, "kl/p_epsilon_steps");
        let down = trace_mean(sweep, &s.method, &s.setting, "kl/n_epsilon_steps");
        fractions.push(Series {
            label: format!("{label} step +1"),
            color: i,
            points: up,
            line: true,
        });
        fractions.push(Series {
            label: format!("{label} step −1"),
            color: i,
            points: down,
            line: false,
        });
    }
    Some(Figure {
        name: "beta_dynamics".into(),
        title: "ε-DPO: base β and step decisions over training (mean over seeds)".into(),
        panels: vec![
            Panel {
                x_label: "optimizer step".into(),
                y_label: "base β".into(),
                series: beta,
                hlines: vec![],
                log_x: false,
            },
            Panel {
                x_label: "optimizer step".into(),
                y_label: "fraction of pairs".into(),
                series: fractions,
                hlines: vec![],
                log_x: false,
            },
        ],
        svg: String::new(),
    })
}

fn steps_vs_confusion(sweep: &Sweep, summary: &[SettingSummary]) -> Option<Figure> {
    let settings: Vec<&SettingSummary> =
        summary.iter().filter(|s| s.kind == "epsilon_dpo").collect();
    // Per setting, the decisions of all its seeds summed bin by bin.
    let mut up = Vec::new();
    let mut down = Vec::new();
    for (c, s) in settings.iter().enumerate() {
        let mut total: Option<Decisions> = None;
        for d in sweep
            .traces
            .iter()
            .filter(|t| t.method == s.method && t.setting == s.setting)
            .filter_map(|t| t.decisions.as_ref())
        {
            match &mut total {
                None => total = Some(d.clone()),
                Some(t) if t.p_true_edges == d.p_true_edges => {
                    for (a, b) in [
                        (&mut t.relaxed, &d.relaxed),
                        (&mut t.kept, &d.kept),
                        (&mut t.strengthened, &d.strengthened),
                    ] {
                        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    }
                }
                Some(_) => {}
            }
        }
        let Some(d) = total else { continue };
        let share = |counts: &[u64]| -> Vec<Point> {
            (0..counts.len())
                .filter_map(|k| {
                    let n = (d.relaxed[k] + d.kept[k] + d.strengthened[k]) as f64;
                    if n == 0.0 {
                        return None;
                    }
                    let p = counts[k] as f64 / n;
                    Some(Point {
                        x: 0.5 * (d.p_true_edges[k] + d.p_true_edges[k + 1]),
                        y: p,
                        x_err: f64::NAN,
                        // Normal-approximation 95% interval of a binomial share.
                        y_err: 1.96 * (p * (1.0 - p) / n).sqrt(),
                        text: None,
                    })
                })
                .collect()
        };
        up.push(Series {
            label: short_setting(s),
            color: c,
            points: share(&d.relaxed),
            line: true,
        });
        down.push(Series {
            label: short_setting(s),
            color: c,
            points: share(&d.strengthened),
            line: true,
        });
    }
    if up.is_empty() {
        return None;
    }
    let x_label = "true P(chosen ≻ rejected) of the pair (bins of 0.1)";
    Some(Figure {
        name: "steps_vs_confusion".into(),
        title: "ε-DPO step decisions against label confusion (all steps and seeds, 95% intervals)"
            .into(),
        panels: vec![
            Panel {
                x_label: x_label.into(),
                y_label: "share of pairs stepped +1 (β relaxed)".into(),
                series: up,
                hlines: vec![],
                log_x: false,
            },
            Panel {
                x_label: x_label.into(),
                y_label: "share of pairs stepped −1 (β strengthened)".into(),
                series: down,
                hlines: vec![],
                log_x: false,
            },
        ],
        svg: String::new(),
    })
}

/// Every figure the sweep has data for, rendered to SVG.
pub fn all(sweep: &Sweep, summary: &[SettingSummary]) -> Result<Vec<Figure>> {
    [
        frontier(summary),
        epsilon_ablation(summary),
        trajectories(sweep, summary),
        beta_dynamics(sweep, summary),
        steps_vs_confusion(sweep, summary),
        margins_accuracy(sweep, summary),
    ]
    .into_iter()
    .flatten()
    .map(finish)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Estimate;

    fn setting(method: &str, kl: f64) -> SettingSummary {
        SettingSummary {
            method: method.into(),
            kind: method.into(),
            setting: format!("kl {kl}"),
            n: 2,
            params: BTreeMap::new(),
            metrics: [
                (
                    "kl".to_string(),
                    Estimate {
                        mean: kl,
                        ci: 0.5 * kl,
                    },
                ),
                (
                    "win_rate".to_string(),
                    Estimate {
                        mean: 0.6,
                        ci: 0.05,
                    },
                ),
            ]
            .into_iter()
            .collect(),
        }
    }

    /// The frontier's KL axis turns logarithmic past a tenfold spread, and there every point,
    /// error bar and bound is drawn at log10 of its value.
    #[test]
    fn frontier_axis_turns_logarithmic_past_a_tenfold_spread() {
        let close = frontier(&[setting("DPO", 2.0), setting("DPO", 15.0)]).expect("figure");
        assert!(!close.panels[0].log_x);
        let wide = frontier(&[setting("DPO", 2.0), setting("R-DPO", 58.0)]).expect("figure");
        let panel = &wide.panels[0];
        assert!(panel.log_x && panel.x_label.contains("log scale"));
        assert_eq!(axis_x(panel, 100.0), 2.0);
        let (lo, hi) = x_extent(panel, 58.0, 29.0);
        assert!((lo - 29f64.log10()).abs() < 1e-12 && (hi - 87f64.log10()).abs() < 1e-12);
        // A lower end at or below zero is drawn at a tenth of the value.
        assert_eq!(x_extent(panel, 10.0, 12.0).0, 0.0);
        let ((x0, x1), _) = bounds(panel);
        assert!(x0 < 1f64.log10() && x1 > 87f64.log10() && x1 < 2.1);
    }
}
