//! The report's figures, each built from a sweep as data ([`Figure`]): the frontier, the ε
//! ablation, trajectories, β dynamics, steps against label confusion, margins and accuracy.

use super::draw::PALETTE;
use super::{Figure, Panel, Point, Series};
use crate::aggregate::SettingSummary;
use crate::paired::Frontier;
use crate::runs::{Binned, Decisions, Sweep};
use std::collections::BTreeMap;

fn short_setting(s: &SettingSummary) -> String {
    if s.kind == "epsilon_dpo" {
        match (s.params.get("epsilon"), s.params.get("beta")) {
            (Some(e), Some(b)) => format!("ε={e}, β₀={b}"),
            (Some(e), None) => format!("ε={e}"),
            _ => s.setting.clone(),
        }
    } else if let Some(b) = s.params.get("beta") {
        format!("β={b}")
    } else {
        s.setting.clone()
    }
}

pub(super) fn frontier(summary: &[SettingSummary]) -> Option<Figure> {
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

/// Every evaluation checkpoint of every method (means over seeds, test prompts) and each
/// method's frontier chosen on the validation prompts, win rate and reward gain against KL.
/// Methods per frontier figure besides DPO, so that every method of a figure has a colour of
/// its own and the legend fits beside the plot.
const FRONTIER_METHODS_PER_FIGURE: usize = 6;

/// The frontier figures: `frontiers` with DPO and the first methods, then `frontiers_2`, … with
/// DPO again and the next ones, when there are more methods than one figure holds.
pub(super) fn checkpoint_frontiers(
    frontiers: &[Frontier],
    best_of_n: &[crate::BestOfN],
) -> Vec<Figure> {
    let baseline: Vec<&Frontier> = frontiers
        .iter()
        .filter(|f| f.method == crate::tables::BASELINE_METHOD)
        .collect();
    let others: Vec<&Frontier> = frontiers
        .iter()
        .filter(|f| f.method != crate::tables::BASELINE_METHOD)
        .collect();
    let groups: Vec<Vec<&Frontier>> = if others.is_empty() {
        vec![baseline.clone()]
    } else {
        others
            .chunks(FRONTIER_METHODS_PER_FIGURE)
            .map(|chunk| baseline.iter().chain(chunk).copied().collect())
            .collect()
    };
    let n = groups.len();
    groups
        .iter()
        .enumerate()
        .filter_map(|(k, group)| {
            let name = if k == 0 {
                "frontiers".to_string()
            } else {
                format!("frontiers_{}", k + 1)
            };
            let part = if n > 1 {
                format!(" ({} of {n})", k + 1)
            } else {
                String::new()
            };
            frontier_figure(group, best_of_n, name, part)
        })
        .collect()
}

fn frontier_figure(
    frontiers: &[&Frontier],
    best_of_n: &[crate::BestOfN],
    name: String,
    part: String,
) -> Option<Figure> {
    if frontiers.iter().all(|f| f.checkpoints.len() < 2) {
        return None;
    }
    // Best-of-n is drawn up to a little past the methods' largest KL, so it does not stretch
    // the axis.
    let top = frontiers
        .iter()
        .flat_map(|f| f.checkpoints.iter().map(|c| c.kl))
        .fold(0f64, f64::max);
    let panel = |y: fn(&crate::paired::Checkpoint) -> f64,
                 bon: fn(&crate::BestOfN) -> (f64, f64),
                 y_label: &str| {
        let mut series = Vec::new();
        let bon_points: Vec<Point> = best_of_n
            .iter()
            .filter(|b| b.kl_estimate <= 1.5 * top)
            .map(|b| {
                let (v, se) = bon(b);
                Point {
                    x: b.kl_estimate,
                    y: v,
                    x_err: f64::NAN,
                    y_err: 1.96 * se,
                    text: Some(format!("n={}", b.n)),
                }
            })
            .collect();
        if !bon_points.is_empty() {
            series.push(Series {
                label: "best-of-n from π_ref".into(),
                color: PALETTE.len() - 1,
                points: bon_points,
                line: true,
            });
        }
        for (c, f) in frontiers.iter().enumerate() {
            let point = |ck: &crate::paired::Checkpoint| Point {
                x: ck.kl,
                y: y(ck),
                x_err: f64::NAN,
                y_err: f64::NAN,
                text: None,
            };
            series.push(Series {
                label: format!("{} frontier", f.method),
                color: c,
                points: f
                    .frontier
                    .iter()
                    .map(|&i| point(&f.checkpoints[i]))
                    .collect(),
                line: true,
            });
            // The checkpoints off the frontier, where there are any.
            let off: Vec<Point> = f
                .checkpoints
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(i, _)| !f.frontier.contains(i))
                .map(|(_, ck)| point(ck))
                .collect();
            if !off.is_empty() {
                series.push(Series {
                    label: format!("{} checkpoints", f.method),
                    color: c,
                    points: off,
                    line: false,
                });
            }
        }
        Panel {
            x_label: "KL(π‖π_ref), nats (exact, mean over prompts and seeds)".into(),
            y_label: y_label.into(),
            series,
            hlines: vec![],
            log_x: false,
        }
    };
    Some(Figure {
        name,
        title: format!("Every evaluation checkpoint and each method's frontier (chosen on validation prompts; test numbers, mean over seeds){part}"),
        panels: vec![
            panel(|c| c.win, |b| (b.win_rate, b.win_rate_se), "win rate vs π_ref"),
            panel(
                |c| c.reward_gain,
                |b| (b.reward_gain, b.reward_gain_se),
                "gold reward gain over π_ref",
            ),
        ],
        svg: String::new(),
    })
}

