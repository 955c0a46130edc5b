//! The Llama family (Touvron et al., 2023) as `transformers`' `LlamaForCausalLM`,
//! `MistralForCausalLM` and `Qwen2ForCausalLM` compute it: RMSNorm, rotary position
//! embeddings in the rotate-half layout, SwiGLU MLP, grouped-query attention, optional q/k/v
//! biases (Qwen2), optional sliding window (Mistral), tied or untied LM head.
//!
//! Reads bottom-up: attention, MLP, block, model.

use crate::arch::{Architecture, Forward, Init, TensorSpec, Weights};
use crate::config::LlamaConfig;
use crate::nn::{cached_attention, LayerKv, Linear, RmsNorm, Rotary};
use crate::Result;
use candle_core::Tensor;
use std::sync::Arc;

/// The names and shapes of every parameter, in `transformers`' naming.
pub fn tensor_specs(cfg: &LlamaConfig) -> Vec<TensorSpec> {
    let d = cfg.hidden_size;
    let q_out = cfg.num_attention_heads * cfg.head_dim;
    let kv_out = cfg.num_key_value_heads * cfg.head_dim;
    let inter = cfg.intermediate_size;
    let w = Init::Normal(0.02);
    let mut specs = vec![TensorSpec::new(
        "model.embed_tokens.weight",
        &[cfg.vocab_size, d],
        w,
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        specs.extend([
            TensorSpec::new(p("input_layernorm.weight"), &[d], Init::Ones),
            TensorSpec::new(p("self_attn.q_proj.weight"), &[q_out, d], w),
            TensorSpec::new(p("self_attn.k_proj.weight"), &[kv_out, d], w),
            TensorSpec::new(p("self_attn.v_proj.weight"), &[kv_out, d], w),
            TensorSpec::new(p("self_attn.o_proj.weight"), &[d, q_out], w),
            TensorSpec::new(p("post_attention_layernorm.weight"), &[d], Init::Ones),
            TensorSpec::new(p("mlp.gate_proj.weight"), &[inter, d], w),
            TensorSpec::new(p("mlp.up_proj.weight"), &[inter, d], w),
            TensorSpec::new(p("mlp.down_proj.weight"), &[d, inter], w),
        ]);
        if cfg.qkv_bias {
            specs.extend([
                TensorSpec::new(p("self_attn.q_proj.bias"), &[q_out], Init::Zeros),
                TensorSpec::new(p("self_attn.k_proj.bias"), &[kv_out], Init::Zeros),
                TensorSpec::new(p("self_attn.v_proj.bias"), &[kv_out], Init::Zeros),
            ]);
        }
        if cfg.o_bias {
            specs.push(TensorSpec::new(
                p("self_attn.o_proj.bias"),
                &[d],
                Init::Zeros,
            ));
        }
        if cfg.mlp_bias {
            specs.extend([
                TensorSpec::new(p("mlp.gate_proj.bias"), &[inter], Init::Zeros),
                TensorSpec::new(p("mlp.up_proj.bias"), &[inter], Init::Zeros),
                TensorSpec::new(p("mlp.down_proj.bias"), &[d], Init::Zeros),
            ]);
        }
    }
    specs.push(TensorSpec::new("model.norm.weight", &[d], Init::Ones));
    if !cfg.tie_word_embeddings {
        specs.push(TensorSpec::new("lm_head.weight", &[cfg.vocab_size, d], w));
    }
    specs
}

fn linear(w: &Weights, name: &str, bias: bool) -> Linear {
    Linear {
        weight: w.get(&format!("{name}.weight")),
        bias: bias.then(|| w.get(&format!("{name}.bias"))),
        input_major: false,
        lora: w.lora(name),
        frozen: w.frozen,
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        bias: &Tensor,
        cache: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (cos, sin) = rope;
        let q = self.q_proj.forward(x)?; // (B, T, H·hd)
        let k = self.k_proj.forward(x)?; // (B, T, KV·hd)
        let v = self.v_proj.forward(x)?;
        let y = match cache {
            Some(cache) => {
                let split = |y: Tensor, heads: usize| -> Result<Tensor> {
                    Ok(y.reshape((b, t, heads, self.head_dim))?
                        .transpose(1, 2)?
                        .contiguous()?)
                };
                let q = Rotary::apply(&split(q, self.n_head)?, cos, sin)?; // (B, H, T, hd)
                let k = Rotary::apply(&split(k, self.n_kv)?, cos, sin)?; // (B, KV, T, hd)
                cached_attention(cache, &q, k, split(v, self.n_kv)?, bias)?
            }
            // Training and scoring: split, rotation, repetition and merge inside one node.
            None => crate::ops::rotary_attention(
                &q,
                &k,
                &v,
                (self.n_head, self.n_kv),
                rope,
                bias,
                1.0 / (self.head_dim as f64).sqrt(),
            )?, // (B, T, H·hd)
        };
        self.o_proj.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&crate::ops::silu_mul(&gate, &up)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        bias: &Tensor,
        cache: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, rope, bias, cache)?;
        let x = (x + h)?;
        Ok((&x
            + self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&x)?)?)?)
    }
}

