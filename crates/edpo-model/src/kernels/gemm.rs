//! Single-precision matrix products for the large matrices of real models: a packed,
//! cache-blocked GEMM with a 6×16 AVX2/FMA register tile (the BLIS scheme: `B` packed in
//! `KC × 16` column panels, `A` in `6 × KC` row panels, each 6×16 block of `C` accumulated in
//! twelve vector registers over `KC` steps), and on CPUs with AVX-512F a 12×32 tile over two
//! panels of each (24 registers of 16 lanes) that gives the same bits. Either operand is read
//! through any row and column strides, so transposed views cost nothing (a transposed `B`, the
//! forward pass's `x·Wᵀ`, is packed eight columns by eight depths at a time through an
//! in-register transpose).
//!
//! Used on x86-64 CPUs with AVX2 and FMA (checked at run time) for products whose three
//! dimensions are all at least [`MIN_DIM`], and for a decoding step's few rows against a large
//! weight ([`skinny`]: the weight streamed once, no packing, up to four rows' dot products per
//! column at once, eight on AVX-512, a row's sum the same whichever rows stand beside it and
//! on either instruction set; where `B` is an activation read along its rows, as in LoRA's
//! rank-16 `∂A = ∂(x·Aᵀ)ᵀ·x`, up to 16 rows' sums held in registers over blocks of `B`'s rows,
//! `scaled_rows`). The smaller products that reach it (the linear maps of the default task's
//! width-128 models, LoRA's other rank-`r` products) run here in the depth blocks candle's own
//! product would use on this CPU ([`candle_depth`]), so they keep candle's numbers bit for bit
//! and the default task's results do not move; anything else goes to candle's matrix
//! multiply. SmolLM2-sized models
//! (width 576) run every linear map and LM head here. Work is split across the kernels'
//! threads ([`super::parallel`]) by blocks of rows of `C`: one block per thread, each packing
//! its own panels and running every depth block on its rows, so a product forks and joins
//! once. `EDPO_GEMM=candle` in the environment turns it off, `EDPO_GEMM=avx2` keeps the AVX2
//! tile on AVX-512 CPUs (for measurement).
//!
//! A product's output is not zeroed before the kernel writes it ([`matmul`],
//! [`matmul_batched`]): the kernel's writers take `C` as `MaybeUninit<f32>`, the first depth
//! block writes every element and only later ones (or a caller's `C` with `accumulate`) read
//! it back, and the buffer's length is set once the product has run.
//!
//! The register tiles, the 8 × 8 transpose, the decoding steps' dot products and that
//! uninitialised output are, with [`super::simd`] and [`super::team`], the model's only
//! `unsafe` code (vector intrinsics behind a run-time CPU check); each checks the lengths of
//! everything it reads and writes before it starts.
#![allow(unsafe_code)]
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// The smallest `m`, `n` and `k` a product needs to run here.
pub const MIN_DIM: usize = 192;

const MR: usize = 6;
const NR: usize = 16;
const KC: usize = 256;
const MC: usize = 72;
const NC: usize = 3072;
/// Panels of `A` and of `B` in one AVX-512 register tile ([`tile_wide`]): 12 × 32, 24
/// accumulators of the 32 registers. On one AVX-512 CPU, one thread, a 768 × 576 × 576 product:
/// 190 GFLOP/s, against 157 with 6 × 32, 162 with 6 × 48 and 79 with 12 × 48 (36 accumulators
/// spill), 108 with the AVX2 tile.
const WIDE_A: usize = 2;
const WIDE_B: usize = 2;

/// A matrix operand: its elements and the strides of its rows and columns.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    /// The elements, element `(i, j)` at `i·row_stride + j·col_stride`.
    pub data: &'a [f32],
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A `rows × cols` matrix stored row-major in `data`, or with `transposed` stored as its
    /// `cols × rows` transpose, row-major, and read in place.
    pub fn stored(data: &'a [f32], rows: usize, cols: usize, transposed: bool) -> Self {
        if transposed {
            Operand {
                data,
                row_stride: 1,
                col_stride: rows,
            }
        } else {
            Operand {
                data,
                row_stride: cols,
                col_stride: 1,
            }
        }
    }

    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

/// Whether this CPU runs the kernel (AVX2 and FMA), and it is not switched off.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let off = std::env::var("EDPO_GEMM").is_ok_and(|v| v == "candle");
        !off && super::simd::cpu_has_avx2_fma()
    })
}

/// Whether this CPU also runs the wider register tiles ([`tile_wide`]: AVX-512F), and it is not
/// switched off (`EDPO_GEMM=avx2` keeps the 6 × 16 tile everywhere, for measurement). The two
/// tiles give the same bits: each element of `C` is the same chain of fused multiply-adds.
fn wide() -> bool {
    static WIDE: OnceLock<bool> = OnceLock::new();
    *WIDE.get_or_init(|| {
        let off = std::env::var("EDPO_GEMM").is_ok_and(|v| v == "avx2");
        !off && available() && super::simd::cpu_has_avx512f()
    })
}

/// Whether an `m × k` by `k × n` product is of the size this kernel takes (whatever the CPU).
pub fn large(m: usize, n: usize, k: usize) -> bool {
    m >= MIN_DIM && n >= MIN_DIM && k >= MIN_DIM
}

/// Whether an `m × k` by `k × n` product runs here: [`large`] or a decoding step's
/// ([`skinny`]), on a CPU that has the kernel.
pub fn eligible(m: usize, n: usize, k: usize) -> bool {
    (large(m, n, k) || skinny(m, n, k)) && available()
}

/// The most rows of a decoding step's product ([`skinny`]).
pub const SKINNY_ROWS: usize = 16;

/// Whether an `m × k` by `k × n` product is a decoding step's: a few rows (at most
/// [`SKINNY_ROWS`]) against a large weight (`n`, `k` at least [`MIN_DIM`]). It runs as one
/// streaming pass over the weight (dot products in vector lanes, no packing), which is what
/// bounds it: every weight is read once per step.
pub fn skinny(m: usize, n: usize, k: usize) -> bool {
    (1..=SKINNY_ROWS).contains(&m) && n >= MIN_DIM && k >= MIN_DIM
}

/// [`skinny`] products: `C (m × n) = A·B` reading `B` once, along its contiguous direction.
fn skinny_matmul(m: usize, n: usize, k: usize, a: Operand<'_>, b: Operand<'_>) -> Vec<f32> {
    // A's rows read in place where they are contiguous, else copied out.
    let copied: Vec<Vec<f32>> = if a.col_stride == 1 {
        Vec::new()
    } else {
        (0..m)
            .map(|i| (0..k).map(|p| a.at(i, p)).collect())
            .collect()
    };
    let a_rows: Vec<&[f32]> = if a.col_stride == 1 {
        (0..m).map(|i| &a.data[i * a.row_stride..][..k]).collect()
    } else {
        copied.iter().map(Vec::as_slice).collect()
    };
    let threads = if super::parallel() {
        super::threads()
    } else {
        1
    };
    // Output columns in blocks, one per thread, each block's part of every row of C written
    // in place by the thread computing it.
    let width = n.div_ceil(threads).max(1);
    let mut c = vec![0f32; m * n];
    let mut blocks: Vec<Vec<&mut [f32]>> = (0..n.div_ceil(width)).map(|_| Vec::new()).collect();
    for row in c.chunks_mut(n) {
        for (s, part) in row.chunks_mut(width).enumerate() {
            blocks[s].push(part);
        }
    }
    super::team::for_each_mut(&mut blocks, |s, out| {
        let j0 = s * width;
        let w = width.min(n - j0);
        if b.row_stride == 1 {
            // Column j of B is contiguous (a transposed `(out, in)` weight): dot products,
            // up to four rows (eight on AVX-512) against each column at once, so the column
            // is loaded once per group of rows and the group's sums advance side by side.
            let per = if wide() { DOTS_WIDE } else { 4 };
            let mut sums = [0f32; DOTS_WIDE];
            // Column j is written across every output row, so j indexes rather than iterates.
            #[allow(clippy::needless_range_loop)]
            for j in 0..w {
                let column = &b.data[(j0 + j) * b.col_stride..][..k];
                for (g, rows) in a_rows.chunks(per).enumerate() {
                    dots(rows, column, &mut sums[..rows.len()]);
                    for (r, &x) in sums[..rows.len()].iter().enumerate() {
                        out[per * g + r][j] = x;
                    }
                }
            }
        } else if b.col_stride == 1 {
            // Row p of B contiguous (an activation, as in LoRA's `∂A = ∂(x·Aᵀ)ᵀ·x`): blocks
            // of a few rows by sixteen columns summed over every p in registers.
            let (mut rows, mut dst) = (&a_rows[..], &mut out[..]);
            let wide = wide();
            let most = if wide { AXPY_ROWS_WIDE } else { AXPY_ROWS };
            while !rows.is_empty() {
                // The largest power of two of rows that fits: one pass over B for 16 rows.
                let take = 1 << rows.len().min(most).ilog2();
                let (now, later) = rows.split_at(take);
                let (d_now, d_later) = std::mem::take(&mut dst).split_at_mut(take);
                scaled_rows(now, b, (j0, k), d_now, wide);
                (rows, dst) = (later, d_later);
            }
        } else {
            // Rows of B in turn, each added to every output row it scales.
            for p in 0..k {
                for (row, dst) in a_rows.iter().zip(out.iter_mut()) {
                    let x = row[p];
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d += x * b.at(p, j0 + j);
                    }
                }
            }
        }
    });
    c
}

