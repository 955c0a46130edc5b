//! The LM head, the log-softmax over the vocabulary and the target gather as one autograd node
//! that never holds more than one chunk of rows' logits: `log_softmax(h·Wᵀ)[target]` per row
//! of `h (N, d)`, `W (V, d)`, computed [`HEAD_CHUNK_ELEMENTS`] logits at a time.
//!
//! Forward: per chunk of rows, the logits `z = h_c·Wᵀ`, each row's log-sum-exp and the target's
//! log-prob (the [`super::softmax`] kernel); only the log-probs and log-sum-exps are kept.
//! A caller may read each chunk's logits as they pass ([`head_logps_visiting`]): ε-DPO mixes
//! them with the reference's there, chunk by chunk, instead of holding both `(N, V)` tensors.
//! Backward: the logits again (one more `N·d·V` product: the price of never storing them),
//! `∂z = g·(onehot − softmax(z))` from the forward's log-sum-exps, `∂h = ∂z·W` and, when the
//! weight trains, `∂W += ∂zᵀ·h`, summed in place. On the [`super::gemm`] kernel this runs a
//! block of about [`HEAD_BACKWARD_COLUMNS`] vocabulary columns at a time for all rows, so each
//! part of `W` is packed for the kernel once per product rather than once per chunk of rows,
//! with the bits of the row-chunked pass (which runs where that kernel does not). Memory for the
//! head is `O(chunk × V)` (forward) and `O(N × block)` (backward) instead of the `(N, V)`
//! logits, their softmax and their gradient.
//!
//! TDPO's sequential KL against a reference head ([`ReferenceHead`]) is a second output of the
//! same node: per chunk the reference's logits `r = h_ref·W_refᵀ`, each row's
//! `KL(softmax(r) ‖ softmax(z))` summed per sequence; its backward adds
//! `k·(softmax(z) − softmax(r))` to `∂z`, the reference's logits recomputed there too.
//!
//! With a single chunk (`N·V` within the budget) its logits are kept for the backward pass
//! instead of recomputed. The products run through [`super::gemm`] wherever the CPU has it.
//! The callers ([`crate::logprobs`]) use this node where the head's product is of the size
//! [`super::gemm`] takes; below it they keep the unchunked operations, so small models
//! compute exactly what they always did.
use super::softmax::{gather_grad, row_lse, LogSoftmaxGather, LogSoftmaxGatherGrad};
use super::{exp, lane_sum2, rows_map, simd::vectorised};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Tensor};
use std::ops::Range;
use std::sync::Arc;

/// The most logits one chunk holds (6 Mi f32, 24 MiB: below the allocator's 32 MiB threshold
/// for mapping fresh pages, so chunk buffers are reused rather than faulted in and zeroed).
pub const HEAD_CHUNK_ELEMENTS: usize = 6 << 20;

/// About how many columns of the vocabulary the backward pass takes at a time
/// ([`HeadLogps::backward_blocked`]): all rows' logits of 4096 columns are 8 MiB at 512 rows.
pub const HEAD_BACKWARD_COLUMNS: usize = 4096;

/// Rows per chunk for a vocabulary of `vocab` (at least one).
pub fn chunk_rows(vocab: usize) -> usize {
    (HEAD_CHUNK_ELEMENTS / vocab.max(1)).max(1)
}

/// The row ranges of `n` rows in the fewest chunks of at most `rows`, of balanced sizes.
fn chunks(n: usize, rows: usize) -> impl Iterator<Item = Range<usize>> {
    let count = n.div_ceil(rows.max(1)).max(1);
    (0..count).map(move |c| c * n / count..(c + 1) * n / count)
}

/// The logits `h[range]·Wᵀ` of one chunk, outside the graph.
pub fn chunk_logits(h: &Tensor, w: &Tensor, range: &Range<usize>) -> candle_core::Result<Tensor> {
    super::gemm::matmul_tensors_any_size(&h.narrow(0, range.start, range.len())?, &w.t()?)
}

