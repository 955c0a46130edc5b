//! The one place each differentiable operation of the models is routed: to the fused CPU
//! kernel ([`crate::kernels`]) when its input is an f32 tensor on the CPU, otherwise to its
//! composed definition ([`crate::composed`]), which candle can run and differentiate on any
//! device. The models call these functions only, so a CUDA or Metal device needs nothing but
//! candle's own operations.
//!
//! [`set_composed`] sends every operation to the composed path, so that a whole training step
//! can be run both ways and compared (`tests/ops.rs` here, operation by operation, and
//! `edpo-train`'s `tests/composed_path.rs`, a training step against the PyTorch traces; each
//! in a test binary of its own, since the switch is process-wide).

use crate::{composed, kernels};
use candle_core::{DType, Result, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static FORCE_COMPOSED: AtomicBool = AtomicBool::new(false);

/// Sends every operation to its composed definition (`true`) or lets eligible ones use the
/// fused kernels again (`false`, the default). Process-wide.
pub fn set_composed(on: bool) {
    FORCE_COMPOSED.store(on, Ordering::SeqCst);
}

/// Whether the composed path is forced.
pub fn composed_forced() -> bool {
    FORCE_COMPOSED.load(Ordering::SeqCst)
}

/// Whether the fused kernels apply to `x`: f32 on the CPU, and the composed path not forced.
pub fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !composed_forced()
}

/// GELU, tanh form.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        kernels::gelu(x)
    } else {
        composed::gelu(x)
    }
}

/// LayerNorm over the last dimension.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(x) {
        kernels::layer_norm(x, weight, bias, eps)
    } else {
        composed::layer_norm(x, weight, bias, eps)
    }
}

/// RMSNorm over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(x) {
        kernels::rms_norm(x, weight, eps)
    } else {
        composed::rms_norm(x, weight, eps)
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        kernels::softmax_last(x)
    } else {
        composed::softmax_last(x)
    }
}

/// Per-row `log_softmax(logits)[target]` for `logits (N, V)`.
pub fn log_softmax_gather(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    if fused(logits) {
        kernels::log_softmax_gather(logits, targets)
    } else {
        composed::log_softmax_gather(logits, targets)
    }
}

/// `x·W (+ b)` with `W` and `b` frozen: on the fused path the backward pass computes the
/// gradient of `x` alone (the composed path computes the weight's too and it is dropped).
pub fn linear_frozen(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    input_major: bool,
) -> Result<Tensor> {
    if fused(x) {
        kernels::linear_frozen(x, weight, bias, input_major)
    } else {
        composed::linear(x, weight, bias, input_major)
    }
}

/// A frozen `x·W (+ b)` plus a LoRA adapter `scale·(x·Aᵀ)·Bᵀ` (`A (r, in)`, `B (out, r)`).
pub fn lora_linear(
    x: &Tensor,
    (weight, bias, input_major): (&Tensor, Option<&Tensor>, bool),
    (a, b, scale): (&Tensor, &Tensor, f64),
) -> Result<Tensor> {
    if fused(x) {
        kernels::lora_linear(x, (weight, bias, input_major), (a, b, scale))
    } else {
        let y = composed::linear(x, weight, bias, input_major)?;
        let down = composed::linear(x, &kernels::sink::tap(a)?, None, false)?;
        let up = composed::linear(&down, &kernels::sink::tap(b)?, None, false)?;
        y + up.affine(scale, 0.0)?
    }
}

/// SwiGLU's gate `silu(a)·b`, elementwise.
pub fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused(a) && fused(b) {
        kernels::silu_mul(a, b)
    } else {
        composed::silu_mul(a, b)
    }
}

/// Rotary position embeddings, "rotate half" layout: `x·cos + rotate_half(x)·sin` for
/// `x (B, H, T, hd)` and tables `(B, 1, T, hd)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused(x) {
        kernels::rope(x, cos, sin)
    } else {
        composed::rope(x, cos, sin)
    }
}

/// `x·W + b` over the last dimension of `x` (`input_major`: `W` is `(in, out)`).
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    input_major: bool,
) -> Result<Tensor> {
    match bias {
        Some(b) if fused(x) => kernels::linear_bias(x, weight, b, input_major),
        None if fused(x) && on_gemm(x, weight)? => kernels::linear_no_bias(x, weight, input_major),
        // A weight with a gradient sink is tapped: candle's product returns its gradient.
        _ => composed::linear(x, &kernels::sink::tap(weight)?, bias, input_major),
    }
}

/// Whether `x·W` runs through [`kernels::gemm`] (every dimension at its threshold, on a CPU
/// that has it).
fn on_gemm(x: &Tensor, weight: &Tensor) -> Result<bool> {
    let n_in = x.dims().last().copied().unwrap_or(0);
    let rows = x.elem_count() / n_in.max(1);
    let (a, b) = weight.dims2()?;
    Ok(kernels::gemm::eligible(rows, a, b))
}

/// `softmax(scale·q·kᵀ + bias)·v`, `q (B, H, Tq, hd)`, `k`, `v (B, H, Tk, hd)` (as many key
/// heads as query heads), `bias (B, 1, Tq, Tk)`; gives `(B, H, Tq, hd)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    if fused(q) {
        kernels::attention(q, k, v, bias, scale)
    } else {
        composed::attention(q, k, v, bias, scale)
    }
}

/// Llama-family attention from its projections `q (B, T, H·hd)`, `k`, `v (B, T, KV·hd)`:
/// q's and k's heads rotated by the tables `cos`, `sin (B, 1, T, hd)`, each key/value head
/// serving `H / KV` query heads, `bias (B, 1, T, T)`; gives `(B, T, H·hd)`.
pub fn rotary_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: (usize, usize),
    rope: (&Tensor, &Tensor),
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if fused(q) {
        kernels::rotary_attention(q, k, v, heads, rope, bias, scale)
    } else {
        composed::rotary_attention(q, k, v, heads, rope, bias, scale)
    }
}

/// GPT-2 attention from its packed projection `qkv (B, T, 3·H·hd)`, giving `(B, T, H·hd)`.
pub fn packed_attention(qkv: &Tensor, n_head: usize, bias: &Tensor, scale: f64) -> Result<Tensor> {
    if fused(qkv) {
        kernels::packed_attention(qkv, n_head, bias, scale)
    } else {
        composed::packed_attention(qkv, n_head, bias, scale)
    }
}