/// Output rows [`scaled_rows`] sums at once: AVX2, two registers of columns per row.
const AXPY_ROWS: usize = 4;
/// Output rows [`scaled_rows`] sums at once on AVX-512: one register of columns per row.
const AXPY_ROWS_WIDE: usize = 16;

/// `dst[r][j] = Σ_p rows[r][p]·B[p, j0 + j]` into zeroed `dst` for up to [`AXPY_ROWS_WIDE`]
/// rows (AVX-512, `wide`: the CPU must have it) or [`AXPY_ROWS`] (AVX2, where the CPU has it),
/// `B`'s rows contiguous. Each sum is taken in order of `p` from zero, a product then a sum per
/// step (no fused multiply-add): the bits of adding `x·B[p, ·]` to zeroed rows one `p` after
/// another, which is what this computed before, with blocks of rows × 16 columns of sums held in
/// registers over blocks of `p` instead of every output row read and written again for each
/// `p`. Columns past the last full sixteen (all of them without AVX2) take the scalar chain.
fn scaled_rows(
    rows: &[&[f32]],
    b: Operand<'_>,
    (j0, k): (usize, usize),
    dst: &mut [&mut [f32]],
    wide: bool,
) {
    let w = dst.first().map_or(0, |d| d.len());
    assert!(
        rows.len() == dst.len()
            && rows.len() <= AXPY_ROWS_WIDE
            && rows.iter().all(|r| r.len() >= k)
            && dst.iter().all(|d| d.len() == w)
            && b.col_stride == 1
            && (k == 0 || (k - 1) * b.row_stride + j0 + w <= b.data.len())
            && (!wide || super::simd::cpu_has_avx512f()),
        "gemm: scaled rows out of bounds"
    );
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if wide {
        // SAFETY: the CPU has AVX-512F (checked above); the rows hold `k` elements, the destinations
        // `w`, and row `p < k` of `B` holds columns `j0..j0 + w` (checked above).
        unsafe {
            j = match rows.len() {
                16 => scaled_rows_avx512::<16>(rows, b, j0, k, dst),
                8 => scaled_rows_avx512::<8>(rows, b, j0, k, dst),
                4 => scaled_rows_avx512::<4>(rows, b, j0, k, dst),
                2 => scaled_rows_avx512::<2>(rows, b, j0, k, dst),
                1 => scaled_rows_avx512::<1>(rows, b, j0, k, dst),
                _ => 0,
            };
        }
    } else if available() {
        // SAFETY: the CPU has AVX2 and FMA (`available`); as above.
        unsafe {
            j = match rows.len() {
                4 => scaled_rows_avx2::<4>(rows, b, j0, k, dst),
                2 => scaled_rows_avx2::<2>(rows, b, j0, k, dst),
                1 => scaled_rows_avx2::<1>(rows, b, j0, k, dst),
                _ => 0,
            };
        }
    }
    // The columns left (fewer than sixteen, or all without AVX2), the same chains in scalars.
    for (row, d) in rows.iter().zip(dst.iter_mut()) {
        for (jj, out) in d.iter_mut().enumerate().skip(j) {
            let mut acc = 0f32;
            for (p, &x) in row[..k].iter().enumerate() {
                acc += x * b.data[p * b.row_stride + j0 + jj];
            }
            *out = acc;
        }
    }
}

/// [`scaled_rows_avx2`] on AVX-512 for up to 16 rows, one 16-lane register of sums per row, so
/// that with LoRA's rank 16 every row of `B` is loaded once: the same chains, the same bits.
///
/// # Safety
/// The CPU must support AVX-512F; the bounds [`scaled_rows`] checks hold, and `dst` is zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn scaled_rows_avx512<const R: usize>(
    rows: &[&[f32]],
    b: Operand<'_>,
    j0: usize,
    k: usize,
    dst: &mut [&mut [f32]],
) -> usize {
    use std::arch::x86_64::*;
    let w = dst[0].len();
    let full = w / 16 * 16;
    let pa: [*const f32; R] = std::array::from_fn(|r| rows[r].as_ptr());
    let pd: [*mut f32; R] = std::array::from_fn(|r| dst[r].as_mut_ptr());
    let mut p0 = 0;
    while p0 < k {
        let depth = AXPY_DEPTH.min(k - p0);
        let mut j = 0;
        while j < full {
            let mut s: [__m512; R] = std::array::from_fn(|r| _mm512_loadu_ps(pd[r].add(j)));
            let mut pb = b.data.as_ptr().add(p0 * b.row_stride + j0 + j);
            for p in p0..p0 + depth {
                _mm_prefetch::<_MM_HINT_T0>(pb.wrapping_add(AXPY_AHEAD).cast());
                let bv = _mm512_loadu_ps(pb);
                for r in 0..R {
                    let x = _mm512_set1_ps(*pa[r].add(p));
                    s[r] = _mm512_add_ps(s[r], _mm512_mul_ps(x, bv));
                }
                pb = pb.wrapping_add(b.row_stride);
            }
            for r in 0..R {
                _mm512_storeu_ps(pd[r].add(j), s[r]);
            }
            j += 16;
        }
        p0 += depth;
    }
    full
}

/// How far along a row of `B` (in `f32`s) [`scaled_rows_avx2`] and [`scaled_rows_avx512`]
/// request the cache line the next block of columns will read: the kernels step down `B` a row
/// at a time, 2304 bytes or more apart (wider than the hardware's stride prefetcher follows),
/// and without the requests each step waited on its load.
const AXPY_AHEAD: usize = 64;

/// Rows of `B` [`scaled_rows_avx2`] takes in one pass over the output columns (at most
/// 64 × 16 floats, 4 KiB, of `B` at a time, read from L1 by every group of rows).
const AXPY_DEPTH: usize = 16;

/// [`scaled_rows`] for `R` rows and every full block of 16 columns, returning the first column
/// it left. The depths go in blocks of [`AXPY_DEPTH`], each block's sums added onto those of
/// the blocks before (read back from `dst`, which starts at zero), so each sum is the same
/// chain in order of `p`; walking all of `k` per block of columns instead strode down `B` a
/// cache line per step, across pages the prefetcher does not follow.
///
/// # Safety
/// The CPU must support AVX2; the bounds [`scaled_rows`] checks hold, and `dst` is zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scaled_rows_avx2<const R: usize>(
    rows: &[&[f32]],
    b: Operand<'_>,
    j0: usize,
    k: usize,
    dst: &mut [&mut [f32]],
) -> usize {
    use std::arch::x86_64::*;
    let w = dst[0].len();
    let full = w / 16 * 16;
    let pa: [*const f32; R] = std::array::from_fn(|r| rows[r].as_ptr());
    let pd: [*mut f32; R] = std::array::from_fn(|r| dst[r].as_mut_ptr());
    let mut p0 = 0;
    while p0 < k {
        let depth = AXPY_DEPTH.min(k - p0);
        let mut j = 0;
        while j < full {
            let mut s0: [__m256; R] = std::array::from_fn(|r| _mm256_loadu_ps(pd[r].add(j)));
            let mut s1: [__m256; R] = std::array::from_fn(|r| _mm256_loadu_ps(pd[r].add(j + 8)));
            let mut pb = b.data.as_ptr().add(p0 * b.row_stride + j0 + j);
            for p in p0..p0 + depth {
                _mm_prefetch::<_MM_HINT_T0>(pb.wrapping_add(AXPY_AHEAD).cast());
                let (b0, b1) = (_mm256_loadu_ps(pb), _mm256_loadu_ps(pb.add(8)));
                for r in 0..R {
                    let x = _mm256_broadcast_ss(&*pa[r].add(p));
                    s0[r] = _mm256_add_ps(s0[r], _mm256_mul_ps(x, b0));
                    s1[r] = _mm256_add_ps(s1[r], _mm256_mul_ps(x, b1));
                }
                pb = pb.wrapping_add(b.row_stride);
            }
            for r in 0..R {
                _mm256_storeu_ps(pd[r].add(j), s0[r]);
                _mm256_storeu_ps(pd[r].add(j + 8), s1[r]);
            }
            j += 16;
        }
        p0 += depth;
    }
    full
}

/// `C = A·B` for `A (m × k)`, `B (k × n)`, into a new row-major `m × n` buffer. Callers check
/// [`eligible`] first; on a CPU without the kernel this computes the product naively.
pub fn matmul(m: usize, n: usize, k: usize, a: Operand<'_>, b: Operand<'_>) -> Vec<f32> {
    matmul_in_blocks(m, n, k, a, b, depth_block(k))
}

/// [`matmul`] in depth blocks of `depth`.
fn matmul_in_blocks(
    m: usize,
    n: usize,
    k: usize,
    a: Operand<'_>,
    b: Operand<'_>,
    depth: usize,
) -> Vec<f32> {
    let mut c = Vec::with_capacity(m * n);
    write_product(m, n, k, a, b, &mut c.spare_capacity_mut()[..m * n], depth);
    // SAFETY: `write_product` wrote every one of the `m·n` elements (its contract), and the
    // vector's capacity holds them.
    unsafe { c.set_len(m * n) };
    c
}