/// A Llama-family language model.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    rotary: Rotary,
    /// The base is frozen (a LoRA model): the LM head skips its weight's gradient.
    frozen: bool,
}

impl Llama {
    /// Assembles the model from weights named as in [`tensor_specs`].
    pub(crate) fn new(cfg: &LlamaConfig, w: &Weights) -> Self {
        let eps = cfg.rms_norm_eps;
        let norm = |name: &str| RmsNorm {
            weight: w.get(&format!("{name}.weight")),
            eps,
        };
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = |s: &str| format!("model.layers.{i}.{s}");
                Block {
                    input_layernorm: norm(&p("input_layernorm")),
                    self_attn: Attention {
                        q_proj: linear(w, &p("self_attn.q_proj"), cfg.qkv_bias),
                        k_proj: linear(w, &p("self_attn.k_proj"), cfg.qkv_bias),
                        v_proj: linear(w, &p("self_attn.v_proj"), cfg.qkv_bias),
                        o_proj: linear(w, &p("self_attn.o_proj"), cfg.o_bias),
                        n_head: cfg.num_attention_heads,
                        n_kv: cfg.num_key_value_heads,
                        head_dim: cfg.head_dim,
                    },
                    post_attention_layernorm: norm(&p("post_attention_layernorm")),
                    mlp: Mlp {
                        gate_proj: linear(w, &p("mlp.gate_proj"), cfg.mlp_bias),
                        up_proj: linear(w, &p("mlp.up_proj"), cfg.mlp_bias),
                        down_proj: linear(w, &p("mlp.down_proj"), cfg.mlp_bias),
                    },
                }
            })
            .collect();
        let embed_tokens = w.get("model.embed_tokens.weight");
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            w.get("lm_head.weight")
        };
        Self {
            embed_tokens,
            blocks,
            norm: norm("model.norm"),
            lm_head,
            rotary: Rotary::new(cfg.head_dim, cfg.rope_theta),
            frozen: w.frozen,
        }
    }
}

impl Architecture for LlamaConfig {
    fn tensor_specs(&self) -> Vec<TensorSpec> {
        tensor_specs(self)
    }

    fn n_layers(&self) -> usize {
        self.num_hidden_layers
    }

    fn max_positions(&self) -> Option<usize> {
        None
    }

    fn sliding_window(&self) -> Option<usize> {
        self.sliding_window
    }

    fn build(&self, weights: &Weights) -> Arc<dyn Forward> {
        Arc::new(Llama::new(self, weights))
    }
}

impl Forward for Llama {
    /// Final hidden states `(B, T, d)` after the last RMSNorm.
    fn hidden(
        &self,
        ids: &Tensor,
        positions: &[u32],
        bias: &Tensor,
        mut cache: Option<&mut [LayerKv]>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let d = self.embed_tokens.dim(1)?;
        let (cos, sin) = self.rotary.tables(positions, b, t, ids.device())?;
        let mut x = crate::kernels::sink::embedding(&self.embed_tokens, ids)?.reshape((b, t, d))?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(
                &x,
                (&cos, &sin),
                bias,
                cache.as_deref_mut().map(|c| &mut c[i]),
            )?;
        }
        self.norm.forward(&x)
    }

    /// Logits `(N, V)` for hidden states `(N, d)`.
    fn head_weight(&self) -> (&Tensor, bool) {
        (&self.lm_head, !self.frozen && self.lm_head.track_op())
    }

    fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        if self.frozen {
            return Ok(crate::ops::linear_frozen(
                hidden,
                &self.lm_head,
                None,
                false,
            )?);
        }
        // Through `ops` (a decoding step's product streams the weight once at real size;
        // small models keep candle's product, the same call as `hidden·Wᵀ`).
        Ok(crate::ops::linear(hidden, &self.lm_head, None, false)?)
    }
}
