//! `edpo bench`: a fixed DPO / ε-DPO training workload, timed at steady state.
//!
//! Model: GPT-2 architecture, vocabulary 4096, 256 positions, width 256, 4 layers, 4 heads,
//! tied embeddings, f32, seeded random initialisation; the reference is a frozen copy of the
//! initial policy. Batch: 8 pairs of random ids, prompt 32 tokens, chosen and rejected 64
//! tokens each including EOS. Step: reference forward, policy forward and backward on chosen
//! and rejected, DPO (β = 0.1) or ε-DPO (ε = 0.01), AdamW at learning rate 1e-5.
//! Timing: 2 warm-up steps, then `steps` timed steps; pairs/s = 8·steps / seconds.
//! Threads: with `--threads T` the batch runs as T shards side by side (`--shards` to choose
//! otherwise; one shard gives the threads to the operations instead).
//! Also timed: sampling with and without the key/value cache (generated tokens/s).
//!
//! `--workload smollm2`: SmolLM2-135M's architecture (Llama family: 30 layers, width 576,
//! 9 query and 3 key/value heads, SwiGLU 1536, vocabulary 49,152, tied embeddings), random
//! weights, 4 pairs per step of prompt 64 + chosen 64 + rejected 64 tokens; sampling with the
//! cache only (8 prompts of 64 tokens, 64 new tokens each; the better of two runs, as
//! `tools/bench_vs_torch.py` times `generate`). `--lora R`: LoRA adapters of rank R (alpha 2R)
//! on every attention and MLP projection, only they trained, the reference being the same
//! base (one copy of it).
//!
//! `--sampling-only`: the sampling measurement alone (no training step).
//!
//! `--workload gemm`: the matrix products of a SmolLM2 step (`--products-of gpt2`: of the small
//! workload's; [`gemm_shapes`]: each projection's forward product, its input gradient and its
//! weight gradient, as the layers lay them out, and the LM head's at one block of vocabulary
//! rows), each timed alone through `kernels::gemm` and through candle's matrix multiply, in
//! GFLOP/s, one JSON line per product with how many times a step computes it (full fine-tuning
//! and LoRA); `tools/bench_gemm.py` times PyTorch on the same products in the same sitting and
//! from the counts gives the fastest a step could run at those rates.

use anyhow::Result;
use edpo_data::TokenizedPair;
use edpo_eval::{sample, sample_uncached, SamplingSettings};
use edpo_model::{CausalLm, Gpt2Config, ModelConfig};
use edpo_train::{AdamWConfig, Objective, Schedule, ScheduleKind, Trainer, TrainerConfig};
use serde_json::json;
use std::time::Instant;

const PAIRS: usize = 8;
const PROMPT: usize = 32;
const RESPONSE: usize = 64;
const VOCAB: usize = 4096;
const WARMUP: usize = 2;

/// A bench workload: the model and the batch shape.
struct Workload {
    config: ModelConfig,
    raw: serde_json::Value,
    vocab: usize,
    pairs: usize,
    prompt: usize,
    response: usize,
    /// The linear modules LoRA targets.
    lora_targets: &'static [&'static str],
}

impl Workload {
    fn named(name: &str) -> Result<Self> {
        Ok(match name {
            "gpt2" => {
                let (config, raw) = config();
                Self {
                    config,
                    raw,
                    vocab: VOCAB,
                    pairs: PAIRS,
                    prompt: PROMPT,
                    response: RESPONSE,
                    lora_targets: &["c_attn", "c_proj", "c_fc"],
                }
            }
            "smollm2" => {
                let raw = json!({
                    "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true,
                    "max_position_embeddings": 8192, "eos_token_id": 2, "bos_token_id": 1,
                });
                let config = ModelConfig::from_json(&raw, std::path::Path::new("<smollm2>"))?;
                Self {
                    config,
                    raw,
                    vocab: 49152,
                    pairs: 4,
                    prompt: 64,
                    response: 64,
                    lora_targets: &[
                        "q_proj",
                        "k_proj",
                        "v_proj",
                        "o_proj",
                        "gate_proj",
                        "up_proj",
                        "down_proj",
                    ],
                }
            }
            other => anyhow::bail!("--workload: `{other}` is not one of gpt2, smollm2, gemm"),
        })
    }
}

