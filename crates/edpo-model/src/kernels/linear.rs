//! A linear layer with its bias as one autograd node, and without one for the matrices large
//! enough for [`super::gemm`] (smaller bias-free maps keep candle's composed product).
use super::{slice, with_f32};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};

/// `x·W + b` over the last dimension of `x`, as one node of the autograd graph: the product
/// runs through candle's matrix multiply, the bias is added in place on its output, and the
/// backward pass computes `∂x = g·Wᵀ`, `∂W = xᵀ·g` and `∂b = Σ_rows g` directly, where the
/// composed version (a product, a broadcast and an addition) would have its gradient passed
/// through zero-filled buffers, a broadcast and a strided reduction.
struct LinearBias {
    /// `W` is stored `(in, out)` (GPT-2's `Conv1D`); otherwise `(out, in)` (`nn.Linear`).
    input_major: bool,
    /// `W` and `b` are frozen: the backward pass computes `∂x` only (LoRA's base).
    frozen: bool,
    /// There is a bias; without one the third operand is an unused placeholder.
    bias: bool,
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
        if (self.bias && b.len() != n_out) || !l1.is_contiguous() || !l2.is_contiguous() {
            bail!("linear: contiguous x and weight, and a bias of width {n_out}, expected");
        }
        let x_layout = Layout::contiguous_with_offset((rows, n_in), l1.start_offset());
        let w_layout = if self.input_major {
            Layout::contiguous_with_offset((n_in, n_out), l2.start_offset())
        } else {
            Layout::contiguous_with_offset((n_out, n_in), l2.start_offset()).transpose(0, 1)?
        };
        let mut y = match super::gemm::matmul_storage((s1, &x_layout), (s2, &w_layout)) {
            Some((c, _)) => CpuStorage::F32(c),
            None => s1.matmul(s2, (1, rows, n_out, n_in), &x_layout, &w_layout)?,
        };
        let CpuStorage::F32(out) = &mut y else {
            bail!("linear: f32 only");
        };
        if self.bias {
            for row in out.chunks_mut(n_out) {
                for (o, &bk) in row.iter_mut().zip(b) {
                    *o += bk;
                }
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
        let mm = super::gemm::matmul_tensors;
        if self.frozen {
            let dx = if self.input_major {
                mm(&g, &w.t()?)?
            } else {
                mm(&g, &w)?
            };
            return Ok((Some(dx.reshape(x.shape())?), None, None));
        }
        let (dx, dw) = if self.input_major {
            (mm(&g, &w.t()?)?, mm(&x2.t()?, &g)?)
        } else {
            (mm(&g, &w)?, mm(&g.t()?, &x2)?)
        };
        if !self.bias {
            return Ok((Some(dx.reshape(x.shape())?), Some(dw), None));
        }
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
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        bias,
        LinearBias {
            input_major,
            frozen: false,
            bias: true,
        },
    )
}

/// `x·W` with a fused backward, for a trained `W` without a bias (Llama's projections); the
/// product through [`super::gemm`] (the caller uses it where that applies).
pub fn linear_no_bias(
    x: &Tensor,
    weight: &Tensor,
    input_major: bool,
) -> candle_core::Result<Tensor> {
    let zeros = Tensor::zeros(1, weight.dtype(), weight.device())?;
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &zeros,
        LinearBias {
            input_major,
            frozen: false,
            bias: false,
        },
    )
}

/// `x·W (+ b)` for a frozen `W` (and `b`): the backward pass computes the gradient of `x`
/// only, where candle's product would also compute (and keep) one for the weight. A bias-free
/// map runs as the bias case with a zero bias.
pub fn linear_frozen(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    input_major: bool,
) -> candle_core::Result<Tensor> {
    let n_out = if input_major {
        weight.dim(1)?
    } else {
        weight.dim(0)?
    };
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(n_out, weight.dtype(), weight.device())?;
            &zeros
        }
    };
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        bias,
        LinearBias {
            input_major,
            frozen: true,
            bias: true,
        },
    )
}
