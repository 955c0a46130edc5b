//! The LM head, the log-softmax over the vocabulary and the target gather as one autograd node
//! that never holds more than one chunk of rows' logits: `log_softmax(h·Wᵀ)[target]` per row
//! of `h (N, d)`, `W (V, d)`, computed [`HEAD_CHUNK_ELEMENTS`] logits at a time.
//!
//! Forward: per chunk of rows, the logits `z = h_c·Wᵀ`, each row's log-sum-exp and the target's
//! log-prob (the [`super::softmax`] kernel); only the log-probs and log-sum-exps are kept.
//! A caller may read each chunk's logits as they pass ([`head_logps_visiting`]): ε-DPO mixes
//! them with the reference's there, chunk by chunk, instead of holding both `(N, V)` tensors.
//! Backward: per chunk, the logits again (one more `N·d·V` product: the price of never
//! storing them), `∂z = g·(onehot − softmax(z))`, `∂h_c = ∂z·W` and, when the weight trains,
//! `∂W += ∂zᵀ·h_c`, summed in place. Memory for the head is `O(chunk × V)` instead of the
//! `(N, V)` logits, their softmax and their gradient.
//!
//! With a single chunk (`N·V` within the budget) its logits are kept for the backward pass
//! instead of recomputed. The products run through [`super::gemm`] wherever the CPU has it.
//! The callers ([`crate::logprobs`]) use this node where the head's product is of the size
//! [`super::gemm`] takes; below it they keep the unchunked operations, so small models
//! compute exactly what they always did.
use super::softmax::{LogSoftmaxGather, LogSoftmaxGatherGrad};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Tensor};
use std::ops::Range;
use std::sync::Arc;

/// The most logits one chunk holds (6 Mi f32, 24 MiB: below the allocator's 32 MiB threshold
/// for mapping fresh pages, so chunk buffers are reused rather than faulted in and zeroed).
pub const HEAD_CHUNK_ELEMENTS: usize = 6 << 20;

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
        Ok((CpuStorage::F32(self.logps.clone()), Shape::from(n)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (h, w) = (h.detach(), w.detach());
        let g = grad.detach().contiguous()?;
        let n = self.targets.len();
        let mut dh = Vec::with_capacity(n.div_ceil(self.rows));
        let mut dw: Option<Vec<f32>> = self.weight_grad.then(|| vec![0f32; w.elem_count()]);
        for range in chunks(n, self.rows) {
            let z = match &self.logits {
                Some(z) => z.clone(),
                None => chunk_logits(&h, &w, &range)?,
            };
            let op = LogSoftmaxGatherGrad {
                targets: Arc::new(self.targets[range.clone()].to_vec()),
                lse: Some(Arc::new(self.lse[range.clone()].to_vec())),
            };
            let dz = z.apply_op2_no_bwd(&g.narrow(0, range.start, range.len())?, &op)?;
            dh.push(super::gemm::matmul_tensors_any_size(&dz, &w)?);
            if let Some(acc) = dw.as_mut() {
                let hc = h.narrow(0, range.start, range.len())?;
                super::gemm::matmul_add_into(&dz.t()?, &hc, acc)?;
            }
        }
        let dh = Tensor::cat(&dh, 0)?;
        let dw = match dw {
            Some(values) => Some(Tensor::from_vec(values, w.shape(), w.device())?),
            None => None,
        };
        Ok((Some(dh), dw))
    }
}

/// `log_softmax(h·Wᵀ)[targets]` per row of `h (N, d)` for `W (V, d)`, in chunks of `rows` rows,
/// differentiable with respect to `h` and, when `weight_grad`, to `W`. `visit(range, z)` sees
/// each chunk's logits `(len, V)` once, in row order, during the forward pass.
pub fn head_logps_visiting(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    weight_grad: bool,
    rows: usize,
    mut visit: impl FnMut(&Range<usize>, &Tensor) -> candle_core::Result<()>,
) -> candle_core::Result<Tensor> {
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
    let mut logps = Vec::with_capacity(n);
    let mut lse = Vec::with_capacity(n);
    let single = n <= rows;
    let mut kept = None;
    for range in chunks(n, rows) {
        let z = chunk_logits(&hd, &wdet, &range)?;
        let (lp, l) = gather(&z, &targets[range.clone()])?;
        visit(&range, &z)?;
        logps.extend(lp);
        lse.extend(l.iter());
        if single {
            kept = Some(z);
        }
    }
    h.contiguous()?.apply_op2(
        &w.contiguous()?,
        HeadLogps {
            targets: Arc::new(targets.to_vec()),
            logps,
            lse,
            rows,
            weight_grad,
            logits: kept,
        },
    )
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
                Some(rows) => head_logps_visiting(
                    h.as_tensor(),
                    w.as_tensor(),
                    &targets,
                    true,
                    rows,
                    |r, z| {
                        assert_eq!(z.dims(), [r.len(), v]);
                        seen.push(r.clone());
                        Ok(())
                    },
                )
                .expect("chunked"),
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

    #[test]
    fn chunk_rows_fit_the_budget() {
        assert!(chunk_rows(49_152) * 49_152 <= HEAD_CHUNK_ELEMENTS);
        assert_eq!(chunk_rows(usize::MAX), 1);
        let ranges: Vec<_> = chunks(10, 4).collect();
        assert_eq!(ranges, vec![0..3, 3..6, 6..10]);
        assert_eq!(chunks(8, 8).collect::<Vec<_>>(), vec![0..8]);
    }
}