/// `C = A·B` into `c` (`m × n`, row-major), every element written, none read: the product's
/// output needs no zeroing first (which cost a `memset` of every fresh output, 2% of a
/// SmolLM2 step).
fn write_product(
    m: usize,
    n: usize,
    k: usize,
    a: Operand<'_>,
    b: Operand<'_>,
    c: &mut [MaybeUninit<f32>],
    depth: usize,
) {
    assert_eq!(c.len(), m * n, "gemm: C must hold m × n elements");
    if !available() {
        for i in 0..m {
            for j in 0..n {
                c[i * n + j].write((0..k).map(|p| a.at(i, p) * b.at(p, j)).sum());
            }
        }
    } else if k == 0 {
        c.iter_mut().for_each(|x| {
            x.write(0.0);
        });
    } else {
        split_rows(m, n, k, a, b, c, false, depth);
    }
}

/// `C_i = A_i·B_i` for `batch` products of `m × k` by `k × n` (`dims = (m, n, k)`), the
/// `i`-th pair of operands `operands(i)`, into one new buffer of `batch` row-major `m × n`
/// blocks (not zeroed first): each product on one thread ([`super::as_shard`]), the products
/// split across the kernels' threads when they may, so no number depends on the split.
pub fn matmul_batched<'a>(
    batch: usize,
    (m, n, k): (usize, usize, usize),
    operands: impl Fn(usize) -> (Operand<'a>, Operand<'a>) + Sync,
) -> Vec<f32> {
    let len = batch * m * n;
    let mut c = Vec::with_capacity(len);
    if len > 0 {
        let one = |(i, c): (usize, &mut [MaybeUninit<f32>])| {
            let (a, b) = operands(i);
            super::as_shard(true, || write_product(m, n, k, a, b, c, depth_block(k)));
        };
        let spare = &mut c.spare_capacity_mut()[..len];
        if super::parallel() {
            spare.par_chunks_mut(m * n).enumerate().for_each(one);
        } else {
            spare.chunks_mut(m * n).enumerate().for_each(one);
        }
    }
    // SAFETY: each of the `batch` blocks of `m·n` elements was written in full by
    // `write_product` (or there are none), within the vector's capacity.
    unsafe { c.set_len(len) };
    c
}

/// `C = A·B`, or `C += A·B` with `accumulate`, for a row-major `C (m × n)`.
pub fn matmul_into(
    m: usize,
    n: usize,
    k: usize,
    a: Operand<'_>,
    b: Operand<'_>,
    c: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(c.len(), m * n, "gemm: C must hold m × n elements");
    if !accumulate {
        write_product(m, n, k, a, b, as_uninit(c), depth_block(k));
    } else if !available() {
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] += (0..k).map(|p| a.at(i, p) * b.at(p, j)).sum::<f32>();
            }
        }
    } else if k > 0 {
        split_rows(m, n, k, a, b, as_uninit(c), true, depth_block(k));
    }
}

/// The depth blocks a product of inner dimension `k` runs in: of equal size (at most `KC`, the
/// last possibly shorter), so that no pass over `C` is a thin remainder. Each element of `C` is
/// its first block's chain of multiply-adds, then each later block's chain added in order.
pub fn depth_block(k: usize) -> usize {
    k.div_ceil(k.div_ceil(KC).max(1)).max(1)
}

/// [`matmul_into`] (`C (+)= A·B`, `A` through any strides) in depth blocks of `depth` instead of
/// [`depth_block`]`(k)`, on this kernel ([`available`] must hold). A product over `K` cut into
/// consecutive parts at multiples of `depth_block(K)`, each part run with that depth and added
/// to `C` in order (the first part written), gives every element of `C` the bits of the whole
/// product: the same blocks, the same additions.
#[allow(clippy::too_many_arguments)]
pub fn matmul_into_depth(
    m: usize,
    n: usize,
    k: usize,
    a: Operand<'_>,
    b: Operand<'_>,
    c: &mut [f32],
    accumulate: bool,
    depth: usize,
) {
    assert!(
        available() && depth > 0 && c.len() == m * n,
        "gemm: a product in depth blocks of {depth} into {} elements for {m} × {n}",
        c.len()
    );
    if k > 0 {
        split_rows(m, n, k, a, b, as_uninit(c), accumulate, depth);
    } else if !accumulate {
        c.fill(0.0);
    }
}

/// The depth blocks candle's CPU product of f32 runs an `m × k` by `k × n` product in on this
/// CPU: its `gemm` crate's AVX2/FMA kernel (a 16 × 6 tile) accumulates each element as one
/// chain of multiply-adds from zero per depth block, the blocks added in order, which is what
/// [`matmul_into_depth`] computes with these blocks (a test checks LoRA's shapes bit for bit).
/// The blocks come from that crate's own rule (its `kernel_params`, from this CPU's L1 cache:
/// up to 1024 deep on a 48 KiB 12-way L1, 512 on a 32 KiB 8-way one), so they differ between
/// machines as candle's do. `None` for the shapes it sends to other kernels (`k ≤ 2`, a single
/// row or column, at most 256 outputs) or where this kernel does not run.
pub fn candle_depth(m: usize, n: usize, k: usize) -> Option<usize> {
    if !available() || k <= 2 || m <= 1 || n <= 1 || m * n <= 256 {
        return None;
    }
    if m <= 64 && n <= 64 {
        return Some(k.min(512));
    }
    Some(gemm_common::cache::kernel_params(m, n, k, 16, 6, std::mem::size_of::<f32>()).kc)
}

/// `a·b` of storages with 2-D layouts `(m, k)` and `(k, n)` on this kernel in candle's depth
/// blocks ([`candle_depth`]): candle's numbers, for the thin products it would otherwise run
/// (LoRA's rank-`r` maps). `None` where that does not apply.
pub fn matmul_storage_as_candle(
    a: (&candle_core::CpuStorage, &candle_core::Layout),
    b: (&candle_core::CpuStorage, &candle_core::Layout),
) -> Option<(Vec<f32>, (usize, usize))> {
    let (&[m, k], &[k2, n]) = (a.1.dims(), b.1.dims()) else {
        return None;
    };
    let depth = candle_depth(m, n, k).filter(|_| k == k2)?;
    let (oa, ob) = (operand(a.0, a.1)?, operand(b.0, b.1)?);
    Some((matmul_in_blocks(m, n, k, oa, ob, depth), (m, n)))
}

/// `a·b` for 2-D tensors, outside the autograd graph, with candle's numbers: on this kernel in
/// candle's depth blocks where [`candle_depth`] gives them, else candle's product itself.
pub fn matmul_tensors_as_candle(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    match on_cpu_storages(a, b, matmul_storage_as_candle) {
        Some((c, shape)) => candle_core::Tensor::from_vec(c, shape, a.device()),
        None => a.matmul(b),
    }
}

