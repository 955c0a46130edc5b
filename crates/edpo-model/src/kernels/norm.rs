//! LayerNorm and RMSNorm over the last dimension, with a fused backward.
use super::{lane_sum, rows_map, slice, vectorised, with_f32};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

/// LayerNorm (`rms = false`, weight and bias) or RMSNorm (`rms = true`, weight only, the bias
/// argument ignored) over the last dimension.
struct Norm {
    eps: f32,
    rms: bool,
}

/// Per-row statistics: mean (0 for RMSNorm) and 1/σ.
#[inline(always)]
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
        rows_map(
            x,
            &mut y,
            d,
            #[inline(always)]
            |_, x, y| {
                let (mean, inv) = norm_stats(x, self.eps, self.rms);
                for (k, o) in y.iter_mut().enumerate() {
                    let xhat = (x[k] - mean) * inv;
                    *o = if self.rms {
                        xhat * w[k]
                    } else {
                        xhat * w[k] + b[k]
                    };
                }
            },
        );
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
                vectorised(
                    #[inline(always)]
                    || {
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
                    },
                )
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
