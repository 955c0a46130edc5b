//! Per-parameter trainability: a model whose parameters are only partly trainable (as with an
//! adapter) trains exactly those, and leaves the rest bit for bit as they were.

use candle_core::Device;
use edpo_data::TokenizedPair;
use edpo_model::{CausalLm, Source};
use edpo_train::{AdamWConfig, Objective, Schedule, ScheduleKind, Trainer, TrainerConfig};
use std::path::PathBuf;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn values(model: &CausalLm) -> Vec<(String, bool, Vec<f32>)> {
    model
        .params()
        .iter()
        .map(|p| {
            let v = p
                .tensor
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .unwrap_or_default();
            (p.name.clone(), p.var.is_some(), v)
        })
        .collect()
}

/// DPO at β 0.1, a constant learning rate of 1e-2, no clipping.
fn dpo_config() -> TrainerConfig {
    TrainerConfig {
        objective: Objective::Dpo { beta: 0.1 },
        sft_weight: 0.0,
        adamw: AdamWConfig::default(),
        schedule: Schedule {
            peak_lr: 1e-2,
            warmup_steps: 0,
            total_steps: 2,
            kind: ScheduleKind::Constant,
        },
        max_grad_norm: None,
    }
}

#[test]
fn only_the_trainable_parameters_move() -> TestResult {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden/gpt2/policy");
    let attention_only = |name: &str| name.contains(".attn.");
    let policy = CausalLm::from_source(
        Source::hf_dir(&dir, &Device::Cpu)?,
        &Device::Cpu,
        &attention_only,
    )?;
    let reference = CausalLm::load(&dir, &Device::Cpu, false)?;
    let before = values(&policy);
    assert!(before.iter().any(|(_, t, _)| *t) && before.iter().any(|(_, t, _)| !*t));
    for (name, trainable, _) in &before {
        assert_eq!(*trainable, attention_only(name), "{name}");
    }
    let config = dpo_config();
    let mut trainer = Trainer::new(policy, reference, config)?;
    let pairs = vec![
        TokenizedPair {
            prompt: vec![1, 2, 3],
            chosen: vec![4, 5, 6],
            rejected: vec![7, 8],
        },
        TokenizedPair {
            prompt: vec![9, 10],
            chosen: vec![11, 12],
            rejected: vec![13, 14, 15],
        },
    ];
    trainer.train_step(&[pairs])?;
    for ((name, trainable, old), (_, _, new)) in before.iter().zip(values(&trainer.policy)) {
        if *trainable {
            assert!(old != &new, "{name} is trainable and did not move");
        } else {
            assert!(old == &new, "{name} is frozen and moved");
        }
    }
    Ok(())
}

/// A LoRA policy against its own base as the reference: the first DPO loss is ln 2 (the two
/// are the same model), one step moves the adapters' B matrices (A gets no gradient while B is
/// zero), and the base, shared with the reference, stays bit for bit.
#[test]
fn a_lora_policy_trains_its_adapters_against_its_base() -> TestResult {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden/llama/policy");
    let base = CausalLm::load(&dir, &Device::Cpu, false)?;
    let lora = edpo_model::LoraConfig {
        r: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
        rslora: false,
    };
    let policy = base.with_lora(&lora, 1)?;
    let before = values(&policy);
    let config = dpo_config();
    let mut trainer = Trainer::new(policy, base, config)?;
    let pairs = vec![TokenizedPair {
        prompt: vec![1, 2, 3],
        chosen: vec![4, 5, 6],
        rejected: vec![7, 8],
    }];
    // The gradient norm is over the adapters alone: with policy = reference, ∂L/∂lw = −β/2
    // and ∂L/∂ll = β/2 (one pair), so the norm is that of ∇(β/2·(ll − lw)) on the adapters.
    let adapters_only = {
        let p = &pairs[0];
        let seqs: [(&[u32], &[u32]); 2] = [(&p.prompt, &p.chosen), (&p.prompt, &p.rejected)];
        let batch = edpo_model::SequenceBatch::new(&seqs, 0)?;
        let lp = edpo_model::sequence_logps(&trainer.policy, &batch)?;
        let coef = candle_core::Tensor::new(&[-0.05f32, 0.05], &Device::Cpu)?;
        let store = (lp * coef)?.sum_all()?.backward()?;
        let mut sq = 0f64;
        for p in trainer.policy.params().iter().filter(|p| p.var.is_some()) {
            if let Some(g) = store.get(&p.tensor) {
                sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
            }
        }
        sq.sqrt()
    };
    let report = trainer.train_step(&[pairs])?;
    assert!(
        (report.loss - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        report.loss
    );
    assert!(
        (report.grad_norm - adapters_only).abs() <= 1e-4 * adapters_only,
        "gradient norm {} vs {adapters_only} over the adapters",
        report.grad_norm
    );
    for ((name, trainable, old), (_, _, new)) in before.iter().zip(values(&trainer.policy)) {
        let moved = old != &new;
        assert_eq!(
            moved,
            name.contains(".lora_B."),
            "{name} (trainable {trainable})"
        );
    }
    Ok(())
}
