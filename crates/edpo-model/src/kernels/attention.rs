//! Scaled masked attention as one autograd node, GPT-2's attention straight from its packed
//! q/k/v projection, a Llama-family model's straight from its three projections (rotary
//! embeddings and grouped key/value heads inside the node), and a decoding step's attention
//! against the key/value cache read in place ([`decode_attention`], outside the autograd
//! graph).
use super::{lane_dot, parallel, slice, softmax_in_place, vectorised, with_f32};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Scaled dot-product attention for one set of heads as one node of the autograd graph:
/// `softmax(scale·q·kᵀ + bias)·v` for `q (B, H, Tq, hd)`, `k`, `v (B, H, Tk, hd)` and an
/// additive mask `bias (B, 1, Tq, Tk)`. The scaling, the mask and the softmax are one pass over
/// the scores. The probabilities are not kept: the backward pass computes them again from `q`
/// and `k` by the same code ([`Self::probabilities`], so the same bits), as the flash-attention
/// kernels PyTorch's fused attention uses do, which keeps `B·H·Tq·Tk` floats per layer out of
/// the memory a step holds between its passes (a SmolLM2 bench batch: 5.3 MB per layer, 159 MB
/// over 30 layers) for one more `q·kᵀ` and softmax per layer. It then computes
/// `∂v = Pᵀ·g`, `∂P = g·vᵀ`, `∂S = scale·P ⊙ (∂P − Σ ∂P·P)`, `∂q = ∂S·k`, `∂k = ∂Sᵀ·q`
/// without the chain of scaled, masked and broadcast intermediates (and their zero-filled
/// gradient buffers) that the composed version records.
struct Attention {
    /// The mask `(B, 1, Tq, Tk)`, contiguous (shared with the caller and every layer).
    bias: Tensor,
    scale: f32,
    /// The heads are at least [`super::gemm::MIN_DIM`] wide together (`H·hd`, a model whose
    /// projections [`super::gemm`] runs): the per-head products go through that kernel too
    /// ([`batched_products`]). Narrower models (the default task's) keep candle's, and their
    /// numbers.
    wide: bool,
}

/// `row ← softmax(scale·row + mask)` in place.
#[inline(always)]
fn scaled_masked_softmax(row: &mut [f32], mask: &[f32], scale: f32) {
    for (x, &m) in row.iter_mut().zip(mask) {
        *x = *x * scale + m;
    }
    softmax_in_place(row);
}

/// Runs `f` on a contiguous CPU tensor's storage and the offset of its first element.
fn on_storage<R>(
    t: &Tensor,
    f: impl FnOnce(&CpuStorage, usize) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    super::with_storage(t, |cpu, layout| {
        if !layout.is_contiguous() {
            bail!("attention: a contiguous tensor expected");
        }
        f(cpu, layout.start_offset())
    })
}

impl Attention {
    /// `P = softmax(scale·q·kᵀ + bias) (B·H, Tq, Tk)` from head-major `q (B·H, Tq, hd)` and
    /// `k (B·H, Tk, hd)` given as storages with start offsets: the one definition the forward
    /// pass and the backward pass's recomputation share.
    fn probabilities(
        &self,
        (q, q_off): (&CpuStorage, usize),
        (k, k_off): (&CpuStorage, usize),
        (b, h, tq, tk, hd): (usize, usize, usize, usize, usize),
    ) -> candle_core::Result<CpuStorage> {
        use candle_core::backend::BackendStorage;
        if self.bias.elem_count() != b * tq * tk {
            bail!(
                "attention: a mask of {} for {b}×{tq}×{tk}",
                self.bias.elem_count()
            );
        }
        let bh = b * h;
        let q_layout = Layout::contiguous_with_offset((bh, tq, hd), q_off);
        let kt_layout = Layout::contiguous_with_offset((bh, tk, hd), k_off).transpose(1, 2)?;
        let mut scores = if self.wide {
            let q = &slice(q, &q_layout, "attention")?;
            let k = slice(
                k,
                &Layout::contiguous_with_offset((bh, tk, hd), k_off),
                "attention",
            )?;
            CpuStorage::F32(batched_products(bh, (tq, tk, hd), (q, false), (k, true)))
        } else {
            q.matmul(k, (bh, tq, tk, hd), &q_layout, &kt_layout)?
        };
        let CpuStorage::F32(z) = &mut scores else {
            bail!("attention: f32 only");
        };
        let scale = self.scale;
        with_f32(&self.bias, |bias| {
            // Row i is query (i % tq) of head-batch (i / tq); the mask is shared by heads.
            let mask = |i: usize| {
                let (n, t) = (i / tq / h, i % tq);
                &bias[(n * tq + t) * tk..(n * tq + t + 1) * tk]
            };
            if parallel() && z.len() >= 1 << 15 {
                z.par_chunks_mut(tk).enumerate().for_each(|(i, r)| {
                    vectorised(
                        #[inline(always)]
                        || scaled_masked_softmax(r, mask(i), scale),
                    )
                });
            } else {
                vectorised(
                    #[inline(always)]
                    || {
                        for (i, r) in z.chunks_mut(tk).enumerate() {
                            scaled_masked_softmax(r, mask(i), scale);
                        }
                    },
                );
            }
        })?;
        Ok(scores)
    }

