//! Fused CPU kernels with explicit backward passes, for the operations that dominate a training
//! step outside the matrix products: GELU, LayerNorm, RMSNorm, softmax, and the log-softmax
//! over the vocabulary gathered at the target token.
//!
//! Each is a candle custom op whose forward is one pass over memory and whose backward is one
//! more, instead of a chain of elementwise tensors each allocated, written and read back. The
//! composed versions in [`crate::nn`] define what each kernel computes and the tests below hold
//! the two together; the golden tests against PyTorch run through these kernels.
//!
//! Work is split across rows with rayon when candle runs with more than one thread.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

fn slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{what}: f32 only");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what}: input must be contiguous"),
    }
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor in place, without copying them
/// (`f` must not write to the tensor).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => Ok(f(slice(cpu, layout, "tensor")?)),
        _ => bail!("a CPU tensor expected"),
    }
}

/// Whether kernels may split work across threads: candle runs with more than one.
pub fn parallel() -> bool {
    candle_core::utils::get_num_threads() > 1
}

/// Applies `f(row_in, row_out)` to every row of width `width`, in parallel when allowed.
fn rows_map(
    input: &[f32],
    out: &mut [f32],
    width: usize,
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync,
) {
    if parallel() && input.len() >= 1 << 15 {
        out.par_chunks_mut(width)
            .zip(input.par_chunks(width))
            .enumerate()
            .for_each(|(i, (o, x))| f(i, x, o));
    } else {
        for (i, (o, x)) in out.chunks_mut(width).zip(input.chunks(width)).enumerate() {
            f(i, x, o);
        }
    }
}

/// Lanes of the reductions below: eight independent partial results, so the loops vectorise
/// (a single running f32 sum is a serial dependency the compiler must keep in order).
const LANES: usize = 8;

/// `Σ f(x_i)` over a row, accumulated in [`LANES`] partial sums.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += f(c[k]);
        }
    }
    let mut total = acc.iter().sum::<f32>();
    for &v in tail {
        total += f(v);
    }
    total
}

/// `Σ a_i·b_i`, accumulated in [`LANES`] partial sums.
#[inline(always)]
fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let full = n - n % LANES;
    for (ca, cb) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
    {
        for k in 0..LANES {
            acc[k] += ca[k] * cb[k];
        }
    }
    let mut total = acc.iter().sum::<f32>();
    for (x, y) in a[full..].iter().zip(&b[full..]) {
        total += x * y;
    }
    total
}

/// The largest element of a row (−∞ for an empty one).
#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    acc.iter()
        .chain(tail)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Softmax of a row in place: `x ← exp(x − max) / Σ exp(x − max)`.
#[inline(always)]
fn softmax_in_place(row: &mut [f32]) {
    let max = lane_max(row);
    row.iter_mut().for_each(|x| *x = exp(*x - max));
    let inv = 1.0 / lane_sum(row, |v| v);
    row.iter_mut().for_each(|x| *x *= inv);
}

/// `eˣ` in f32 without a library call, so loops over it vectorise: `x = n·ln2 + r` with
/// `|r| ≤ ln2/2`, a degree-6 Taylor polynomial for `eʳ` (truncation error below 2e-7 relative),
/// and `2ⁿ` built from its bits. Inputs below −87 give 0 (as `expf` underflows there).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to an integer
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // The integer n sits in the low bits of t: reading it from the bits avoids a float-to-int
    // conversion, which Rust saturates and the compiler then splits into scalar code.
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    let y = p * scale;
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

/// `tanh(u) = 1 − 2/(e^{2u} + 1)`, with the absolute error of f32 (about 1e-7) near 0, which is
/// what GELU needs.
#[inline(always)]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u) + 1.0)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// GELU, tanh approximation (`gelu_new` / `gelu_pytorch_tanh`):
/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "edpo-gelu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, "gelu")?;
        let mut y = vec![0f32; x.len()];
        rows_map(x, &mut y, 4096.min(x.len().max(1)), |_, x, y| {
            for (o, &v) in y.iter_mut().zip(x) {
                let u = SQRT_2_OVER_PI * (v + GELU_C * v * v * v);
                *o = 0.5 * v * (1.0 + tanh(u));
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad_res.contiguous()?, &GeluGrad)?,
        ))
    }
}

/// `dx = dy · d/dx gelu(x)`, the exact derivative of the tanh form.
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "edpo-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "gelu grad")?;
        let dy = slice(s2, l2, "gelu grad")?;
        let mut dx = vec![0f32; x.len()];
        let chunk = 4096.min(x.len().max(1));
        let f = |i: usize, dy: &[f32], dx: &mut [f32]| {
            let x = &x[i * chunk..i * chunk + dx.len()];
            for ((o, &g), &v) in dx.iter_mut().zip(dy).zip(x) {
                let u = SQRT_2_OVER_PI * (v + GELU_C * v * v * v);
                let t = tanh(u);
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * v * v);
                *o = g * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du);
            }
        };
        rows_map(dy, &mut dx, chunk, f);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// GELU (tanh form) with a fused backward.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

