//! The golden checks against PyTorch + `transformers` (see `golden.rs`), as plain functions so
//! that `golden.rs` runs them on the default path and `composed_path.rs` on the composed one.

#![allow(dead_code)]

use candle_core::Device;
use edpo_data::{read_jsonl_pairs, PairTokenizer, TokenizedPair};
use edpo_model::{logprobs::sequence_logps, CausalLm, SequenceBatch};
use edpo_objectives::{dpo, epsilon_dpo, EpsilonBeta, Method};
use edpo_train::{
    score_pairs, AdamWConfig, Objective, Schedule, ScheduleKind, Trainer, TrainerConfig,
};
use serde_json::Value;
use std::path::PathBuf;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

const FAMILIES: [&str; 3] = ["gpt2", "llama", "qwen2"];

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden")
}

fn load(family: &str) -> Result<(Value, CausalLm, CausalLm), Box<dyn std::error::Error>> {
    let dir = golden_dir().join(family);
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json"))?)?;
    let policy = CausalLm::load(&dir.join("policy"), &Device::Cpu, true)?;
    let reference = CausalLm::load(&dir.join("reference"), &Device::Cpu, false)?;
    Ok((golden, policy, reference))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn golden_pairs(golden: &Value) -> Vec<TokenizedPair> {
    golden["pairs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| TokenizedPair {
                    prompt: ids(&p["prompt_ids"]),
                    chosen: ids(&p["chosen_ids"]),
                    rejected: ids(&p["rejected_ids"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn assert_rel(found: f64, expected: f64, rel: f64, what: &str) {
    let err = (found - expected).abs() / expected.abs().max(1e-12);
    assert!(
        err <= rel,
        "{what}: {found} vs PyTorch {expected} (relative error {err:e} > {rel:e})"
    );
}

fn assert_abs(found: f64, expected: f64, tol: f64, what: &str) {
    assert!(
        (found - expected).abs() <= tol,
        "{what}: {found} vs PyTorch {expected} (|diff| > {tol:e})"
    );
}

pub fn tokenisation_follows_the_convention() -> TestResult {
    let dir = golden_dir();
    let (golden, policy, _) = load("gpt2")?;
    let eos = policy.eos_token_id().ok_or("no eos")?;
    let tokenizer = PairTokenizer::from_file(&dir.join("tokenizer.json"), eos)?;
    let rows = read_jsonl_pairs(&dir.join("pairs.jsonl"))?;
    assert_eq!(rows.len(), golden_pairs(&golden).len());
    for (row, expected) in rows.iter().zip(golden_pairs(&golden)) {
        assert_eq!(tokenizer.encode_pair(row)?, expected, "line {}", row.line);
    }
    Ok(())
}

pub fn logps_losses_and_epsilon_steps_match_pytorch() -> TestResult {
    for family in FAMILIES {
        let (golden, policy, reference) = load(family)?;
        let pairs = golden_pairs(&golden);
        let beta = f(&golden["beta"]);
        let scores = score_pairs(&policy, &reference, &pairs, None)?;
        for (i, p) in golden["pairs"]
            .as_array()
            .ok_or("pairs")?
            .iter()
            .enumerate()
        {
            let what = |k: &str| format!("{family} pair {i} {k}");
            assert_rel(
                scores.policy_chosen[i],
                f(&p["chosen_logp"]),
                1e-4,
                &what("chosen_logp"),
            );
            assert_rel(
                scores.policy_rejected[i],
                f(&p["rejected_logp"]),
                1e-4,
                &what("rejected_logp"),
            );
            assert_rel(
                scores.reference_chosen[i],
                f(&p["ref_chosen_logp"]),
                1e-4,
                &what("ref_chosen_logp"),
            );
            assert_rel(
                scores.reference_rejected[i],
                f(&p["ref_rejected_logp"]),
                1e-4,
                &what("ref_rejected_logp"),
            );
        }
        let plain = dpo(&scores.logps(), beta)?;
        assert_abs(
            plain.loss(),
            f(&golden["dpo_loss"]),
            1e-5,
            &format!("{family} DPO loss"),
        );

        for size in ["small", "large"] {
            let g = &golden["epsilon"][size];
            let eps = f(&g["epsilon"]);
            let s = score_pairs(&policy, &reference, &pairs, Some(eps))?;
            let ratios = s.ratios.clone().ok_or("no ratios")?;
            let (out, steps) = epsilon_dpo(&s.logps(), &ratios, beta, eps)?;
            let expected: Vec<i8> = g["steps"]
                .as_array()
                .ok_or("steps")?
                .iter()
                .map(|v| v.as_i64().unwrap_or(9) as i8)
                .collect();
            assert_eq!(steps, expected, "{family} ε = {eps}: steps");
            if size == "large" {
                assert!(
                    steps.contains(&0),
                    "{family}: the large ε must exercise step 0"
                );
            }
            for (i, b) in g["beta_i"].as_array().ok_or("beta_i")?.iter().enumerate() {
                assert_rel(
                    out.betas[i],
                    f(b),
                    1e-12,
                    &format!("{family} ε = {eps} β_{i}"),
                );
                assert_abs(
                    ratios[i].h_relaxed,
                    f(&g["h_plus"][i]),
                    2e-3,
                    &format!("{family} h⁺_{i}"),
                );
                assert_abs(
                    ratios[i].h_stronger,
                    f(&g["h_minus"][i]),
                    2e-3,
                    &format!("{family} h⁻_{i}"),
                );
            }
            assert_abs(
                out.loss(),
                f(&g["loss"]),
                1e-5,
                &format!("{family} ε = {eps} loss"),
            );
            let mut state = EpsilonBeta::new(beta, eps)?;
            state.record(&steps);
            state.update();
            assert_rel(
                state.beta(),
                f(&g["next_beta"]),
                1e-12,
                &format!("{family} ε = {eps} next β"),
            );
        }
    }
    Ok(())
}

fn trace_config(golden: &Value, objective: Objective) -> TrainerConfig {
    let s = &golden["trace"]["settings"];
    TrainerConfig {
        objective,
        sft_weight: 0.0,
        adamw: AdamWConfig {
            beta1: f(&s["betas"][0]),
            beta2: f(&s["betas"][1]),
            eps: f(&s["eps"]),
            weight_decay: f(&s["weight_decay"]),
        },
        schedule: Schedule {
            peak_lr: f(&s["lr"]),
            warmup_steps: s["warmup_steps"].as_u64().unwrap_or(0) as usize,
            total_steps: s["total_steps"].as_u64().unwrap_or(0) as usize,
            kind: ScheduleKind::Cosine,
        },
        max_grad_norm: Some(f(&s["max_grad_norm"])),
    }
}

/// The golden pairs split into the trace's micro-batches.
fn trace_micro_batches(golden: &Value) -> Vec<Vec<TokenizedPair>> {
    let k = golden["trace"]["settings"]["micro_batches"]
        .as_u64()
        .unwrap_or(1) as usize;
    let pairs = golden_pairs(golden);
    let size = pairs.len() / k;
    (0..k)
        .map(|i| pairs[i * size..(i + 1) * size].to_vec())
        .collect()
}

pub fn dpo_gradient_norm_matches_pytorch() -> TestResult {
    for family in FAMILIES {
        let (golden, policy, reference) = load(family)?;
        let mut config = trace_config(
            &golden,
            Objective::Dpo {
                beta: f(&golden["beta"]),
            },
        );
        config.schedule.peak_lr = 0.0;
        let mut trainer = Trainer::new(policy, reference, config)?;
        let report = trainer.train_step(&[golden_pairs(&golden)])?;
        assert_rel(
            report.grad_norm,
            f(&golden["dpo_grad_norm"]),
            1e-4,
            &format!("{family} ‖∇L_DPO‖"),
        );
        assert_abs(
            report.loss,
            f(&golden["dpo_loss"]),
            1e-5,
            &format!("{family} DPO loss"),
        );
    }
    Ok(())
}

/// TDPO1 and TDPO2 (one step at learning rate 0): the responses' mean sequential KLs, the loss
/// and the gradient norm against `tools/make_tdpo_golden.py`'s values, computed as the official
/// TDPO code does. The sequential KLs flow into the gradient through the trainer's surrogate,
/// so a wrong derivative with respect to them moves the norm.
pub fn tdpo_matches_pytorch() -> TestResult {
    for family in FAMILIES {
        let (golden, policy, reference) = load(family)?;
        let path = golden_dir().join(family).join("tdpo.json");
        let expected: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        for case in expected["cases"].as_array().ok_or("cases")? {
            let params = &case["params"];
            let method = match case["method"].as_str() {
                Some("tdpo1") => Method::Tdpo1 {
                    beta: f(&params["beta"]),
                },
                Some("tdpo2") => Method::Tdpo2 {
                    beta: f(&params["beta"]),
                    alpha: f(&params["alpha"]),
                },
                other => return Err(format!("{path:?}: unknown method {other:?}").into()),
            };
            let mut config = trace_config(&golden, Objective::Method(method));
            config.schedule.peak_lr = 0.0;
            let mut trainer = Trainer::new(policy.clone(), reference.clone(), config)?;
            let report = trainer.train_step(&[golden_pairs(&golden)])?;
            let what = |k: &str| format!("{family} {} {k}", method.name());
            let mean = |v: &Value| -> f64 {
                let xs: Vec<f64> = v
                    .as_array()
                    .map_or(Vec::new(), |a| a.iter().map(f).collect());
                xs.iter().sum::<f64>() / xs.len().max(1) as f64
            };
            let stat = |k: &str| -> f64 {
                report
                    .stats
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map_or(f64::NAN, |&(_, v)| v)
            };
            assert_rel(
                stat("tdpo/kl_chosen"),
                mean(&case["kl_w"]),
                1e-4,
                &what("K_w"),
            );
            assert_rel(
                stat("tdpo/kl_rejected"),
                mean(&case["kl_l"]),
                1e-4,
                &what("K_l"),
            );
            assert_abs(report.loss, f(&case["loss"]), 1e-5, &what("loss"));
            assert_rel(report.grad_norm, f(&case["grad_norm"]), 1e-4, &what("‖∇L‖"));
        }
    }
    Ok(())
}

pub fn ten_step_traces_match_pytorch() -> TestResult {
    for family in FAMILIES {
        let (golden, policy, reference) = load(family)?;
        let beta = f(&golden["beta"]);
        let eps = f(&golden["trace"]["epsilon_dpo"]["epsilon"]);
        let micro = trace_micro_batches(&golden);
        for (name, objective, expected) in [
            ("DPO", Objective::Dpo { beta }, &golden["trace"]["dpo"]),
            (
                "ε-DPO",
                Objective::EpsilonDpo { beta, epsilon: eps },
                &golden["trace"]["epsilon_dpo"]["steps"],
            ),
        ] {
            let policy = CausalLm::load(
                &golden_dir().join(family).join("policy"),
                &Device::Cpu,
                true,
            )?;
            let mut trainer =
                Trainer::new(policy, reference.clone(), trace_config(&golden, objective))?;
            for e in expected.as_array().ok_or("trace")? {
                let r = trainer.train_step(&micro)?;
                let what = |k: &str| format!("{family} {name} step {} {k}", r.step);
                assert_rel(r.lr, f(&e["lr"]).max(1e-300), 1e-9, &what("lr"));
                assert_abs(r.loss, f(&e["loss"]), 2e-4, &what("loss"));
                assert_rel(r.grad_norm, f(&e["grad_norm"]), 2e-3, &what("grad norm"));
                assert_rel(r.beta, f(&e["beta"]), 1e-12, &what("β"));
                assert_rel(r.next_beta, f(&e["next_beta"]), 1e-12, &what("next β"));
            }
        }
        drop(policy);
    }
    Ok(())
}

pub fn every_parameter_receives_a_finite_nonzero_gradient() -> TestResult {
    for family in FAMILIES {
        let (golden, policy, reference) = load(family)?;
        let pairs = golden_pairs(&golden);
        let scores = score_pairs(&policy, &reference, &pairs, None)?;
        let out = dpo(&scores.logps(), 0.1)?;
        let mut seqs: Vec<(&[u32], &[u32])> = pairs
            .iter()
            .map(|p| (p.prompt.as_slice(), p.chosen.as_slice()))
            .collect();
        seqs.extend(
            pairs
                .iter()
                .map(|p| (p.prompt.as_slice(), p.rejected.as_slice())),
        );
        let batch = SequenceBatch::new(&seqs, 0)?;
        let logps = sequence_logps(&policy, &batch)?;
        let coef: Vec<f32> = out
            .grad_policy_chosen
            .iter()
            .chain(&out.grad_policy_rejected)
            .map(|&g| g as f32)
            .collect();
        let coef = candle_core::Tensor::from_vec(coef, logps.dims(), logps.device())?;
        let grads = (&logps * &coef)?.sum_all()?.backward()?;
        for p in policy.params() {
            let g = grads
                .get(&p.tensor)
                .ok_or_else(|| format!("{family}: `{}` received no gradient", p.name))?;
            let v = g.flatten_all()?.to_vec1::<f32>()?;
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{family}: `{}` has a non-finite gradient",
                p.name
            );
            assert!(
                v.iter().any(|&x| x != 0.0),
                "{family}: `{}` has an all-zero gradient",
                p.name
            );
        }
    }
    Ok(())
}

pub fn log_probs_do_not_depend_on_batch_or_padding() -> TestResult {
    for family in FAMILIES {
        let (golden, policy, _) = load(family)?;
        let pairs = golden_pairs(&golden);
        let all: Vec<(&[u32], &[u32])> = pairs
            .iter()
            .map(|p| (p.prompt.as_slice(), p.rejected.as_slice()))
            .collect();
        let together = sequence_logps(&policy, &SequenceBatch::new(&all, 0)?)?.to_vec1::<f32>()?;
        for (i, seq) in all.iter().enumerate() {
            let alone =
                sequence_logps(&policy, &SequenceBatch::new(&[*seq], 0)?)?.to_vec1::<f32>()?;
            assert_rel(
                f64::from(alone[0]),
                f64::from(together[i]),
                1e-5,
                &format!("{family} sequence {i}"),
            );
        }
        // Extra padding of a different id changes nothing.
        let long: Vec<u32> = all[0]
            .1
            .iter()
            .copied()
            .chain(std::iter::repeat_n(5, 40))
            .collect();
        let padded = SequenceBatch::new(&[all[0], (all[1].0, long.as_slice())], 7)?;
        let with_padding = sequence_logps(&policy, &padded)?.to_vec1::<f32>()?;
        assert_rel(
            f64::from(with_padding[0]),
            f64::from(together[0]),
            1e-5,
            &format!("{family} padded"),
        );
    }
    Ok(())
}

pub fn save_then_load_gives_identical_logits() -> TestResult {
    for family in FAMILIES {
        let (_, policy, _) = load(family)?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!("edpo-roundtrip-{family}-"))
            .tempdir()?;
        let dir = tmp.path().join(family);
        policy.save(&dir)?;
        let back = CausalLm::load(&dir, &Device::Cpu, false)?;
        let ids: Vec<u32> = (0..12).map(|i| (i * 17 + 3) % 300).collect();
        let mask = vec![1u8; 12];
        let a = policy
            .forward(&ids, &mask, 1, 12)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = back
            .forward(&ids, &mask, 1, 12)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(a, b, "{family}: logits differ after a save/load round trip");
        assert!(dir.join("tokenizer.json").exists() && dir.join("config.json").exists());
        std::fs::remove_dir_all(&dir)?;
    }
    let roundtrip: Value = serde_json::from_str(&std::fs::read_to_string(
        golden_dir().join("roundtrip.json"),
    )?)?;
    for family in FAMILIES {
        assert_eq!(roundtrip[family]["loaded"], Value::Bool(true));
        assert_eq!(
            f(&roundtrip[family]["max_abs_logit_diff"]),
            0.0,
            "{family}: transformers logits"
        );
    }
    Ok(())
}

/// A micro-batch split into shards (run in parallel, gradients summed per shard) follows the
/// same PyTorch traces with the same tolerances, and at every step reports the same ε-DPO
/// decisions as the unsplit batch with a loss equal to f32 rounding.
pub fn sharded_steps_match_pytorch_and_the_unsplit_batch() -> TestResult {
    for family in FAMILIES {
        let (golden, _, reference) = load(family)?;
        let beta = f(&golden["beta"]);
        let eps = f(&golden["trace"]["epsilon_dpo"]["epsilon"]);
        let micro = trace_micro_batches(&golden);
        let size = micro[0].len();
        assert!(
            size >= 2,
            "{family}: micro-batches of {size} cannot be split"
        );
        let objective = Objective::EpsilonDpo { beta, epsilon: eps };
        let expected = golden["trace"]["epsilon_dpo"]["steps"]
            .as_array()
            .ok_or("trace")?;
        let trainer = |shards: usize| -> Result<Trainer, Box<dyn std::error::Error>> {
            let policy = CausalLm::load(
                &golden_dir().join(family).join("policy"),
                &Device::Cpu,
                true,
            )?;
            Ok(
                Trainer::new(policy, reference.clone(), trace_config(&golden, objective))?
                    .with_shards(shards)?,
            )
        };
        let (mut whole, mut split) = (trainer(1)?, trainer(size)?);
        for e in expected {
            let a = whole.train_step(&micro)?;
            let b = split.train_step(&micro)?;
            let what = |k: &str| format!("{family} {} shards step {} {k}", size, b.step);
            assert_abs(b.loss, f(&e["loss"]), 2e-4, &what("loss"));
            assert_rel(b.grad_norm, f(&e["grad_norm"]), 2e-3, &what("grad norm"));
            assert_rel(b.next_beta, f(&e["next_beta"]), 1e-12, &what("next β"));
            assert_eq!(a.pair_steps, b.pair_steps, "{}", what("decisions"));
            assert_abs(b.loss, a.loss, 1e-5, &what("loss vs unsplit"));
            assert_rel(
                b.grad_norm,
                a.grad_norm,
                1e-4,
                &what("grad norm vs unsplit"),
            );
        }
    }
    Ok(())
}
