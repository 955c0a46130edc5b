//! LoRA against PEFT (`tools/make_lora_golden.py`): a PEFT adapter on the golden tiny Llama
//! loads onto our base and gives PEFT's sequence log-probs (golden tolerance, 1e-4 relative)
//! and the norm of PEFT's gradient on every adapter matrix (1e-3 relative); the base is frozen
//! (no variable) and is the very tensors of the model the adapters were put on; fresh adapters
//! leave the model unchanged; a saved adapter loads back unchanged; merged into the base and saved
//! as a full directory, the adapters still give PEFT's log-probs; bad adapters are errors.

mod common;

use candle_core::Device;
use common::{golden_sequences, testdata};
use edpo_model::{sequence_logps, CausalLm, LoraConfig};
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn base() -> Result<CausalLm, Box<dyn std::error::Error>> {
    Ok(CausalLm::load(
        &testdata().join("golden/llama/policy"),
        &Device::Cpu,
        false,
    )?)
}

#[test]
fn a_peft_adapter_gives_pefts_log_probs_and_gradients() -> TestResult {
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(
        testdata().join("lora/golden.json"),
    )?)?;
    let base = base()?;
    let model = base.load_adapter(&testdata().join("lora/adapter"))?;
    let logps = sequence_logps(&model, &golden_sequences()?)?;
    let found = logps.to_vec1::<f32>()?;
    for (f, w) in found.iter().zip(golden["logps"].as_array().ok_or("logps")?) {
        let w = w.as_f64().ok_or("logp")?;
        let rel = (f64::from(*f) - w).abs() / w.abs();
        assert!(rel < 1e-4, "log-prob {f} vs PEFT {w} ({rel:e})");
    }
    let grads = logps.sum_all()?.backward()?;
    let norms = golden["grad_norms"].as_object().ok_or("grad norms")?;
    let mut adapters = 0;
    for (i, p) in model.params().iter().enumerate() {
        let g = grads.get(&p.tensor);
        if p.var.is_none() {
            let b = &base.params()[i];
            // Frozen: no variable, so no optimizer can move it; the very base tensor.
            assert_eq!(
                p.tensor.id(),
                b.tensor.id(),
                "{}: not the base's tensor",
                p.name
            );
            continue;
        }
        adapters += 1;
        let g = g.ok_or("adapter gradient")?;
        let norm = f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?).sqrt();
        let want = norms[&format!("base_model.model.{}", p.name)]
            .as_f64()
            .ok_or("norm")?;
        assert!(
            (norm - want).abs() / want < 1e-3,
            "{}: gradient norm {norm} vs PEFT {want}",
            p.name
        );
    }
    assert_eq!(adapters, norms.len());
    // Saved and loaded back: the same model.
    let tmp = tempfile::Builder::new().prefix("edpo-lora-").tempdir()?;
    let dir = tmp.path().join("adapter");
    model.save_adapter(&dir)?;
    let again = base.load_adapter(&dir)?;
    assert_eq!(
        sequence_logps(&again, &golden_sequences()?)?.to_vec1::<f32>()?,
        found
    );
    // Merged into the base, saved as a full directory and loaded back: PEFT's log-probs too.
    let merged = model.merged()?;
    assert!(merged.lora().is_none());
    let full = tmp.path().join("merged");
    merged.save(&full)?;
    let merged = CausalLm::load(&full, &Device::Cpu, false)?;
    let again = sequence_logps(&merged, &golden_sequences()?)?.to_vec1::<f32>()?;
    for (m, w) in again.iter().zip(golden["logps"].as_array().ok_or("logps")?) {
        let w = w.as_f64().ok_or("logp")?;
        let rel = (f64::from(*m) - w).abs() / w.abs();
        assert!(rel < 1e-4, "merged log-prob {m} vs PEFT {w} ({rel:e})");
    }
    assert!(
        base.merged().is_err(),
        "a model without adapters has nothing to merge"
    );
    Ok(())
}

#[test]
fn fresh_adapters_leave_the_model_unchanged_and_bad_ones_are_errors() -> TestResult {
    let base = base()?;
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        targets: vec!["q_proj".into(), "up_proj".into()],
        rslora: true,
    };
    let model = base.with_lora(&cfg, 7)?;
    assert_eq!(
        sequence_logps(&model, &golden_sequences()?)?.to_vec1::<f32>()?,
        sequence_logps(&base, &golden_sequences()?)?.to_vec1::<f32>()?
    );
    let trainable: Vec<&str> = model
        .params()
        .iter()
        .filter(|p| p.var.is_some())
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(trainable.len(), 2 * 2 * 2, "{trainable:?}");
    assert!(trainable.iter().all(|n| n.contains(".lora_")));
    let missing = LoraConfig {
        targets: vec!["c_attn".into()],
        ..cfg
    };
    let err = base
        .with_lora(&missing, 7)
        .err()
        .ok_or("no error")?
        .to_string();
    assert!(err.contains("c_attn"), "{err}");
    let err = base
        .load_adapter(&testdata().join("golden/llama/policy"))
        .err()
        .ok_or("no error")?
        .to_string();
    assert!(err.contains("adapter_config.json"), "{err}");
    Ok(())
}
