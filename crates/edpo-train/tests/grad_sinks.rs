//! Gradient sinks (`GradBuffers::with_sinks`) give every parameter the very gradient candle's
//! store gives it, bit for bit (but for the sign of a zero): on the golden models (below the GEMM's size: candle's products
//! and head, the weights tapped) and on models at the GEMM's size (the chunked LM head, the
//! fused linear maps and the embedding lookup write their sinks), tied and untied, GPT-2 and
//! Llama, with two forward passes in one graph (so each weight gets two contributions) and
//! in a shard other than the first.

use candle_core::{Device, Tensor};
use edpo_model::{sequence_logps, CausalLm, ModelConfig, SequenceBatch};
use edpo_train::GradBuffers;
use std::path::{Path, PathBuf};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn random(raw: serde_json::Value) -> Result<CausalLm, Box<dyn std::error::Error>> {
    let config = ModelConfig::from_json(&raw, Path::new("<test>"))?;
    Ok(CausalLm::random(config, raw, 7, &Device::Cpu, true)?)
}

fn llama(tied: bool) -> serde_json::Value {
    serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": 256, "hidden_size": 192, "intermediate_size": 384,
        "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tied,
        "max_position_embeddings": 512, "eos_token_id": 2, "bos_token_id": 1,
    })
}

fn gpt2() -> serde_json::Value {
    serde_json::json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": 256, "n_positions": 512, "n_embd": 192, "n_layer": 2, "n_head": 3,
        "layer_norm_epsilon": 1e-5, "eos_token_id": 255, "bos_token_id": 255,
    })
}

fn models() -> Result<Vec<(String, CausalLm)>, Box<dyn std::error::Error>> {
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden");
    let mut out = Vec::new();
    for family in ["gpt2", "llama"] {
        let dir = golden.join(family).join("policy");
        out.push((
            format!("golden {family}"),
            CausalLm::load(&dir, &Device::Cpu, true)?,
        ));
    }
    out.push(("llama 192, tied".into(), random(llama(true))?));
    out.push(("llama 192, untied".into(), random(llama(false))?));
    out.push(("gpt2 192".into(), random(gpt2())?));
    Ok(out)
}

/// A loss over two forward passes (two batches of sequences with responses long enough for
/// the chunked head at width 192), each weight reached by both.
fn surrogate(model: &CausalLm, vocab: u32) -> Result<Tensor, Box<dyn std::error::Error>> {
    let batches = if model.config().max_positions() >= 512 {
        [(4, 12, 60), (3, 20, 70)]
    } else {
        [(4, 8, 20), (3, 10, 24)]
    };
    let mut state = 12345u64;
    let mut token = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % u64::from(vocab - 3)) as u32 + 3
    };
    let mut loss: Option<Tensor> = None;
    for (sequences, prompt, response) in batches {
        let data: Vec<(Vec<u32>, Vec<u32>)> = (0..sequences)
            .map(|s| {
                (
                    (0..prompt + s).map(|_| token()).collect(),
                    (0..response - 2 * s).map(|_| token()).collect(),
                )
            })
            .collect();
        let seqs: Vec<(&[u32], &[u32])> = data
            .iter()
            .map(|(p, r)| (p.as_slice(), r.as_slice()))
            .collect();
        let batch = SequenceBatch::new(&seqs, 0)?;
        let lp = sequence_logps(model, &batch)?;
        let coef: Vec<f32> = (0..sequences).map(|s| 0.3 - 0.17 * s as f32).collect();
        let term = (lp * Tensor::from_vec(coef, sequences, &Device::Cpu)?)?.sum_all()?;
        loss = Some(match loss {
            Some(l) => (l + term)?,
            None => term,
        });
    }
    Ok(loss.ok_or("no batches")?)
}

#[test]
fn sinks_give_the_stores_gradients_bit_for_bit() -> TestResult {
    for (name, model) in models()? {
        let vocab = model.config().vocab_size() as u32;
        let params = model.params();
        // Without sinks first: installed, they change what the kernels return to candle.
        let mut plain = GradBuffers::new(params);
        plain.add(params, &surrogate(&model, vocab)?.backward()?)?;
        let mut sunk = GradBuffers::with_sinks(params)?;
        for shard in [0, 1] {
            sunk.zero();
            let store = edpo_model::kernels::sink::in_shard(shard, || {
                surrogate(&model, vocab).and_then(|l| Ok(l.backward()?))
            })?;
            for p in params.iter().filter(|p| p.var.is_some()) {
                let matrix = p.tensor.rank() == 2;
                assert_eq!(
                    store.get(&p.tensor).is_none(),
                    matrix,
                    "{name}, `{}`: a matrix's gradient goes to its sink, the rest to the store",
                    p.name
                );
            }
            sunk.add_shard(params, &store, shard)?;
            for ((p, a), b) in params.iter().zip(plain.grads()).zip(sunk.grads()) {
                assert!(
                    a.iter().any(|&x| x != 0.0) || p.var.is_none(),
                    "{name}, `{}`: no gradient at all",
                    p.name
                );
                // Bit for bit, but for the sign of a zero (`0 + (−0)` is `+0`; a sum that
                // becomes the buffer keeps its `−0`), which neither the norm nor AdamW reads.
                let same = a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|(x, y)| x.to_bits() == y.to_bits() || (*x == 0.0 && *y == 0.0));
                assert!(
                    same,
                    "{name}, shard {shard}, `{}`: gradients differ",
                    p.name
                );
            }
        }
    }
    Ok(())
}

/// A weight whose gradient came both through its sink and through candle's store is refused,
/// not summed in an order that might not be candle's (here the graph was built before the sinks
/// were installed: its embedding lookup is candle's, its LM head writes the sink); and `zero`
/// clears what the sinks hold.
#[test]
fn a_split_gradient_is_refused_and_zero_clears_the_sinks() -> TestResult {
    let model = random(llama(true))?;
    let params = model.params();
    let early = surrogate(&model, 256)?;
    let mut sunk = GradBuffers::with_sinks(params)?;
    let store = early.backward()?;
    let err = sunk
        .add(params, &store)
        .err()
        .ok_or("a split gradient was summed")?;
    assert!(
        err.to_string().contains("model.embed_tokens.weight"),
        "{err}"
    );
    sunk.zero();
    sunk.add(params, &store)?;
    let q = params
        .iter()
        .position(|p| p.name.ends_with("q_proj.weight"))
        .ok_or("no q_proj")?;
    assert!(
        sunk.grads()[q].iter().all(|&x| x == 0.0),
        "a sink kept its gradient through `zero`"
    );
    Ok(())
}

/// One model trained by two trainers at once would have each see the other's gradients: the
/// second set of sinks is refused, and installs once the first is gone.
#[test]
fn a_model_gets_one_set_of_sinks_at_a_time() -> TestResult {
    let model = random(llama(true))?;
    let first = GradBuffers::with_sinks(model.params())?;
    let err = GradBuffers::with_sinks(model.params())
        .err()
        .ok_or("a second set of sinks was installed")?;
    assert!(err.to_string().contains("already has one"), "{err}");
    drop(first);
    GradBuffers::with_sinks(model.params())?;
    Ok(())
}
