//! The `edpo` command line: the only place that knows argument parsing, YAML files, grids,
//! logging subscribers and exit codes. Each subcommand is a thin layer over the library
//! crates: `train` and `sweep` over `edpo-experiment`, `report` over `edpo-report`, `score`
//! and `bench` over the model, trainer and objectives.

/// Prints a line to standard output. A reader that closed the pipe (`edpo sweep … --dry-run |
/// head`) ends the process quietly with success, as Unix tools do, instead of a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

mod bandit;
mod bench;
mod config;
mod data;
mod generate;
mod grid;
mod holders;
mod malloc;
mod score;
mod slurm;
mod status;
mod sweep;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use edpo_experiment::runner::{Outcome, SharedTasks};
use std::path::PathBuf;
use std::process::ExitCode;

/// Preference optimisation of language models with adaptive KL control.
#[derive(Parser)]
#[command(name = "edpo", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train one config; the run directory is `OUT/<config name>-<hash>`.
    Train {
        /// The run config (YAML).
        config: PathBuf,
        /// Override a key, e.g. `--set objective.beta=0.2` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Output root (runs and the stage cache).
        #[arg(long, default_value = "runs")]
        out: PathBuf,
        /// Print the resolved config and its hash, and stop.
        #[arg(long)]
        print_config: bool,
        /// Print the stage cache entries (`name-hash`) the config reads, and stop.
        #[arg(long)]
        print_stages: bool,
    },
    /// Expand a grid and run it, skipping completed runs; `OUT/<sweep name>/`. With
    /// `--launcher slurm`, hand it to Slurm as one job array instead.
    Sweep(Box<SweepArgs>),
    /// Preference data: `edpo data inspect SOURCE` prints what the readers make of it.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Build the report of a sweep: figures, tables, report.md and report.html.
    Report {
        /// The sweep directory (`runs/<sweep name>`).
        sweep: PathBuf,
        /// Where to write it (default: `reports/<sweep name>`).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Score preference pairs: log-probs under policy and reference, DPO and ε-DPO losses,
    /// ε-DPO's per-pair steps and β, and the base β after one optimizer step. Prints JSON.
    Score(score::ScoreArgs),
    /// A model's answers to a public judge's questions (AlpacaEval 2, Arena-Hard-Auto,
    /// MT-Bench), written in that judge's format.
    Generate(generate::GenerateArgs),
    /// DPO, IPO, cDPO, rDPO and ε-DPO on an exactly solvable bandit over many seeds: distance to the
    /// KL-regularised optimum and to the optimal frontier.
    Bandit(bandit::BanditArgs),
    /// Time a fixed DPO / ε-DPO training workload; prints JSON with pairs/s.
    Bench(bench::BenchArgs),
    /// Load a model (a Hugging Face directory, a GGUF file or `hf:ORG/NAME`), merge a LoRA
    /// adapter into it if one is given, and write it in the Hugging Face layout.
    Convert {
        /// Source: a directory (config.json + safetensors) or a `.gguf` file (llama, qwen2).
        #[arg(long)]
        model: PathBuf,
        /// Destination directory.
        #[arg(long)]
        out: PathBuf,
        /// A PEFT LoRA adapter directory to merge into the model before writing it.
        #[arg(long)]
        adapter: Option<PathBuf>,
    },
}

/// Where a sweep's runs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Launcher {
    /// On this machine, `--jobs` runs at a time.
    Local,
    /// On a Slurm cluster, as one job array (`sbatch`).
    Slurm,
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct SweepArgs {
    #[command(subcommand)]
    action: Option<SweepAction>,
    /// The grid file (YAML).
    #[arg(required = true)]
    grid: Option<PathBuf>,
    /// Runs in parallel (local launcher).
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Threads inside each run (local launcher; a Slurm task uses its `--cpus-per-task`).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print the table of runs (with `--launcher slurm`, the job script) and stop.
    #[arg(long)]
    dry_run: bool,
    /// Override a key in every run (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Output root.
    #[arg(long, default_value = "runs")]
    out: PathBuf,
    /// Where the report goes (default: `reports/<sweep name>`; local launcher).
    #[arg(long)]
    report_out: Option<PathBuf>,
    /// Where the runs run.
    #[arg(long, value_enum, default_value_t = Launcher::Local)]
    launcher: Launcher,
    #[command(flatten)]
    slurm: slurm::SlurmArgs,
}

