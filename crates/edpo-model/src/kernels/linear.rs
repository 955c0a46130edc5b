//! A linear layer with its bias as one autograd node, and without one for the matrices large
//! enough for [`super::gemm`] (smaller bias-free maps keep candle's composed product); a frozen
//! linear map with its LoRA adapter as one node ([`lora_linear`]).
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
        let sink = super::sink::sink_for(w);
        let w = w.detach();
        let mm = super::gemm::matmul_tensors;
        if self.frozen {
            let dx = input_grad(&g, &w, self.input_major)?;
            return Ok((Some(dx.reshape(x.shape())?), None, None));
        }
        let dx = input_grad(&g, &w, self.input_major)?;
        let (lhs, rhs) = if self.input_major {
            (x2.t()?, g.clone())
        } else {
            (g.t()?, x2.clone())
        };
        let dw = match sink {
            Some(sink) => {
                sink.contribute(|dst| super::gemm::matmul_tensors_into(&lhs, &rhs, dst))?;
                None
            }
            None => Some(mm(&lhs, &rhs)?),
        };
        if !self.bias {
            return Ok((Some(dx.reshape(x.shape())?), dw, None));
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
            dw,
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// `∂x = g·Wᵀ` of `x·W` for `g (rows, out)` and `W` stored `(in, out)` with `input_major`, else
/// `(out, in)`.
fn input_grad(g: &Tensor, w: &Tensor, input_major: bool) -> candle_core::Result<Tensor> {
    if input_major {
        super::gemm::matmul_tensors(g, &w.t()?)
    } else {
        super::gemm::matmul_tensors(g, w)
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

/// A frozen linear map and its LoRA adapter as one autograd node:
/// `y = x·W (+ b) + s·(x·Aᵀ)·Bᵀ` for inputs `x`, `A (r, in)`, `B (out, r)`, the frozen `W`
/// and `b` held by the op. The composed version keeps three output-wide tensors per map alive
/// until the backward pass (the base's output, `(x·Aᵀ)·Bᵀ` and its scaled copy, besides the
/// sum); this one keeps the sum and the rank-wide `x·Aᵀ` only. Its backward pass:
/// `∂(x·Aᵀ) = s·g·B`, `∂B = s·gᵀ·(x·Aᵀ)`, `∂A = ∂(x·Aᵀ)ᵀ·x`, `∂x = g·W(ᵀ) + ∂(x·Aᵀ)·A`.
struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    input_major: bool,
    scale: f64,
    /// `x·Aᵀ (rows, r)`, written by the forward pass for the backward pass.
    down: std::sync::Mutex<Option<Tensor>>,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "edpo-lora-linear"
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
        let base = LinearBias {
            input_major: self.input_major,
            frozen: true,
            bias: self.bias.is_some(),
        };
        let zeros = Tensor::zeros(1, candle_core::DType::F32, &candle_core::Device::Cpu)?;
        let bias = self.bias.as_ref().unwrap_or(&zeros).contiguous()?;
        let weight = self.weight.contiguous()?;
        let (mut y, shape) = {
            let (ws, wl) = weight.storage_and_layout();
            let (bs, bl) = bias.storage_and_layout();
            match (&*ws, &*bs) {
                (candle_core::Storage::Cpu(ws), candle_core::Storage::Cpu(bs)) => {
                    base.cpu_fwd(s1, l1, ws, wl, bs, bl)?
                }
                _ => bail!("lora linear: CPU weights expected"),
            }
        };
        let (rows, n_in, n_out) = base.dims(l1, weight.layout())?;
        let (r, a_in) = l2.shape().dims2()?;
        let (b_out, b_r) = l3.shape().dims2()?;
        if a_in != n_in || b_out != n_out || b_r != r || !l2.is_contiguous() || !l3.is_contiguous()
        {
            bail!(
                "lora linear: A {:?} and B {:?} for a map of {n_in} → {n_out}",
                l2.dims(),
                l3.dims()
            );
        }
        let x_layout = Layout::contiguous_with_offset((rows, n_in), l1.start_offset());
        let at_layout =
            Layout::contiguous_with_offset((r, n_in), l2.start_offset()).transpose(0, 1)?;
        // The rank-r products on the GEMM kernel in candle's depth blocks: candle's numbers.
        let thin = |sa: &CpuStorage, la: &Layout, sb: &CpuStorage, lb: &Layout, dims| {
            match super::gemm::matmul_storage_as_candle((sa, la), (sb, lb)) {
                Some((c, _)) => Ok(CpuStorage::F32(c)),
                None => sa.matmul(sb, dims, la, lb),
            }
        };
        let down = thin(s1, &x_layout, s2, &at_layout, (1, rows, r, n_in))?;
        let d_layout = Layout::contiguous((rows, r));
        let bt_layout =
            Layout::contiguous_with_offset((n_out, r), l3.start_offset()).transpose(0, 1)?;
        let up = thin(&down, &d_layout, s3, &bt_layout, (1, rows, n_out, r))?;
        let (CpuStorage::F32(out), CpuStorage::F32(up), CpuStorage::F32(d)) = (&mut y, &up, down)
        else {
            bail!("lora linear: f32 only");
        };
        let scale = self.scale as f32;
        out.iter_mut().zip(up).for_each(|(o, &u)| *o += scale * u);
        let down = Tensor::from_vec(d, (rows, r), &candle_core::Device::Cpu)?;
        if let Ok(mut slot) = self.down.lock() {
            *slot = Some(down);
        }
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let down = match self.down.lock().ok().and_then(|s| s.clone()) {
            Some(d) => d,
            None => bail!("lora linear: backward before forward"),
        };
        let rows = down.dim(0)?;
        let (n_in, n_out) = (a.dim(1)?, b.dim(0)?);
        let g = grad.detach().contiguous()?.reshape((rows, n_out))?;
        let x2 = x.detach().reshape((rows, n_in))?;
        let (a, b, w) = (a.detach(), b.detach(), self.weight.detach());
        let mm = super::gemm::matmul_tensors;
        // The rank-r products where candle would run them, with its numbers.
        let thin = super::gemm::matmul_tensors_as_candle;
        let d_down = thin(&g, &b)?.affine(self.scale, 0.0)?; // (rows, r)
        let db = thin(&g.t()?, &down)?.affine(self.scale, 0.0)?; // (out, r)
        let da = mm(&d_down.t()?, &x2)?; // (r, in)
                                         // `g·W(ᵀ) + ∂(x·Aᵀ)·A`, the sum taken on the first product's buffer.
        let lora = thin(&d_down, &a)?;
        let dx = if self.input_major {
            super::gemm::matmul_tensors_plus(&g, &w.t()?, &lora)?
        } else {
            super::gemm::matmul_tensors_plus(&g, &w, &lora)?
        };
        Ok((Some(dx.reshape(x.shape())?), Some(da), Some(db)))
    }
}

/// A frozen `x·W (+ b)` plus its LoRA adapter `scale·(x·Aᵀ)·Bᵀ` as one node (see
/// [`LoraLinear`]); `input_major`: `W` is `(in, out)`, else `(out, in)`.
pub fn lora_linear(
    x: &Tensor,
    (weight, bias, input_major): (&Tensor, Option<&Tensor>, bool),
    (a, b, scale): (&Tensor, &Tensor, f64),
) -> candle_core::Result<Tensor> {
    let op = LoraLinear {
        weight: weight.detach(),
        bias: bias.map(Tensor::detach),
        input_major,
        scale,
        down: std::sync::Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}
