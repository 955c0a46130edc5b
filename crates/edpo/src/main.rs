//! The `edpo` command line: the only place that knows argument parsing, logging subscribers
//! and exit codes. Each subcommand is a thin layer over the library crates.

mod bench;
mod score;

use anyhow::Result;
use clap::{Parser, Subcommand};
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
    /// Score preference pairs: log-probs under policy and reference, DPO and ε-DPO losses,
    /// ε-DPO's per-pair steps and β, and the base β after one optimizer step. Prints JSON.
    Score(score::ScoreArgs),
    /// Time a fixed DPO / ε-DPO training workload; prints JSON with pairs/s.
    Bench(bench::BenchArgs),
    /// Load a model directory and write it back in the Hugging Face layout.
    Convert {
        /// Source directory (config.json + safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Destination directory.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::Bench(args) = &cli.command {
        // candle reads its thread count from the environment when its pool starts.
        std::env::set_var("CANDLE_NUM_THREADS", args.threads.to_string());
        std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
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
        Command::Bench(args) => bench::run(&args),
        Command::Convert { model, out } => {
            let m = edpo_model::CausalLm::load(&model, &candle_core::Device::Cpu, false)?;
            m.save(&out)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
    }
}
