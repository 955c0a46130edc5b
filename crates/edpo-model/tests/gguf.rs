//! GGUF files as a model source, against the fixtures `tools/make_gguf_fixture.py` writes from
//! the golden Llama checkpoint the way llama.cpp's converter does (its names, its metadata, its
//! permuted q/k rows) in F32, F16, Q8_0 and Q4_0:
//! - sequence log-probs equal those `transformers` computes loading the same GGUF files (its
//!   own dequantisation, names, permutation and config) to the golden tolerance, 1e-4
//!   relative;
//! - every dequantised tensor matches the `gguf` package's own dequantisation (sum, sum of
//!   squares, and a row-weighted sum that sees the row order);
//! - the F32 file gives the safetensors checkpoint's parameters and log-probs exactly (so the
//!   metadata, the names and the undoing of the rotary permutation are right), and the
//!   quantised files log-probs close to them;
//! - a GGUF model saved as a Hugging Face directory loads back with identical log-probs;
//! - a truncated file and an unsupported architecture are errors naming the file and key.

mod common;

use candle_core::Device;
use common::{golden_sequences, testdata};
use edpo_model::{sequence_logps, CausalLm, Source};
use serde_json::Value;
use std::path::PathBuf;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn gguf(label: &str) -> PathBuf {
    testdata().join(format!("gguf/tiny-llama-{label}.gguf"))
}

fn logps(model: &CausalLm) -> Result<Vec<f32>, Box<dyn std::error::Error>> {
    Ok(sequence_logps(model, &golden_sequences()?)?.to_vec1::<f32>()?)
}

fn values(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .unwrap_or_default()
}

#[test]
fn log_probs_match_transformers_loading_the_same_files() -> TestResult {
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(
        testdata().join("gguf/expected.json"),
    )?)?;
    for label in ["f32", "f16", "q8_0", "q4_0"] {
        let found = logps(&CausalLm::load(&gguf(label), &Device::Cpu, false)?)?;
        let want = expected["logps"][label].as_array().ok_or("logps")?;
        assert_eq!(found.len(), want.len());
        for (f, w) in found.iter().zip(want) {
            let w = w.as_f64().ok_or("logp")?;
            let rel = (f64::from(*f) - w).abs() / w.abs();
            assert!(
                rel < 1e-4,
                "{label}: {f} vs transformers {w} ({rel:e} relative)"
            );
        }
    }
    Ok(())
}

#[test]
fn dequantised_tensors_match_the_gguf_package() -> TestResult {
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(
        testdata().join("gguf/expected.json"),
    )?)?;
    for label in ["f32", "f16", "q8_0", "q4_0"] {
        let model = CausalLm::load(&gguf(label), &Device::Cpu, false)?;
        let sums = &expected["files"][label];
        assert_eq!(
            model.params().len(),
            sums.as_object().map_or(0, |m| m.len()),
            "{label}: parameter count"
        );
        for p in model.params() {
            let e = &sums[&p.name];
            let dims = p.tensor.dims().to_vec();
            let v = values(&p.tensor);
            let cols = v.len() / dims[0];
            let sum: f64 = v.iter().map(|&x| f64::from(x)).sum();
            let sum_sq: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            let weighted: f64 = v
                .chunks(cols)
                .enumerate()
                .map(|(r, row)| (r + 1) as f64 * row.iter().map(|&x| f64::from(x)).sum::<f64>())
                .sum();
            for (what, found, want) in [
                ("sum", sum, &e["sum"]),
                ("sum of squares", sum_sq, &e["sum_sq"]),
                ("row-weighted sum", weighted, &e["row_weighted"]),
            ] {
                let want = want.as_f64().ok_or("expected value")?;
                assert!(
                    (found - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{label} {}: {what} {found} vs gguf {want}",
                    p.name
                );
            }
        }
    }
    Ok(())
}

#[test]
fn the_f32_file_is_the_safetensors_checkpoint_and_quantised_files_are_close() -> TestResult {
    let reference = CausalLm::load(&testdata().join("golden/llama/policy"), &Device::Cpu, false)?;
    let f32_model = CausalLm::load(&gguf("f32"), &Device::Cpu, false)?;
    for (a, b) in reference.params().iter().zip(f32_model.params()) {
        assert_eq!(a.name, b.name);
        assert!(values(&a.tensor) == values(&b.tensor), "{} differs", a.name);
    }
    let want = logps(&reference)?;
    assert_eq!(logps(&f32_model)?, want);
    // Quantisation moves the log-probs, by less the more bits it keeps.
    for (label, tol) in [("f16", 1e-3), ("q8_0", 2e-2)] {
        let found = logps(&CausalLm::load(&gguf(label), &Device::Cpu, false)?)?;
        for (f, w) in found.iter().zip(&want) {
            assert!(
                ((f - w) / w).abs() < tol,
                "{label}: log-prob {f} vs {w} (relative tolerance {tol})"
            );
        }
    }
    Ok(())
}