/// `c`'s elements as the kernel's output type. Sound: `MaybeUninit<f32>` has `f32`'s layout,
/// every element of `c` is initialised, and the kernel writes only initialised values.
fn as_uninit(c: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: as above; the returned slice borrows `c` exclusively for its lifetime.
    unsafe { &mut *(c as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// `C (+)= A·B` on the kernels' threads: one contiguous block of rows of `C` per thread, each
/// thread packing its own panels of `B` and running every depth block on its rows: one fork
/// and join per product, not one per depth block. No number depends on the split: each
/// element of `C` is accumulated over the same depth blocks (of `depth`) either way. With
/// `accumulate`, every element of `c` must be initialised; without, every element is written.
#[allow(clippy::too_many_arguments)]
fn split_rows(
    m: usize,
    n: usize,
    k: usize,
    a: Operand<'_>,
    b: Operand<'_>,
    c: &mut [MaybeUninit<f32>],
    accumulate: bool,
    depth: usize,
) {
    if super::parallel() && m > MC {
        let rows = m.div_ceil(super::threads()).div_ceil(MR) * MR;
        c.par_chunks_mut(rows * n)
            .enumerate()
            .for_each(|(t, part)| {
                let a = Operand {
                    data: &a.data[t * rows * a.row_stride..],
                    ..a
                };
                serial_into(n, k, a, b, part, accumulate, depth);
            });
    } else {
        serial_into(n, k, a, b, c, accumulate, depth);
    }
}

/// `C (+)= A·B` on this thread alone, `C`'s rows (and `A`'s) as many as `c` holds rows of `n`.
fn serial_into(
    n: usize,
    k: usize,
    a: Operand<'_>,
    b: Operand<'_>,
    c: &mut [MaybeUninit<f32>],
    accumulate: bool,
    depth: usize,
) {
    PACKED.with(|buffers| match buffers.try_borrow_mut() {
        Ok(mut buffers) => {
            let (packed_b_buf, packed_a_buf) = &mut *buffers;
            serial_with(n, k, a, b, c, accumulate, depth, packed_b_buf, packed_a_buf);
        }
        // Not reached (a product never runs inside another on one thread); fresh buffers then.
        Err(_) => serial_with(
            n,
            k,
            a,
            b,
            c,
            accumulate,
            depth,
            &mut Vec::new(),
            &mut Vec::new(),
        ),
    });
}

thread_local! {
    /// Each thread's buffers for packed panels of `B` and `A`, kept between products: a
    /// product's panels are written in full before they are read, so what a buffer held is
    /// never seen, and a buffer grows (and is zeroed) only when a product needs more.
    static PACKED: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// [`serial_into`] with its buffers for packed panels.
#[allow(clippy::too_many_arguments)]
fn serial_with(
    n: usize,
    k: usize,
    a: Operand<'_>,
    b: Operand<'_>,
    c: &mut [MaybeUninit<f32>],
    accumulate: bool,
    kc_size: usize,
    packed_b_buf: &mut Vec<f32>,
    packed_a_buf: &mut Vec<f32>,
) {
    let wide = wide();
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(kc_size) {
            let kc = kc_size.min(k - pc);
            let packed_b = pack_b(packed_b_buf, b, pc, kc, jc, nc);
            let add = accumulate || pc > 0;
            for (ib, rows) in c.chunks_mut(MC * n).enumerate() {
                let ic = ib * MC;
                let mc = rows.len() / n;
                let packed_a = pack_a(packed_a_buf, a, ic, mc, pc, kc);
                if wide {
                    wide_tiles(kc, packed_a, packed_b, rows, n, jc, mc, nc, add);
                } else {
                    for jr in (0..nc).step_by(NR) {
                        let nr = NR.min(nc - jr);
                        let bp = &packed_b[(jr / NR) * kc * NR..][..kc * NR];
                        for ir in (0..mc).step_by(MR) {
                            let mr = MR.min(mc - ir);
                            let ap = &packed_a[(ir / MR) * kc * MR..][..kc * MR];
                            let tile = &mut rows[ir * n + jc + jr..];
                            tile_6x16(kc, ap, bp, tile, n, mr, nr, add);
                        }
                    }
                }
            }
        }
    }
}

/// A 2-D f32 CPU operand's elements from its start, with its strides.
fn operand<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> Option<Operand<'a>> {
    let candle_core::CpuStorage::F32(data) = storage else {
        return None;
    };
    match layout.stride() {
        [rs, cs] => Some(Operand {
            data: &data[layout.start_offset()..],
            row_stride: *rs,
            col_stride: *cs,
        }),
        _ => None,
    }
}

/// `a·b` of storages with 2-D layouts `(m, k)` and `(k, n)` through this kernel, when
/// [`eligible`]; `None` otherwise.
pub fn matmul_storage(
    a: (&candle_core::CpuStorage, &candle_core::Layout),
    b: (&candle_core::CpuStorage, &candle_core::Layout),
) -> Option<(Vec<f32>, (usize, usize))> {
    matmul_storage_with(a, b, false)
}

fn matmul_storage_with(
    a: (&candle_core::CpuStorage, &candle_core::Layout),
    b: (&candle_core::CpuStorage, &candle_core::Layout),
    any_size: bool,
) -> Option<(Vec<f32>, (usize, usize))> {
    let (&[m, k], &[k2, n]) = (a.1.dims(), b.1.dims()) else {
        return None;
    };
    let ok = if any_size {
        available()
    } else {
        eligible(m, n, k)
    };
    if k != k2 {
        return None;
    }
    if !ok {
        // Below this kernel's sizes, candle's product: its numbers, here in its depth blocks.
        return match any_size {
            true => None,
            false => matmul_storage_as_candle(a, b),
        };
    }
    let (oa, ob) = (operand(a.0, a.1)?, operand(b.0, b.1)?);
    if skinny(m, n, k) && !any_size {
        return Some((skinny_matmul(m, n, k, oa, ob), (m, n)));
    }
    Some((matmul(m, n, k, oa, ob), (m, n)))
}

/// `c += a·b` for 2-D f32 CPU tensors `a (m, k)`, `b (k, n)` and a row-major `c`, through this
/// kernel whatever the sizes where it is available (else candle's product, added), as
/// [`matmul_tensors_any_size`]. The products of a sum over chunks
/// then need no buffer each.
pub fn matmul_add_into(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    c: &mut [f32],
) -> candle_core::Result<()> {
    let done = on_kernel_into(a, b, c, true, available());
    if !done {
        let part = a.matmul(b)?.contiguous()?;
        super::with_f32(&part, |p| {
            if p.len() == c.len() {
                c.iter_mut().zip(p).for_each(|(x, &y)| *x += y);
                Ok(())
            } else {
                Err(candle_core::Error::Msg(format!(
                    "gemm: a product of {} elements added to {}",
                    p.len(),
                    c.len()
                )))
            }
        })??;
    }
    Ok(())
}

/// `c (+)= a·b` through this kernel for 2-D f32 CPU tensors (`c` row-major, of `a`'s rows by
/// `b`'s columns) when `allowed`; whether it ran.
fn on_kernel_into(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    c: &mut [f32],
    accumulate: bool,
    allowed: bool,
) -> bool {
    let (Ok((m, k)), Ok((k2, n))) = (a.dims2(), b.dims2()) else {
        return false;
    };
    if k != k2 || c.len() != m * n {
        return false;
    }
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    match (&*sa, &*sb) {
        (candle_core::Storage::Cpu(ca), candle_core::Storage::Cpu(cb)) if allowed => {
            match (operand(ca, la), operand(cb, lb)) {
                (Some(oa), Some(ob)) => {
                    matmul_into(m, n, k, oa, ob, c, accumulate);
                    true
                }
                _ => false,
            }
        }
        _ => false,
    }
}

/// `a·b` for 2-D tensors, outside the autograd graph: through this kernel for eligible f32
/// CPU products (any strides, so `t()` views are free), else candle's matrix multiply.
pub fn matmul_tensors(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    product(a, b, false)
}

/// `A·B + D` for `D` of the product's shape: [`matmul_tensors`]'s product with `D` added in
/// place on its buffer, the numbers of `(A·B) + D` without a third buffer.
pub fn matmul_tensors_plus(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    d: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    let ((m, _), (_, n)) = (a.dims2()?, b.dims2()?);
    if d.dims2()? != (m, n) {
        candle_core::bail!("gemm: adding {:?} to an {m} × {n} product", d.dims());
    }
    let Some((mut c, _)) = kernel_product(a, b, false) else {
        return a.matmul(b)? + d;
    };
    super::with_f32(&d.contiguous()?, |d| {
        c.iter_mut().zip(d).for_each(|(x, &y)| *x += y);
    })?;
    candle_core::Tensor::from_vec(c, (m, n), a.device())
}

/// [`matmul_tensors`] written into `c` (row-major, `m × n`): the same numbers, without a new
/// buffer where this kernel runs the product.
pub fn matmul_tensors_into(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    c: &mut [f32],
) -> candle_core::Result<()> {
    let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
    if k != k2 || c.len() != m * n {
        candle_core::bail!("gemm: {m} × {k} by {k2} × {n} into {} elements", c.len());
    }
    let done = on_kernel_into(a, b, c, false, eligible(m, n, k) && !skinny(m, n, k));
    if !done {
        let p = matmul_tensors(a, b)?.contiguous()?;
        super::with_f32(&p, |p| c.copy_from_slice(p))?;
    }
    Ok(())
}

/// [`matmul_tensors`] through this kernel whatever the sizes, wherever it is available: for
/// operations whose numbers are new anyway (the chunked LM head), where a thin dimension
/// should not send a product back to the slower kernel.
pub fn matmul_tensors_any_size(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    product(a, b, true)
}

/// `A·B` on this kernel for CPU tensors it takes, else `None`.
fn kernel_product(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    any_size: bool,
) -> Option<(Vec<f32>, (usize, usize))> {
    on_cpu_storages(a, b, |a, b| matmul_storage_with(a, b, any_size))
}

/// A product `f` of two tensors' CPU storages and layouts; `None` for other devices.
fn on_cpu_storages(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    f: impl FnOnce(
        (&candle_core::CpuStorage, &candle_core::Layout),
        (&candle_core::CpuStorage, &candle_core::Layout),
    ) -> Option<(Vec<f32>, (usize, usize))>,
) -> Option<(Vec<f32>, (usize, usize))> {
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    match (&*sa, &*sb) {
        (candle_core::Storage::Cpu(ca), candle_core::Storage::Cpu(cb)) => f((ca, la), (cb, lb)),
        _ => None,
    }
}

fn product(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    any_size: bool,
) -> candle_core::Result<candle_core::Tensor> {
    match kernel_product(a, b, any_size) {
        Some((c, shape)) => candle_core::Tensor::from_vec(c, shape, a.device()),
        None => a.matmul(b),
    }
}

/// `out[r] = Σ_i rows[r][i]·column[i]` for up to four rows, the column read once for all of
/// them: in eight-wide fused multiply-adds with two accumulators per row where the CPU has
/// them (else the lanes of [`super::lane_dot`]). A row's sum does not depend on the rows beside
/// it.
fn dots(rows: &[&[f32]], column: &[f32], out: &mut [f32]) {
    assert!(
        rows.len() == out.len()
            && rows.len() <= DOTS_WIDE
            && rows.iter().all(|r| r.len() == column.len()),
        "gemm: dot products of unequal lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if wide() {
        // SAFETY: the CPU has AVX-512F (`wide`); every row has the column's length and `out`
        // one element per row (checked just above).
        unsafe {
            match rows.len() {
                8 => dots_avx512::<8>(rows, column, out),
                7 => dots_avx512::<7>(rows, column, out),
                6 => dots_avx512::<6>(rows, column, out),
                5 => dots_avx512::<5>(rows, column, out),
                4 => dots_avx512::<4>(rows, column, out),
                3 => dots_avx512::<3>(rows, column, out),
                2 => dots_avx512::<2>(rows, column, out),
                _ => dots_avx512::<1>(rows, column, out),
            }
        }
        return;
    }
    assert!(
        rows.len() <= 4,
        "gemm: more than four rows' dot products without AVX-512"
    );
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX2 and FMA (`available`); every row has the column's length
        // and `out` one element per row (checked just above).
        unsafe {
            match rows.len() {
                4 => dots_avx2::<4>(rows, column, out),
                3 => dots_avx2::<3>(rows, column, out),
                2 => dots_avx2::<2>(rows, column, out),
                _ => dots_avx2::<1>(rows, column, out),
            }
        }
        return;
    }
    for (o, row) in out.iter_mut().zip(rows) {
        *o = super::lane_dot(row, column);
    }
}

/// How far ahead of the dot products' loads (in `f32`s: 2.5 KiB) the weight's cache lines are
/// requested, one request per line. A decoding step streams every weight once from memory,
/// column after contiguous column, and without the requests the loop waited on the weight's
/// loads. Measured on a 2-core AVX-512 Xeon, SmolLM2 sampling on one thread (weights on huge
/// pages, the AVX-512 dot products; `reports/bench/`, sitting q), tokens/s: 256 → 120–122, 384
/// and 512 → 123–125, 640 → 124–127, 768 → 125–126, 1024 → 121–122, 2048 → 117–119, 4096 →
/// 113–114; at 640 against 4096, two threads 158–162 against 149–150 and the AVX2 dot products
/// 105 against 97. A prefetch never faults, so requests past the weight's end are harmless,
/// and no result changes.
const PREFETCH: usize = 640;

/// [`dots`] for `R` rows after its checks.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `rows` and `out` hold `R` elements, every row the
/// column's length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<const R: usize>(rows: &[&[f32]], column: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = column.len();
    let pb = column.as_ptr();
    let pa: [*const f32; R] = std::array::from_fn(|r| rows[r].as_ptr());
    let (mut s0, mut s1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let mut i = 0;
    while i + 16 <= n {
        _mm_prefetch::<_MM_HINT_T0>(pb.wrapping_add(i + PREFETCH).cast());
        let (b0, b1) = (_mm256_loadu_ps(pb.add(i)), _mm256_loadu_ps(pb.add(i + 8)));
        for r in 0..R {
            s0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(pa[r].add(i)), b0, s0[r]);
            s1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(pa[r].add(i + 8)), b1, s1[r]);
        }
        i += 16;
    }
    for r in 0..R {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(s0[r], s1[r]));
        let mut total: f32 = lanes.iter().sum();
        for t in i..n {
            total += rows[r][t] * column[t];
        }
        out[r] = total;
    }
}

