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
        if let (Some(lora), true) = (&self.lora, self.frozen) {
            // LoRA's usual case: the base frozen, base and adapter one node.
            return Ok(crate::ops::lora_linear(
                x,
                (&self.weight, self.bias.as_ref(), self.input_major),
                (&lora.a, &lora.b, lora.scale),
            )?);
        }
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

/// Keys and values of the positions one layer has already seen, for incremental decoding:
/// `(B, KV, capacity, hd)` buffers, filled to `len` positions and grown by doubling, so that a
/// decoding step writes its new positions in place instead of concatenating the whole past
/// again. Nothing here is differentiated: decoding is inference only, so the buffers hold
/// plain values. (Before they were plain buffers, the stored tensors kept their autograd
/// history, and every decoding step kept the previous steps' activations alive: memory grew
/// by gigabytes over a SmolLM2 evaluation and was killed at 24 GiB.)
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
    rows: usize,
    heads: usize,
    head_dim: usize,
    len: usize,
    capacity: usize,
}

impl LayerKv {
    /// Appends the new positions' keys and values `(B, KV, T_new, hd)` and returns all of
    /// them, `(B, KV, T, hd)` in the inputs' dtype and device.
    pub fn extend(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        self.append(&k, &v)?;
        let shape = (self.rows, self.heads, self.len, self.head_dim);
        let all = |buf: &[f32], like: &Tensor| -> Result<Tensor> {
            let mut out = Vec::with_capacity(self.rows * self.heads * self.len * self.head_dim);
            for row_head in 0..self.rows * self.heads {
                let start = row_head * self.capacity * self.head_dim;
                out.extend_from_slice(&buf[start..start + self.len * self.head_dim]);
            }
            Ok(Tensor::from_vec(out, shape, like.device())?.to_dtype(like.dtype())?)
        };
        Ok((all(&self.k, &k)?, all(&self.v, &v)?))
    }

    /// Positions stored so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes the new positions' keys and values `(B, KV, T_new, hd)` after the stored ones.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (b, kv, t, hd) = k.dims4()?;
        if v.dims4()? != (b, kv, t, hd) {
            return Err(crate::Error::Input(format!(
                "decoding cache: keys {:?} and values {:?} differ in shape",
                k.dims(),
                v.dims()
            )));
        }
        if self.len == 0 {
            (self.rows, self.heads, self.head_dim) = (b, kv, hd);
        } else if (b, kv, hd) != (self.rows, self.heads, self.head_dim) {
            return Err(crate::Error::Input(format!(
                "decoding cache: {b} rows × {kv} heads × {hd} added to a cache of {} × {} × {}",
                self.rows, self.heads, self.head_dim
            )));
        }
        if self.len + t > self.capacity {
            self.grow((self.len + t).max(2 * self.capacity));
        }
        let plain = |x: &Tensor| -> Result<Vec<f32>> {
            Ok(x.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let (new_k, new_v) = (plain(k)?, plain(v)?);
        for row_head in 0..b * kv {
            let at = (row_head * self.capacity + self.len) * hd;
            let from = row_head * t * hd;
            self.k[at..at + t * hd].copy_from_slice(&new_k[from..from + t * hd]);
            self.v[at..at + t * hd].copy_from_slice(&new_v[from..from + t * hd]);
        }
        self.len += t;
        Ok(())
    }

    /// Room for `capacity` positions per row and head, the stored ones kept.
    fn grow(&mut self, capacity: usize) {
        let hd = self.head_dim;
        let regrown = |old: &[f32]| -> Vec<f32> {
            let mut buf = vec![0f32; self.rows * self.heads * capacity * hd];
            for row_head in 0..self.rows * self.heads {
                let (from, to) = (row_head * self.capacity * hd, row_head * capacity * hd);
                buf[to..to + self.len * hd].copy_from_slice(&old[from..from + self.len * hd]);
            }
            buf
        };
        (self.k, self.v) = (regrown(&self.k), regrown(&self.v));
        self.capacity = capacity;
    }

    /// Keeps only the given batch rows, in that order.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.rows) {
            return Err(crate::Error::Input(format!(
                "row {bad} is not in a decoding cache of {} rows",
                self.rows
            )));
        }
        let per_row = self.heads * self.capacity * self.head_dim;
        let kept = |old: &[f32]| -> Vec<f32> {
            let mut buf = Vec::with_capacity(rows.len() * per_row);
            for &r in rows {
                buf.extend_from_slice(&old[r * per_row..(r + 1) * per_row]);
            }
            buf
        };
        (self.k, self.v) = (kept(&self.k), kept(&self.v));
        self.rows = rows.len();
        Ok(())
    }

    /// A decoding step's attention read from the buffers in place: the queries `q (B, H, T, hd)`
    /// against every stored position, `bias (B, 1, T, len)`; returns `(B, T, H·hd)`
    /// ([`crate::kernels::attention::decode_attention`]).
    fn attend(&self, q: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, h, t, hd) = q.dims4()?;
        if bias.dims4()? != (b, 1, t, self.len) || (b, hd) != (self.rows, self.head_dim) {
            return Err(crate::Error::Input(format!(
                "decoding attention: queries {:?} and mask {:?} against a cache of {} rows × {} positions × {}",
                q.dims(),
                bias.dims(),
                self.rows,
                self.len,
                self.head_dim
            )));
        }
        let dims = crate::kernels::attention::DecodeDims {
            batch: b,
            heads: h,
            kv_heads: self.heads,
            queries: t,
            len: self.len,
            capacity: self.capacity,
            head_dim: hd,
        };
        let q = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let bias = bias.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let out = crate::kernels::attention::decode_attention(
            &q,
            (&self.k, &self.v),
            &bias,
            dims,
            scale,
        )?;
        Ok(Tensor::from_vec(out, (b, t, h * hd), &Device::Cpu)?)
    }
}

