//! The models' building blocks: linear maps, LayerNorm, RMSNorm, softmax, attention masks,
//! attention with grouped key/value heads, rotary embeddings and the decoding cache.
//!
//! Every operation with a gradient goes through [`crate::ops`], which runs the fused CPU
//! kernel or the composed definition; what is computed here directly (rotary embeddings,
//! head repetition, masks) is built from candle operations that have a backward pass.

use crate::Result;
use candle_core::{Device, Tensor};

/// A linear map `y = x·Wᵀ + b` (PyTorch `nn.Linear`, weight `[out, in]`) or `y = x·W + b`
/// (GPT-2's `Conv1D`, weight stored input-major `[in, out]`).
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight, in the layout the checkpoint stores it.
    pub weight: Tensor,
    /// Optional bias `[out]`.
    pub bias: Option<Tensor>,
    /// True for `Conv1D`'s `[in, out]` layout.
    pub input_major: bool,
    /// A LoRA adapter on this map, if any.
    pub lora: Option<Lora>,
    /// The weight and bias are frozen (the base of a LoRA model): no gradient is computed
    /// for them.
    pub frozen: bool,
}

/// Which modules carry adapters, and their rank and scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Module names (the last component: `q_proj`, `v_proj`, `c_attn`, …).
    pub targets: Vec<String>,
    /// rsLoRA: scale by `alpha/√r` instead of `alpha/r`.
    pub rslora: bool,
}

impl LoraConfig {
    /// The factor on the adapters' product.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// A LoRA adapter (Hu et al., 2021) as PEFT computes it: `y += scale · (x·Aᵀ)·Bᵀ` with
/// `A (r, in)`, `B (out, r)`, whatever the layout of the base weight.
#[derive(Debug, Clone)]
pub struct Lora {
    /// `lora_A`, `(r, in)`.
    pub a: Tensor,
    /// `lora_B`, `(out, r)`.
    pub b: Tensor,
    /// `alpha / r` (or `alpha / √r` with rsLoRA).
    pub scale: f64,
}

impl Linear {
    /// Applies the map to `x` of shape `(…, in)`, giving `(…, out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if self.frozen {
            crate::ops::linear_frozen(x, &self.weight, self.bias.as_ref(), self.input_major)?
        } else {
            crate::ops::linear(x, &self.weight, self.bias.as_ref(), self.input_major)?
        };
        let Some(lora) = &self.lora else {
            return Ok(y);
        };
        let down = crate::ops::linear(x, &lora.a, None, false)?;
        let up = crate::ops::linear(&down, &lora.b, None, false)?;
        Ok((y + up.affine(lora.scale, 0.0)?)?)
    }
}

/// LayerNorm with weight and bias over the last dimension (biased variance, as PyTorch).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Scale `[d]`.
    pub weight: Tensor,
    /// Shift `[d]`.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Normalises `x` of shape `(…, d)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// RMSNorm over the last dimension: `w · x / sqrt(mean(x²) + eps)` (Llama).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Scale `[d]`.
    pub weight: Tensor,
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// Normalises `x` of shape `(…, d)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(crate::ops::softmax_last(x)?)
}

/// Log-softmax over the last dimension, with max subtraction (outside the training path: the
/// training path gathers at the targets, [`crate::ops::log_softmax_gather`]).
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(crate::composed::log_softmax_last(x)?)
}

/// Additive attention bias `(B, 1, T, T)`: 0 where query `i` may attend key `j` (causal,
/// key not padding, and within `window` positions when a sliding window is set), a large
/// negative number elsewhere. A large finite number rather than −∞ keeps fully masked rows
/// (padding queries) finite.
pub fn attention_bias(
    attention_mask: &[u8],
    batch: usize,
    seq_len: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    // One branch per row: the tree rule reduces to causal + real keys + window. Positions
    // count real tokens, which for left or right padding differ from column indices by a
    // constant along the real tokens, so the window is the same either way.
    let positions = position_ids(attention_mask, batch, seq_len);
    let branch = vec![0u8; batch * seq_len];
    tree_attention_bias(
        attention_mask,
        &positions,
        &branch,
        batch,
        seq_len,
        window,
        device,
    )
}

/// Additive attention bias `(B, 1, T, T)` for rows that hold a shared prompt and branches
/// after it (see `SequenceBatch::shared_prompt_pairs`); [`attention_bias_rows`] for every query.
pub fn tree_attention_bias(
    attention_mask: &[u8],
    positions: &[u32],
    branch: &[u8],
    batch: usize,
    seq_len: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    attention_bias_rows(
        attention_mask,
        positions,
        branch,
        batch,
        seq_len,
        0,
        window,
        device,
    )
}