/// Log-probs of `targets` under logits `z (c, V)` and each row's log-sum-exp, no graph.
fn gather(z: &Tensor, targets: &[u32]) -> candle_core::Result<(Vec<f32>, Arc<Vec<f32>>)> {
    let op = LogSoftmaxGather::new(targets);
    let lp = z.apply_op1_no_bwd(&op)?.to_vec1::<f32>()?;
    let lse = match op.lse.lock().ok().and_then(|s| s.clone()) {
        Some(l) => l,
        None => bail!("LM head: the log-softmax kept no log-sum-exp"),
    };
    Ok((lp, lse))
}

/// A reference model's head beside the policy's, at the same rows: its hidden states `(N, d)`
/// and weight `(V, d)` (constants: no gradient flows to them).
pub struct ReferenceHead<'a> {
    /// The reference's hidden states at the policy head's rows, `(N, d)`.
    pub hidden: &'a Tensor,
    /// The reference's head weight, `(V, d)`.
    pub weight: &'a Tensor,
    /// For TDPO's sequential KL: the sequence of every row and the number of sequences. The
    /// head then also returns, per sequence, `Σ_rows KL(softmax(r) ‖ softmax(z))`.
    pub kl: Option<(&'a [usize], usize)>,
}

/// The node: its forward returns the log-probs computed chunk by chunk before it was made.
struct HeadLogps {
    targets: Arc<Vec<u32>>,
    logps: Vec<f32>,
    lse: Vec<f32>,
    rows: usize,
    /// The weight is trained: the backward pass computes its gradient.
    weight_grad: bool,
    /// With a single chunk, its logits (within the budget, so kept instead of recomputed).
    logits: Option<Tensor>,
    /// The sequential KL, a second output after the log-probs.
    kl: Option<KlPart>,
}

/// What the node keeps of the sequential KL.
struct KlPart {
    hidden: Tensor,
    weight: Tensor,
    sequence_of: Vec<usize>,
    /// Per sequence, the forward's values.
    values: Vec<f32>,
    /// The reference's log-sum-exp per row.
    lse: Vec<f32>,
    /// With a single chunk, the reference's logits.
    logits: Option<Tensor>,
}

/// `Σ_v p_r(v)·((r_v − lse_r) − (z_v − lse_z))` of one row, `p_r = exp(r − lse_r)`.
#[inline(always)]
fn row_kl(z: &[f32], r: &[f32], lse_z: f32, lse_r: f32) -> f32 {
    lane_sum2(
        z,
        r,
        #[inline(always)]
        |x, y| {
            let lr = y - lse_r;
            exp(lr) * (lr - (x - lse_z))
        },
    )
}

/// Adds `k_i·(softmax(z_i) − softmax(r_i))` to each row `i` of `dz` (width `v`).
fn add_kl_grad(dz: &mut [f32], z: &[f32], r: &[f32], v: usize, lse: (&[f32], &[f32]), k: &[f32]) {
    rows_map(
        z,
        dz,
        v,
        #[inline(always)]
        |i, z, d| {
            let (lz, lr, ki) = (lse.0[i], lse.1[i], k[i]);
            for ((o, &x), &y) in d.iter_mut().zip(z).zip(&r[i * v..(i + 1) * v]) {
                *o += ki * (exp(x - lz) - exp(y - lr));
            }
        },
    );
}