/// Rows whose dot products with one column [`dots`] takes at once on an AVX-512 CPU.
const DOTS_WIDE: usize = 8;

/// [`dots`] for `R` rows on AVX-512: each row's sum in one 16-lane register, whose lane `l`
/// is the chain [`dots_avx2`] accumulates in lane `l % 8` of its first (`l < 8`) or second
/// register, then the two halves added and the eight lanes summed in order as there: the same
/// bits, with one load of the column per sixteen elements for all `R` rows.
///
/// # Safety
/// The CPU must support AVX-512F; `rows` and `out` hold `R` elements, every row the column's
/// length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dots_avx512<const R: usize>(rows: &[&[f32]], column: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = column.len();
    let pb = column.as_ptr();
    let pa: [*const f32; R] = std::array::from_fn(|r| rows[r].as_ptr());
    let mut s = [_mm512_setzero_ps(); R];
    let mut i = 0;
    while i + 16 <= n {
        _mm_prefetch::<_MM_HINT_T0>(pb.wrapping_add(i + PREFETCH).cast());
        let b = _mm512_loadu_ps(pb.add(i));
        for r in 0..R {
            s[r] = _mm512_fmadd_ps(_mm512_loadu_ps(pa[r].add(i)), b, s[r]);
        }
        i += 16;
    }
    for r in 0..R {
        let (low, high) = (
            _mm512_castps512_ps256(s[r]),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s[r]))),
        );
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(low, high));
        let mut total: f32 = lanes.iter().sum();
        for t in i..n {
            total += rows[r][t] * column[t];
        }
        out[r] = total;
    }
}

/// The first `len` elements of `buf`, grown (never shrunk) to hold them, left as they were
/// (every panel is written in full, a partial one zeroed first, so nothing is cleared twice).
/// (Starting the packed panels at a 64-byte boundary was measured and made no difference
/// beyond the noise.)
fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// Packs `B[pc..pc+kc, jc..jc+nc]` as `⌈nc/16⌉` panels of `kc × 16`, zero-padded, into `out`;
/// returns the packed panels.
fn pack_b<'o>(
    out: &'o mut Vec<f32>,
    b: Operand<'_>,
    pc: usize,
    kc: usize,
    jc: usize,
    nc: usize,
) -> &'o [f32] {
    let packed = sized(out, nc.div_ceil(NR) * kc * NR);
    if b.col_stride == 1 {
        // Rows of B contiguous: read each row once along its length, its runs of sixteen
        // written to every panel in turn. (Panel by panel, each step read a row further down
        // `B`, farther apart than the hardware's stride prefetcher follows.)
        let full = nc / NR;
        if full * NR < nc {
            packed[full * kc * NR..].fill(0.0);
        }
        for p in 0..kc {
            let row = &b.data[(pc + p) * b.row_stride + jc..][..nc];
            let runs = row.chunks_exact(NR);
            let rest = runs.remainder();
            for (q, run) in runs.enumerate() {
                // A constant sixteen: moved in vector registers, not by a call to memmove.
                let dst: &mut [f32; NR] = (&mut packed[(q * kc + p) * NR..][..NR])
                    .try_into()
                    .expect("a run of sixteen");
                *dst = run.try_into().expect("a run of sixteen");
            }
            if !rest.is_empty() {
                packed[(full * kc + p) * NR..][..rest.len()].copy_from_slice(rest);
            }
        }
        return packed;
    }
    let pack = |(q, panel): (usize, &mut [f32])| {
        let j0 = jc + q * NR;
        let width = NR.min(jc + nc - j0);
        if width < NR {
            panel.fill(0.0);
        }
        if b.row_stride == 1 {
            // A transposed view: each column is contiguous, so read along it, eight columns
            // by eight depths at a time transposed in registers, the rest one by one.
            let (groups, blocks) = (width / 8, kc / 8);
            for g in 0..groups {
                let columns: [&[f32]; 8] =
                    std::array::from_fn(|j| &b.data[(j0 + 8 * g + j) * b.col_stride + pc..][..kc]);
                for q in 0..blocks {
                    transpose_8x8(&columns, 8 * q, &mut panel[8 * q * NR + 8 * g..], NR);
                }
            }
            for j in 0..width {
                let column = &b.data[(j0 + j) * b.col_stride + pc..][..kc];
                let done = if j < 8 * groups { 8 * blocks } else { 0 };
                for (p, &x) in column.iter().enumerate().skip(done) {
                    panel[p * NR + j] = x;
                }
            }
        } else {
            for p in 0..kc {
                for j in 0..width {
                    panel[p * NR + j] = b.at(pc + p, j0 + j);
                }
            }
        }
    };
    packed.chunks_mut(kc * NR).enumerate().for_each(pack);
    packed
}

/// `dst[r·stride + j] = columns[j][p + r]` for `r, j < 8`: an 8 × 8 block of eight contiguous
/// columns written as eight rows. Panics when a column holds fewer than `p + 8` elements or
/// `dst` fewer than `7·stride + 8`.
fn transpose_8x8(columns: &[&[f32]; 8], p: usize, dst: &mut [f32], stride: usize) {
    assert!(
        columns.iter().all(|c| c.len() >= p + 8) && stride >= 8 && dst.len() >= 7 * stride + 8,
        "gemm: an 8 × 8 transpose out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX2 (`available`), every column is read at `p..p + 8` and
        // `dst` written at `r·stride..r·stride + 8` for `r < 8`, within the lengths checked.
        unsafe { transpose_8x8_avx2(columns, p, dst, stride) };
        return;
    }
    for r in 0..8 {
        for (j, column) in columns.iter().enumerate() {
            dst[r * stride + j] = column[p + r];
        }
    }
}

/// [`transpose_8x8`] after its checks.
///
/// # Safety
/// The CPU must support AVX2; every column holds `p + 8` elements and `dst` `7·stride + 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_8x8_avx2(columns: &[&[f32]; 8], p: usize, dst: &mut [f32], stride: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(columns[j].as_ptr().add(p)));
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let out = [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ];
    for (row, v) in out.iter().enumerate() {
        _mm256_storeu_ps(dst.as_mut_ptr().add(row * stride), *v);
    }
}