    /// The forward pass on head-major `q (B·H, Tq, hd)`, `k`, `v (B·H, Tk, hd)` given as
    /// storages with start offsets; returns `(B·H, Tq, hd)`.
    fn forward_heads(
        &self,
        q: (&CpuStorage, usize),
        k: (&CpuStorage, usize),
        (v, v_off): (&CpuStorage, usize),
        dims @ (b, h, tq, tk, hd): (usize, usize, usize, usize, usize),
    ) -> candle_core::Result<CpuStorage> {
        use candle_core::backend::BackendStorage;
        let scores = self.probabilities(q, k, dims)?;
        let bh = b * h;
        let p_layout = Layout::contiguous((bh, tq, tk));
        let v_layout = Layout::contiguous_with_offset((bh, tk, hd), v_off);
        if self.wide {
            let p = slice(&scores, &p_layout, "attention")?;
            let v = slice(v, &v_layout, "attention")?;
            Ok(CpuStorage::F32(batched_products(
                bh,
                (tq, hd, tk),
                (p, false),
                (v, false),
            )))
        } else {
            scores.matmul(v, (bh, tq, hd, tk), &p_layout, &v_layout)
        }
    }

    /// The backward pass on head-major `q (B·H, Tq, hd)`, `k`, `v (B·H, Tk, hd)` and
    /// `g (B·H, Tq, hd)` of `B` sequences and `H` heads: `(∂q, ∂k, ∂v)` in the same layout.
    fn backward_heads(
        &self,
        [q, k, v]: [&Tensor; 3],
        g: &Tensor,
        (b, h): (usize, usize),
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (bh, tq, hd) = q.dims3()?;
        let tk = k.dim(1)?;
        if bh != b * h {
            bail!("attention: {bh} head-batches for {b} sequences of {h} heads");
        }
        let p = on_storage(q, |qs, q_off| {
            on_storage(k, |ks, k_off| {
                self.probabilities((qs, q_off), (ks, k_off), (b, h, tq, tk, hd))
            })
        })?;
        let CpuStorage::F32(p) = p else {
            bail!("attention: f32 only");
        };
        let device = q.device();
        let p = Tensor::from_vec(p, (bh, tq, tk), device)?;
        // `a·b` per head, `a` and `b` read as stored or transposed.
        let product =
            |a: &Tensor, a_t: bool, b: &Tensor, b_t: bool| -> candle_core::Result<Tensor> {
                let (m, k) = if a_t {
                    (a.dim(2)?, a.dim(1)?)
                } else {
                    (a.dim(1)?, a.dim(2)?)
                };
                let n = if b_t { b.dim(1)? } else { b.dim(2)? };
                if self.wide {
                    let c = with_f32(a, |a| {
                        with_f32(b, |b| batched_products(bh, (m, n, k), (a, a_t), (b, b_t)))
                    })??;
                    Tensor::from_vec(c, (bh, m, n), device)
                } else {
                    let a = if a_t { a.t()? } else { a.clone() };
                    let b = if b_t { b.t()? } else { b.clone() };
                    a.matmul(&b)
                }
            };
        let dv = product(&p, true, g, false)?;
        let dp = product(g, false, v, true)?;
        let ds = with_f32(&p, |pv| {
            with_f32(&dp, |dp| {
                super::softmax::softmax_grad(pv, dp, tk, self.scale)
            })
        })??;
        let ds = Tensor::from_vec(ds, (bh, tq, tk), device)?;
        let dq = product(&ds, false, k, false)?;
        let dk = product(&ds, true, q, false)?;
        Ok((dq, dk, dv))
    }

