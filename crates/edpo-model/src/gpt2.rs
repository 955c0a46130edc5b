//! GPT-2 (Radford et al., 2019) as `transformers`' `GPT2LMHeadModel` computes it: learned
//! positions, pre-LayerNorm blocks with biases, GELU (tanh approximation), `Conv1D` weights
//! stored input-major, and the LM head tied to the token embedding. Dropout is never applied:
//! preference optimisation trains with it disabled, as TRL does by default.
//!
//! Reads bottom-up: attention, MLP, block, model.

use crate::arch::{Architecture, Forward, Init, TensorSpec, Weights};
use crate::config::Gpt2Config;
use crate::nn::{attention, cached_attention, LayerKv, LayerNorm, Linear};
use crate::Result;
use candle_core::Tensor;
use std::sync::Arc;

/// The names and shapes of every parameter, in `transformers`' naming.
pub fn tensor_specs(cfg: &Gpt2Config) -> Vec<TensorSpec> {
    let d = cfg.n_embd;
    let mut specs = vec![
        TensorSpec::new(
            "transformer.wte.weight",
            &[cfg.vocab_size, d],
            Init::Normal(0.02),
        ),
        TensorSpec::new(
            "transformer.wpe.weight",
            &[cfg.n_positions, d],
            Init::Normal(0.01),
        ),
    ];
    // Residual projections get GPT-2's 1/sqrt(2·n_layer) scaled initialisation.
    let proj_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
    for i in 0..cfg.n_layer {
        let p = |s: &str| format!("transformer.h.{i}.{s}");
        specs.extend([
            TensorSpec::new(p("ln_1.weight"), &[d], Init::Ones),
            TensorSpec::new(p("ln_1.bias"), &[d], Init::Zeros),
            TensorSpec::new(p("attn.c_attn.weight"), &[d, 3 * d], Init::Normal(0.02)),
            TensorSpec::new(p("attn.c_attn.bias"), &[3 * d], Init::Zeros),
            TensorSpec::new(p("attn.c_proj.weight"), &[d, d], Init::Normal(proj_std)),
            TensorSpec::new(p("attn.c_proj.bias"), &[d], Init::Zeros),
            TensorSpec::new(p("ln_2.weight"), &[d], Init::Ones),
            TensorSpec::new(p("ln_2.bias"), &[d], Init::Zeros),
            TensorSpec::new(p("mlp.c_fc.weight"), &[d, cfg.n_inner], Init::Normal(0.02)),
            TensorSpec::new(p("mlp.c_fc.bias"), &[cfg.n_inner], Init::Zeros),
            TensorSpec::new(
                p("mlp.c_proj.weight"),
                &[cfg.n_inner, d],
                Init::Normal(proj_std),
            ),
            TensorSpec::new(p("mlp.c_proj.bias"), &[d], Init::Zeros),
        ]);
    }
    specs.extend([
        TensorSpec::new("transformer.ln_f.weight", &[d], Init::Ones),
        TensorSpec::new("transformer.ln_f.bias", &[d], Init::Zeros),
    ]);
    specs
}

fn conv1d(w: &Weights, name: &str) -> Linear {
    Linear {
        weight: w.get(&format!("{name}.weight")),
        bias: Some(w.get(&format!("{name}.bias"))),
        input_major: true,
        lora: w.lora(name),
        frozen: w.frozen,
    }
}

fn layer_norm(w: &Weights, name: &str, eps: f64) -> LayerNorm {
    LayerNorm {
        weight: w.get(&format!("{name}.weight")),
        bias: w.get(&format!("{name}.bias")),
        eps,
    }
}

#[derive(Debug, Clone)]
struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
}