/// Packs `A[ic..ic+mc, pc..pc+kc]` as `⌈mc/6⌉` panels of `6 × kc` stored column by column,
/// zero-padded, into `out`; returns the packed panels.
fn pack_a<'o>(
    out: &'o mut Vec<f32>,
    a: Operand<'_>,
    ic: usize,
    mc: usize,
    pc: usize,
    kc: usize,
) -> &'o [f32] {
    let packed = sized(out, mc.div_ceil(MR) * kc * MR);
    if a.row_stride == 1 && mc.is_multiple_of(MR) {
        // A transposed view: each depth's `mc` values are contiguous; read them once, their
        // runs of six written to every panel in turn. (Panel by panel, each step read six
        // values a row further down the stored matrix, farther apart than the hardware's
        // stride prefetcher follows.)
        for p in 0..kc {
            let column = &a.data[ic + (pc + p) * a.col_stride..][..mc];
            for (q, run) in column.chunks_exact(MR).enumerate() {
                let dst: &mut [f32; MR] = (&mut packed[(q * kc + p) * MR..][..MR])
                    .try_into()
                    .expect("a run of six");
                *dst = run.try_into().expect("a run of six");
            }
        }
        return packed;
    }
    for (q, panel) in packed.chunks_mut(kc * MR).enumerate() {
        let i0 = ic + q * MR;
        let height = MR.min(ic + mc - i0);
        if a.row_stride == 1 && height == MR {
            // A transposed view: the six values of each column are contiguous.
            for (p, dst) in panel.chunks_exact_mut(MR).enumerate() {
                let start = i0 + (pc + p) * a.col_stride;
                dst.copy_from_slice(&a.data[start..start + MR]);
            }
        } else if a.col_stride == 1 && height == MR {
            // Six rows read side by side, the panel written in order.
            let row = |i: usize| &a.data[(i0 + i) * a.row_stride + pc..][..kc];
            let (r0, r1, r2, r3, r4, r5) = (row(0), row(1), row(2), row(3), row(4), row(5));
            for (p, dst) in panel.chunks_exact_mut(MR).enumerate().take(kc) {
                dst[0] = r0[p];
                dst[1] = r1[p];
                dst[2] = r2[p];
                dst[3] = r3[p];
                dst[4] = r4[p];
                dst[5] = r5[p];
            }
        } else {
            if height < MR {
                panel.fill(0.0);
            }
            for p in 0..kc {
                for i in 0..height {
                    panel[p * MR + i] = a.at(i0 + i, pc + p);
                }
            }
        }
    }
    packed
}

/// `C[0..mr, 0..nr] (+)= Ap · Bp` for packed panels `Ap (6 × kc)` and `Bp (kc × 16)`, `C` with
/// row stride `ldc`. Panics when the slices are shorter than that or the CPU lacks the kernel.
#[allow(clippy::too_many_arguments)]
fn tile_6x16(
    kc: usize,
    ap: &[f32],
    bp: &[f32],
    c: &mut [MaybeUninit<f32>],
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
) {
    assert!(
        available() && (1..=MR).contains(&mr) && (1..=NR).contains(&nr) && ldc >= nr,
        "gemm tile: {mr}×{nr} (row stride {ldc}) on a CPU with{} AVX2 and FMA",
        if available() { "" } else { "out" }
    );
    assert!(ap.len() >= MR * kc && bp.len() >= NR * kc && c.len() >= (mr - 1) * ldc + nr);
    // SAFETY: the CPU has AVX2 and FMA (`available`), and every read of `ap`, `bp` and every
    // read and write of `c` stays within the lengths just checked (full 6×16 tiles touch
    // `5·ldc + 16 ≤ (mr − 1)·ldc + nr` elements of `c`, since then `mr = 6`, `nr = 16`).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        tile_6x16_avx2(kc, ap, bp, c, ldc, mr, nr, accumulate)
    }
}

/// [`tile_6x16`] after its checks.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `ap` holds `6·kc`, `bp` `16·kc` elements, and `c` holds
/// `(mr − 1)·ldc + nr` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_6x16_avx2(
    kc: usize,
    ap: &[f32],
    bp: &[f32],
    c: &mut [MaybeUninit<f32>],
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let (a, b) = (ap.as_ptr(), bp.as_ptr());
    // The tile of C is read (or written) only after the loop: ask for its lines now, so that
    // their misses overlap the loop instead of following it. (A prefetch is a hint: it reads
    // nothing into the program, and an address past the slice is never dereferenced.)
    for i in 0..mr {
        let row = c.as_ptr().cast::<f32>().wrapping_add(i * ldc);
        _mm_prefetch::<_MM_HINT_T0>(row.cast());
        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(nr - 1).cast());
    }
    // Twelve accumulators as locals, so they live in registers for the whole loop.
    let z = _mm256_setzero_ps();
    let (mut c00, mut c01, mut c10, mut c11, mut c20, mut c21) = (z, z, z, z, z, z);
    let (mut c30, mut c31, mut c40, mut c41, mut c50, mut c51) = (z, z, z, z, z, z);
    for p in 0..kc {
        let b0 = _mm256_loadu_ps(b.add(p * NR));
        let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
        let ai = a.add(p * MR);
        let x = _mm256_broadcast_ss(&*ai);
        c00 = _mm256_fmadd_ps(x, b0, c00);
        c01 = _mm256_fmadd_ps(x, b1, c01);
        let x = _mm256_broadcast_ss(&*ai.add(1));
        c10 = _mm256_fmadd_ps(x, b0, c10);
        c11 = _mm256_fmadd_ps(x, b1, c11);
        let x = _mm256_broadcast_ss(&*ai.add(2));
        c20 = _mm256_fmadd_ps(x, b0, c20);
        c21 = _mm256_fmadd_ps(x, b1, c21);
        let x = _mm256_broadcast_ss(&*ai.add(3));
        c30 = _mm256_fmadd_ps(x, b0, c30);
        c31 = _mm256_fmadd_ps(x, b1, c31);
        let x = _mm256_broadcast_ss(&*ai.add(4));
        c40 = _mm256_fmadd_ps(x, b0, c40);
        c41 = _mm256_fmadd_ps(x, b1, c41);
        let x = _mm256_broadcast_ss(&*ai.add(5));
        c50 = _mm256_fmadd_ps(x, b0, c50);
        c51 = _mm256_fmadd_ps(x, b1, c51);
    }
    let acc = [
        [c00, c01],
        [c10, c11],
        [c20, c21],
        [c30, c31],
        [c40, c41],
        [c50, c51],
    ];
    if mr == MR && nr == NR {
        for (i, row) in acc.iter().enumerate() {
            let dst = c.as_mut_ptr().cast::<f32>().add(i * ldc);
            let (mut v0, mut v1) = (row[0], row[1]);
            if accumulate {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(dst));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(dst.add(8)));
            }
            _mm256_storeu_ps(dst, v0);
            _mm256_storeu_ps(dst.add(8), v1);
        }
    } else {
        let mut tile = [0f32; MR * NR];
        for (i, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR), row[0]);
            _mm256_storeu_ps(tile.as_mut_ptr().add(i * NR + 8), row[1]);
        }
        write_partial(&tile, NR, c, ldc, mr, nr, accumulate);
    }
}

/// One row block's tiles with [`tile_wide`]: `WIDE_A` panels of `A` by `WIDE_B` panels of `B`
/// at a time, fewer at the edges.
#[allow(clippy::too_many_arguments)]
fn wide_tiles(
    kc: usize,
    packed_a: &[f32],
    packed_b: &[f32],
    rows: &mut [MaybeUninit<f32>],
    n: usize,
    jc: usize,
    mc: usize,
    nc: usize,
    add: bool,
) {
    let mut jr = 0;
    while jr < nc {
        let panels_b = WIDE_B.min((nc - jr).div_ceil(NR));
        let nr = (panels_b * NR).min(nc - jr);
        let bp = &packed_b[(jr / NR) * kc * NR..][..panels_b * kc * NR];
        let mut ir = 0;
        while ir < mc {
            let panels_a = WIDE_A.min((mc - ir).div_ceil(MR));
            let mr = (panels_a * MR).min(mc - ir);
            let ap = &packed_a[(ir / MR) * kc * MR..][..panels_a * kc * MR];
            let tile = &mut rows[ir * n + jc + jr..];
            match (panels_a, panels_b) {
                (2, 2) => tile_wide::<2, 2>(kc, ap, bp, tile, n, mr, nr, add),
                (2, _) => tile_wide::<2, 1>(kc, ap, bp, tile, n, mr, nr, add),
                (_, 2) => tile_wide::<1, 2>(kc, ap, bp, tile, n, mr, nr, add),
                _ => tile_wide::<1, 1>(kc, ap, bp, tile, n, mr, nr, add),
            }
            ir += panels_a * MR;
        }
        jr += panels_b * NR;
    }
}

/// `C[0..mr, 0..nr] (+)= [Ap₀; …] · [Bp₀ …]` for `RA` consecutive packed panels of `A`
/// (`6 × kc` each, one after the other in `ap`) and `RB` consecutive packed panels of `B`
/// (`kc × 16` each, in `bp`): a `6·RA × 16·RB` register tile, each row of it `RB` 16-lane
/// AVX-512 registers, so a broadcast of `A` and a load of `B` each feed more multiply-adds than
/// in [`tile_6x16`]. Every element of `C` is the same chain of fused multiply-adds over `p`
/// as in [`tile_6x16`] (then the same single addition to `C` with `accumulate`), so the tiles
/// give the same bits. Panics when the slices are shorter than that or the CPU lacks
/// AVX-512F.
#[allow(clippy::too_many_arguments)]
fn tile_wide<const RA: usize, const RB: usize>(
    kc: usize,
    ap: &[f32],
    bp: &[f32],
    c: &mut [MaybeUninit<f32>],
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
) {
    assert!(
        wide() && (1..=MR * RA).contains(&mr) && (1..=NR * RB).contains(&nr) && ldc >= nr,
        "gemm tile: {mr}×{nr} (row stride {ldc}) on a CPU with{} AVX-512F",
        if wide() { "" } else { "out" }
    );
    assert!(
        (1..=2).contains(&RA)
            && (1..=2).contains(&RB)
            && ap.len() >= RA * MR * kc
            && bp.len() >= RB * NR * kc
            && c.len() >= (mr - 1) * ldc + nr
    );
    // SAFETY: the CPU has AVX-512F (`wide`), and every read of `ap`, `bp` and every read and
    // write of `c` stays within the lengths just checked (full tiles touch
    // `(6·RA − 1)·ldc + 16·RB = (mr − 1)·ldc + nr` elements of `c`).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        tile_wide_avx512::<RA, RB>(kc, ap, bp, c, ldc, mr, nr, accumulate)
    }
}

