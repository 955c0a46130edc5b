//! Softmax over the last dimension, and the log-softmax over the vocabulary gathered at the
//! target token, each with a fused backward.
use super::{
    exp, lane_dot, lane_max, lane_sum, parallel, rows_map, slice, softmax_in_place, vectorised,
};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

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
        rows_map(
            x,
            &mut y,
            width,
            #[inline(always)]
            |_, x, y| {
                y.copy_from_slice(x);
                softmax_in_place(y);
            },
        );
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
        let dx = softmax_grad(y, dy, width, 1.0);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// The gradient of a row softmax `y` of width `width` given `dy`, times `scale`:
/// `scale·(y ⊙ (dy − Σ dy·y))` per row (a scale of 1 changes no bit).
pub(crate) fn softmax_grad(y: &[f32], dy: &[f32], width: usize, scale: f32) -> Vec<f32> {
    let mut dx = vec![0f32; y.len()];
    rows_map(
        dy,
        &mut dx,
        width,
        #[inline(always)]
        |i, dy, dx| {
            let y = &y[i * width..(i + 1) * width];
            let dot = lane_dot(dy, y);
            for ((o, &g), &p) in dx.iter_mut().zip(dy).zip(y) {
                *o = scale * (p * (g - dot));
            }
        },
    );
    dx
}

/// Softmax over the last dimension with a fused backward.
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

/// `log_softmax(z)[target]` for each row of `z (N, V)`: one pass for the log-sum-exp, no
/// `(N, V)` output. The backward is `g·(onehot(target) − softmax(z))`.
pub(crate) struct LogSoftmaxGather {
    targets: Arc<Vec<u32>>,
    /// Each row's log-sum-exp, written by the forward pass for the backward pass.
    pub(crate) lse: std::sync::Mutex<Option<Arc<Vec<f32>>>>,
}

impl LogSoftmaxGather {
    pub(crate) fn new(targets: &[u32]) -> Self {
        Self {
            targets: Arc::new(targets.to_vec()),
            lse: std::sync::Mutex::new(None),
        }
    }
}

#[inline(always)]
pub(crate) fn row_lse(z: &[f32]) -> f32 {
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
        let lse = |i: usize| {
            vectorised(
                #[inline(always)]
                || row_lse(&z[i * v..(i + 1) * v]),
            )
        };
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

/// One logit's `∂z` of the log-softmax gather for output gradient `g` and its row's
/// log-sum-exp, before the target's `+g`: `−g·exp(z − lse)`. The chunked head's backward pass by
/// vocabulary blocks computes it element by element too.
#[inline(always)]
pub(crate) fn gather_grad(z: f32, g: f32, lse: f32) -> f32 {
    -g * exp(z - lse)
}

pub(crate) struct LogSoftmaxGatherGrad {
    pub(crate) targets: Arc<Vec<u32>>,
    /// The forward pass's log-sum-exp per row (recomputed when absent).
    pub(crate) lse: Option<Arc<Vec<f32>>>,
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
        rows_map(
            z,
            &mut dz,
            v,
            #[inline(always)]
            |i, z, dz| {
                let lse = match &self.lse {
                    Some(l) => l[i],
                    None => row_lse(z),
                };
                let gi = g[i];
                for (o, &x) in dz.iter_mut().zip(z) {
                    *o = gather_grad(x, gi, lse);
                }
                dz[self.targets[i] as usize] += gi;
            },
        );
        Ok((CpuStorage::F32(dz), l1.shape().clone()))
    }
}

/// Per-row `log_softmax(logits)[targets]` for `logits (N, V)`, differentiable.
pub fn log_softmax_gather(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    logits
        .contiguous()?
        .apply_op1(LogSoftmaxGather::new(targets))
}