    /// [`Self::forward_heads`] on head-major `q`, `k`, `v` buffers `(B·H, T, hd)` of one
    /// length `T`, its output merged back token-major `(B, T, H·hd)`. The buffers are not kept:
    /// the caller's backward pass makes them again from the node's inputs.
    fn forward_merged(
        &self,
        [q, k, v]: [Vec<f32>; 3],
        dims @ (b, t, h, hd): (usize, usize, usize, usize),
    ) -> candle_core::Result<Vec<f32>> {
        let [q, k, v] = [q, k, v].map(CpuStorage::F32);
        let out = self.forward_heads((&q, 0), (&k, 0), (&v, 0), (b, h, t, t, hd))?;
        let CpuStorage::F32(out) = out else {
            bail!("attention: f32 only");
        };
        let mut merged = vec![0f32; b * t * h * hd];
        pack_heads(&out, &mut merged, (0, 1), dims);
        Ok(merged)
    }

    /// The backward pass of [`Self::forward_merged`] for a token-major gradient
    /// `(B, T, H·hd)`, given the forward pass's head-major buffers again: head-major
    /// `(∂q, ∂k, ∂v)`, each `(B·H, T, hd)`.
    fn backward_merged(
        &self,
        grad: &Tensor,
        heads: [Vec<f32>; 3],
        dims @ (b, t, h, hd): (usize, usize, usize, usize),
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let device = grad.device();
        let [q, k, v] = heads.map(|x| Tensor::from_vec(x, (b * h, t, hd), device));
        let g = grad.detach().contiguous()?.reshape((b, t, h * hd))?;
        // The gradient arrives token-major; bring it to head-major as the forward did.
        let gh = with_f32(&g, |gs| unpack_heads(gs, (0, 1), dims))?;
        let g = Tensor::from_vec(gh, (b * h, t, hd), device)?;
        self.backward_heads([&q?, &k?, &v?], &g, (b, h))
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
            [
                &q.detach().contiguous()?.reshape((bh, tq, hd))?,
                &k.detach().contiguous()?.reshape((bh, tk, hd))?,
                &v.detach().contiguous()?.reshape((bh, tk, hd))?,
            ],
            &g,
            (b, h),
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
        let heads = [0, 1, 2].map(|w| unpack_heads(x, (w, 3), dims));
        let merged = self.core.forward_merged(heads, dims)?;
        Ok((CpuStorage::F32(merged), Shape::from((b, t, h * hd))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dims @ (b, t, h, hd) = self.dims(arg.layout())?;
        // The forward pass's head-major copies, made again.
        let heads = with_f32(&arg.contiguous()?, |x| {
            [0, 1, 2].map(|w| unpack_heads(x, (w, 3), dims))
        })?;
        let (dq, dk, dv) = self.core.backward_merged(grad, heads, dims)?;
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
            bias: bias.flatten_all()?.contiguous()?,
            scale: scale as f32,
            wide: wide(qkv.dim(2)? / 3),
        },
        n_head,
    };
    qkv.contiguous()?.apply_op1(op)
}

/// Llama-family attention straight from its three projections: `q (B, T, H·hd)`,
/// `k`, `v (B, T, KV·hd)` in, the heads' outputs side by side `(B, T, H·hd)` out, as one
/// autograd node. Inside it, q's and k's heads are rotated ([`super::rope::rotate`]), each
/// key/value head is repeated for its `H / KV` query heads, and [`Attention`] runs on the
/// head-major copies; the backward pass sums each repeated head's gradient over its group in
/// the group's order from zero (as candle's sum over the broadcast dimension does) and rotates
/// back. So the numbers are those of the chain of split, [`super::rope`], repeat, [`attention`]
/// and merge it replaces, without that chain's twenty-three nodes per layer (fifteen without
/// grouped heads), their copies and their zero-filled gradient buffers.
struct RotaryAttention {
    core: Attention,
    n_head: usize,
    n_kv: usize,
    /// Rotary tables `(B, T, hd)`, contiguous (shared with the caller and every layer).
    cos: Tensor,
    sin: Tensor,
}

impl RotaryAttention {
    /// `(B, T, H, KV, hd)` of the three inputs' layouts, checked against each other and the
    /// tables.
    fn dims(
        &self,
        q: &Layout,
        k: &Layout,
        v: &Layout,
    ) -> candle_core::Result<(usize, usize, usize, usize, usize)> {
        let (b, t, wq) = q.shape().dims3()?;
        let (h, kv) = (self.n_head, self.n_kv);
        if h == 0 || kv == 0 || h % kv != 0 || wq % h != 0 || (wq / h) % 2 != 0 {
            bail!("attention: width {wq} for {h} heads over {kv} key/value heads");
        }
        let hd = wq / h;
        if k.dims() != [b, t, kv * hd] || v.dims() != [b, t, kv * hd] {
            bail!(
                "attention: q {:?}, k {:?}, v {:?} do not agree",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if self.cos.elem_count() != b * t * hd || self.sin.elem_count() != b * t * hd {
            bail!(
                "attention: rotary tables of {} for {b}×{t}×{hd}",
                self.cos.elem_count()
            );
        }
        Ok((b, t, h, kv, hd))
    }

    /// Head-major `(B·H, T, hd)` from a token-major `(B, T, heads·hd)` input of `heads` heads,
    /// head `j` of the output taken from input head `j / (H / heads)`, rotated when `rotate`.
    fn heads_of(
        &self,
        x: &[f32],
        heads: usize,
        rotate: bool,
        (b, t, h, hd): (usize, usize, usize, usize),
    ) -> candle_core::Result<Vec<f32>> {
        let group = h / heads;
        let mut out = vec![0f32; b * h * t * hd];
        self.with_tables(
            #[inline(always)]
            |cos, sin| {
                for (r, dst) in out.chunks_exact_mut(hd).enumerate() {
                    let (n, j, s) = (r / (h * t), (r / t) % h, r % t);
                    let src = &x[((n * t + s) * heads + j / group) * hd..][..hd];
                    if rotate {
                        let table = (n * t + s) * hd;
                        super::rope::rotate(
                            src,
                            &cos[table..table + hd],
                            &sin[table..table + hd],
                            dst,
                        );
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
            },
        )?;
        Ok(out)
    }

    /// Runs `f(cos, sin)` on the rotary tables, in [`vectorised`] code (`f` marked
    /// `#[inline(always)]`, so that its loop is compiled there).
    fn with_tables(&self, f: impl FnOnce(&[f32], &[f32])) -> candle_core::Result<()> {
        with_f32(&self.cos, |cos| {
            with_f32(&self.sin, |sin| {
                vectorised(
                    #[inline(always)]
                    || f(cos, sin),
                )
            })
        })?
    }

    /// The gradient of [`Self::heads_of`]: a head-major `(B·H, T, hd)` gradient summed over
    /// each group of `H / heads` heads (from zero, in the group's order) and rotated back when
    /// `rotate`, written token-major `(B, T, heads·hd)`.
    fn heads_grad(
        &self,
        g: &[f32],
        heads: usize,
        rotate: bool,
        (b, t, h, hd): (usize, usize, usize, usize),
    ) -> candle_core::Result<Vec<f32>> {
        let group = h / heads;
        let mut out = vec![0f32; b * t * heads * hd];
        let mut sum = vec![0f32; hd];
        self.with_tables(
            #[inline(always)]
            |cos, sin| {
                for (r, dst) in out.chunks_exact_mut(hd).enumerate() {
                    let (n, s, i) = (r / (t * heads), (r / heads) % t, r % heads);
                    sum.fill(0.0);
                    for j in i * group..(i + 1) * group {
                        let src = &g[((n * h + j) * t + s) * hd..][..hd];
                        sum.iter_mut().zip(src).for_each(|(a, &x)| *a += x);
                    }
                    if rotate {
                        let table = (n * t + s) * hd;
                        super::rope::rotate_grad(
                            &sum,
                            &cos[table..table + hd],
                            &sin[table..table + hd],
                            dst,
                        );
                    } else {
                        dst.copy_from_slice(&sum);
                    }
                }
            },
        )?;
        Ok(out)
    }
}

impl CustomOp3 for RotaryAttention {
    fn name(&self) -> &'static str {
        "edpo-rotary-attention"
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
        let (b, t, h, kv, hd) = self.dims(l1, l2, l3)?;
        let dims = (b, t, h, hd);
        let q = self.heads_of(slice(s1, l1, "attention")?, h, true, dims);
        let k = self.heads_of(slice(s2, l2, "attention")?, kv, true, dims);
        let v = self.heads_of(slice(s3, l3, "attention")?, kv, false, dims);
        let merged = self.core.forward_merged([q?, k?, v?], dims)?;
        Ok((CpuStorage::F32(merged), Shape::from((b, t, h * hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, h, kv, hd) = self.dims(q.layout(), k.layout(), v.layout())?;
        let dims = (b, t, h, hd);
        // The forward pass's head-major copies (q and k rotated, k and v repeated), made
        // again from the node's inputs.
        let heads_of = |x: &Tensor, heads: usize, rotate: bool| {
            with_f32(&x.contiguous()?, |x| self.heads_of(x, heads, rotate, dims))?
        };
        let heads = [
            heads_of(q, h, true)?,
            heads_of(k, kv, true)?,
            heads_of(v, kv, false)?,
        ];
        let (dq, dk, dv) = self.core.backward_merged(grad, heads, dims)?;
        let back = |d: &Tensor, heads: usize, rotate: bool| -> candle_core::Result<Tensor> {
            let d = d.contiguous()?;
            let out = with_f32(&d, |d| self.heads_grad(d, heads, rotate, dims))??;
            Tensor::from_vec(out, (b, t, heads * hd), q.device())
        };
        Ok((
            Some(back(&dq, h, true)?),
            Some(back(&dk, kv, true)?),
            Some(back(&dv, kv, false)?),
        ))
    }
}

/// Llama-family attention from its projections (see [`RotaryAttention`]): `q (B, T, H·hd)`,
/// `k`, `v (B, T, KV·hd)` with `n_head = H` query heads over `n_kv = KV` key/value heads, the
/// rotary tables `cos`, `sin (B, 1, T, hd)` and `bias (B, 1, T, T)`; gives `(B, T, H·hd)`.
pub fn rotary_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (n_head, n_kv): (usize, usize),
    (cos, sin): (&Tensor, &Tensor),
    bias: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, t, _) = q.dims3()?;
    if n_head == 0 || cos.dims() != [b, 1, t, q.dim(2)? / n_head] || sin.dims() != cos.dims() {
        bail!(
            "attention: q {:?} of {n_head} heads against rotary tables {:?}, {:?}",
            q.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    let op = RotaryAttention {
        core: Attention {
            bias: bias.flatten_all()?.contiguous()?,
            scale: scale as f32,
            wide: wide(q.dim(2)?),
        },
        n_head,
        n_kv,
        cos: cos.flatten_all()?.contiguous()?,
        sin: sin.flatten_all()?.contiguous()?,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
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
        bias: bias.flatten_all()?.contiguous()?,
        scale: scale as f32,
        wide: wide(q.dim(1)? * q.dim(3)?),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// Whether heads `width` wide together (`H·hd`) take their products through
/// [`super::gemm`]: the width of a model whose projections it runs, on a CPU that has it.
fn wide(width: usize) -> bool {
    width >= super::gemm::MIN_DIM && super::gemm::available()
}

/// `C_i = A_i·B_i` for `batch` products of `m × k` by `k × n` (`dims = (m, n, k)`), each
/// operand `batch` matrices stored one after another, row-major or (with its flag) as the
/// transpose, read in place; every product through [`super::gemm::matmul_batched`] (one output
/// buffer, not zeroed first), the products split across threads when kernels may (each on one
/// thread, so no number depends on the split).
fn batched_products(
    batch: usize,
    (m, n, k): (usize, usize, usize),
    (a, a_t): (&[f32], bool),
    (b, b_t): (&[f32], bool),
) -> Vec<f32> {
    use super::gemm::{matmul_batched, Operand};
    matmul_batched(batch, (m, n, k), |i| {
        (
            Operand::stored(&a[i * m * k..(i + 1) * m * k], m, k, a_t),
            Operand::stored(&b[i * k * n..(i + 1) * k * n], k, n, b_t),
        )
    })
}

/// The shapes of a decoding step's attention ([`decode_attention`]).
#[derive(Debug, Clone, Copy)]
pub struct DecodeDims {
    /// Rows (sequences).
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (a divisor of `heads`).
    pub kv_heads: usize,
    /// New positions per row.
    pub queries: usize,
    /// Stored positions per row and key/value head.
    pub len: usize,
    /// Positions the cache has room for per row and key/value head (`≥ len`).
    pub capacity: usize,
    /// Width of a head.
    pub head_dim: usize,
}

/// A decoding step's attention against a key/value cache read in place, outside the autograd
/// graph: `q (B, H, Tq, hd)`, `keys`, `values (B, KV, capacity, hd)` filled to `len`
/// positions, `bias (B, 1, Tq, len)`; returns `(B, Tq, H·hd)`. Query head `h` reads key/value
/// head `h / (H / KV)`, so grouped heads are never repeated in memory. Each query's scores are
/// `scale·(q·k) + bias` ([`lane_dot`]), its weights [`softmax_in_place`], and its output
/// `Σ_j p_j·v_j` added in position order. Split over (row, head) pairs across threads when
/// [`super::parallel`] allows it; no number depends on the split.
pub fn decode_attention(
    q: &[f32],
    (keys, values): (&[f32], &[f32]),
    bias: &[f32],
    d: DecodeDims,
    scale: f32,
) -> candle_core::Result<Vec<f32>> {
    let (hd, tq) = (d.head_dim, d.queries);
    let stored = d.batch * d.kv_heads * d.capacity * hd;
    if d.kv_heads == 0
        || !d.heads.is_multiple_of(d.kv_heads)
        || d.len > d.capacity
        || q.len() != d.batch * d.heads * tq * hd
        || keys.len() < stored
        || values.len() < stored
        || bias.len() != d.batch * tq * d.len
    {
        bail!("decoding attention: buffers do not match {d:?}");
    }
    let group = d.heads / d.kv_heads;
    let mut out = vec![0f32; d.batch * tq * d.heads * hd];
    // Each (row, head) pair's `Tq` output rows, written in place by the thread computing it.
    let mut pieces: Vec<Vec<&mut [f32]>> = (0..d.batch * d.heads).map(|_| Vec::new()).collect();
    for (c, piece) in out.chunks_mut(hd).enumerate() {
        let (bi, h) = (c / d.heads, c % d.heads);
        pieces[(bi / tq) * d.heads + h].push(piece);
    }
    super::team::for_each_mut(&mut pieces, |bh, out| {
        vectorised(
            #[inline(always)]
            || {
                let (b, h) = (bh / d.heads, bh % d.heads);
                let base = (b * d.kv_heads + h / group) * d.capacity * hd;
                let (k, v) = (
                    &keys[base..base + d.len * hd],
                    &values[base..base + d.len * hd],
                );
                let mut p = vec![0f32; d.len];
                for (i, o) in out.iter_mut().enumerate() {
                    let query = &q[(bh * tq + i) * hd..][..hd];
                    let mask = &bias[(b * tq + i) * d.len..][..d.len];
                    for ((s, key), &m) in p.iter_mut().zip(k.chunks_exact(hd)).zip(mask) {
                        *s = lane_dot(query, key) * scale + m;
                    }
                    softmax_in_place(&mut p);
                    for (&w, value) in p.iter().zip(v.chunks_exact(hd)) {
                        o.iter_mut().zip(value).for_each(|(o, &x)| *o += w * x);
                    }
                }
            },
        )
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    fn var(shape: &[usize], seed: usize, scale: f32) -> Var {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((((i + seed) * 7919 % 1000) as f32 / 500.0) - 1.0) * scale)
            .collect();
        Var::from_vec(v, shape, &Device::Cpu).expect("var")
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().and_then(|t| t.to_vec1()).expect("values")
    }

    /// The one-node Llama attention against the chain of fused nodes it replaced (split into
    /// heads, rotary node, repeated key/value heads, attention node, merge): the same outputs
    /// and the same gradients for q, k and v, as numbers (a zero's sign aside), narrow and
    /// wide (the GEMM kernel's products), grouped or not.
    #[test]
    fn rotary_attention_equals_the_chain_of_nodes_it_replaces() -> candle_core::Result<()> {
        for (seed, (b, t, h, kv, hd)) in [(2, 5, 4, 4, 8), (2, 7, 6, 3, 16), (2, 9, 6, 2, 64)]
            .into_iter()
            .enumerate()
        {
            let q = var(&[b, t, h * hd], 10 * seed + 1, 0.7);
            let k = var(&[b, t, kv * hd], 10 * seed + 2, 0.7);
            let v = var(&[b, t, kv * hd], 10 * seed + 3, 1.0);
            let cos = var(&[b, 1, t, hd], 10 * seed + 4, 1.0).as_tensor().detach();
            let sin = var(&[b, 1, t, hd], 10 * seed + 5, 1.0).as_tensor().detach();
            let mut mask = vec![0f32; b * t * t];
            for (r, m) in mask.iter_mut().enumerate() {
                let (n, i, j) = (r / (t * t), (r / t) % t, r % t);
                if j > i || (n == 1 && j == 1 && i != 1) {
                    *m = -1e30;
                }
            }
            let bias = Tensor::from_vec(mask, (b, 1, t, t), &Device::Cpu)?;
            let scale = 1.0 / (hd as f64).sqrt();
            let fused = super::rotary_attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                (h, kv),
                (&cos, &sin),
                &bias,
                scale,
            )?;
            let heads = |x: &Tensor, n: usize| -> candle_core::Result<Tensor> {
                x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let qh = super::super::rope(&heads(q.as_tensor(), h)?, &cos, &sin)?;
            let kh = super::super::rope(&heads(k.as_tensor(), kv)?, &cos, &sin)?;
            let vh = heads(v.as_tensor(), kv)?;
            let (kh, vh) = if kv == h {
                (kh, vh)
            } else {
                (
                    crate::composed::repeat_kv(&kh, h / kv)?,
                    crate::composed::repeat_kv(&vh, h / kv)?,
                )
            };
            let chain = super::attention(&qh, &kh, &vh, &bias, scale)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, t, h * hd))?;
            assert_eq!(
                values(&fused),
                values(&chain),
                "outputs, {h} over {kv} heads"
            );
            let probe = Tensor::from_vec(
                (0..fused.elem_count())
                    .map(|i| ((i * 31 % 17) as f32) / 17.0 - 0.5)
                    .collect::<Vec<f32>>(),
                fused.dims(),
                &Device::Cpu,
            )?;
            let gf = (&fused * &probe)?.sum_all()?.backward()?;
            let gc = (&chain * &probe)?.sum_all()?.backward()?;
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (f, c) = (gf.get(x.as_tensor()), gc.get(x.as_tensor()));
                let (Some(f), Some(c)) = (f, c) else {
                    panic!("gradient of {name} missing");
                };
                assert_eq!(
                    values(f),
                    values(c),
                    "gradient of {name}, {h} over {kv} heads"
                );
            }
        }
        Ok(())
    }
}