/// The most rows and columns of a [`tile_wide`] (its buffer for partial tiles).
const WIDE_ROWS: usize = 2 * MR;
const WIDE_COLS: usize = 2 * NR;

/// [`tile_wide`] after its checks.
///
/// # Safety
/// The CPU must support AVX-512F; `RA ≤ 2`, `RB ≤ 2`; `ap` holds `6·RA·kc`, `bp` `16·RB·kc`
/// elements, and `c` holds `(mr − 1)·ldc + nr` elements, `mr ≤ 6·RA`, `nr ≤ 16·RB`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_wide_avx512<const RA: usize, const RB: usize>(
    kc: usize,
    ap: &[f32],
    bp: &[f32],
    c: &mut [MaybeUninit<f32>],
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let (a, b) = (ap.as_ptr(), bp.as_ptr());
    for i in 0..mr {
        let row = c.as_ptr().cast::<f32>().wrapping_add(i * ldc);
        _mm_prefetch::<_MM_HINT_T0>(row.cast());
        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(nr - 1).cast());
    }
    // The accumulators, indexed by (A panel, row of it, B panel): constant bounds, so the
    // loops unroll and the array lives in registers.
    let mut acc = [[[_mm512_setzero_ps(); RB]; MR]; RA];
    for p in 0..kc {
        let bv: [__m512; RB] =
            std::array::from_fn(|q| _mm512_loadu_ps(b.add(q * kc * NR + p * NR)));
        for (g, rows) in acc.iter_mut().enumerate() {
            let ai = a.add(g * kc * MR + p * MR);
            for (i, row) in rows.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*ai.add(i));
                for (q, v) in row.iter_mut().enumerate() {
                    *v = _mm512_fmadd_ps(x, bv[q], *v);
                }
            }
        }
    }
    if mr == MR * RA && nr == NR * RB {
        for i in 0..MR * RA {
            let dst = c.as_mut_ptr().cast::<f32>().add(i * ldc);
            for (q, &v) in acc[i / MR][i % MR].iter().enumerate() {
                let v = if accumulate {
                    _mm512_add_ps(v, _mm512_loadu_ps(dst.add(q * NR)))
                } else {
                    v
                };
                _mm512_storeu_ps(dst.add(q * NR), v);
            }
        }
    } else {
        let mut tile = [0f32; WIDE_ROWS * WIDE_COLS];
        for i in 0..MR * RA {
            for (q, &v) in acc[i / MR][i % MR].iter().enumerate() {
                _mm512_storeu_ps(tile.as_mut_ptr().add(i * WIDE_COLS + q * NR), v);
            }
        }
        write_partial(&tile, WIDE_COLS, c, ldc, mr, nr, accumulate);
    }
}