/// Softmax over the last dimension.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "edpo-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, "softmax")?;
        let width = layout.dims().last().copied().unwrap_or(1);
        let mut y = vec![0f32; x.len()];
        rows_map(x, &mut y, width, |_, x, y| {
            y.copy_from_slice(x);
            softmax_in_place(y);
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            res.contiguous()?
                .apply_op2_no_bwd(&grad_res.contiguous()?, &SoftmaxGrad)?,
        ))
    }
}

/// `dx = y ⊙ (dy − Σ dy·y)` per row.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "edpo-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = slice(s1, l1, "softmax grad")?;
        let dy = slice(s2, l2, "softmax grad")?;
        let width = l1.dims().last().copied().unwrap_or(1);
        let mut dx = vec![0f32; y.len()];
        rows_map(dy, &mut dx, width, |i, dy, dx| {
            let y = &y[i * width..(i + 1) * width];
            let dot = lane_dot(dy, y);
            for ((o, &g), &p) in dx.iter_mut().zip(dy).zip(y) {
                *o = p * (g - dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Softmax over the last dimension with a fused backward.
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

/// `log_softmax(z)[target]` for each row of `z (N, V)`: one pass for the log-sum-exp, no
/// `(N, V)` output. The backward is `g·(onehot(target) − softmax(z))`.
struct LogSoftmaxGather {
    targets: Arc<Vec<u32>>,
    /// Each row's log-sum-exp, written by the forward pass for the backward pass.
    lse: std::sync::Mutex<Option<Arc<Vec<f32>>>>,
}

fn row_lse(z: &[f32]) -> f32 {
    let max = lane_max(z);
    let sum = lane_sum(z, |v| exp(v - max));
    max + sum.ln()
}

impl CustomOp1 for LogSoftmaxGather {
    fn name(&self) -> &'static str {
        "edpo-log-softmax-gather"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let z = slice(storage, layout, "log-softmax gather")?;
        let (n, v) = layout.shape().dims2()?;
        if self.targets.len() != n {
            bail!(
                "log-softmax gather: {} targets for {n} rows",
                self.targets.len()
            );
        }
        if let Some(t) = self.targets.iter().find(|&&t| t as usize >= v) {
            bail!("log-softmax gather: target {t} outside the vocabulary of {v}");
        }
        let lse = |i: usize| row_lse(&z[i * v..(i + 1) * v]);
        let lses: Vec<f32> = if parallel() && n * v >= 1 << 15 {
            (0..n).into_par_iter().map(lse).collect()
        } else {
            (0..n).map(lse).collect()
        };
        let out: Vec<f32> = (0..n)
            .map(|i| z[i * v + self.targets[i] as usize] - lses[i])
            .collect();
        if let Ok(mut slot) = self.lse.lock() {
            *slot = Some(Arc::new(lses));
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let op = LogSoftmaxGatherGrad {
            targets: self.targets.clone(),
            lse: self.lse.lock().ok().and_then(|s| s.clone()),
        };
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad_res.contiguous()?, &op)?,
        ))
    }
}

struct LogSoftmaxGatherGrad {
    targets: Arc<Vec<u32>>,
    /// The forward pass's log-sum-exp per row (recomputed when absent).
    lse: Option<Arc<Vec<f32>>>,
}

impl CustomOp2 for LogSoftmaxGatherGrad {
    fn name(&self) -> &'static str {
        "edpo-log-softmax-gather-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let z = slice(s1, l1, "log-softmax gather grad")?;
        let g = slice(s2, l2, "log-softmax gather grad")?;
        let (_, v) = l1.shape().dims2()?;
        let mut dz = vec![0f32; z.len()];
        rows_map(z, &mut dz, v, |i, z, dz| {
            let lse = match &self.lse {
                Some(l) => l[i],
                None => row_lse(z),
            };
            let gi = g[i];
            for (o, &x) in dz.iter_mut().zip(z) {
                *o = -gi * exp(x - lse);
            }
            dz[self.targets[i] as usize] += gi;
        });
        Ok((CpuStorage::F32(dz), l1.shape().clone()))
    }
}

/// Per-row `log_softmax(logits)[targets]` for `logits (N, V)`, differentiable.
pub fn log_softmax_gather(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    logits.contiguous()?.apply_op1(LogSoftmaxGather {
        targets: Arc::new(targets.to_vec()),
        lse: std::sync::Mutex::new(None),
    })
}