/// Arguments of `edpo bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Threads inside the run.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Groups of pairs per batch whose forward and backward passes run in parallel
    /// (default: one per thread).
    #[arg(long)]
    pub shards: Option<usize>,
    /// Timed optimizer steps per objective.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Skip the sampling measurement (for profiling the training step alone).
    #[arg(long)]
    no_sampling: bool,
    /// Time sampling only (the training step is not measured).
    #[arg(long, conflicts_with = "no_sampling")]
    sampling_only: bool,
    /// The workload: `gpt2` (the small default), `smollm2` (SmolLM2-135M's architecture) or
    /// `gemm` (the matrix products of a SmolLM2 step, one at a time, in GFLOP/s).
    #[arg(long, default_value = "gpt2")]
    workload: String,
    /// Train LoRA adapters of this rank on every projection instead of every weight.
    #[arg(long)]
    lora: Option<usize>,
    /// With `--workload gemm`: whose step's products to time, `smollm2` or `gpt2`.
    #[arg(long, default_value = "smollm2")]
    products_of: String,
    /// Time this objective alone instead of DPO and ε-DPO: its pairs/s and the process's peak
    /// memory. Written as a config's `objective` (`docs/spec/baselines.md`):
    /// `--objective '{kind: tdpo2, beta: 0.1}'`.
    #[arg(long, conflicts_with = "sampling_only")]
    objective: Option<String>,
}

impl BenchArgs {
    /// The shards when `--shards` is not given: one per thread for the training workloads;
    /// one for `gemm`, whose products then use every thread (a shard keeps its products to
    /// its own thread, and the GEMM workload has no batch to shard).
    pub fn default_shards(&self) -> usize {
        if self.workload == "gemm" {
            1
        } else {
            self.threads
        }
    }
}

fn config() -> (ModelConfig, serde_json::Value) {
    let cfg = Gpt2Config {
        vocab_size: VOCAB,
        n_positions: 256,
        n_embd: 256,
        n_layer: 4,
        n_head: 4,
        n_inner: 1024,
        layer_norm_epsilon: 1e-5,
    };
    let raw = cfg.hf_json((VOCAB - 1) as u32);
    (ModelConfig::Gpt2(cfg), raw)
}

fn random_pairs(seed: u64) -> Vec<TokenizedPair> {
    random_pairs_for(seed, VOCAB, PAIRS, PROMPT, RESPONSE)
}

/// `pairs` pairs of random ids below `vocab − 1`, responses ending with EOS (`vocab − 1`).
fn random_pairs_for(
    seed: u64,
    vocab: usize,
    pairs: usize,
    prompt_len: usize,
    response_len: usize,
) -> Vec<TokenizedPair> {
    let mut rng = edpo_data::rng::SplitMix64(seed);
    let mut next = move || (rng.next_u64() % (vocab as u64 - 1)) as u32;
    let eos = (vocab - 1) as u32;
    let response = |next: &mut dyn FnMut() -> u32| {
        let mut r: Vec<u32> = (0..response_len - 1).map(|_| next()).collect();
        r.push(eos);
        r
    };
    (0..pairs)
        .map(|_| {
            let prompt = (0..prompt_len).map(|_| next()).collect();
            let chosen = response(&mut next);
            let rejected = response(&mut next);
            TokenizedPair {
                prompt,
                chosen,
                rejected,
            }
        })
        .collect()
}

fn measure(
    work: &Workload,
    lora: Option<usize>,
    objective: Objective,
    sft_weight: f64,
    steps: usize,
    shards: usize,
) -> Result<f64> {
    let device = edpo_experiment::device();
    let (policy, reference) = match lora {
        None => {
            let policy =
                CausalLm::random(work.config.clone(), work.raw.clone(), 1234, &device, true)?;
            let reference = policy.frozen_copy()?;
            (policy, reference)
        }
        Some(r) => {
            let base =
                CausalLm::random(work.config.clone(), work.raw.clone(), 1234, &device, false)?;
            let cfg = edpo_model::LoraConfig {
                r,
                alpha: 2.0 * r as f64,
                targets: work.lora_targets.iter().map(|t| t.to_string()).collect(),
                rslora: false,
            };
            (base.with_lora(&cfg, 99)?, base)
        }
    };
    let config = TrainerConfig {
        objective,
        sft_weight,
        adamw: AdamWConfig::default(),
        schedule: Schedule {
            peak_lr: 1e-5,
            warmup_steps: 0,
            total_steps: steps + WARMUP,
            kind: ScheduleKind::Constant,
        },
        max_grad_norm: None,
    };
    let mut trainer = Trainer::new(policy, reference, config)?.with_shards(shards)?;
    let batch = vec![random_pairs_for(
        7,
        work.vocab,
        work.pairs,
        work.prompt,
        work.response,
    )];
    for _ in 0..WARMUP {
        trainer.train_step(&batch)?;
    }
    let start = Instant::now();
    for _ in 0..steps {
        trainer.train_step(&batch)?;
    }
    Ok((work.pairs * steps) as f64 / start.elapsed().as_secs_f64())
}