/// The `mr × nr` corner of a register tile stored row by row (`stride` apart) written to `C`
/// (row stride `ldc`), or added to it with `accumulate`: a partial tile's edge.
fn write_partial(
    tile: &[f32],
    stride: usize,
    c: &mut [MaybeUninit<f32>],
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
) {
    for i in 0..mr {
        let dst = &mut c[i * ldc..i * ldc + nr];
        for (d, &v) in dst.iter_mut().zip(&tile[i * stride..i * stride + nr]) {
            let sum = if accumulate {
                // SAFETY: with `accumulate`, C's elements were written before (by the caller,
                // or by an earlier depth block of the same product).
                (unsafe { d.assume_init() }) + v
            } else {
                v
            };
            d.write(sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several rows' dot products at once: each row's sum the same, bit for bit, whichever rows
    /// stand beside it, and the definition's up to rounding.
    #[test]
    fn grouped_dot_products_do_not_depend_on_the_group() {
        for k in [1, 15, 16, 200, 577] {
            let column: Vec<f32> = (0..k)
                .map(|i| ((i * 53 % 89) as f32) * 0.02 - 0.9)
                .collect();
            let most = if wide() { DOTS_WIDE } else { 4 };
            let rows: Vec<Vec<f32>> = (0..most)
                .map(|r| {
                    (0..k)
                        .map(|i| (((i + 7 * r) * 37 % 101) as f32) * 0.01 - 0.5)
                        .collect()
                })
                .collect();
            let rows: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
            for (r, &row) in rows.iter().enumerate() {
                let mut alone = [0f32];
                dots(&[row], &column, &mut alone);
                let exact: f64 = row
                    .iter()
                    .zip(&column)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                assert!((f64::from(alone[0]) - exact).abs() <= 1e-5 * exact.abs().max(1.0));
                for count in r + 1..=most {
                    let mut out = vec![0f32; count];
                    dots(&rows[..count], &column, &mut out);
                    assert_eq!(out[r].to_bits(), alone[0].to_bits(), "k {k}, {count} rows");
                }
            }
        }
    }

    /// On an AVX-512 CPU, the 16-lane dot products give the 8-lane ones' bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn wide_dot_products_give_the_narrow_ones_bits() {
        if !wide() {
            return;
        }
        for k in [1, 15, 16, 17, 200, 576, 1539] {
            let column: Vec<f32> = (0..k)
                .map(|i| ((i * 53 % 89) as f32) * 0.021 - 0.9)
                .collect();
            let rows: Vec<Vec<f32>> = (0..DOTS_WIDE)
                .map(|r| {
                    (0..k)
                        .map(|i| (((i + 5 * r) * 37 % 103) as f32) * 0.013 - 0.6)
                        .collect()
                })
                .collect();
            let rows: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
            let (mut narrow, mut wide_out) = ([0f32; DOTS_WIDE], [0f32; DOTS_WIDE]);
            // SAFETY: the CPU has AVX-512F (`wide`), hence AVX2 and FMA; every row has the
            // column's length and each output one element per row.
            unsafe {
                dots_avx2::<4>(&rows[..4], &column, &mut narrow[..4]);
                dots_avx2::<4>(&rows[4..], &column, &mut narrow[4..]);
                dots_avx512::<DOTS_WIDE>(&rows, &column, &mut wide_out);
            }
            for (n, w) in narrow.iter().zip(&wide_out) {
                assert_eq!(n.to_bits(), w.to_bits(), "k {k}");
            }
        }
    }

    /// Decoding-step products against a float64 product, for both storage orders of `B`, on
    /// counts of rows that split unevenly and evenly into the kernels' groups.
    #[test]
    fn skinny_products_equal_the_definition() {
        for m in [5, 16] {
            skinny_product_equals_the_definition(m);
        }
    }

    fn skinny_product_equals_the_definition(m: usize) {
        let (n, k) = (230, 200);
        assert!(skinny(m, n, k) && !large(m, n, k));
        let av: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32) * 0.01 - 0.5)
            .collect();
        let bv: Vec<f32> = (0..k * n)
            .map(|i| ((i * 53 % 89) as f32) * 0.02 - 0.9)
            .collect();
        let mut bt = vec![0f32; k * n];
        for p in 0..k {
            for j in 0..n {
                bt[j * k + p] = bv[p * n + j];
            }
        }
        let a = Operand::stored(&av, m, k, false);
        for b in [
            Operand::stored(&bv, k, n, false),
            Operand::stored(&bt, k, n, true),
        ] {
            // Columns split across two threads or kept to one: the same bits.
            super::super::set_threads(2);
            let c = skinny_matmul(m, n, k, a, b);
            let serial = super::super::as_shard(true, || skinny_matmul(m, n, k, a, b));
            assert!(c
                .iter()
                .zip(&serial)
                .all(|(x, s)| x.to_bits() == s.to_bits()));
            if b.col_stride == 1 {
                // B's rows contiguous: each sum the scalar chain in order of p, bit for bit,
                // from the kernel this CPU uses and from each it has, on every count of rows.
                let rows: Vec<&[f32]> = av.chunks(k).collect();
                for wide in [false, super::super::simd::cpu_has_avx512f()] {
                    for take in [1, 2, 4, 8, 16].into_iter().filter(|&t| t <= m) {
                        if !wide && take > AXPY_ROWS {
                            continue;
                        }
                        let mut out = vec![vec![0f32; n - 3]; take];
                        let mut dst: Vec<&mut [f32]> =
                            out.iter_mut().map(Vec::as_mut_slice).collect();
                        scaled_rows(&rows[..take], b, (3, k), &mut dst, wide);
                        for (i, row) in out.iter().enumerate() {
                            for (j, &x) in row.iter().enumerate() {
                                assert_eq!(x.to_bits(), c[i * n + j + 3].to_bits(), "{wide}");
                            }
                        }
                    }
                }
                for i in 0..m {
                    for j in 0..n {
                        let mut chain = 0f32;
                        for p in 0..k {
                            chain += av[i * k + p] * bv[p * n + j];
                        }
                        assert_eq!(c[i * n + j].to_bits(), chain.to_bits(), "({i}, {j})");
                    }
                }
            }
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|p| f64::from(av[i * k + p]) * f64::from(bv[p * n + j]))
                        .sum();
                    let got = f64::from(c[i * n + j]);
                    assert!(
                        (got - exact).abs() <= 1e-4 * exact.abs().max(1.0),
                        "{got} vs {exact}"
                    );
                }
            }
        }
    }

    /// The AVX-512 tiles over several panels give the bits of the AVX2 tile over each panel,
    /// full and partial tiles, written and accumulated. (On a CPU without AVX-512F there is
    /// only the one tile, and this checks nothing.)
    #[test]
    fn the_wide_tiles_give_the_narrow_tiles_bits() {
        if !wide() {
            eprintln!("no AVX-512F on this CPU: the wide tiles are not used");
            return;
        }
        let kc = 203;
        let ap: Vec<f32> = (0..2 * MR * kc)
            .map(|i| ((i * 37 % 101) as f32) * 0.013 - 0.6)
            .collect();
        let bp: Vec<f32> = (0..2 * NR * kc)
            .map(|i| ((i * 53 % 89) as f32) * 0.021 - 0.9)
            .collect();
        let ldc = 50;
        type Tile = fn(usize, &[f32], &[f32], &mut [MaybeUninit<f32>], usize, usize, usize, bool);
        let tiles: [(usize, usize, Tile); 4] = [
            (1, 1, tile_wide::<1, 1>),
            (1, 2, tile_wide::<1, 2>),
            (2, 1, tile_wide::<2, 1>),
            (2, 2, tile_wide::<2, 2>),
        ];
        for (ra, rb, tile) in tiles {
            let (full_m, full_n) = (ra * MR, rb * NR);
            for (mr, nr) in [
                (full_m, full_n),
                (full_m, full_n - 5),
                (full_m - 1, full_n),
                (1, 3),
            ] {
                for accumulate in [false, true] {
                    let start: Vec<f32> = (0..2 * MR * ldc).map(|i| (i % 7) as f32 * 0.3).collect();
                    let mut wide_c = start.clone();
                    tile(
                        kc,
                        &ap,
                        &bp,
                        as_uninit(&mut wide_c),
                        ldc,
                        mr,
                        nr,
                        accumulate,
                    );
                    let mut narrow_c = start.clone();
                    for i0 in (0..mr).step_by(MR) {
                        for j0 in (0..nr).step_by(NR) {
                            tile_6x16(
                                kc,
                                &ap[(i0 / MR) * MR * kc..],
                                &bp[(j0 / NR) * NR * kc..],
                                as_uninit(&mut narrow_c[i0 * ldc + j0..]),
                                ldc,
                                MR.min(mr - i0),
                                NR.min(nr - j0),
                                accumulate,
                            );
                        }
                    }
                    assert!(
                        wide_c
                            .iter()
                            .zip(&narrow_c)
                            .all(|(w, x)| w.to_bits() == x.to_bits()),
                        "{ra}×{rb} panels, {mr}×{nr}, accumulate {accumulate}"
                    );
                }
            }
        }
    }

    /// LoRA's thin products (rank 16 against widths 576 and 1536, 768 rows; the adapter's
    /// transposed views as candle sees them), the default task's width-128 maps and a few shapes
    /// around them give candle's own product's bits on this kernel in candle's depth blocks.
    #[test]
    fn thin_products_give_candles_bits() -> candle_core::Result<()> {
        use candle_core::{Device, Tensor};
        let values = |len: usize, a: usize, b: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * a % b) as f32 - b as f32 / 2.0) * 0.0137 + (i % 7) as f32 * 1e-4)
                .collect()
        };
        // (m, k, n, A stored transposed, B stored transposed)
        let shapes = [
            (768, 576, 16, false, true),   // x·Aᵀ
            (768, 1536, 16, false, true),  // x·Aᵀ, the MLP's down map
            (768, 16, 576, false, true),   // (x·Aᵀ)·Bᵀ
            (768, 576, 16, false, false),  // g·B
            (1536, 768, 16, true, false),  // gᵀ·(x·Aᵀ)
            (768, 16, 1536, false, false), // ∂(x·Aᵀ)·A
            (512, 128, 384, false, true),  // the default task's width-128 maps
            (128, 512, 384, true, false),
            (40, 1100, 50, false, false), // both sides at most 64: candle's other rule
            (300, 2500, 7, true, true),
        ];
        let dev = &Device::Cpu;
        for (m, k, n, at, bt) in shapes {
            let a = match at {
                true => Tensor::from_vec(values(m * k, 37, 101), (k, m), dev)?.t()?,
                false => Tensor::from_vec(values(m * k, 37, 101), (m, k), dev)?,
            };
            let b = match bt {
                true => Tensor::from_vec(values(k * n, 53, 89), (n, k), dev)?.t()?,
                false => Tensor::from_vec(values(k * n, 53, 89), (k, n), dev)?,
            };
            let ours = matmul_tensors_as_candle(&a, &b)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let candle = a.matmul(&b)?.flatten_all()?.to_vec1::<f32>()?;
            // Below this kernel's sizes the general entry point gives the same.
            let general = matmul_tensors(&a, &b)?.flatten_all()?.to_vec1::<f32>()?;
            let same = |c: &[f32]| {
                c.iter()
                    .zip(&candle)
                    .all(|(x, y)| x.to_bits() == y.to_bits())
            };
            assert!(
                same(&ours) && (eligible(m, n, k) || same(&general)),
                "{m} × {k} by {k} × {n} (depth {:?}) differs from candle's product",
                candle_depth(m, n, k)
            );
        }
        Ok(())
    }

    /// Against a float64 product, for shapes off every block size and both storage orders (which
    /// give the same bits).
    #[test]
    fn products_equal_the_definition() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 17, 3),
            (6, 16, 256),
            (73, 35, 257),
            (200, 3100, 300),
            (770, 40, 200),
        ] {
            let av: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32) * 0.01 - 0.5)
                .collect();
            let bv: Vec<f32> = (0..k * n)
                .map(|i| ((i * 53 % 89) as f32) * 0.02 - 0.9)
                .collect();
            let mut first: Option<Vec<f32>> = None;
            for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
                // The same logical matrices stored row-major or column-major.
                let store = |v: &[f32], rows: usize, cols: usize, t: bool| -> Vec<f32> {
                    if !t {
                        return v.to_vec();
                    }
                    let mut out = vec![0f32; rows * cols];
                    for i in 0..rows {
                        for j in 0..cols {
                            out[j * rows + i] = v[i * cols + j];
                        }
                    }
                    out
                };
                let (sa, sb) = (store(&av, m, k, a_t), store(&bv, k, n, b_t));
                let a = Operand::stored(&sa, m, k, a_t);
                let b = Operand::stored(&sb, k, n, b_t);
                let c = matmul(m, n, k, a, b);
                // `A` with neither its rows nor its columns contiguous (every other element of a
                // buffer twice as long), which packs element by element: the same bits.
                if !a_t {
                    let spread: Vec<f32> = sa.iter().flat_map(|&x| [x, f32::NAN]).collect();
                    let strided = Operand {
                        data: &spread,
                        row_stride: 2 * k,
                        col_stride: 2,
                    };
                    let packed = matmul(m, n, k, strided, b);
                    assert!(
                        packed
                            .iter()
                            .zip(&c)
                            .all(|(p, x)| p.to_bits() == x.to_bits()),
                        "{m}×{n}×{k}: a strided A gives other bits ({b_t})"
                    );
                }
                // Packed the same whichever way the operands are stored: the same bits.
                let first = first.get_or_insert_with(|| c.clone());
                assert!(
                    first
                        .iter()
                        .zip(&c)
                        .all(|(f, x)| f.to_bits() == x.to_bits()),
                    "{m}×{n}×{k}: the product depends on the storage order ({a_t}, {b_t})"
                );
                // Kept on one thread (where candle runs with more, the blocks of rows were
                // split across them above, in other sizes): the same numbers, bit for bit.
                let serial = super::super::as_shard(true, || matmul(m, n, k, a, b));
                assert!(
                    serial
                        .iter()
                        .zip(&c)
                        .all(|(s, x)| s.to_bits() == x.to_bits()),
                    "{m}×{n}×{k}: the product depends on the threads"
                );
                // Written over whatever C held (every element written, none read): the same
                // bits; and one block of a batch of two, the other a different product.
                let mut over = vec![f32::NAN; m * n];
                matmul_into(m, n, k, a, b, &mut over, false);
                assert!(over.iter().zip(&c).all(|(o, x)| o.to_bits() == x.to_bits()));
                let zero = vec![0f32; av.len().max(bv.len())];
                let batched = matmul_batched(2, (m, n, k), |i| match i {
                    0 => (Operand::stored(&zero[..m * k], m, k, false), b),
                    _ => (a, b),
                });
                assert!(batched[..m * n].iter().all(|&x| x == 0.0));
                assert!(batched[m * n..]
                    .iter()
                    .zip(&c)
                    .all(|(o, x)| o.to_bits() == x.to_bits()));
                // Accumulating onto C: the same product plus what C held.
                let mut twice = c.clone();
                matmul_into(m, n, k, a, b, &mut twice, true);
                for (t, x) in twice.iter().zip(&c) {
                    assert!(
                        (t - 2.0 * x).abs() <= 1e-5 * x.abs().max(1.0),
                        "{t} vs 2·{x}"
                    );
                }
                for i in (0..m).step_by(5) {
                    for j in 0..n {
                        let exact: f64 = (0..k)
                            .map(|p| f64::from(av[i * k + p]) * f64::from(bv[p * n + j]))
                            .sum();
                        let got = f64::from(c[i * n + j]);
                        assert!(
                            (got - exact).abs() <= 1e-5 * (k as f64).sqrt() * exact.abs().max(1.0),
                            "{m}×{n}×{k} ({a_t}, {b_t}) at ({i}, {j}): {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}