/// The one masking rule of every layout: additive bias `(B, 1, T − first_query, T)` for the
/// queries at columns `first_query..T` (all of them for a forward pass, the new ones when
/// decoding with a cache). Query `i` may attend key `j` when `j ≤ i`, the key is a real token,
/// the key is on branch 0 or on the query's own branch (shared-prompt rows; one branch
/// otherwise), and, with a sliding window, within `window` positions. Masked entries get a
/// large finite negative number, which keeps fully masked rows (padding queries) finite.
#[allow(clippy::too_many_arguments)]
pub fn attention_bias_rows(
    attention_mask: &[u8],
    positions: &[u32],
    branch: &[u8],
    batch: usize,
    seq_len: usize,
    first_query: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    const MASKED: f32 = -1e30;
    let queries = seq_len - first_query;
    let mut bias = vec![0f32; batch * queries * seq_len];
    for b in 0..batch {
        let base = b * seq_len;
        for i in first_query..seq_len {
            let out = (b * queries + i - first_query) * seq_len;
            let row = &mut bias[out..out + seq_len];
            let (qb, qp) = (branch[base + i], positions[base + i] as usize);
            for (j, v) in row.iter_mut().enumerate() {
                let kb = branch[base + j];
                let outside_window = window.is_some_and(|w| qp >= positions[base + j] as usize + w);
                if j > i || attention_mask[base + j] == 0 || (kb != 0 && kb != qb) || outside_window
                {
                    *v = MASKED;
                }
            }
        }
    }
    Ok(Tensor::from_vec(
        bias,
        (batch, 1, queries, seq_len),
        device,
    )?)
}

/// Keys and values of the positions one layer has already seen, `(B, KV, T_past, hd)` each,
/// for incremental decoding. Nothing here is differentiated: decoding is inference only, so the
/// stored tensors are detached. Without that, a trainable model's keys and values carried their
/// autograd history, and every decoding step kept the previous steps' activations alive
/// (memory grew by gigabytes over a SmolLM2 evaluation and was killed at 24 GiB).
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl LayerKv {
    /// Appends the new positions' keys and values and returns all of them.
    pub fn extend(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match (self.k.take(), self.v.take()) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            _ => (k, v),
        };
        let (k, v) = (k.detach(), v.detach());
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        Ok((k, v))
    }

    /// Keeps only the given batch rows, in that order.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        if let Some(k) = &self.k {
            self.k = Some(k.index_select(rows, 0)?);
        }
        if let Some(v) = &self.v {
            self.v = Some(v.index_select(rows, 0)?);
        }
        Ok(())
    }
}

/// Position of each token: the count of real tokens before it, so left padding does not
/// shift positions and right padding does not matter.
pub fn position_ids(attention_mask: &[u8], batch: usize, seq_len: usize) -> Vec<u32> {
    let mut pos = vec![0u32; batch * seq_len];
    for b in 0..batch {
        let mut cumsum = 0u32;
        for t in 0..seq_len {
            cumsum += u32::from(attention_mask[b * seq_len + t] != 0);
            pos[b * seq_len + t] = cumsum.saturating_sub(1);
        }
    }
    pos
}

/// Scaled dot-product attention from differentiable ops.
/// `q: (B, H, T, hd)`, `k, v: (B, KV, T, hd)` with `H` a multiple of `KV` (grouped-query
/// attention), `bias: (B, 1, T, T)`. Returns `(B, T, H·hd)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let kv = k.dim(1)?;
    let (k, v) = if kv == h {
        (k.clone(), v.clone())
    } else {
        (repeat_kv(k, h / kv)?, repeat_kv(v, h / kv)?)
    };
    let scale = 1.0 / (hd as f64).sqrt();
    let out = crate::ops::attention(q, &k, &v, bias, scale)?; // (B, H, T, hd)
    Ok(out.transpose(1, 2)?.contiguous()?.reshape((b, t, h * hd))?)
}

/// Repeats each key/value head `n` times: `(B, KV, T, hd) → (B, KV·n, T, hd)`.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, kv, t, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kv, n, t, hd))?
        .contiguous()?
        .reshape((b, kv * n, t, hd))?)
}

/// Rotary position embeddings in the Hugging Face "rotate half" layout: the first and second
/// halves of each head are the two coordinates of each rotated pair.
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Vec<f32>,
}

impl Rotary {
    /// Frequencies `θ^(−2i/d)` for a head width `head_dim`, computed in f32 as `transformers` does.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self { inv_freq }
    }

    /// `cos` and `sin` tables `(B, 1, T, hd)` for the given positions (`B·T` values).
    pub fn tables(
        &self,
        positions: &[u32],
        batch: usize,
        seq_len: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let hd = 2 * half;
        let mut cos = vec![0f32; batch * seq_len * hd];
        let mut sin = vec![0f32; batch * seq_len * hd];
        for (n, &p) in positions.iter().enumerate() {
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let angle = p as f32 * f;
                let (s, c) = angle.sin_cos();
                cos[n * hd + i] = c;
                cos[n * hd + half + i] = c;
                sin[n * hd + i] = s;
                sin[n * hd + half + i] = s;
            }
        }
        let shape = (batch, 1, seq_len, hd);
        Ok((
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        ))
    }

    /// Rotates `x: (B, H, T, hd)`: `x·cos + rotate_half(x)·sin`.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let hd = x.dim(3)?;
        let x1 = x.narrow(3, 0, hd / 2)?;
        let x2 = x.narrow(3, hd / 2, hd / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
        Ok(x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_skip_left_padding() {
        let mask = [0, 0, 1, 1, 1, 1, 1, 0];
        assert_eq!(position_ids(&mask, 2, 4), vec![0, 0, 0, 1, 0, 1, 2, 2]);
    }

    #[test]
    fn log_softmax_matches_direct_formula() -> Result<()> {
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0], [1000.0, 0.0, -1000.0]], &Device::Cpu)?;
        let y = log_softmax_last(&x)?.to_vec2::<f32>()?;
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((y[0][0] as f64 - (1.0 - lse)).abs() < 1e-6);
        assert_eq!(y[1][0], 0.0);
        assert!(y[1][1].is_finite() && y[1][1] == -1000.0);
        Ok(())
    }
}