/// Attention of the new positions `q (B, H, T, hd)` over everything `cache` has seen once
/// their keys and values `k`, `v (B, KV, T, hd)` are added to it; returns `(B, T, H·hd)`. A
/// decoding step (`T = 1`) of a model at least [`crate::kernels::gemm::MIN_DIM`] wide (the
/// models whose products the large-matrix kernel runs) reads the cache in place
/// ([`crate::kernels::attention::decode_attention`], grouped key/value heads without
/// repeating them); everything else (prompts, and the default task's narrow models, whose
/// numbers stay those of the training attention) goes through [`attention`] on copies.
pub fn cached_attention(
    cache: &mut LayerKv,
    q: &Tensor,
    k: Tensor,
    v: Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    let (_, h, t, hd) = q.dims4()?;
    if t == 1 && crate::ops::fused(q) && h * hd >= crate::kernels::gemm::MIN_DIM {
        cache.append(&k, &v)?;
        return cache.attend(q, bias);
    }
    let (k, v) = cache.extend(k, v)?;
    attention(q, &k, &v, bias)
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
        (
            crate::composed::repeat_kv(k, h / kv)?,
            crate::composed::repeat_kv(v, h / kv)?,
        )
    };
    let scale = 1.0 / (hd as f64).sqrt();
    let out = crate::ops::attention(q, &k, &v, bias, scale)?; // (B, H, T, hd)
    Ok(out.transpose(1, 2)?.contiguous()?.reshape((b, t, h * hd))?)
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
        Ok(crate::ops::rope(x, cos, sin)?)
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

    /// The cache's in-place decoding attention (grouped heads read without repeating them,
    /// buffers grown past their first capacity, rows dropped on the way) against the training
    /// attention on the materialised, repeated keys and values.
    #[test]
    fn in_place_decoding_attention_equals_the_training_attention() -> Result<()> {
        let (b, h, kv, hd) = (3, 6, 2, 64);
        let dev = Device::Cpu;
        let value = |seed: usize, shape: (usize, usize, usize, usize)| -> Result<Tensor> {
            let n = shape.0 * shape.1 * shape.2 * shape.3;
            let v: Vec<f32> = (0..n)
                .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32) / 1001.0 - 1.0)
                .collect();
            Ok(Tensor::from_vec(v, shape, &dev)?)
        };
        let mut cache = LayerKv::default();
        let mut rows: Vec<usize> = (0..b).collect();
        // A prompt of 5 positions, then single steps past the first capacity (5, then 10).
        cache.extend(value(1, (b, kv, 5, hd))?, value(2, (b, kv, 5, hd))?)?;
        for step in 0..9 {
            if step == 4 {
                // The middle row finished: drop it.
                rows = vec![0, 2];
                cache.select_rows(&[0, 2])?;
            }
            let n = rows.len();
            let (k, v) = (
                value(10 + step, (n, kv, 1, hd))?,
                value(30 + step, (n, kv, 1, hd))?,
            );
            let q = value(50 + step, (n, h, 1, hd))?;
            let len = cache.len() + 1;
            // Row r masks its first r positions (left padding).
            let mask: Vec<u8> = (0..n)
                .flat_map(|r| (0..len).map(move |j| u8::from(j >= r)))
                .collect();
            let bias = Tensor::from_vec(
                mask.iter()
                    .map(|&m| if m == 1 { 0f32 } else { -1e30 })
                    .collect(),
                (n, 1, 1, len),
                &dev,
            )?;
            let mut reference = cache.clone();
            let got = cached_attention(&mut cache, &q, k.clone(), v.clone(), &bias)?;
            let (all_k, all_v) = reference.extend(k, v)?;
            let want = attention(&q, &all_k, &all_v, &bias)?;
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "step {step}: {diff}");
        }
        Ok(())
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