/// LayerNorm (`rms = false`, weight and bias) or RMSNorm (`rms = true`, weight only, the bias
/// argument ignored) over the last dimension.
struct Norm {
    eps: f32,
    rms: bool,
}

/// Per-row statistics: mean (0 for RMSNorm) and 1/σ.
fn norm_stats(x: &[f32], eps: f32, rms: bool) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = if rms { 0.0 } else { lane_sum(x, |v| v) / n };
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "edpo-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "norm")?;
        let w = slice(s2, l2, "norm weight")?;
        let b = slice(s3, l3, "norm bias")?;
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        rows_map(x, &mut y, d, |_, x, y| {
            let (mean, inv) = norm_stats(x, self.eps, self.rms);
            for (k, o) in y.iter_mut().enumerate() {
                let xhat = (x[k] - mean) * inv;
                *o = if self.rms {
                    xhat * w[k]
                } else {
                    xhat * w[k] + b[k]
                };
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let ws = w.flatten_all()?.to_vec1::<f32>()?;
        let (xt, gt) = (x.contiguous()?, dy.contiguous()?);
        let mut dx = vec![0f32; x.elem_count()];
        let mut dw = vec![0f64; d];
        let mut db = vec![0f64; d];
        let mut xhat = vec![0f32; d];
        with_f32(&xt, |xs| {
            with_f32(&gt, |gs| {
                for ((x, g), o) in xs.chunks(d).zip(gs.chunks(d)).zip(dx.chunks_mut(d)) {
                    let (mean, inv) = norm_stats(x, self.eps, self.rms);
                    let mut sum_gw = 0f32;
                    let mut sum_gwx = 0f32;
                    for k in 0..d {
                        xhat[k] = (x[k] - mean) * inv;
                        let gw = g[k] * ws[k];
                        sum_gw += gw;
                        sum_gwx += gw * xhat[k];
                        dw[k] += f64::from(g[k] * xhat[k]);
                        db[k] += f64::from(g[k]);
                    }
                    let n = d as f32;
                    for k in 0..d {
                        let gw = g[k] * ws[k];
                        o[k] = if self.rms {
                            inv * (gw - xhat[k] * sum_gwx / n)
                        } else {
                            inv * (gw - sum_gw / n - xhat[k] * sum_gwx / n)
                        };
                    }
                }
            })
        })??;
        let dev = x.device();
        let dx = Tensor::from_vec(dx, x.shape(), dev)?;
        let dw = Tensor::from_vec(
            dw.into_iter().map(|v| v as f32).collect::<Vec<_>>(),
            w.shape(),
            dev,
        )?;
        let db = if self.rms {
            None
        } else {
            Some(Tensor::from_vec(
                db.into_iter().map(|v| v as f32).collect::<Vec<_>>(),
                w.shape(),
                dev,
            )?)
        };
        Ok((Some(dx), Some(dw), db))
    }
}

/// LayerNorm over the last dimension with a fused backward.
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(
        weight,
        bias,
        Norm {
            eps: eps as f32,
            rms: false,
        },
    )
}

/// RMSNorm over the last dimension with a fused backward.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(
        weight,
        weight,
        Norm {
            eps: eps as f32,
            rms: true,
        },
    )
}

/// `x·W + b` over the last dimension of `x`, as one node of the autograd graph: the product
/// runs through candle's matrix multiply, the bias is added in place on its output, and the
/// backward pass computes `∂x = g·Wᵀ`, `∂W = xᵀ·g` and `∂b = Σ_rows g` directly, where the
/// composed version (a product, a broadcast and an addition) would have its gradient passed
/// through zero-filled buffers, a broadcast and a strided reduction.
struct LinearBias {
    /// `W` is stored `(in, out)` (GPT-2's `Conv1D`); otherwise `(out, in)` (`nn.Linear`).
    input_major: bool,
}

