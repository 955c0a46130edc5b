//! `edpo bandit`: DPO, IPO, cDPO, rDPO, ε-DPO and the related objectives with a β (ODPO with
//! the true rewards as scores, H-DPO, χPO, SPPO, BPO) on the exactly solvable bandit
//! ([`edpo_experiment::bandit`]), over many seeds in seconds. Every method trains on the same
//! problems and datasets seed by seed (a paired design); it prints, per label kind and
//! method, the mean and a 95% Student-t interval over seeds of the final policy's KL to π_ref,
//! its reward, its KL to the optimum π*_β and its gap below the optimal frontier, and the
//! paired differences of every method to DPO.

use anyhow::Result;
use edpo_experiment::bandit::{frontier_curve, problem, train, BanditConfig, Labels, Outcome};
use edpo_objectives::{Method, Objective};
use edpo_report::aggregate::t_quantile;
use edpo_report::figures::{render, render_png, Figure, Panel, Point, Series};

/// Arguments of `edpo bandit`.
#[derive(clap::Args)]
pub struct BanditArgs {
    /// Seeds (each a new problem and dataset, shared by every method).
    #[arg(long, default_value_t = 32)]
    seeds: u64,
    /// β of DPO, IPO and ε-DPO's initial β.
    #[arg(long, default_value_t = 0.5)]
    beta: f64,
    /// cDPO's and rDPO's label smoothing ℓ (the assumed share of flipped labels).
    #[arg(long, default_value_t = 0.1)]
    label_smoothing: f64,
    /// H-DPO's α (the weight of the policy's log-probability; 1 is DPO).
    #[arg(long, default_value_t = 0.9)]
    hdpo_alpha: f64,
    /// BPO's λ (SBA instance; −0.5 gives the loss √R).
    #[arg(long, default_value_t = -0.5)]
    bpo_lambda: f64,
    /// ε-DPO's ε (repeatable).
    #[arg(long = "epsilon", default_values_t = [0.01, 0.05])]
    epsilons: Vec<f64>,
    /// Prompts per problem.
    #[arg(long, default_value_t = 64)]
    prompts: usize,
    /// Candidate responses per prompt.
    #[arg(long, default_value_t = 6)]
    responses: usize,
    /// Labelled pairs per prompt.
    #[arg(long, default_value_t = 8)]
    pairs_per_prompt: usize,
    /// Full-batch Adam steps.
    #[arg(long, default_value_t = 400)]
    steps: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// One pass over the pairs in minibatches of this size (each pair seen once) instead of
    /// `--steps` full-batch steps.
    #[arg(long)]
    one_pass_batch: Option<usize>,
    /// Also write `report.md` and the figure (`bandit.svg`, `bandit.png`) here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn mean_ci(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, t_quantile(xs.len() - 1) * (var / n).sqrt())
}

