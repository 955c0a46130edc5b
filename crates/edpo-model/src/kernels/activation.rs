//! GELU (tanh approximation) and SwiGLU's `silu(a)·b`, each with a fused backward.
use super::{exp_as_libm, rows_map, slice, tanh, vectorised, LIBM_EXP_BLOCK};
use crate::composed::{GELU_C, SQRT_2_OVER_PI};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Elements per block of the elementwise loops (a thread's unit of work when they are split).
const CHUNK: usize = 4096;

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
        rows_map(
            x,
            &mut y,
            CHUNK.min(x.len().max(1)),
            #[inline(always)]
            |_, x, y| {
                for (o, &v) in y.iter_mut().zip(x) {
                    let u = SQRT_2_OVER_PI * (v + GELU_C * v * v * v);
                    *o = 0.5 * v * (1.0 + tanh(u));
                }
            },
        );
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
        let chunk = CHUNK.min(x.len().max(1));
        rows_map(
            dy,
            &mut dx,
            chunk,
            #[inline(always)]
            |i: usize, dy: &[f32], dx: &mut [f32]| {
                let x = &x[i * chunk..i * chunk + dx.len()];
                for ((o, &g), &v) in dx.iter_mut().zip(dy).zip(x) {
                    let u = SQRT_2_OVER_PI * (v + GELU_C * v * v * v);
                    let t = tanh(u);
                    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * v * v);
                    *o = g * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du);
                }
            },
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// GELU (tanh form) with a fused backward.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

/// SwiGLU's gate: `silu(a)·b` (`silu(a) = a/(1 + e^{−a})`) as one node. The composed version
/// keeps `silu(a)` alive beside the product until the backward pass; this one keeps the
/// product only. The forward pass computes `silu(a)` as candle does (the same expression in
/// f32, its `e^{−a}` the C library's bits computed in vector lanes by
/// [`super::exp_as_libm`]) and then the product, so its values are the composed version's bit
/// for bit; the backward pass is `∂a = g·b·σ(a)·(1 + a·(1 − σ(a)))`, `∂b = g·silu(a)`.
struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "edpo-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = slice(s1, l1, "silu mul")?;
        let b = slice(s2, l2, "silu mul")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("silu mul: {:?} against {:?}", l1.dims(), l2.dims());
        }
        let mut y = vec![0f32; a.len()];
        let chunk = CHUNK.min(a.len().max(1));
        rows_map(
            a,
            &mut y,
            chunk,
            #[inline(always)]
            |i: usize, a: &[f32], y: &mut [f32]| {
                let b = &b[i * chunk..i * chunk + y.len()];
                let mut e = [0f32; LIBM_EXP_BLOCK];
                for ((a, y), b) in a
                    .chunks(LIBM_EXP_BLOCK)
                    .zip(y.chunks_mut(LIBM_EXP_BLOCK))
                    .zip(b.chunks(LIBM_EXP_BLOCK))
                {
                    let e = &mut e[..a.len()];
                    neg_exp(a, e);
                    for (((o, &v), &u), &ev) in y.iter_mut().zip(a).zip(b).zip(e.iter()) {
                        *o = (v / (1.0 + ev)) * u;
                    }
                }
            },
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (a, b, g) = (a.contiguous()?, b.contiguous()?, grad_res.contiguous()?);
        let n = a.elem_count();
        let (mut da, mut db) = (vec![0f32; n], vec![0f32; n]);
        super::with_f32(&a, |a| {
            super::with_f32(&b, |b| {
                super::with_f32(&g, |g| {
                    // Blocks of `CHUNK` elements, each block's e^{−a} computed in lanes first.
                    let block = |i: usize, da: &mut [f32], db: &mut [f32]| {
                        let at = i * CHUNK..i * CHUNK + da.len();
                        let (a, b, g) = (&a[at.clone()], &b[at.clone()], &g[at]);
                        vectorised(
                            #[inline(always)]
                            || {
                                let mut e = [0f32; LIBM_EXP_BLOCK];
                                let parts = a
                                    .chunks(LIBM_EXP_BLOCK)
                                    .zip(b.chunks(LIBM_EXP_BLOCK))
                                    .zip(g.chunks(LIBM_EXP_BLOCK))
                                    .zip(da.chunks_mut(LIBM_EXP_BLOCK))
                                    .zip(db.chunks_mut(LIBM_EXP_BLOCK));
                                for ((((a, b), g), da), db) in parts {
                                    let e = &mut e[..a.len()];
                                    neg_exp(a, e);
                                    let each = a.iter().zip(b).zip(g).zip(e.iter());
                                    let out = da.iter_mut().zip(db.iter_mut());
                                    for ((((&v, &u), &gk), &ek), (dak, dbk)) in each.zip(out) {
                                        let denominator = 1.0 + ek;
                                        let sig = 1.0 / denominator;
                                        *dak = gk * u * sig * (1.0 + v * (1.0 - sig));
                                        *dbk = gk * (v / denominator);
                                    }
                                }
                            },
                        )
                    };
                    if super::parallel() && n >= 1 << 15 {
                        da.par_chunks_mut(CHUNK)
                            .zip(db.par_chunks_mut(CHUNK))
                            .enumerate()
                            .for_each(|(i, (da, db))| block(i, da, db));
                    } else {
                        da.chunks_mut(CHUNK)
                            .zip(db.chunks_mut(CHUNK))
                            .enumerate()
                            .for_each(|(i, (da, db))| block(i, da, db));
                    }
                })
            })
        })???;
        Ok((
            Some(Tensor::from_vec(da, a.shape(), a.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// `e[j] = e^{−a[j]}` as the C library computes it ([`exp_as_libm`]: the bits of candle's
/// `silu`), for at most [`LIBM_EXP_BLOCK`] elements.
#[inline(always)]
fn neg_exp(a: &[f32], e: &mut [f32]) {
    let mut neg = [0f32; LIBM_EXP_BLOCK];
    let neg = &mut neg[..a.len()];
    neg.iter_mut().zip(a).for_each(|(m, &v)| *m = -v);
    exp_as_libm(neg, e);
}

/// `silu(a)·b` with a fused backward (see [`SiluMul`]).
pub fn silu_mul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, SiluMul)
}