impl CustomOp2 for HeadLogps {
    fn name(&self) -> &'static str {
        "edpo-head-logps"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l1.dims().first().copied().unwrap_or(0);
        if n != self.logps.len() {
            bail!("LM head: {n} rows for {} log-probs", self.logps.len());
        }
        let mut out = self.logps.clone();
        if let Some(kl) = &self.kl {
            out.extend_from_slice(&kl.values);
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.detach().contiguous()?;
        if !self.weight_grad {
            return Ok((
                Some(self.backward(&h.detach(), &w.detach(), &g, None)?),
                None,
            ));
        }
        let sink = super::sink::sink_for(w);
        let (h, w) = (h.detach(), w.detach());
        match sink {
            Some(sink) => {
                let dh = sink.contribute(|dw| {
                    dw.fill(0.0);
                    self.backward(&h, &w, &g, Some(dw))
                })?;
                Ok((Some(dh), None))
            }
            None => {
                let mut dw = vec![0f32; w.elem_count()];
                let dh = self.backward(&h, &w, &g, Some(&mut dw))?;
                Ok((Some(dh), Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
            }
        }
    }
}

impl HeadLogps {
    /// The backward pass of the node for the output gradient `g`: `∂h`, and `∂W` added to `dw`
    /// when given.
    fn backward(
        &self,
        h: &Tensor,
        w: &Tensor,
        g: &Tensor,
        dw: Option<&mut [f32]>,
    ) -> candle_core::Result<Tensor> {
        let n = self.targets.len();
        // The KL part's gradient per row: its sequence's.
        let k_rows = match &self.kl {
            Some(kl) => {
                let k = g.narrow(0, n, kl.values.len())?.to_vec1::<f32>()?;
                Some(kl.sequence_of.iter().map(|&b| k[b]).collect::<Vec<f32>>())
            }
            None => None,
        };
        let g = g.narrow(0, 0, n)?;
        if self.logits.is_none() && super::gemm::available() {
            self.backward_blocked(h, w, &g, k_rows.as_deref(), dw, HEAD_BACKWARD_COLUMNS)
        } else {
            self.backward_chunked(h, w, &g, k_rows.as_deref(), dw)
        }
    }

    /// [`Self::backward`] a chunk of rows at a time: the logits again (or the kept ones),
    /// `∂z`, then `∂h_c = ∂z·W` and `∂W += ∂zᵀ·h_c`.
    fn backward_chunked(
        &self,
        h: &Tensor,
        w: &Tensor,
        g: &Tensor,
        k_rows: Option<&[f32]>,
        mut dw: Option<&mut [f32]>,
    ) -> candle_core::Result<Tensor> {
        let n = self.targets.len();
        let mut dh = Vec::with_capacity(n.div_ceil(self.rows));
        for range in chunks(n, self.rows) {
            let z = match &self.logits {
                Some(z) => z.clone(),
                None => chunk_logits(h, w, &range)?,
            };
            let op = LogSoftmaxGatherGrad {
                targets: Arc::new(self.targets[range.clone()].to_vec()),
                lse: Some(Arc::new(self.lse[range.clone()].to_vec())),
            };
            let mut dz = z.apply_op2_no_bwd(&g.narrow(0, range.start, range.len())?, &op)?;
            if let (Some(kl), Some(k)) = (&self.kl, k_rows) {
                let r = match &kl.logits {
                    Some(r) => r.clone(),
                    None => chunk_logits(&kl.hidden, &kl.weight, &range)?,
                };
                let v = z.dim(1)?;
                let mut d = dz.flatten_all()?.to_vec1::<f32>()?;
                super::with_f32(&z, |z| {
                    super::with_f32(&r, |r| {
                        add_kl_grad(
                            &mut d,
                            z,
                            r,
                            v,
                            (&self.lse[range.clone()], &kl.lse[range.clone()]),
                            &k[range.clone()],
                        )
                    })
                })??;
                dz = Tensor::from_vec(d, z.shape(), z.device())?;
            }
            dh.push(super::gemm::matmul_tensors_any_size(&dz, w)?);
            if let Some(acc) = dw.as_deref_mut() {
                let hc = h.narrow(0, range.start, range.len())?;
                super::gemm::matmul_add_into(&dz.t()?, &hc, acc)?;
            }
        }
        Tensor::cat(&dh, 0)
    }

    /// [`Self::backward`] a block of the vocabulary at a time instead of a chunk of rows: per
    /// block of about `columns` columns (a multiple of the depth block of the `V`-deep product
    /// `∂z·W`), every row's logits and `∂z` there, then `∂h += ∂z_blk·W_blk` in that product's
    /// own depth blocks and `∂W_blk += ∂z_blkᵀ·h` over the same chunks of rows as before. So
    /// each part of `W` is packed for the kernel twice per backward pass, not twice per chunk of
    /// rows (with 128-row chunks at SmolLM2's vocabulary, eight passes over its 113 MB), and the
    /// buffers are `rows × columns`; every number is the row-chunked pass's, bit for bit (the
    /// same chains of multiply-adds, added in the same order; elementwise terms per element).
    fn backward_blocked(
        &self,
        h: &Tensor,
        w: &Tensor,
        g: &Tensor,
        k_rows: Option<&[f32]>,
        mut dw: Option<&mut [f32]>,
        columns: usize,
    ) -> candle_core::Result<Tensor> {
        use super::gemm::{depth_block, matmul, matmul_into, matmul_into_depth, Operand};
        let (n, d) = h.dims2()?;
        let (v, _) = w.dims2()?;
        let (h, w, g) = (h.contiguous()?, w.contiguous()?, g.to_vec1::<f32>()?);
        let depth = depth_block(v);
        let width = depth * (columns / depth).max(1);
        let row_chunks: Vec<Range<usize>> = chunks(n, self.rows).collect();
        let reference = match (&self.kl, k_rows) {
            (Some(kl), Some(k)) => Some((kl.hidden.contiguous()?, kl.weight.contiguous()?, kl, k)),
            _ => None,
        };
        let mut dh = vec![0f32; n * d];
        super::with_f32(&h, |hs| {
            super::with_f32(&w, |ws| -> candle_core::Result<()> {
                // Rows `row_stride` apart (row-major), or a transposed view of such rows.
                fn rows(data: &[f32], row_stride: usize) -> Operand<'_> {
                    Operand {
                        data,
                        row_stride,
                        col_stride: 1,
                    }
                }
                fn transposed(data: &[f32], stride: usize) -> Operand<'_> {
                    Operand {
                        data,
                        row_stride: 1,
                        col_stride: stride,
                    }
                }
                for j0 in (0..v).step_by(width) {
                    let nb = width.min(v - j0);
                    let w_blk = &ws[j0 * d..(j0 + nb) * d];
                    let mut z = matmul(n, nb, d, rows(hs, d), transposed(w_blk, d));
                    let dz = match &reference {
                        None => {
                            // In place: z is not needed again.
                            softmax_gather_grad(&mut z, nb, &g, &self.lse, |i| {
                                self.targets[i].checked_sub(j0 as u32)
                            });
                            z
                        }
                        Some((hr, wr, kl, k)) => {
                            let r = super::with_f32(hr, |hrs| {
                                super::with_f32(wr, |wrs| {
                                    matmul(
                                        n,
                                        nb,
                                        d,
                                        rows(hrs, d),
                                        transposed(&wrs[j0 * d..(j0 + nb) * d], d),
                                    )
                                })
                            })??;
                            let mut dz = z.clone();
                            softmax_gather_grad(&mut dz, nb, &g, &self.lse, |i| {
                                self.targets[i].checked_sub(j0 as u32)
                            });
                            add_kl_grad(&mut dz, &z, &r, nb, (&self.lse, &kl.lse), k);
                            dz
                        }
                    };
                    let (dz_rows, w_rows) = (rows(&dz, nb), rows(w_blk, d));
                    matmul_into_depth(n, d, nb, dz_rows, w_rows, &mut dh, j0 > 0, depth);
                    if let Some(acc) = dw.as_deref_mut() {
                        let acc = &mut acc[j0 * d..(j0 + nb) * d];
                        for c in &row_chunks {
                            let dz_t = transposed(&dz[c.start * nb..], nb);
                            let hc = rows(&hs[c.start * d..c.end * d], d);
                            matmul_into(nb, d, c.len(), dz_t, hc, acc, true);
                        }
                    }
                }
                Ok(())
            })?
        })??;
        Tensor::from_vec(dh, (n, d), h.device())
    }
}

