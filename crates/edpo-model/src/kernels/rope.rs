//! Rotary position embeddings (the "rotate half" layout) as one autograd node: the composed
//! version (a negation, a concatenation, two broadcast products and a sum) keeps four
//! head-wide tensors per rotated input alive until the backward pass; this one keeps none but
//! its output (the tables are constants).
use super::{slice, vectorised};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// `y = x·cos + rotate_half(x)·sin` for `x (B, H, T, hd)` and tables `(B, 1, T, hd)`, where
/// `rotate_half(x) = [−x₂, x₁]` of the two halves of a head. The forward pass computes what the
/// composed version computes, in the same order (bit for bit); the backward pass is
/// `∂x = g·cos + [g₂·sin₂, −g₁·sin₁]`.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// One head's row rotated: `y = x·cos + rotate_half(x)·sin` with the row's tables `c`, `s`
/// (all four of one even length). The one definition of the forward arithmetic, shared with
/// [`super::attention::rotary_attention`], so the two give the same bits.
#[inline(always)]
pub(crate) fn rotate(x: &[f32], c: &[f32], s: &[f32], y: &mut [f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        y[i] = x[i] * c[i] + (-x[half + i]) * s[i];
        y[half + i] = x[half + i] * c[half + i] + x[i] * s[half + i];
    }
}

/// The gradient of [`rotate`] for one row: `∂x = g·cos + [g₂·sin₂, −g₁·sin₁]`.
#[inline(always)]
pub(crate) fn rotate_grad(g: &[f32], c: &[f32], s: &[f32], dx: &mut [f32]) {
    let half = g.len() / 2;
    for i in 0..half {
        dx[i] = g[i] * c[i] + g[half + i] * s[half + i];
        dx[half + i] = g[half + i] * c[half + i] - g[i] * s[i];
    }
}

impl Rope {
    /// Applies `f(x row, cos row, sin row, out row)` to every `(b, h, t)` row of width `hd`.
    fn rows(
        &self,
        x: &[f32],
        (b, h, t, hd): (usize, usize, usize, usize),
        f: impl Fn(&[f32], &[f32], &[f32], &mut [f32]),
    ) -> candle_core::Result<Vec<f32>> {
        if x.len() != b * h * t * hd || self.cos.len() != b * t * hd || self.sin.len() != b * t * hd
        {
            bail!("rope: {} inputs for {b}×{h}×{t}×{hd}", x.len());
        }
        let mut out = vec![0f32; x.len()];
        vectorised(
            #[inline(always)]
            || {
                for (r, (xr, o)) in x.chunks(hd).zip(out.chunks_mut(hd)).enumerate() {
                    let (n, s) = (r / (h * t), r % t);
                    let table = (n * t + s) * hd;
                    f(
                        xr,
                        &self.cos[table..table + hd],
                        &self.sin[table..table + hd],
                        o,
                    );
                }
            },
        );
        Ok(out)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "edpo-rope"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, "rope")?;
        let dims = layout.shape().dims4()?;
        let y = self.rows(x, dims, rotate)?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dims = arg.dims4()?;
        let g = grad_res.contiguous()?;
        let dx = super::with_f32(&g, |g| self.rows(g, dims, rotate_grad))??;
        Ok(Some(Tensor::from_vec(dx, dims, arg.device())?))
    }
}

/// Rotates `x (B, H, T, hd)` by the tables `cos`, `sin (B, 1, T, hd)` as one node (see
/// [`Rope`]).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (b, _, t, hd) = x.dims4()?;
    if cos.dims() != [b, 1, t, hd] || sin.dims() != [b, 1, t, hd] || hd % 2 != 0 {
        bail!(
            "rope: x {:?} against tables {:?}, {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    let op = Rope {
        cos: cos.flatten_all()?.to_vec1::<f32>()?,
        sin: sin.flatten_all()?.to_vec1::<f32>()?,
    };
    x.contiguous()?.apply_op1(op)
}
