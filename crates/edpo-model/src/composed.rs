//! The definition of every routed operation from candle operations that candle can
//! differentiate on any device: matrix products, elementwise arithmetic, `tanh`, `exp`,
//! `sqrt`, reductions, `gather`, `narrow`, reshapes and transposes. None of candle's fused
//! kernels (`softmax_last_dim`, `rms_norm`, `layer_norm`, `rope*`, `sdpa`, flash attention)
//! appears here: they have no backward pass and would drop gradients silently.
//!
//! [`crate::ops`] runs these where the fused CPU kernels ([`crate::kernels`]) do not apply (a
//! device other than the CPU, a dtype other than f32), or everywhere when asked to; its tests
//! hold the two paths together in values and gradients. The max subtracted for numerical
//! stability is detached, which leaves softmax's gradient unchanged.

use candle_core::{Result, Tensor, D};

/// √(2/π), as GELU's tanh form uses it.
pub const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of GELU's tanh form.
pub const GELU_C: f32 = 0.044_715;

/// GELU, tanh form: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let u =
        ((x * x)?.affine(f64::from(GELU_C), 1.0)? * x)?.affine(f64::from(SQRT_2_OVER_PI), 0.0)?;
    (x * (u.tanh()? + 1.0)?)?.affine(0.5, 0.0)
}

/// LayerNorm over the last dimension (biased variance, as PyTorch).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_std = var.affine(1.0, eps)?.sqrt()?.recip()?;
    centred
        .broadcast_mul(&inv_std)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// RMSNorm over the last dimension: `w · x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = ms.affine(1.0, eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Per-row `log_softmax(logits)[target]` for `logits (N, V)`.
pub fn log_softmax_gather(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let t = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    log_softmax_last(logits)?.gather(&t, 1)?.squeeze(1)
}

/// SwiGLU's gate `silu(a)·b`, elementwise.
pub fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.silu()? * b
}

/// Rotary position embeddings, "rotate half" layout: `x·cos + rotate_half(x)·sin` for
/// `x (B, H, T, hd)` and tables `(B, 1, T, hd)`, `rotate_half(x) = [−x₂, x₁]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(3)?;
    let x1 = x.narrow(3, 0, hd / 2)?;
    let x2 = x.narrow(3, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)
}

/// `x·W + b` over the last dimension of `x`; `input_major`: `W` is `(in, out)` (GPT-2's
/// `Conv1D`), else `(out, in)` (`nn.Linear`).
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    input_major: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n_in = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((rows, n_in))?; // (N, in)
    let y = if input_major {
        x2.matmul(weight)? // (N, in)·(in, out)
    } else {
        x2.matmul(&weight.t()?)? // (N, in)·(in, out) as a transposed view
    };
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = y.dim(1)?;
    y.reshape(out_dims)
}

/// `softmax(scale·q·kᵀ + bias)·v` for `q (B, H, Tq, hd)`, `k`, `v (B, H, Tk, hd)`,
/// `bias (B, 1, Tq, Tk)`; gives `(B, H, Tq, hd)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = q
        .contiguous()?
        .matmul(&k.contiguous()?.t()?)?
        .affine(scale, 0.0)?
        .broadcast_add(bias)?;
    softmax_last(&scores)?.matmul(&v.contiguous()?)
}

/// Llama-family attention from the projections `q (B, T, H·hd)`, `k`, `v (B, T, KV·hd)`:
/// each split into heads, q and k rotated ([`rope`]), each key/value head repeated for its
/// `H / KV` query heads ([`repeat_kv`]), [`attention`], heads merged back: `(B, T, H·hd)`.
pub fn rotary_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (n_head, n_kv): (usize, usize),
    (cos, sin): (&Tensor, &Tensor),
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, width) = q.dims3()?;
    let hd = width / n_head;
    let heads = |x: &Tensor, n: usize| -> Result<Tensor> {
        x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
    };
    let q = rope(&heads(q, n_head)?, cos, sin)?;
    let k = rope(&heads(k, n_kv)?, cos, sin)?;
    let v = heads(v, n_kv)?;
    let (k, v) = if n_kv == n_head {
        (k, v)
    } else {
        (repeat_kv(&k, n_head / n_kv)?, repeat_kv(&v, n_head / n_kv)?)
    };
    attention(&q, &k, &v, bias, scale)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, width))
}

/// Repeats each key/value head `n` times: `(B, KV, T, hd) → (B, KV·n, T, hd)`.
pub fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, kv, t, hd) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n, t, hd))?
        .contiguous()?
        .reshape((b, kv * n, t, hd))
}

/// GPT-2 attention from the packed projection `qkv (B, T, 3·H·hd)`: q, k and v sliced out,
/// split into heads, [`attention`], heads merged back: `(B, T, H·hd)`.
pub fn packed_attention(qkv: &Tensor, n_head: usize, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, t, three_d) = qkv.dims3()?;
    let d = three_d / 3;
    let hd = d / n_head;
    let heads = |i: usize| -> Result<Tensor> {
        qkv.narrow(2, i * d, d)?
            .reshape((b, t, n_head, hd))?
            .transpose(1, 2)?
            .contiguous()
    };
    attention(&heads(0)?, &heads(1)?, &heads(2)?, bias, scale)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, d))
}