impl Attention {
    fn forward(&self, x: &Tensor, bias: &Tensor, cache: Option<&mut LayerKv>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.n_head;
        let qkv = self.c_attn.forward(x)?; // (B, T, 3d)
        if cache.is_none() {
            let scale = 1.0 / (hd as f64).sqrt();
            let y = crate::ops::packed_attention(&qkv, self.n_head, bias, scale)?;
            return self.c_proj.forward(&y);
        }
        let heads = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, i * d, d)?
                .reshape((b, t, self.n_head, hd))?
                .transpose(1, 2)?
                .contiguous()?) // (B, H, T, hd)
        };
        let y = match cache {
            Some(cache) => cached_attention(cache, &heads(0)?, heads(1)?, heads(2)?, bias)?,
            None => attention(&heads(0)?, &heads(1)?, &heads(2)?, bias)?, // (B, T, d)
        };
        self.c_proj.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.c_proj
            .forward(&crate::ops::gelu(&self.c_fc.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn forward(&self, x: &Tensor, bias: &Tensor, cache: Option<&mut LayerKv>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, bias, cache)?)?;
        Ok((&x + self.mlp.forward(&self.ln_2.forward(&x)?)?)?)
    }
}

/// GPT-2 language model; the LM head is the transposed token embedding.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    /// The base is frozen (a LoRA model): the LM head skips its weight's gradient.
    frozen: bool,
}

impl Gpt2 {
    /// Assembles the model from weights named as in [`tensor_specs`].
    pub(crate) fn new(cfg: &Gpt2Config, w: &Weights) -> Self {
        let eps = cfg.layer_norm_epsilon;
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let p = |s: &str| format!("transformer.h.{i}.{s}");
                Block {
                    ln_1: layer_norm(w, &p("ln_1"), eps),
                    attn: Attention {
                        c_attn: conv1d(w, &p("attn.c_attn")),
                        c_proj: conv1d(w, &p("attn.c_proj")),
                        n_head: cfg.n_head,
                    },
                    ln_2: layer_norm(w, &p("ln_2"), eps),
                    mlp: Mlp {
                        c_fc: conv1d(w, &p("mlp.c_fc")),
                        c_proj: conv1d(w, &p("mlp.c_proj")),
                    },
                }
            })
            .collect();
        Self {
            wte: w.get("transformer.wte.weight"),
            wpe: w.get("transformer.wpe.weight"),
            blocks,
            ln_f: layer_norm(w, "transformer.ln_f", eps),
            frozen: w.frozen,
        }
    }
}

impl Architecture for Gpt2Config {
    fn tensor_specs(&self) -> Vec<TensorSpec> {
        tensor_specs(self)
    }

    fn n_layers(&self) -> usize {
        self.n_layer
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.n_positions)
    }

    fn sliding_window(&self) -> Option<usize> {
        None
    }

    fn build(&self, weights: &Weights) -> Arc<dyn Forward> {
        Arc::new(Gpt2::new(self, weights))
    }
}

impl Forward for Gpt2 {
    /// Final hidden states `(B, T, d)` after `ln_f`.
    fn hidden(
        &self,
        ids: &Tensor,
        positions: &[u32],
        bias: &Tensor,
        mut cache: Option<&mut [LayerKv]>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let positions = Tensor::from_slice(positions, (b, t), ids.device())?;
        let d = self.wte.dim(1)?;
        let tok = crate::kernels::sink::embedding(&self.wte, ids)?;
        let pos = crate::kernels::sink::embedding(&self.wpe, &positions)?;
        let mut x = (tok + pos)?.reshape((b, t, d))?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, bias, cache.as_deref_mut().map(|c| &mut c[i]))?;
        }
        self.ln_f.forward(&x)
    }

    /// Logits `(N, V)` for hidden states `(N, d)`: the LM head tied to the token embedding.
    fn head_weight(&self) -> (&Tensor, bool) {
        (&self.wte, !self.frozen && self.wte.track_op())
    }

    fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        if self.frozen {
            return Ok(crate::ops::linear_frozen(hidden, &self.wte, None, false)?);
        }
        // Through `ops` (a decoding step's product streams the weight once at real size;
        // small models keep candle's product, the same call as `hidden·Wᵀ`).
        Ok(crate::ops::linear(hidden, &self.wte, None, false)?)
    }
}