/// `∂z` of the log-softmax gather in place over logits `z` (rows of `width`): each element
/// `−g_i·exp(z − lse_i)`, then `g_i` added at the row's target column where `target(i)` gives
/// one ([`gather_grad`], as `LogSoftmaxGatherGrad` computes it).
fn softmax_gather_grad(
    z: &mut [f32],
    width: usize,
    g: &[f32],
    lse: &[f32],
    target: impl Fn(usize) -> Option<u32> + Sync,
) {
    super::rows_map_in_place(
        z,
        width,
        #[inline(always)]
        |i, row| {
            let (gi, l) = (g[i], lse[i]);
            for o in row.iter_mut() {
                *o = gather_grad(*o, gi, l);
            }
            if let Some(t) = target(i).filter(|&t| (t as usize) < row.len()) {
                row[t as usize] += gi;
            }
        },
    );
}

/// `log_softmax(h·Wᵀ)[targets]` per row of `h (N, d)` for `W (V, d)`, in chunks of `rows` rows,
/// differentiable with respect to `h` and, when `weight_grad`, to `W`. `visit(range, z, r)`
/// sees each chunk's logits `(len, V)` once, in row order, during the forward pass, with the
/// reference's logits `r` of the same rows when a `reference` is given. With the reference's
/// `kl`, the sequential KL per sequence is returned too, differentiable in the same way.
pub fn head_logps_visiting(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    weight_grad: bool,
    rows: usize,
    reference: Option<ReferenceHead>,
    mut visit: impl FnMut(&Range<usize>, &Tensor, Option<&Tensor>) -> candle_core::Result<()>,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let (n, d) = h.dims2()?;
    let (_, wd) = w.dims2()?;
    if wd != d || targets.len() != n {
        bail!(
            "LM head: hidden {:?}, weight {:?} and {} targets do not agree",
            h.dims(),
            w.dims(),
            targets.len()
        );
    }
    let (hd, wdet) = (h.detach().contiguous()?, w.detach().contiguous()?);
    let reference = match reference {
        Some(r) => {
            if r.hidden.dims() != h.dims() || r.weight.dims() != w.dims() {
                bail!(
                    "LM head: reference hidden {:?} and weight {:?} against the policy's {:?} \
                     and {:?}",
                    r.hidden.dims(),
                    r.weight.dims(),
                    h.dims(),
                    w.dims()
                );
            }
            if let Some((of, b)) = r.kl {
                if of.len() != n || of.iter().any(|&s| s >= b) {
                    bail!(
                        "LM head: {} row sequences for {n} rows of {b} sequences",
                        of.len()
                    );
                }
            }
            let hidden = r.hidden.detach().contiguous()?;
            let weight = r.weight.detach().contiguous()?;
            Some((hidden, weight, r.kl))
        }
        None => None,
    };
    let mut logps = Vec::with_capacity(n);
    let mut lse = Vec::with_capacity(n);
    let mut kl = reference
        .as_ref()
        .and_then(|(_, _, kl)| *kl)
        .map(|(_, b)| (vec![0f64; b], Vec::with_capacity(n), None));
    let single = n <= rows;
    let mut kept = None;
    for range in chunks(n, rows) {
        let z = chunk_logits(&hd, &wdet, &range)?;
        let (lp, l) = gather(&z, &targets[range.clone()])?;
        let r = match &reference {
            Some((hr, wr, _)) => Some(chunk_logits(hr, wr, &range)?),
            None => None,
        };
        visit(&range, &z, r.as_ref())?;
        if let (Some((sums, lse_r, kept_r)), Some(r), Some((_, _, Some((of, _))))) =
            (kl.as_mut(), &r, &reference)
        {
            let v = z.dim(1)?;
            let values = super::with_f32(&z, |zs| {
                super::with_f32(r, |rs| {
                    vectorised(
                        #[inline(always)]
                        || {
                            (0..range.len())
                                .map(|i| {
                                    let (zi, ri) =
                                        (&zs[i * v..(i + 1) * v], &rs[i * v..(i + 1) * v]);
                                    let lr = row_lse(ri);
                                    (lr, row_kl(zi, ri, l[i], lr))
                                })
                                .collect::<Vec<_>>()
                        },
                    )
                })
            })??;
            for (i, (lr, value)) in values.into_iter().enumerate() {
                lse_r.push(lr);
                sums[of[range.start + i]] += f64::from(value);
            }
            if single {
                *kept_r = Some(r.clone());
            }
        }
        logps.extend(lp);
        lse.extend(l.iter());
        if single {
            kept = Some(z);
        }
    }
    let kl = match (kl, reference) {
        (Some((sums, lse_r, kept_r)), Some((hidden, weight, Some((of, _))))) => Some(KlPart {
            hidden,
            weight,
            sequence_of: of.to_vec(),
            values: sums.iter().map(|&s| s as f32).collect(),
            lse: lse_r,
            logits: kept_r,
        }),
        _ => None,
    };
    let sequences = kl.as_ref().map(|k| k.values.len());
    let out = h.contiguous()?.apply_op2(
        &w.contiguous()?,
        HeadLogps {
            targets: Arc::new(targets.to_vec()),
            logps,
            lse,
            rows,
            weight_grad,
            logits: kept,
            kl,
        },
    )?;
    match sequences {
        Some(b) => Ok((out.narrow(0, 0, n)?, Some(out.narrow(0, n, b)?))),
        None => Ok((out, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Chunked and unchunked head agree in values and in both gradients.
    #[test]
    fn chunks_equal_the_materialised_head() {
        let (n, d, v) = (11, 6, 37);
        let hv: Vec<f32> = (0..n * d)
            .map(|i| ((i * 29 % 31) as f32) * 0.07 - 1.0)
            .collect();
        let wv: Vec<f32> = (0..v * d)
            .map(|i| ((i * 13 % 23) as f32) * 0.05 - 0.55)
            .collect();
        let targets: Vec<u32> = (0..n).map(|i| (i * 7 % v) as u32).collect();
        let weights: Vec<f32> = (0..n).map(|i| 0.2 + 0.1 * i as f32).collect();
        let run = |rows: Option<usize>| {
            let h = Var::from_vec(hv.clone(), (n, d), &Device::Cpu).expect("h");
            let w = Var::from_vec(wv.clone(), (v, d), &Device::Cpu).expect("w");
            let mut seen = Vec::new();
            let lp = match rows {
                Some(rows) => {
                    head_logps_visiting(
                        h.as_tensor(),
                        w.as_tensor(),
                        &targets,
                        true,
                        rows,
                        None,
                        |r, z, _| {
                            assert_eq!(z.dims(), [r.len(), v]);
                            seen.push(r.clone());
                            Ok(())
                        },
                    )
                    .expect("chunked")
                    .0
                }
                None => {
                    let z = h.as_tensor().matmul(&w.as_tensor().t().expect("t"));
                    super::super::log_softmax_gather(&z.expect("z"), &targets).expect("lp")
                }
            };
            let wt = Tensor::from_vec(weights.clone(), n, &Device::Cpu).expect("w");
            let grads = (&lp * &wt)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("backward");
            let flat = |t: &Tensor| {
                grads
                    .get(t)
                    .expect("gradient")
                    .flatten_all()
                    .and_then(|g| g.to_vec1::<f32>())
                    .expect("values")
            };
            (
                lp.to_vec1::<f32>().expect("lp"),
                flat(h.as_tensor()),
                flat(w.as_tensor()),
                seen,
            )
        };
        let (lp, gh, gw, _) = run(None);
        for rows in [1, 4, 11, 50] {
            let (lp2, gh2, gw2, seen) = run(Some(rows));
            assert_eq!(seen.len(), n.div_ceil(rows));
            assert!(seen.iter().all(|r| r.len() <= rows));
            assert_eq!(seen.last().map(|r| r.end), Some(n));
            for (a, b) in lp.iter().zip(&lp2).chain(gh.iter().zip(&gh2)) {
                assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
            }
            for (a, b) in gw.iter().zip(&gw2) {
                assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
            }
        }
    }

    /// The backward pass by blocks of the vocabulary gives the row-chunked pass's `∂h` and `∂W`
    /// bit for bit: a vocabulary off every lane and block multiple, blocks of one depth block
    /// and of several, with and without the weight's gradient and TDPO's KL term.
    #[test]
    fn vocabulary_blocks_give_the_row_chunks_bits() -> candle_core::Result<()> {
        if !super::super::gemm::available() {
            eprintln!("no AVX2 and FMA on this CPU: the blocked backward pass is not used");
            return Ok(());
        }
        let (n, d, v, rows) = (13, 300, 1003, 5);
        let dev = &Device::Cpu;
        let values = |len: usize, a: usize, b: usize, scale: f32| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * a % b) as f32 - b as f32 / 2.0) * scale)
                .collect()
        };
        let h = Tensor::from_vec(values(n * d, 29, 31, 0.02), (n, d), dev)?;
        let w = Tensor::from_vec(values(v * d, 13, 23, 0.03), (v, d), dev)?;
        let hr = Tensor::from_vec(values(n * d, 17, 37, 0.02), (n, d), dev)?;
        let wr = Tensor::from_vec(values(v * d, 11, 19, 0.03), (v, d), dev)?;
        let targets: Vec<u32> = (0..n).map(|i| (i * 211 % v) as u32).collect();
        let g = Tensor::from_vec(values(n, 7, 11, 0.3), n, dev)?;
        let sequence_of: Vec<usize> = (0..n).map(|i| i % 3).collect();
        let k_rows: Vec<f32> = sequence_of.iter().map(|&s| 0.25 + 0.5 * s as f32).collect();
        let (mut lse, mut lse_r) = (Vec::new(), Vec::new());
        for range in chunks(n, rows) {
            let (_, l) = gather(&chunk_logits(&h, &w, &range)?, &targets[range.clone()])?;
            lse.extend(l.iter());
            let r = chunk_logits(&hr, &wr, &range)?;
            super::super::with_f32(&r, |r| lse_r.extend(r.chunks(v).map(row_lse)))?;
        }
        for with_kl in [false, true] {
            let node = HeadLogps {
                targets: Arc::new(targets.clone()),
                logps: vec![0.0; n],
                lse: lse.clone(),
                rows,
                weight_grad: true,
                logits: None,
                kl: with_kl.then(|| KlPart {
                    hidden: hr.clone(),
                    weight: wr.clone(),
                    sequence_of: sequence_of.clone(),
                    values: vec![0.0; 3],
                    lse: lse_r.clone(),
                    logits: None,
                }),
            };
            let k = with_kl.then_some(&k_rows[..]);
            for weight_grad in [false, true] {
                let mut dw_rows = vec![0f32; v * d];
                let dh_rows = node
                    .backward_chunked(&h, &w, &g, k, weight_grad.then_some(&mut dw_rows[..]))?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                for columns in [1, 600, 1 << 20] {
                    let mut dw = vec![0f32; v * d];
                    let dh = node
                        .backward_blocked(
                            &h,
                            &w,
                            &g,
                            k,
                            weight_grad.then_some(&mut dw[..]),
                            columns,
                        )?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    let same = |a: &[f32], b: &[f32]| {
                        a.len() == b.len()
                            && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                    };
                    let case = format!("KL {with_kl}, weight {weight_grad}, {columns} columns");
                    assert!(same(&dh, &dh_rows), "∂h differs: {case}");
                    assert!(same(&dw, &dw_rows), "∂W differs: {case}");
                    assert!(dh.iter().any(|&x| x != 0.0), "{case}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn chunk_rows_fit_the_budget() {
        assert!(chunk_rows(49_152) * 49_152 <= HEAD_CHUNK_ELEMENTS);
        assert_eq!(chunk_rows(usize::MAX), 1);
        let ranges: Vec<_> = chunks(10, 4).collect();
        assert_eq!(ranges, vec![0..3, 3..6, 6..10]);
        assert_eq!(chunks(8, 8).collect::<Vec<_>>(), vec![0..8]);
    }
}