/// Generated tokens per second of the cached and the uncached sampler on the bench model:
/// 32 prompts of 32 random tokens, 64 new tokens each at temperature 1, the same seed. Both
/// must draw the same tokens.
fn measure_sampling() -> Result<(f64, f64)> {
    let (cfg, raw) = config();
    let model = CausalLm::random(cfg, raw, 1234, &edpo_experiment::device(), false)?;
    let prompts: Vec<Vec<u32>> = (0..4)
        .flat_map(|s| random_pairs(100 + s))
        .map(|p| p.prompt)
        .collect();
    let settings = sampling_settings(VOCAB);
    let (cached, a) = timed_sampling(&|| sample(&model, &prompts, &settings, 5))?;
    let (uncached, b) = timed_sampling(&|| sample_uncached(&model, &prompts, &settings, 5))?;
    anyhow::ensure!(
        a == b,
        "the cached and uncached samplers drew different tokens"
    );
    Ok((cached, uncached))
}

/// 64 new tokens at temperature 1, nothing truncated, EOS the last id.
fn sampling_settings(vocab: usize) -> SamplingSettings {
    SamplingSettings {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens: 64,
        eos: (vocab - 1) as u32,
    }
}

/// Generated tokens per second of one sampling call, and what it drew.
fn timed_sampling(
    f: &dyn Fn() -> edpo_eval::Result<Vec<Vec<u32>>>,
) -> Result<(f64, Vec<Vec<u32>>)> {
    let start = Instant::now();
    let out = f()?;
    let tokens: usize = out.iter().map(Vec::len).sum();
    Ok((tokens as f64 / start.elapsed().as_secs_f64(), out))
}

/// Cached sampling on a large workload's model: 8 prompts of its prompt length (the ids of
/// [`random_pairs_for`] with seed 100, as `tools/bench_vs_torch.py` draws them), the better
/// of two runs.
fn measure_sampling_at(work: &Workload) -> Result<f64> {
    let model = CausalLm::random(
        work.config.clone(),
        work.raw.clone(),
        1234,
        &edpo_experiment::device(),
        false,
    )?;
    let prompts: Vec<Vec<u32>> = random_pairs_for(100, work.vocab, 8, work.prompt, work.response)
        .into_iter()
        .map(|p| p.prompt)
        .collect();
    let settings = sampling_settings(work.vocab);
    let mut best = 0f64;
    for _ in 0..2 {
        best = best.max(timed_sampling(&|| sample(&model, &prompts, &settings, 5))?.0);
    }
    Ok(best)
}

/// Peak resident set size of this process, from `/proc/self/status` (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The sampling measurements of a workload: cached and uncached tokens/s on the small one,
/// cached only on a large one (none with LoRA there).
fn sampling_of(args: &BenchArgs, work: &Workload) -> Result<(Option<f64>, Option<f64>)> {
    Ok(match (args.workload.as_str(), args.lora) {
        ("gpt2", _) => {
            let (cached, uncached) = measure_sampling()?;
            (Some(cached), Some(uncached))
        }
        (_, Some(_)) => (None, None),
        _ => (Some(measure_sampling_at(work)?), None),
    })
}