#[derive(Subcommand)]
enum SweepAction {
    /// Where every planned run of a sweep is: pending, running, completed or failed, with its
    /// Slurm task's state when it was submitted to Slurm.
    Status {
        /// The sweep directory (`runs/<sweep name>`).
        sweep: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run grid point INDEX of a planned sweep directory (what a Slurm array task runs).
    Task {
        /// The sweep directory.
        sweep: PathBuf,
        /// The grid index.
        #[arg(long)]
        index: usize,
        /// Threads for the run.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Build the shared stages of a planned sweep directory (the Slurm launcher's stage job).
    Stages {
        /// The sweep directory.
        sweep: PathBuf,
        /// Threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

/// SIGTERM (Slurm's time limit, preemption, `scancel`) and SIGINT (Ctrl-C) ask the runs of
/// this process to stop cleanly (`runner::stop_flag`); a second signal ends it at once.
fn handle_signals() -> Result<()> {
    let stop = edpo_experiment::runner::stop_flag();
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())?;
        signal_hook::flag::register(sig, stop.clone())?;
    }
    Ok(())
}

/// candle sizes its thread pool from the environment when the pool starts, so this must run
/// before any tensor work.
fn set_threads(threads: usize) {
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
}

/// Runs `f` on `threads` threads. With one shard the threads go to the operations (matrix
/// products and kernels split their work); with several, each shard's operations run on one
/// thread and the shards run side by side, which keeps both cores busy on independent work
/// instead of synchronising inside every operation (measured in `edpo bench`).
/// The kernels of `edpo-model` get every thread either way (`edpo_model::kernels::set_threads`):
/// inside a shard they keep to its thread, outside (decoding, evaluation) they use them all.
fn with_threads<R: Send>(threads: usize, shards: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    set_threads(if shards > 1 { 1 } else { threads });
    edpo_model::kernels::set_threads(threads);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    Ok(pool.install(f))
}

fn main() -> ExitCode {
    malloc::restart_with_huge_pages();
    if !malloc::configure() {
        eprintln!("warning: the C allocator refused a setting; running with its defaults");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = handle_signals() {
        eprintln!("warning: signals are not handled: {e}");
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Score(args) => score::run(&args),
        Command::Data(command) => data::run(&command),
        Command::Bandit(args) => bandit::run(&args),
        Command::Generate(args) => with_threads(args.threads, 1, || generate::run(&args))?,
        Command::Report { sweep, out } => {
            let out = out.unwrap_or_else(|| report_dir(&sweep));
            let summary = edpo_report::build_report(&sweep, &out)?;
            print_report(&summary, &out);
            Ok(())
        }
        Command::Bench(args) => {
            let shards = args.shards.unwrap_or_else(|| args.default_shards());
            with_threads(args.threads, shards, || bench::run(&args, shards))?
        }
        Command::Convert {
            model,
            out,
            adapter,
        } => {
            let mut m = edpo_model::CausalLm::load(&model, &edpo_experiment::device(), false)?;
            if let Some(adapter) = adapter {
                m = m.load_adapter(&adapter)?.merged()?;
            }
            m.save(&out)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::Train {
            config,
            sets,
            out,
            print_config,
            print_stages,
        } => {
            let cfg = config::load(&config, &sets)?;
            if print_stages {
                for entry in cfg.stage_entries()? {
                    say!("{entry}");
                }
                return Ok(());
            }
            if print_config {
                print!("# hash: {}\n{}", cfg.hash()?, cfg.to_yaml()?);
                return Ok(());
            }
            let stem = config.file_stem().and_then(|s| s.to_str()).unwrap_or("run");
            let dir = out.join(format!("{stem}-{}", cfg.hash()?));
            let shared = SharedTasks::new(&out.join("cache"));
            let bar = indicatif::ProgressBar::new(0);
            let outcome = with_threads(cfg.run.threads, cfg.run.shards, || {
                sweep::run_locked(&cfg, &dir, &shared, &bar)
            })??;
            match outcome {
                Outcome::Skipped => eprintln!("already completed: {}", dir.display()),
                Outcome::Completed => eprintln!("completed: {}", dir.display()),
                Outcome::Busy(owner) => bail!("{} is being run by {owner}", dir.display()),
                Outcome::Failed(m) => bail!("run failed ({}): {m}", dir.display()),
            }
            bar.finish_and_clear();
            say!("{}", std::fs::read_to_string(dir.join("eval.json"))?);
            Ok(())
        }
        Command::Sweep(args) => sweep_command(*args),
    }
}

fn sweep_command(args: SweepArgs) -> Result<()> {
    match args.action {
        Some(SweepAction::Status { sweep, json }) => return status::print(&sweep, json),
        Some(SweepAction::Task {
            sweep,
            index,
            threads,
        }) => return sweep_task(&sweep, index, threads),
        Some(SweepAction::Stages { sweep, threads }) => {
            let manifest = edpo_rundir::SweepManifest::read(&sweep)?;
            let configs = manifest
                .runs
                .iter()
                .map(|r| sweep::planned_config(&sweep, &manifest, r.index).map(|p| p.1))
                .collect::<Result<Vec<_>>>()?;
            let shared = SharedTasks::new(&manifest.cache);
            with_threads(threads, 1, || sweep::build_stages(&shared, &configs))??;
            eprintln!("stages built for {} runs", configs.len());
            return Ok(());
        }
        None => {}
    }
    let grid = args
        .grid
        .expect("clap requires the grid without a subcommand");
    let planned = grid::expand(&grid, &args.sets)?;
    if args.launcher == Launcher::Slurm {
        return slurm::launch(&planned, &args.out, &args.slurm, args.dry_run);
    }
    if args.slurm.is_set() {
        bail!("--partition, --time, --cpus-per-task, --mem, --gres, --max-parallel, --sbatch-arg, --stages-job and --log-dir apply to --launcher slurm");
    }
    if args.dry_run {
        say!("{:>4}  {:<12}  overrides", "run", "hash");
        for r in &planned.runs {
            say!(
                "{:>4}  {:<12}  {}",
                r.index,
                r.hash,
                grid::describe(&r.overrides)
            );
        }
        say!(
            "{} runs; output would go to {}",
            planned.runs.len(),
            args.out.join(&planned.name).display()
        );
        return Ok(());
    }
    if args.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    set_threads(args.threads);
    let outcomes = sweep::run_local(&planned, &args.out, args.jobs, args.threads)?;
    let root = args.out.join(&planned.name);
    let report_out = args.report_out.unwrap_or_else(|| report_dir(&root));
    let reported = edpo_report::build_report(&root, &report_out);
    let summary = summarise(&planned, &root, &outcomes);
    match reported {
        Ok(r) => print_report(&r, &report_out),
        Err(e) => {
            // The runs are safe in their directories; the report can be rebuilt alone.
            summary?;
            bail!(
                "the runs are complete but the report could not be written: {e}; once fixed, \
                 `edpo report {}` writes it",
                root.display()
            );
        }
    }
    summary
}

/// One grid point of a planned sweep directory, run under its lock: a Slurm array task. Fails
/// unless the run is completed.
fn sweep_task(root: &std::path::Path, index: usize, threads: usize) -> Result<()> {
    let manifest = edpo_rundir::SweepManifest::read(root)?;
    let (entry, cfg) = sweep::planned_config(root, &manifest, index)?;
    let dir = edpo_rundir::sweep::run_dir(root, &entry.hash);
    let shared = SharedTasks::new(&manifest.cache);
    let bar = indicatif::ProgressBar::hidden();
    eprintln!(
        "run {index} ({}) in {} on {}{}: {}",
        entry.hash,
        dir.display(),
        holders::host_name(),
        holders::this_task()
            .map(|t| format!(", Slurm task {t}"))
            .unwrap_or_default(),
        entry.overrides
    );
    let outcome = with_threads(threads, cfg.run.shards, || {
        sweep::run_locked(&cfg, &dir, &shared, &bar)
    })?
    .unwrap_or_else(|e| Outcome::Failed(format!("{e:#}")));
    sweep::log_outcome(index, &entry.hash, &outcome);
    eprintln!("{}", sweep::task_result(index, &entry.hash, outcome)?);
    Ok(())
}

/// Where the report of a sweep directory goes: `reports/<sweep name>`.
fn report_dir(sweep: &std::path::Path) -> PathBuf {
    PathBuf::from("reports").join(sweep.file_name().unwrap_or_default())
}

fn print_report(summary: &edpo_report::ReportSummary, out: &std::path::Path) {
    say!("\n{}", summary.table_markdown);
    say!(
        "report of {} runs: {} and {}",
        summary.runs,
        out.join("report.md").display(),
        out.join("report.html").display()
    );
    for s in &summary.skipped {
        say!("  not reported: {s}");
    }
}

/// Prints the sweep's table and fails if any run failed.
fn summarise(
    planned: &grid::Sweep,
    root: &std::path::Path,
    outcomes: &[(usize, Outcome)],
) -> Result<()> {
    say!(
        "{:>4}  {:<12}  {:<9}  {:>8}  {:>8}  {:>8}  overrides",
        "run",
        "hash",
        "status",
        "win",
        "kl",
        "acc"
    );
    let mut failed = Vec::new();
    for (index, outcome) in outcomes {
        let r = &planned.runs[*index];
        let run_dir = edpo_rundir::sweep::run_dir(root, &r.hash);
        let eval: Option<serde_json::Value> =
            std::fs::read_to_string(run_dir.join(edpo_rundir::EVAL))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
        let get = |k: &str| {
            eval.as_ref()
                .and_then(|e| e[k].as_f64())
                .map(|x| format!("{x:.3}"))
                .unwrap_or_else(|| "-".into())
        };
        let status = match outcome {
            Outcome::Skipped => "skipped",
            Outcome::Completed => "completed",
            // Another process (a second sweep on the directory, a Slurm task) held it and has
            // finished it since: done, by someone else.
            Outcome::Busy(_)
                if edpo_rundir::read_status(&run_dir)
                    .is_some_and(|s| s.state == edpo_rundir::RunState::Completed) =>
            {
                "elsewhere"
            }
            Outcome::Busy(owner) => {
                failed.push(format!(
                    "run {index} ({}): left to {owner}, which holds it",
                    r.hash
                ));
                "busy"
            }
            Outcome::Failed(m) => {
                failed.push(format!("run {index} ({}): {m}", r.hash));
                "failed"
            }
        };
        say!(
            "{:>4}  {:<12}  {:<9}  {:>8}  {:>8}  {:>8}  {}",
            index,
            r.hash,
            status,
            get("win_rate"),
            get("kl"),
            get("preference_accuracy"),
            grid::describe(&r.overrides)
        );
    }
    say!("results: {}", root.display());
    if !failed.is_empty() {
        bail!(
            "{} of {} runs failed:\n  {}",
            failed.len(),
            outcomes.len(),
            failed.join("\n  ")
        );
    }
    Ok(())
}