pub(super) fn epsilon_ablation(summary: &[SettingSummary]) -> Option<Figure> {
    let eps: Vec<&SettingSummary> = summary
        .iter()
        .filter(|s| s.kind == "epsilon_dpo" && s.params.contains_key("epsilon"))
        .collect();
    // An ablation needs ε to vary, and nothing else: settings that differ in another
    // parameter (the initial β) would stack at one ε and read as noise.
    let mut values: Vec<u64> = eps.iter().map(|s| s.params["epsilon"].to_bits()).collect();
    values.sort_unstable();
    values.dedup();
    let others_fixed = eps.iter().all(|s| {
        s.params
            .iter()
            .filter(|(k, _)| k.as_str() != "epsilon")
            .all(|(k, v)| eps[0].params.get(k) == Some(v))
    });
    if values.len() < 2 || !others_fixed {
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

/// Across the tasks of a sweep (x: their label noise, in %): each setting's final win rate and
/// KL (mean over seeds, 95% t-interval), and ε-DPO's +1 share on mislabelled minus correctly
/// labelled pairs (95% interval; 0: its decisions do not see the labels' noise).
pub(super) fn across_tasks(tasks: &[super::TaskNumbers]) -> Option<Figure> {
    if tasks.len() < 2 {
        return None;
    }
    let mut keys: Vec<(String, String)> = Vec::new();
    for t in tasks {
        for s in &t.settings {
            let key = (s.method.clone(), s.setting.clone());
            if s.get("win_rate").is_some() && !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    if keys.is_empty() {
        return None;
    }
    let x_label = "label noise (% of training labels against the gold ordering)";
    let panel = |metric: &str, y_label: &str| Panel {
        x_label: x_label.into(),
        y_label: y_label.into(),
        series: keys
            .iter()
            .enumerate()
            .map(|(color, (method, setting))| {
                let mut points: Vec<Point> = tasks
                    .iter()
                    .filter_map(|t| {
                        let s = t
                            .settings
                            .iter()
                            .find(|s| &s.method == method && &s.setting == setting)?;
                        let m = s.get(metric)?;
                        Some(Point {
                            x: 100.0 * t.label_noise,
                            y: m.mean,
                            x_err: f64::NAN,
                            y_err: m.ci,
                            text: None,
                        })
                    })
                    .collect();
                points.sort_by(|a, b| a.x.total_cmp(&b.x));
                Series {
                    label: format!("{method} {setting}"),
                    color,
                    points,
                    line: true,
                }
            })
            .collect(),
        hlines: Vec::new(),
        log_x: false,
    };
    let mut panels = vec![
        panel("win_rate", "win rate vs π_ref (test)"),
        panel("kl", "KL(π‖π_ref), nats"),
    ];
    let mut eps: Vec<String> = Vec::new();
    for t in tasks {
        for (setting, _, _) in &t.relaxed_on_mislabelled {
            if !eps.contains(setting) {
                eps.push(setting.clone());
            }
        }
    }
    if !eps.is_empty() {
        panels.push(Panel {
            x_label: x_label.into(),
            y_label: "ε-DPO: +1 share, mislabelled − correct".into(),
            series: eps
                .iter()
                .enumerate()
                .map(|(i, setting)| {
                    let mut points: Vec<Point> = tasks
                        .iter()
                        .filter_map(|t| {
                            let (_, d, se) = t
                                .relaxed_on_mislabelled
                                .iter()
                                .find(|(s, _, _)| s == setting)?;
                            Some(Point {
                                x: 100.0 * t.label_noise,
                                y: *d,
                                x_err: f64::NAN,
                                y_err: 1.96 * se,
                                text: None,
                            })
                        })
                        .collect();
                    points.sort_by(|a, b| a.x.total_cmp(&b.x));
                    Series {
                        label: format!("ε-DPO {setting}"),
                        color: keys.len() + i,
                        points,
                        line: true,
                    }
                })
                .collect(),
            hlines: vec![("no difference".into(), 0.0, 0)],
            log_x: false,
        });
    }
    Some(Figure {
        name: "across_tasks".into(),
        title: "Across tasks: win rate and KL by label noise (mean over seeds, 95% t-intervals), and ε-DPO's +1 share on mislabelled minus correctly labelled pairs (steps after the first, all seeds, 95% intervals)".into(),
        panels,
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

pub(super) fn trajectories(sweep: &Sweep, summary: &[SettingSummary]) -> Option<Figure> {
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

/// ε-DPO's step decisions by the pair's gold gap `|r_w − r_l|` and by the policy's implicit
/// margin `Δ` when the step scored it (steps after the first, all seeds): the shares stepped
/// +1 and −1 per bin, with 95% intervals.
pub(super) fn steps_by_gap_and_margin(sweep: &Sweep, summary: &[SettingSummary]) -> Option<Figure> {
    let mut panels: Vec<[Vec<Series>; 2]> = vec![Default::default(), Default::default()];
    for (c, (s, d)) in epsilon_decisions(sweep, summary).into_iter().enumerate() {
        for (k, binned) in [&d.by_gap, &d.by_margin].into_iter().enumerate() {
            let Some(b) = binned else { continue };
            for (j, counts) in [&b.relaxed, &b.strengthened].into_iter().enumerate() {
                panels[k][j].push(Series {
                    label: short_setting(s),
                    color: c,
                    points: bin_shares(b, counts),
                    line: true,
                });
            }
        }
    }
    if panels[0][0].is_empty() && panels[1][0].is_empty() {
        return None;
    }
    let [[gap_up, gap_down], [margin_up, margin_down]] = [
        std::mem::take(&mut panels[0]),
        std::mem::take(&mut panels[1]),
    ];
    let panel = |x: &str, y: &str, series: Vec<Series>| Panel {
        x_label: x.into(),
        y_label: y.into(),
        series,
        hlines: vec![],
        log_x: false,
    };
    let gap = "gold gap |r_w − r_l| of the pair (bin midpoints)";
    let margin = "implicit margin Δ when scored (nats, bin midpoints)";
    Some(Figure {
        name: "steps_by_gap_and_margin".into(),
        title: "ε-DPO step decisions by gold gap and by implicit margin (every step after the first, all seeds, 95% intervals)".into(),
        panels: vec![
            panel(gap, "share stepped +1 (β relaxed)", gap_up),
            panel(gap, "share stepped −1 (β strengthened)", gap_down),
            panel(margin, "share stepped +1 (β relaxed)", margin_up),
            panel(margin, "share stepped −1 (β strengthened)", margin_down),
        ],
        svg: String::new(),
    })
}

pub(super) fn margins_accuracy(sweep: &Sweep, summary: &[SettingSummary]) -> Option<Figure> {
    let shown = shown_settings(summary, sweep, "rewards/margins");
    if shown.is_empty() {
        return None;
    }
    let panel = |key: &str, y_label: &str| trace_panel(sweep, &shown, key, y_label, SMOOTH);
    Some(Figure {
        name: "margins_accuracy".into(),
        title: format!(
            "Reward margins and preference accuracy, training batches (lines, moving average over \
             {SMOOTH} steps) against held-out pairs (markers); mean over seeds"
        ),
        panels: vec![
            panel("rewards/margins", "reward margin r(chosen) − r(rejected)"),
            {
                // Training batches (lines) and held-out pairs (markers, same colour) on one axis.
                let mut p = panel(
                    "rewards/accuracies",
                    "accuracy (margin > 0): training batches, held-out pairs",
                );
                let held = trace_panel(sweep, &shown, "eval/preference_accuracy", "", 1);
                for mut s in held.series {
                    s.label = format!("{} (held-out)", s.label);
                    s.line = false;
                    p.series.push(s);
                }
                p
            },
        ],
        svg: String::new(),
    })
}

pub(super) fn beta_dynamics(sweep: &Sweep, summary: &[SettingSummary]) -> Option<Figure> {
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

/// The share of a bin's decisions that `counts` holds, with its 95% interval (normal
/// approximation of a binomial share), at the bin's midpoint; empty bins are left out.
fn bin_shares(b: &Binned, counts: &[u64]) -> Vec<Point> {
    (0..b.bins())
        .filter_map(|k| {
            let n = b.total(k) as f64;
            if n == 0.0 {
                return None;
            }
            let p = counts[k] as f64 / n;
            Some(Point {
                x: 0.5 * (b.edges[k] + b.edges[k + 1]),
                y: p,
                x_err: f64::NAN,
                y_err: 1.96 * (p * (1.0 - p) / n).sqrt(),
                text: None,
            })
        })
        .collect()
}

/// ε-DPO's settings with their decisions summed over seeds.
fn epsilon_decisions<'a>(
    sweep: &Sweep,
    summary: &'a [SettingSummary],
) -> Vec<(&'a SettingSummary, Decisions)> {
    summary
        .iter()
        .filter(|s| s.kind == "epsilon_dpo")
        .filter_map(|s| {
            Some((
                s,
                crate::runs::decisions_of(&sweep.traces, &s.method, &s.setting)?,
            ))
        })
        .collect()
}

pub(super) fn steps_vs_confusion(sweep: &Sweep, summary: &[SettingSummary]) -> Option<Figure> {
    let mut up = Vec::new();
    let mut down = Vec::new();
    let mut apart = true;
    for (c, (s, d)) in epsilon_decisions(sweep, summary).into_iter().enumerate() {
        apart &= d.start.is_some();
        let b = &d.by_p_true;
        up.push(Series {
            label: short_setting(s),
            color: c,
            points: bin_shares(b, &b.relaxed),
            line: true,
        });
        down.push(Series {
            label: short_setting(s),
            color: c,
            points: bin_shares(b, &b.strengthened),
            line: true,
        });
    }
    if up.is_empty() {
        return None;
    }
    let x_label = "true P(chosen ≻ rejected) of the pair (bins of 0.1)";
    Some(Figure {
        name: "steps_vs_confusion".into(),
        title: if apart {
            "ε-DPO step decisions against label confusion (every step after the first, all seeds, 95% intervals)"
        } else {
            "ε-DPO step decisions against label confusion (all steps and seeds, 95% intervals)"
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Estimate;
    use crate::figures::draw::{axis_x, bounds, x_extent};

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