/// Runs the bench with `shards` groups of pairs per batch, on the current rayon pool.
pub fn run(args: &BenchArgs, shards: usize) -> Result<()> {
    anyhow::ensure!(
        args.threads >= 1 && args.steps >= 1,
        "--threads and --steps must be at least 1"
    );
    if args.workload == "gemm" {
        return run_gemm(&args.products_of);
    }
    let work = Workload::named(&args.workload)?;
    if args.sampling_only {
        let (sampling, sampling_uncached) = sampling_of(args, &work)?;
        let out = json!({
            "sampling_tokens_per_s": sampling,
            "sampling_uncached_tokens_per_s": sampling_uncached,
            "workload": args.workload,
            "threads": args.threads,
        });
        say!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    if let Some(spec) = &args.objective {
        // The objective as a config writes it, resolved by the config's own rules.
        let raw: edpo_experiment::config::raw::RawObjective =
            serde_yaml::from_str(spec).map_err(|e| anyhow::anyhow!("--objective {spec}: {e}"))?;
        let resolved = raw
            .resolve()
            .map_err(|e| anyhow::anyhow!("--objective {spec}: {e:#}"))?;
        let pairs_per_s = measure(
            &work,
            args.lora,
            resolved.to_objective(0)?,
            resolved.sft_weight,
            args.steps,
            shards,
        )?;
        let kind = &resolved.kind;
        let out = json!({
            "objective": kind,
            "pairs_per_s": pairs_per_s,
            "threads": args.threads,
            "shards": shards,
            "steps": args.steps,
            "peak_rss_mib": peak_rss_mib(),
            "workload": args.workload,
            "lora_rank": args.lora,
        });
        say!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let dpo = measure(
        &work,
        args.lora,
        Objective::Dpo { beta: 0.1 },
        0.0,
        args.steps,
        shards,
    )?;
    let eps = measure(
        &work,
        args.lora,
        Objective::EpsilonDpo {
            beta: 0.1,
            epsilon: 0.01,
        },
        0.0,
        args.steps,
        shards,
    )?;
    let (sampling, sampling_uncached) = if args.no_sampling {
        (None, None)
    } else {
        sampling_of(args, &work)?
    };
    let tokens_per_pair = (2 * (work.prompt + work.response)) as f64;
    let out = json!({
        "dpo_pairs_per_s": dpo,
        "epsilon_dpo_pairs_per_s": eps,
        "epsilon_over_dpo": eps / dpo,
        "dpo_tokens_per_s": dpo * tokens_per_pair,
        "sampling_tokens_per_s": sampling,
        "sampling_uncached_tokens_per_s": sampling_uncached,
        "threads": args.threads,
        "shards": shards,
        "steps": args.steps,
        "peak_rss_mib": peak_rss_mib(),
    });
    let mut out = out;
    if args.workload != "gpt2" || args.lora.is_some() {
        // Only off the default workload, so the default output keeps its keys.
        out["workload"] = json!(args.workload);
        out["lora_rank"] = json!(args.lora);
    }
    say!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// One product of a step ([`gemm_shapes`]): `C (m × n) = op(A)·op(B)`, `a_t`: `A` stored
/// `(k, m)` and read transposed, `b_t`: `B` stored `(n, k)` and read transposed; `full` and
/// `lora`: how many times one training step must compute it with every weight trained and with
/// LoRA adapters only.
struct GemmShape {
    name: String,
    m: usize,
    n: usize,
    k: usize,
    a_t: bool,
    b_t: bool,
    full: usize,
    lora: usize,
}

impl GemmShape {
    /// `name`'s product of `(m, n, k)`, operands read as `(a_t, b_t)`, computed `(full, lora)`
    /// times a step.
    fn new(
        name: String,
        (m, n, k): (usize, usize, usize),
        (a_t, b_t): (bool, bool),
        (full, lora): (usize, usize),
    ) -> Self {
        Self {
            name,
            m,
            n,
            k,
            a_t,
            b_t,
            full,
            lora,
        }
    }
}

/// The large products one DPO / ε-DPO step of workload `of` must compute, with how often, and
/// the pairs in a step.
///
/// A step is a reference forward and a policy forward over every token (`rows`), the LM head
/// over the positions that predict a response token only, and the policy's backward: each
/// projection's input gradient (with LoRA not the first layer's query / key / value one, whose
/// input is the frozen embedding), its weight gradient with every weight trained, and the
/// head's input gradient and (its weight being trained and tied) weight gradient. Each
/// projection `W` is laid out as the model holds it: GPT-2's `Conv1D` `(in, out)`, Llama's
/// `(out, in)`. The head is timed at one block of `HEAD_BLOCK` vocabulary rows and counted
/// `vocab / HEAD_BLOCK` times. Left out, so that time at these products' rates is a lower
/// bound on a step: attention's products, LoRA's rank-`r` products, norms, activations,
/// softmaxes and the optimiser.
fn gemm_shapes(of: &str) -> Result<(Vec<GemmShape>, usize)> {
    const HEAD_BLOCK: usize = 8192;
    let work = Workload::named(of)?;
    let (layers, width, inner, kv, vocab, input_major) = match &work.config {
        ModelConfig::Gpt2(c) => (c.n_layer, c.n_embd, c.n_inner, c.n_embd, c.vocab_size, true),
        ModelConfig::Llama(c) => (
            c.num_hidden_layers,
            c.hidden_size,
            c.intermediate_size,
            c.head_dim * c.num_key_value_heads,
            c.vocab_size,
            false,
        ),
    };
    let rows = work.pairs * (work.prompt + 2 * work.response);
    let head_rows = work.pairs * 2 * work.response;
    let mut out = Vec::new();
    // A projection `inp → outp`, `count` of them per layer; `first_input_grad`: whether LoRA
    // still needs its input gradient in the first layer.
    let mut projection = |name: &str, inp, outp, count, first_input_grad: bool| {
        let lora_input = count * (layers - usize::from(!first_input_grad));
        // Forward `x·W` or `x·Wᵀ`, input gradient `g·Wᵀ` or `g·W`, and the weight's gradient
        // in its own layout: `xᵀ·g` (in, out) or `gᵀ·x` (out, in).
        let (weight, forward_t) = if input_major {
            ((inp, outp), false)
        } else {
            ((outp, inp), true)
        };
        let every = count * layers;
        out.push(GemmShape::new(
            format!("{name}.forward"),
            (rows, outp, inp),
            (false, forward_t),
            (2 * every, 2 * every),
        ));
        out.push(GemmShape::new(
            format!("{name}.input_grad"),
            (rows, inp, outp),
            (false, !forward_t),
            (every, lora_input),
        ));
        out.push(GemmShape::new(
            format!("{name}.weight_grad"),
            (weight.0, weight.1, rows),
            (true, false),
            (every, 0),
        ));
    };
    match &work.config {
        ModelConfig::Gpt2(_) => {
            projection("c_attn", width, 3 * width, 1, false);
            projection("attn.c_proj", width, width, 1, true);
            projection("c_fc", width, inner, 1, true);
            projection("mlp.c_proj", inner, width, 1, true);
        }
        ModelConfig::Llama(_) => {
            projection("q", width, width, 1, false);
            projection("o", width, width, 1, true);
            projection("k_v", width, kv, 2, false);
            projection("gate_up", width, inner, 2, true);
            projection("down", inner, width, 1, true);
        }
    }
    let block = HEAD_BLOCK.min(vocab);
    let blocks = vocab.div_ceil(block);
    let head = |name: &str| format!("head.{name}");
    out.push(GemmShape::new(
        head("forward"),
        (head_rows, block, width),
        (false, true),
        (2 * blocks, 2 * blocks),
    ));
    out.push(GemmShape::new(
        head("input_grad"),
        (head_rows, width, block),
        (false, false),
        (blocks, blocks),
    ));
    out.push(GemmShape::new(
        head("weight_grad"),
        (block, width, head_rows),
        (true, false),
        (blocks, 0),
    ));
    Ok((out, work.pairs))
}

/// Seconds per call of `f`, the best of five rounds of enough calls to fill 0.2 s.
fn seconds_per_call(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let start = Instant::now();
    f()?;
    let once = start.elapsed().as_secs_f64().max(1e-6);
    let calls = ((0.2 / once).ceil() as usize).max(1);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..calls {
            f()?;
        }
        best = best.min(start.elapsed().as_secs_f64() / calls as f64);
    }
    Ok(best)
}

/// `--workload gemm`: every product of workload `of`'s step ([`gemm_shapes`]) through
/// `kernels::gemm` and candle's matrix multiply, on the current thread pool.
fn run_gemm(of: &str) -> Result<()> {
    use candle_core::{Device, Tensor};
    use edpo_model::kernels::gemm;
    anyhow::ensure!(
        gemm::available(),
        "--workload gemm: this CPU has no AVX2/FMA, or EDPO_GEMM=candle is set"
    );
    let device = Device::Cpu;
    let (shapes, pairs) = gemm_shapes(of)?;
    for s in &shapes {
        let (a_rows, a_cols) = if s.a_t { (s.k, s.m) } else { (s.m, s.k) };
        let (b_rows, b_cols) = if s.b_t { (s.n, s.k) } else { (s.k, s.n) };
        let a = Tensor::randn(0f32, 1.0, (a_rows, a_cols), &device)?;
        let b = Tensor::randn(0f32, 1.0, (b_rows, b_cols), &device)?;
        let av: Vec<f32> = a.flatten_all()?.to_vec1()?;
        let bv: Vec<f32> = b.flatten_all()?.to_vec1()?;
        let oa = gemm::Operand::stored(&av, s.m, s.k, s.a_t);
        let ob = gemm::Operand::stored(&bv, s.k, s.n, s.b_t);
        let mut c = vec![0f32; s.m * s.n];
        let ours = seconds_per_call(|| {
            gemm::matmul_into(s.m, s.n, s.k, oa, ob, &mut c, false);
            Ok(())
        })?;
        let (ta, tb) = (
            if s.a_t { a.t()? } else { a.clone() },
            if s.b_t { b.t()? } else { b.clone() },
        );
        let theirs = seconds_per_call(|| {
            ta.matmul(&tb)?;
            Ok(())
        })?;
        let flops = 2.0 * (s.m * s.n * s.k) as f64;
        say!(
            "{}",
            serde_json::to_string(&json!({
                "product": s.name, "m": s.m, "n": s.n, "k": s.k, "a_t": s.a_t, "b_t": s.b_t,
                "edpo_gflops": flops / ours / 1e9,
                "candle_gflops": flops / theirs / 1e9,
                "threads": candle_core::utils::get_num_threads(),
                "of": of, "pairs_per_step": pairs,
                "per_step_full": s.full, "per_step_lora": s.lora,
            }))?
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The step's products hold every projection weight the model declares, once per forward
    /// pass (two a step) and once per gradient, and the head over the response positions.
    #[test]
    fn step_products_cover_the_models_weights() {
        for of in ["gpt2", "smollm2"] {
            let work = Workload::named(of).unwrap();
            let specs = match &work.config {
                ModelConfig::Gpt2(c) => edpo_model::gpt2::tensor_specs(c),
                ModelConfig::Llama(c) => edpo_model::llama::tensor_specs(c),
            };
            let weights: usize = specs
                .iter()
                .filter(|s| s.shape.len() == 2)
                .filter(|s| s.name.contains(".layers.") || s.name.contains(".h."))
                .map(|s| s.shape.iter().product::<usize>())
                .sum();
            let (shapes, pairs) = gemm_shapes(of).unwrap();
            let rows = pairs * (work.prompt + 2 * work.response);
            let head_rows = pairs * 2 * work.response;
            let width = match &work.config {
                ModelConfig::Gpt2(c) => c.n_embd,
                ModelConfig::Llama(c) => c.hidden_size,
            };
            // Multiply-adds of the products named `….{kind}`, head or body, each `count` times.
            let flops = |kind: &str, head: bool, count: fn(&GemmShape) -> usize| -> usize {
                shapes
                    .iter()
                    .filter(|s| s.name.ends_with(kind) && s.name.starts_with("head.") == head)
                    .map(|s| count(s) * s.m * s.n * s.k)
                    .sum()
            };
            for kind in [".forward", ".input_grad", ".weight_grad"] {
                let per_pass = if kind == ".forward" { 2 } else { 1 };
                assert_eq!(
                    flops(kind, false, |s| s.full),
                    per_pass * rows * weights,
                    "{of}{kind}"
                );
                assert_eq!(
                    flops(kind, true, |s| s.full),
                    per_pass * head_rows * work.vocab * width,
                    "{of} head{kind}"
                );
            }
            assert_eq!(flops(".weight_grad", false, |s| s.lora), 0, "{of}");
            assert_eq!(
                flops(".forward", false, |s| s.lora),
                2 * rows * weights,
                "{of}"
            );
            assert!(
                flops(".input_grad", false, |s| s.lora) < rows * weights,
                "{of}"
            );
        }
    }
}