impl LinearBias {
    fn dims(&self, x: &Layout, w: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (&n_in, lead) = match x.dims().split_last() {
            Some(v) => v,
            None => bail!("linear: x must have at least one dimension"),
        };
        let (wi, wo) = match *w.dims() {
            [a, b] if self.input_major => (a, b),
            [a, b] => (b, a),
            _ => bail!("linear: the weight must be a matrix"),
        };
        if wi != n_in {
            bail!("linear: input width {n_in} against weight {:?}", w.dims());
        }
        Ok((lead.iter().product(), n_in, wo))
    }
}

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "edpo-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (rows, n_in, n_out) = self.dims(l1, l2)?;
        let b = slice(s3, l3, "linear bias")?;
        if b.len() != n_out || !l1.is_contiguous() || !l2.is_contiguous() {
            bail!("linear: contiguous x and weight, and a bias of width {n_out}, expected");
        }
        let x_layout = Layout::contiguous_with_offset((rows, n_in), l1.start_offset());
        let w_layout = if self.input_major {
            Layout::contiguous_with_offset((n_in, n_out), l2.start_offset())
        } else {
            Layout::contiguous_with_offset((n_out, n_in), l2.start_offset()).transpose(0, 1)?
        };
        let mut y = s1.matmul(s2, (1, rows, n_out, n_in), &x_layout, &w_layout)?;
        let CpuStorage::F32(out) = &mut y else {
            bail!("linear: f32 only");
        };
        for row in out.chunks_mut(n_out) {
            for (o, &bk) in row.iter_mut().zip(b) {
                *o += bk;
            }
        }
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n_out;
        }
        Ok((y, Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, n_in, n_out) = self.dims(x.layout(), w.layout())?;
        let g = grad.detach().contiguous()?.reshape((rows, n_out))?;
        let x2 = x.detach().reshape((rows, n_in))?;
        let w = w.detach();
        let (dx, dw) = if self.input_major {
            (g.matmul(&w.t()?)?, x2.t()?.matmul(&g)?)
        } else {
            (g.matmul(&w)?, g.t()?.matmul(&x2)?)
        };
        let mut db = vec![0f64; n_out];
        with_f32(&g, |gs| {
            for row in gs.chunks(n_out) {
                for (acc, &v) in db.iter_mut().zip(row) {
                    *acc += f64::from(v);
                }
            }
        })?;
        let db: Vec<f32> = db.into_iter().map(|v| v as f32).collect();
        Ok((
            Some(dx.reshape(x.shape())?),
            Some(dw),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// `x·W + b` with a fused bias and backward (see [`LinearBias`]); `input_major`: `W` is
/// `(in, out)`, else `(out, in)`.
pub fn linear_bias(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    input_major: bool,
) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, bias, LinearBias { input_major })
}

/// Scaled dot-product attention for one set of heads as one node of the autograd graph:
/// `softmax(scale·q·kᵀ + bias)·v` for `q (B, H, Tq, hd)`, `k`, `v (B, H, Tk, hd)` and an
/// additive mask `bias (B, 1, Tq, Tk)`. The scaling, the mask and the softmax are one pass over
/// the scores, and the probabilities are kept for the backward pass, which computes
/// `∂v = Pᵀ·g`, `∂P = g·vᵀ`, `∂S = scale·P ⊙ (∂P − Σ ∂P·P)`, `∂q = ∂S·k`, `∂k = ∂Sᵀ·q`
/// without the chain of scaled, masked and broadcast intermediates (and their zero-filled
/// gradient buffers) that the composed version records.
struct Attention {
    bias: Vec<f32>,
    scale: f32,
    /// `P (B·H, Tq, Tk)`, written by the forward pass for the backward pass.
    probs: std::sync::Mutex<Option<Tensor>>,
}

impl Attention {
    /// The forward pass on head-major `q (B·H, Tq, hd)`, `k`, `v (B·H, Tk, hd)` given as
    /// storages with start offsets; returns `(B·H, Tq, hd)` and keeps the probabilities.
    #[allow(clippy::too_many_arguments)]
    fn forward_heads(
        &self,
        (q, q_off): (&CpuStorage, usize),
        (k, k_off): (&CpuStorage, usize),
        (v, v_off): (&CpuStorage, usize),
        (b, h, tq, tk, hd): (usize, usize, usize, usize, usize),
    ) -> candle_core::Result<CpuStorage> {
        use candle_core::backend::BackendStorage;
        if self.bias.len() != b * tq * tk {
            bail!("attention: a mask of {} for {b}×{tq}×{tk}", self.bias.len());
        }
        let bh = b * h;
        let q_layout = Layout::contiguous_with_offset((bh, tq, hd), q_off);
        let kt_layout = Layout::contiguous_with_offset((bh, tk, hd), k_off).transpose(1, 2)?;
        let mut scores = q.matmul(k, (bh, tq, tk, hd), &q_layout, &kt_layout)?;
        let CpuStorage::F32(z) = &mut scores else {
            bail!("attention: f32 only");
        };
        let scale = self.scale;
        let rows = |i: usize, row: &mut [f32]| {
            // Row i is query (i % tq) of head-batch (i / tq); the mask is shared by heads.
            let (n, t) = (i / tq / h, i % tq);
            let mask = &self.bias[(n * tq + t) * tk..(n * tq + t + 1) * tk];
            for (x, &m) in row.iter_mut().zip(mask) {
                *x = *x * scale + m;
            }
            softmax_in_place(row);
        };
        if parallel() && z.len() >= 1 << 15 {
            z.par_chunks_mut(tk)
                .enumerate()
                .for_each(|(i, r)| rows(i, r));
        } else {
            z.chunks_mut(tk).enumerate().for_each(|(i, r)| rows(i, r));
        }
        let p_layout = Layout::contiguous((bh, tq, tk));
        let v_layout = Layout::contiguous_with_offset((bh, tk, hd), v_off);
        let out = scores.matmul(v, (bh, tq, hd, tk), &p_layout, &v_layout)?;
        let CpuStorage::F32(z) = scores else {
            bail!("attention: f32 only");
        };
        let probs = Tensor::from_vec(z, (bh, tq, tk), &candle_core::Device::Cpu)?;
        if let Ok(mut slot) = self.probs.lock() {
            *slot = Some(probs);
        }
        Ok(out)
    }

    /// The backward pass on head-major `q (B·H, Tq, hd)`, `k`, `v (B·H, Tk, hd)` and
    /// `g (B·H, Tq, hd)`: `(∂q, ∂k, ∂v)` in the same layout.
    fn backward_heads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let p = match self.probs.lock().ok().and_then(|s| s.clone()) {
            Some(p) => p,
            None => bail!("attention: backward before forward"),
        };
        let (bh, tq, tk) = p.dims3()?;
        let dv = p.t()?.matmul(g)?;
        let dp = g.matmul(&v.t()?)?;
        let mut ds = vec![0f32; p.elem_count()];
        let scale = self.scale;
        with_f32(&p, |pv| {
            with_f32(&dp, |dp| {
                rows_map(dp, &mut ds, tk, |i, dp, ds| {
                    let p = &pv[i * tk..(i + 1) * tk];
                    let dot = lane_dot(dp, p);
                    for ((o, &g), &y) in ds.iter_mut().zip(dp).zip(p) {
                        *o = scale * (y * (g - dot));
                    }
                })
            })
        })??;
        let ds = Tensor::from_vec(ds, (bh, tq, tk), q.device())?;
        let dq = ds.matmul(k)?;
        let dk = ds.t()?.matmul(q)?;
        Ok((dq, dk, dv))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "edpo-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, tq, hd) = l1.shape().dims4()?;
        let tk = l2.dim(2)?;
        if l2.dims() != [b, h, tk, hd] || l3.dims() != [b, h, tk, hd] {
            bail!(
                "attention: q {:?}, k {:?}, v {:?} do not agree",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        if !(l1.is_contiguous() && l2.is_contiguous() && l3.is_contiguous()) {
            bail!("attention: contiguous q, k and v expected");
        }
        let out = self.forward_heads(
            (s1, l1.start_offset()),
            (s2, l2.start_offset()),
            (s3, l3.start_offset()),
            (b, h, tq, tk, hd),
        )?;
        Ok((out, Shape::from((b, h, tq, hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, tq, hd) = q.dims4()?;
        let tk = k.dim(2)?;
        let bh = b * h;
        let g = grad.detach().contiguous()?.reshape((bh, tq, hd))?;
        let (dq, dk, dv) = self.backward_heads(
            &q.detach().reshape((bh, tq, hd))?,
            &k.detach().reshape((bh, tk, hd))?,
            &v.detach().reshape((bh, tk, hd))?,
            &g,
        )?;
        Ok((
            Some(dq.reshape((b, h, tq, hd))?),
            Some(dk.reshape((b, h, tk, hd))?),
            Some(dv.reshape((b, h, tk, hd))?),
        ))
    }
}

/// Copies part `which` of a packed `(B, T, parts·H·hd)` row layout (for the projection: 0 q,
/// 1 k, 2 v of 3 parts) into a head-major `(B·H, T, hd)` buffer.
fn unpack_heads(
    x: &[f32],
    (which, parts): (usize, usize),
    (b, t, h, hd): (usize, usize, usize, usize),
) -> Vec<f32> {
    let d = h * hd;
    let mut out = vec![0f32; b * h * t * hd];
    for n in 0..b {
        for s in 0..t {
            let row = &x[(n * t + s) * parts * d + which * d..][..d];
            for (head, src) in row.chunks_exact(hd).enumerate() {
                out[((n * h + head) * t + s) * hd..][..hd].copy_from_slice(src);
            }
        }
    }
    out
}

/// Writes a head-major `(B·H, T, hd)` buffer into part `which` of a packed `(B, T, w·H·hd)`
/// row layout (`w` parts per row).
fn pack_heads(
    src: &[f32],
    out: &mut [f32],
    (which, parts): (usize, usize),
    (b, t, h, hd): (usize, usize, usize, usize),
) {
    let d = h * hd;
    for n in 0..b {
        for s in 0..t {
            let row = &mut out[(n * t + s) * parts * d + which * d..][..d];
            for (head, dst) in row.chunks_exact_mut(hd).enumerate() {
                dst.copy_from_slice(&src[((n * h + head) * t + s) * hd..][..hd]);
            }
        }
    }
}

/// GPT-2's attention straight from its packed projection: `qkv (B, T, 3·H·hd)` in, the heads'
/// outputs side by side `(B, T, H·hd)` out, as one autograd node. The split into heads and the
/// merge back are copies inside the node, so neither the three slices, reshapes, transposes
/// and copies of the composed version nor their gradient buffers appear in the graph.
struct PackedAttention {
    core: Attention,
    n_head: usize,
    /// Head-major q, k, v of the forward pass, for the backward pass.
    heads: std::sync::Mutex<Option<[Tensor; 3]>>,
}

impl PackedAttention {
    fn dims(&self, layout: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, t, w) = layout.shape().dims3()?;
        let h = self.n_head;
        if h == 0 || w % (3 * h) != 0 {
            bail!("attention: width {w} is not 3 × {h} heads");
        }
        Ok((b, t, h, w / (3 * h)))
    }
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "edpo-packed-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, "attention")?;
        let dims @ (b, t, h, hd) = self.dims(layout)?;
        let [q, k, v] = [0, 1, 2].map(|w| CpuStorage::F32(unpack_heads(x, (w, 3), dims)));
        let out = self
            .core
            .forward_heads((&q, 0), (&k, 0), (&v, 0), (b, h, t, t, hd))?;
        let CpuStorage::F32(out) = out else {
            bail!("attention: f32 only");
        };
        let mut merged = vec![0f32; b * t * h * hd];
        pack_heads(&out, &mut merged, (0, 1), dims);
        let device = candle_core::Device::Cpu;
        let mut kept = Vec::with_capacity(3);
        for part in [q, k, v] {
            let CpuStorage::F32(part) = part else {
                bail!("attention: f32 only");
            };
            kept.push(Tensor::from_vec(part, (b * h, t, hd), &device)?);
        }
        if let (Ok(mut slot), Ok(kept)) = (self.heads.lock(), <[Tensor; 3]>::try_from(kept)) {
            *slot = Some(kept);
        }
        Ok((CpuStorage::F32(merged), Shape::from((b, t, h * hd))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dims @ (b, t, h, hd) = self.dims(arg.layout())?;
        let Some([q, k, v]) = self.heads.lock().ok().and_then(|s| s.clone()) else {
            bail!("attention: backward before forward");
        };
        let g = grad.detach().contiguous()?.reshape((b, t, h * hd))?;
        // The gradient arrives token-major; bring it to head-major as the forward did.
        let gh = with_f32(&g, |gs| unpack_heads(gs, (0, 1), dims))?;
        let g = Tensor::from_vec(gh, (b * h, t, hd), arg.device())?;
        let (dq, dk, dv) = self.core.backward_heads(&q, &k, &v, &g)?;
        let mut dx = vec![0f32; b * t * 3 * h * hd];
        for (which, part) in [dq, dk, dv].iter().enumerate() {
            with_f32(&part.contiguous()?, |part| {
                pack_heads(part, &mut dx, (which, 3), dims)
            })?;
        }
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// GPT-2 attention from the packed `qkv (B, T, 3·H·hd)` projection (see [`PackedAttention`]),
/// giving `(B, T, H·hd)`; `bias (B, 1, T, T)`.
pub fn packed_attention(
    qkv: &Tensor,
    n_head: usize,
    bias: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let op = PackedAttention {
        core: Attention {
            bias: bias.flatten_all()?.to_vec1::<f32>()?,
            scale: scale as f32,
            probs: std::sync::Mutex::new(None),
        },
        n_head,
        heads: std::sync::Mutex::new(None),
    };
    qkv.contiguous()?.apply_op1(op)
}

/// `softmax(scale·q·kᵀ + bias)·v` as one node (see [`Attention`]): `q (B, H, Tq, hd)`,
/// `k`, `v (B, H, Tk, hd)` with as many key heads as query heads, `bias (B, 1, Tq, Tk)`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let op = Attention {
        bias: bias.flatten_all()?.to_vec1::<f32>()?,
        scale: scale as f32,
        probs: std::sync::Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let a = a.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a");
        let b = b.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("b");
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "element {i}: {x} vs {y}"
            );
        }
    }

    fn input(shape: (usize, usize)) -> Var {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 250.0) - 2.0)
            .collect();
        Var::from_vec(v, shape, &Device::Cpu).expect("var")
    }

    /// `fused` and `composed` agree in value, and the gradients of `⟨out, probe⟩` with respect
    /// to each of `vars` agree (both present, or both absent where `absent_ok`).
    fn same_values_and_grads(
        name: &str,
        fused: &Tensor,
        composed: &Tensor,
        probe: &Tensor,
        vars: &[&Var],
        absent_ok: bool,
    ) -> candle_core::Result<()> {
        close(fused, composed, 1e-5);
        let ga = (fused * probe)?.sum_all()?.backward()?;
        let gc = (composed * probe)?.sum_all()?.backward()?;
        for var in vars {
            match (ga.get(var.as_tensor()), gc.get(var.as_tensor())) {
                (Some(p), Some(q)) => close(p, q, 1e-4),
                (None, None) if absent_ok => {}
                _ => panic!("{name}: a gradient is missing on one side"),
            }
        }
        Ok(())
    }

    /// An additive causal mask `(b, 1, t, t)`, also hiding where `hide(row, query, key)`.
    fn causal_mask(
        b: usize,
        t: usize,
        hide: impl Fn(usize, usize, usize) -> bool,
    ) -> candle_core::Result<Tensor> {
        let mut mask = vec![0f32; b * t * t];
        for n in 0..b {
            for i in 0..t {
                for j in 0..t {
                    if j > i || hide(n, i, j) {
                        mask[(n * t + i) * t + j] = -1e30;
                    }
                }
            }
        }
        Tensor::from_vec(mask, (b, 1, t, t), &Device::Cpu)
    }

    type Op = fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>;

    fn composed_gelu(x: &Tensor, _: &Tensor, _: &Tensor) -> candle_core::Result<Tensor> {
        let u = ((x * x)?.affine(f64::from(GELU_C), 1.0)? * x)?
            .affine(f64::from(SQRT_2_OVER_PI), 0.0)?;
        (x * (u.tanh()? + 1.0)?)?.affine(0.5, 0.0)
    }

    fn composed_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        nn::LayerNorm {
            weight: w.clone(),
            bias: b.clone(),
            eps: 1e-5,
        }
        .forward_composed(x)
    }

    fn composed_rms_norm(x: &Tensor, w: &Tensor, _: &Tensor) -> candle_core::Result<Tensor> {
        nn::RmsNorm {
            weight: w.clone(),
            eps: 1e-6,
        }
        .forward_composed(x)
    }

    /// Each kernel against its composed definition: values and the gradients of x, w and b.
    #[test]
    fn kernels_match_composed_ops() -> candle_core::Result<()> {
        let x = input((6, 40));
        let w = Var::from_vec(
            (0..40).map(|i| 0.5 + i as f32 / 40.0).collect::<Vec<f32>>(),
            40,
            &Device::Cpu,
        )?;
        let b = Var::from_vec(
            (0..40).map(|i| i as f32 / 80.0 - 0.2).collect::<Vec<f32>>(),
            40,
            &Device::Cpu,
        )?;
        let probe = Tensor::new(
            (0..240)
                .map(|i| ((i * 31 % 17) as f32) / 17.0 - 0.5)
                .collect::<Vec<f32>>()
                .as_slice(),
            &Device::Cpu,
        )?
        .reshape((6, 40))?;
        let cases: [(&str, Op, Op); 4] = [
            ("gelu", |x, _, _| gelu(x), composed_gelu),
            (
                "softmax",
                |x, _, _| softmax_last(x),
                |x, _, _| nn::softmax_composed(x),
            ),
            (
                "layer_norm",
                |x, w, b| layer_norm(x, w, b, 1e-5),
                composed_layer_norm,
            ),
            (
                "rms_norm",
                |x, w, _| rms_norm(x, w, 1e-6),
                composed_rms_norm,
            ),
        ];
        for (name, fused, composed) in cases {
            let args = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            let a = fused(args.0, args.1, args.2)?;
            let c = composed(args.0, args.1, args.2)?;
            same_values_and_grads(name, &a, &c, &probe, &[&x, &w, &b], true)?;
        }
        Ok(())
    }

    /// The fused linear layer against a product plus a broadcast bias, for both weight
    /// layouts and a 3-d input: values and the gradients of x, W and b.
    #[test]
    fn linear_bias_matches_composed() -> candle_core::Result<()> {
        let x = Var::from_tensor(&input((6, 40)).as_tensor().reshape((2, 3, 40))?)?;
        for input_major in [true, false] {
            let shape = if input_major { (40, 24) } else { (24, 40) };
            let w = Var::from_tensor(&input(shape).as_tensor().affine(0.1, 0.0)?)?;
            let b = Var::from_vec(
                (0..24).map(|i| i as f32 / 48.0 - 0.3).collect::<Vec<f32>>(),
                24,
                &Device::Cpu,
            )?;
            let probe = input((6, 24)).as_tensor().reshape((2, 3, 24))?;
            let fused = linear_bias(x.as_tensor(), w.as_tensor(), b.as_tensor(), input_major)?;
            let wt = if input_major {
                w.as_tensor().clone()
            } else {
                w.as_tensor().t()?
            };
            let composed = x
                .as_tensor()
                .reshape((6, 40))?
                .matmul(&wt)?
                .broadcast_add(b.as_tensor())?
                .reshape((2, 3, 24))?;
            let name = format!("linear (input_major {input_major})");
            same_values_and_grads(&name, &fused, &composed, &probe, &[&x, &w, &b], false)?;
        }
        Ok(())
    }

    /// Fused attention against the composed product, scale, mask, softmax and product, with a
    /// causal mask that also hides one padded key: values and the gradients of q, k and v.
    #[test]
    fn attention_matches_composed() -> candle_core::Result<()> {
        let (b, h, t, hd) = (2, 3, 5, 4);
        let var = |seed: usize| -> candle_core::Result<Var> {
            let n = b * h * t * hd;
            let v: Vec<f32> = (0..n)
                .map(|i| (((i + seed) * 7919 % 1000) as f32 / 500.0) - 1.0)
                .collect();
            Var::from_vec(v, (b, h, t, hd), &Device::Cpu)
        };
        let (q, k, v) = (var(1)?, var(2)?, var(3)?);
        let bias = causal_mask(b, t, |n, i, j| n == 1 && j == 2 && i != 2)?;
        let scale = 0.5;
        let fused = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, scale)?;
        let scores = q
            .as_tensor()
            .matmul(&k.as_tensor().t()?)?
            .affine(scale, 0.0)?
            .broadcast_add(&bias)?;
        let composed = nn::softmax_composed(&scores)?.matmul(v.as_tensor())?;
        let probe = var(4)?.as_tensor().affine(0.7, 0.1)?;
        same_values_and_grads("attention", &fused, &composed, &probe, &[&q, &k, &v], false)?;
        Ok(())
    }

    /// Packed GPT-2 attention against slicing q, k, v out of the projection, splitting heads,
    /// the composed attention and merging heads: values and the gradient of the projection.
    #[test]
    fn packed_attention_matches_composed() -> candle_core::Result<()> {
        let (b, t, h, hd) = (2, 5, 3, 4);
        let d = h * hd;
        let n = b * t * 3 * d;
        let qkv = Var::from_vec(
            (0..n)
                .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
                .collect::<Vec<f32>>(),
            (b, t, 3 * d),
            &Device::Cpu,
        )?;
        let bias = causal_mask(b, t, |_, _, _| false)?;
        let scale = 0.5;
        let fused = packed_attention(qkv.as_tensor(), h, &bias, scale)?;
        let heads = |i: usize| -> candle_core::Result<Tensor> {
            qkv.as_tensor()
                .narrow(2, i * d, d)?
                .reshape((b, t, h, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scores = heads(0)?
            .matmul(&heads(1)?.t()?)?
            .affine(scale, 0.0)?
            .broadcast_add(&bias)?;
        let composed = nn::softmax_composed(&scores)?
            .matmul(&heads(2)?)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, d))?;
        let probe = Tensor::from_vec(
            (0..b * t * d)
                .map(|i| ((i * 31 % 17) as f32) / 17.0 - 0.5)
                .collect::<Vec<f32>>(),
            (b, t, d),
            &Device::Cpu,
        )?;
        same_values_and_grads(
            "packed attention",
            &fused,
            &composed,
            &probe,
            &[&qkv],
            false,
        )?;
        Ok(())
    }

    #[test]
    fn exp_is_accurate_over_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp(x) as f64) - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(rel);
            x += 0.013;
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        for u in [-20.0f32, -3.0, -0.5, -1e-4, 0.0, 1e-4, 0.5, 3.0, 20.0] {
            assert!((tanh(u) - u.tanh()).abs() < 2e-7, "tanh({u})");
        }
    }

    #[test]
    fn log_softmax_gather_matches_composed() -> candle_core::Result<()> {
        let z = input((5, 33));
        let targets = [0u32, 32, 7, 7, 12];
        let fused = log_softmax_gather(z.as_tensor(), &targets)?;
        let t = Tensor::new(&targets, &Device::Cpu)?.unsqueeze(1)?;
        let composed = nn::log_softmax_last(z.as_tensor())
            .expect("composed")
            .gather(&t, 1)?
            .squeeze(1)?;
        close(&fused, &composed, 1e-6);
        let w = Tensor::new(&[0.3f32, -1.0, 2.0, 0.5, 1.5], &Device::Cpu)?;
        let ga = (&fused * &w)?.sum_all()?.backward()?;
        let gb = (&composed * &w)?.sum_all()?.backward()?;
        close(
            ga.get(z.as_tensor()).expect("grad"),
            gb.get(z.as_tensor()).expect("grad"),
            1e-5,
        );
        Ok(())
    }
}
