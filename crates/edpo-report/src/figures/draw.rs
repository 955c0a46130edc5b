//! Drawing: one plotters routine renders every [`Figure`] to SVG (kept on the figure, inline
//! in the HTML report) and PNG, with the font embedded so PNGs render the same everywhere and
//! every legend in a strip beside its plot.

use super::{Figure, Panel, Series};
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
pub(super) const PALETTE: [RGBColor; 14] = [
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

const PANEL_W: u32 = 780;
const LEGEND_W: u32 = 190;
const HEIGHT: u32 = 460;

/// Where `x` sits on the panel's x axis (its log10 on a logarithmic axis).
pub(super) fn axis_x(panel: &Panel, x: f64) -> f64 {
    if panel.log_x {
        x.max(1e-12).log10()
    } else {
        x
    }
}

/// The drawn extent `(low, high)` of `x ± err` (no bar: `x`); on a logarithmic axis a lower end
/// at or below zero is drawn at a tenth of `x`.
pub(super) fn x_extent(panel: &Panel, x: f64, err: f64) -> (f64, f64) {
    let e = if err.is_finite() { err } else { 0.0 };
    let low = if panel.log_x && x - e <= 0.0 {
        x / 10.0
    } else {
        x - e
    };
    (axis_x(panel, low), axis_x(panel, x + e))
}

pub(super) fn bounds(panel: &Panel) -> ((f64, f64), (f64, f64)) {
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
        if second_cycle(s.color) {
            // Past the palette's length colours repeat: those series get hollow squares.
            chart
                .draw_series(s.points.iter().map(|p| {
                    EmptyElement::at((axis_x(panel, p.x), p.y))
                        + Rectangle::new(
                            [(-radius - 1, -radius - 1), (radius + 1, radius + 1)],
                            color.stroke_width(2),
                        )
                }))
                .map_err(|e| format!("{e:?}"))?;
        } else {
            chart
                .draw_series(
                    s.points
                        .iter()
                        .map(|p| Circle::new((axis_x(panel, p.x), p.y), radius, color.filled())),
                )
                .map_err(|e| format!("{e:?}"))?;
        }
    }
    draw_legend(&legend_area, &panel.series)
}

/// Whether a series' colour index lies past the palette, where colours repeat: its markers
/// are hollow squares instead of filled circles, so no two series look the same.
fn second_cycle(color: usize) -> bool {
    color >= PALETTE.len()
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
        if second_cycle(s.color) {
            area.draw(&Rectangle::new(
                [(7, y - 5), (17, y + 5)],
                color.stroke_width(2),
            ))
            .map_err(|e| format!("{e:?}"))?;
        } else {
            area.draw(&Circle::new((12, y), 4, color.filled()))
                .map_err(|e| format!("{e:?}"))?;
        }
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

pub(super) fn finish(mut fig: Figure) -> Result<Figure> {
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

/// Writes the figure as PNG: drawn into a temporary sibling of this process's and renamed into
/// place, so a failure (a full disk) leaves no half-written image and two processes writing
/// one report never rename each other's; the error names the file.
pub fn render_png(fig: &Figure, path: &Path) -> Result<()> {
    register_font()?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::File {
            path: parent.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    // The extension tells plotters the image format.
    let tmp = crate::temporary_sibling(path, ".png");
    let drawn = draw(BitMapBackend::new(&tmp, size(fig)).into_drawing_area(), fig);
    let done = drawn.and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    done.map_err(|message| {
        let _ = std::fs::remove_file(&tmp);
        Error::File {
            path: path.to_path_buf(),
            message: format!("figure `{}`: {message}", fig.name),
        }
    })
}