#[test]
fn a_gguf_model_trains_and_saves_as_a_hugging_face_directory() -> TestResult {
    let source = Source::gguf(&gguf("q8_0"), &Device::Cpu)?;
    let model = CausalLm::from_source(source, &Device::Cpu, &|_| true)?;
    assert!(model.params().iter().all(|p| p.var.is_some()));
    let tmp = tempfile::Builder::new()
        .prefix("edpo-gguf-save-")
        .tempdir()?;
    let dir = tmp.path().join("save");
    model.save(&dir)?;
    let back = CausalLm::load(&dir, &Device::Cpu, false)?;
    assert_eq!(logps(&back)?, logps(&model)?);
    Ok(())
}

#[test]
fn bad_files_are_errors_naming_file_and_key() -> TestResult {
    let tmp = tempfile::Builder::new()
        .prefix("edpo-gguf-bad-")
        .tempdir()?;
    let dir = tmp.path().join("bad");
    std::fs::create_dir_all(&dir)?;
    let bytes = std::fs::read(gguf("q8_0"))?;
    for cut in [10, 200, bytes.len() / 2, bytes.len() - 7] {
        let path = dir.join(format!("cut-{cut}.gguf"));
        std::fs::write(&path, &bytes[..cut])?;
        let err = CausalLm::load(&path, &Device::Cpu, false)
            .err()
            .ok_or("a truncated file loaded")?
            .to_string();
        assert!(err.contains(&format!("cut-{cut}.gguf")), "{err}");
    }
    let falcon = testdata().join("gguf/falcon-no-tensors.gguf");
    let err = CausalLm::load(&falcon, &Device::Cpu, false)
        .err()
        .ok_or("an unsupported architecture loaded")?
        .to_string();
    assert!(
        err.contains("falcon-no-tensors.gguf")
            && err.contains("general.architecture")
            && err.contains("falcon"),
        "{err}"
    );
    Ok(())
}

#[test]
fn the_files_tokenizer_and_chat_template_come_out_as_hugging_face_files() -> TestResult {
    let model = CausalLm::load(&gguf("q4_0"), &Device::Cpu, false)?;
    let tmp = tempfile::Builder::new()
        .prefix("edpo-gguf-tok-")
        .tempdir()?;
    let dir = tmp.path().join("tok");
    model.save(&dir)?;
    let ours = edpo_data::PairTokenizer::from_file(&dir.join("tokenizer.json"), 0)?;
    let golden = edpo_data::PairTokenizer::from_file(
        &testdata().join("golden/llama/policy/tokenizer.json"),
        0,
    )?;
    for text in [
        "the cat sat on the mat",
        "  leading spaces, trailing punctuation!!",
        "digits 12345 and 3.14, don't stop",
        "unicode: naïve café — ünïcödé",
        "<|endoftext|> then more",
        "",
    ] {
        let ids = ours.encode(text)?;
        assert_eq!(ids, golden.encode(text)?, "{text:?}");
        assert_eq!(ours.decode(&ids)?, golden.decode(&ids)?, "{text:?}");
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json"))?)?;
    let template = config["chat_template"].as_str().ok_or("chat template")?;
    assert!(
        template.starts_with("{% for message in messages %}"),
        "{template}"
    );
    assert_eq!(config["eos_token"], "<|endoftext|>");
    let chat =
        edpo_data::chat::ChatTemplate::from_tokenizer_config(&dir.join("tokenizer_config.json"))?
            .ok_or("no chat template")?;
    let hi = edpo_data::chat::Message {
        role: "user".into(),
        content: "Hi".into(),
    };
    assert_eq!(
        chat.render(&[hi], true)?,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let err = CausalLm::load(&gguf("bad-pre"), &Device::Cpu, false)
        .err()
        .ok_or("an unknown pre-tokenizer loaded")?
        .to_string();
    assert!(
        err.contains("tiny-llama-bad-pre.gguf")
            && err.contains("tokenizer.ggml.pre")
            && err.contains("mystery"),
        "{err}"
    );
    Ok(())
}
