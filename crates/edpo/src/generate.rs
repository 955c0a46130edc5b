//! `edpo generate`: a model's answers to a public judge's questions (AlpacaEval 2,
//! Arena-Hard-Auto, MT-Bench), in that judge's answer format ([`edpo_eval::judges`]). The
//! model is any source `edpo` loads (a Hugging Face directory, a GGUF file, `hf:ORG/NAME`),
//! with a LoRA adapter merged in if one is given; its chat template is its own, or one named.

use anyhow::{anyhow, Context, Result};
use edpo_data::chat::ChatTemplate;
use edpo_eval::judges::{generate, read_questions, write_answers, Benchmark};
use edpo_eval::SamplingSettings;
use std::path::PathBuf;

/// Arguments of `edpo generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The model: a Hugging Face directory, a GGUF file or `hf:ORG/NAME`.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory to merge into the model first (a LoRA run's `adapter`).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// alpaca-eval, arena-hard or mt-bench.
    #[arg(long)]
    benchmark: String,
    /// The benchmark's question file (not shipped: the benchmarks' own files).
    #[arg(long)]
    questions: PathBuf,
    /// The model's name in the answer file (`generator`, `model`, `model_id`).
    #[arg(long)]
    name: String,
    /// Where answers go: AlpacaEval a JSON file; the others a directory that gets
    /// `model_answer/<name>.jsonl`.
    #[arg(long)]
    out: PathBuf,
    /// A chat template by name (chatml, llama3, smollm2) instead of the model's own.
    #[arg(long)]
    template: Option<String>,
    /// Longest answer per turn, in tokens (EOS included).
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Sampling temperature (0: greedy) for AlpacaEval and Arena-Hard; MT-Bench uses its
    /// categories' temperatures.
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    /// Top-p for sampled answers.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// The sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Answer only the first N questions.
    #[arg(long)]
    limit: Option<usize>,
    /// Threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

/// Runs `edpo generate`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    let benchmark = Benchmark::parse(&args.benchmark)?;
    let mut questions = read_questions(benchmark, &args.questions)?;
    if let Some(n) = args.limit {
        questions.truncate(n);
    }
    let device = edpo_experiment::device();
    let mut model = edpo_model::CausalLm::load(&args.model, &device, false)?;
    if let Some(adapter) = &args.adapter {
        model = model.load_adapter(adapter)?.merged()?;
    }
    // The tokenizer and its chat template, as the source has them.
    let (tokenizer, own) = crate::data::model_tokenizer(&model, &args.model)?;
    let template = match &args.template {
        Some(name) => ChatTemplate::named(name)?,
        None => own.ok_or_else(|| {
            anyhow!(
                "{} has no chat template; name one with --template (chatml, llama3, smollm2)",
                args.model.display()
            )
        })?,
    };
    let settings = SamplingSettings {
        temperature: args.temperature,
        top_k: 0,
        top_p: args.top_p,
        max_new_tokens: args.max_new_tokens,
        eos: tokenizer.eos_id(),
    };
    let started = std::time::Instant::now();
    let answers = generate(
        &model, &tokenizer, &template, benchmark, &questions, &settings, args.seed,
    )?;
    let tstamp = edpo_rundir::now_unix();
    let path = write_answers(benchmark, &answers, &args.name, &args.out, tstamp)
        .with_context(|| format!("writing answers under {}", args.out.display()))?;
    let tokens: usize = answers.iter().map(|a| a.token_len).sum();
    eprintln!(
        "{} answers ({tokens} tokens) in {:.1} s: {}",
        answers.len(),
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}