/// Runs `edpo bandit`.
pub fn run(args: &BanditArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let mut text = String::new();
    macro_rules! out {
        ($($arg:tt)*) => {{
            text.push_str(&format!($($arg)*));
            text.push('\n');
        }};
    }
    let bs: Vec<f64> = (0..60)
        .map(|i| 10f64.powf(-2.0 + 4.0 * f64::from(i) / 59.0))
        .collect();
    let mut panels = Vec::new();
    let mut methods: Vec<(String, Objective)> = vec![
        (
            format!("DPO β={}", args.beta),
            Objective::Dpo { beta: args.beta },
        ),
        (
            format!("IPO β={}", args.beta),
            Objective::Method(Method::Ipo {
                beta: args.beta,
                average: false,
            }),
        ),
        (
            format!("cDPO β={}, ℓ={}", args.beta, args.label_smoothing),
            Objective::Method(Method::Cdpo {
                beta: args.beta,
                label_smoothing: args.label_smoothing,
            }),
        ),
        (
            format!("rDPO β={}, ℓ={}", args.beta, args.label_smoothing),
            Objective::Method(Method::Rdpo {
                beta: args.beta,
                label_smoothing: args.label_smoothing,
            }),
        ),
    ];
    for &epsilon in &args.epsilons {
        methods.push((
            format!("ε-DPO β₀={}, ε={epsilon}", args.beta),
            Objective::EpsilonDpo {
                beta: args.beta,
                epsilon,
            },
        ));
    }
    let beta = args.beta;
    methods.extend([
        (
            format!("ODPO β={beta}, α=1 (difference)"),
            Objective::Method(Method::Odpo {
                beta,
                alpha: 1.0,
                log_offset: false,
            }),
        ),
        (
            format!("H-DPO β={beta}, α={}", args.hdpo_alpha),
            Objective::Method(Method::Hdpo {
                beta,
                alpha: args.hdpo_alpha,
            }),
        ),
        (
            format!("χPO β={beta}"),
            Objective::Method(Method::Chipo { beta, r_max: 5.0 }),
        ),
        (
            format!("SPPO β={beta}"),
            Objective::Method(Method::SppoHard { beta }),
        ),
        (
            format!("BPO β={beta}, λ={}", args.bpo_lambda),
            Objective::Method(Method::Bpo {
                beta,
                lambda: args.bpo_lambda,
                r_min: 0.01,
            }),
        ),
        (
            format!("TDPO2 β={beta}, α=0.5"),
            Objective::Method(Method::Tdpo2 { beta, alpha: 0.5 }),
        ),
    ]);
    out!(
        "| labels | method | KL(π‖π_ref) | reward | KL(π‖π*_β) | gap below the frontier | final β |"
    );
    out!("|---|---|---|---|---|---|---|");
    let mut paired = Vec::new();
    for (labels, name) in [
        (Labels::BradleyTerry, "Bradley–Terry"),
        (Labels::Deterministic, "deterministic"),
    ] {
        let cfg = BanditConfig {
            prompts: args.prompts,
            responses: args.responses,
            pairs_per_prompt: args.pairs_per_prompt,
            labels,
            lr: args.lr,
            steps: args.steps,
            batch: args.one_pass_batch,
            ..BanditConfig::default()
        };
        let mut outcomes: Vec<Vec<Outcome>> = vec![Vec::new(); methods.len()];
        let mut curve = vec![(0.0, 0.0); bs.len()];
        for seed in 0..args.seeds {
            let pb = problem(&cfg, seed)?;
            for (c, (k, r)) in curve.iter_mut().zip(frontier_curve(&pb, &bs)) {
                c.0 += k / args.seeds as f64;
                c.1 += r / args.seeds as f64;
            }
            for (i, (_, objective)) in methods.iter().enumerate() {
                outcomes[i].push(train(&pb, objective, &cfg, seed)?);
            }
        }
        let mut series = vec![Series {
            label: "optimum π*_b, all b".into(),
            color: 0,
            points: curve
                .iter()
                .filter(|(k, _)| *k > 1e-4)
                .map(|&(x, y)| Point {
                    x,
                    y,
                    x_err: f64::NAN,
                    y_err: f64::NAN,
                    text: None,
                })
                .collect(),
            line: true,
        }];
        for (i, (label, _)) in methods.iter().enumerate() {
            let (x, x_err) = mean_ci(
                &outcomes[i]
                    .iter()
                    .map(|o| o.kl_reference)
                    .collect::<Vec<_>>(),
            );
            let (y, y_err) = mean_ci(&outcomes[i].iter().map(|o| o.reward).collect::<Vec<_>>());
            series.push(Series {
                label: label.clone(),
                color: i + 1,
                points: vec![Point {
                    x,
                    y,
                    x_err,
                    y_err,
                    text: None,
                }],
                line: false,
            });
        }
        panels.push(Panel {
            x_label: format!("KL(π‖π_ref), {name} labels"),
            y_label: "expected reward".into(),
            series,
            hlines: Vec::new(),
            log_x: true,
        });
        let cell = |xs: Vec<f64>| {
            let (m, ci) = mean_ci(&xs);
            format!("{m:.4} ± {ci:.4}")
        };
        for (i, (label, _)) in methods.iter().enumerate() {
            let o = &outcomes[i];
            out!(
                "| {name} | {label} | {} | {} | {} | {} | {} |",
                cell(o.iter().map(|x| x.kl_reference).collect()),
                cell(o.iter().map(|x| x.reward).collect()),
                cell(o.iter().map(|x| x.kl_optimum).collect()),
                cell(o.iter().map(|x| x.frontier_gap).collect()),
                cell(o.iter().map(|x| x.final_beta).collect()),
            );
        }
        for (i, (label, _)) in methods.iter().enumerate().skip(1) {
            let diff = |f: &dyn Fn(&Outcome) -> f64| -> (f64, f64) {
                mean_ci(
                    &outcomes[i]
                        .iter()
                        .zip(&outcomes[0])
                        .map(|(a, b)| f(a) - f(b))
                        .collect::<Vec<_>>(),
                )
            };
            paired.push((
                name,
                label.clone(),
                diff(&|o| o.kl_optimum),
                diff(&|o| o.frontier_gap),
                diff(&|o| o.kl_reference),
            ));
        }
    }
    out!("\nEach method − DPO, paired by seed (mean ± 95% t-interval over seeds):\n");
    out!("| labels | method | Δ KL(π‖π*_β) | Δ gap below the frontier | Δ KL(π‖π_ref) |");
    out!("|---|---|---|---|---|");
    for (labels, label, a, b, c) in &paired {
        out!(
            "| {labels} | {label} | {:+.4} ± {:.4} | {:+.4} ± {:.4} | {:+.4} ± {:.4} |",
            a.0,
            a.1,
            b.0,
            b.1,
            c.0,
            c.1
        );
    }
    let regime = match args.one_pass_batch {
        Some(b) => format!("one pass in minibatches of {b} (each pair seen once)"),
        None => format!(
            "{} full-batch steps (every pair seen at every step)",
            args.steps
        ),
    };
    out!(
        "\n{} seeds × {} prompts × {} responses, {} pairs per prompt from π_ref; Adam at lr {}, {regime}; {:.1} s",
        args.seeds,
        args.prompts,
        args.responses,
        args.pairs_per_prompt,
        args.lr,
        started.elapsed().as_secs_f64()
    );
    say!("{}", text.trim_end());
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        let fig = render(Figure {
            name: "bandit".into(),
            title: "Final policies against the optimal reward-vs-KL frontier (each point and the frontier: means over the seeds' problems; bars: 95% t-intervals over seeds)".into(),
            panels,
            svg: String::new(),
        })?;
        std::fs::write(dir.join("bandit.svg"), &fig.svg)?;
        render_png(&fig, &dir.join("bandit.png"))?;
        let md = format!(
            "# The exactly solvable bandit\n\nCommand: `edpo bandit {}`\n\n![{}](bandit.svg)\n\n{text}",
            std::env::args().skip(2).collect::<Vec<_>>().join(" "),
            fig.title
        );
        std::fs::write(dir.join("report.md"), md)?;
        eprintln!("wrote {}", dir.join("report.md").display());
    }
    Ok(())
}
