//! Fused CPU kernels with explicit backward passes, for the operations that dominate a training
//! step outside the matrix products, by family:
//! - [`activation`]: GELU (tanh form) and SwiGLU's `silu(a)·b`;
//! - [`softmax`]: softmax over the last dimension, and the log-softmax over the vocabulary
//!   gathered at the target token (no `(N, V)` output);
//! - [`head`]: the LM head, that log-softmax and the gather in chunks of rows (no `(N, V)`
//!   logits at all);
//! - [`norm`]: LayerNorm and RMSNorm;
//! - [`rope`]: rotary position embeddings;
//! - [`simd`]: the kernels' loops compiled for AVX2 where the CPU has it;
//! - [`sink`]: gradient sinks, where the kernels write a trained weight's gradient instead of
//!   returning it to candle, and the embedding lookup that writes one;
//! - [`linear`]: a linear layer with (or, at SmolLM2's size, without) its bias, and a frozen
//!   one with its LoRA adapter;
//! - [`gemm`]: the matrix product of large matrices (AVX2/FMA; candle's below its size);
//! - [`team`]: the threads of a decoding step's parallel sections, kept awake between them;
//! - [`attention`]: scaled masked attention, GPT-2's attention straight from its packed
//!   q/k/v projection, and a decoding step's attention read from the key/value cache in place
//!   (no autograd node: inference only).
//!
//! Each is a candle custom op whose forward is one pass over memory and whose backward is one
//! more, instead of a chain of elementwise tensors each allocated, written and read back. They
//! run on contiguous f32 CPU tensors only; [`crate::ops`] routes every operation here or to its
//! composed definition ([`crate::composed`]), and its tests hold the two together in values
//! and gradients. The golden tests against PyTorch run through these kernels.
//!
//! This module holds what the kernels share: reading a tensor's storage in place, splitting
//! rows across threads, lane-wise reductions, the vectorising `exp` and `tanh` (and an f64
//! `exp` for ε-DPO's mixed log-softmaxes), the C library's `expf` in vector lanes with its bits
//! ([`exp_as_libm`], for SwiGLU), the gradient norm's sequential sum of squares
//! computed a block at a time with its bits ([`sequential_sum_of_squares`]), and
//! [`simd::vectorised`], which compiles a kernel's loops for AVX2 where the CPU has it. Work is
//! split across rows with rayon when [`parallel`] allows it.

pub mod activation;
pub mod attention;
pub mod gemm;
pub mod head;
pub mod linear;
pub mod norm;
pub mod rope;
pub mod simd;
pub mod sink;
pub mod softmax;
pub mod team;

pub use activation::{gelu, silu_mul};
pub use attention::{attention, packed_attention, rotary_attention};
pub use linear::{linear_bias, linear_frozen, linear_no_bias, lora_linear};
pub use norm::{layer_norm, rms_norm};
pub use rope::rope;
pub use softmax::{log_softmax_gather, softmax_last};

pub(crate) use simd::vectorised;

use candle_core::{bail, CpuStorage, Layout, Tensor};
use rayon::prelude::*;

pub(crate) fn slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{what}: f32 only");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what}: input must be contiguous"),
    }
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor in place, without copying them
/// (`f` must not write to the tensor).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    with_storage(t, |cpu, layout| Ok(f(slice(cpu, layout, "tensor")?)))
}

/// Runs `f` on a CPU tensor's storage and layout, in place (`f` must not write to it).
pub(crate) fn with_storage<R>(
    t: &Tensor,
    f: impl FnOnce(&CpuStorage, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f(cpu, layout),
        _ => bail!("a CPU tensor expected"),
    }
}

/// The threads this crate's kernels split their work across, when set ([`set_threads`]);
/// 0 until then.
static THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sets the threads this crate's kernels split their work across (the rayon pool they run
/// on should have as many), apart from candle's own operations, which follow candle's
/// setting (`CANDLE_NUM_THREADS`). A run whose batch is split into shards gives candle one
/// thread, so that each shard's operations keep to its thread, and the kernels all of them:
/// inside a shard ([`as_shard`]) they keep to its thread too, and everywhere else (decoding,
/// scoring for evaluation, the optimizer step) they use every thread. No number depends on
/// the threads: every kernel splits work by rows, columns or items, never inside a sum.
pub fn set_threads(threads: usize) {
    THREADS.store(threads, std::sync::atomic::Ordering::Relaxed);
}

/// The threads of [`set_threads`], or candle's when it was not called.
pub fn threads() -> usize {
    match THREADS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => candle_core::utils::get_num_threads().max(1),
        n => n,
    }
}

thread_local! {
    static SHARD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether kernels may split work across threads: [`threads`] is more than one, and this is
/// not a shard among others ([`as_shard`]).
pub fn parallel() -> bool {
    threads() > 1 && !SHARD.with(std::cell::Cell::get)
}

/// Runs `f` as one shard among others already running side by side (`parallel` set): the
/// kernels then keep to this thread instead of splitting their work across a pool the other
/// shards occupy. No number depends on it (the kernels' blocks are the same either way).
pub fn as_shard<R>(parallel: bool, f: impl FnOnce() -> R) -> R {
    let before = SHARD.with(|s| s.replace(parallel));
    let out = f();
    SHARD.with(|s| s.set(before));
    out
}

/// Applies `f(row_in, row_out)` to every row of width `width`, in parallel when allowed.
pub(crate) fn rows_map(
    input: &[f32],
    out: &mut [f32],
    width: usize,
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync,
) {
    if parallel() && input.len() >= 1 << 15 {
        out.par_chunks_mut(width)
            .zip(input.par_chunks(width))
            .enumerate()
            .for_each(|(i, (o, x))| {
                vectorised(
                    #[inline(always)]
                    || f(i, x, o),
                )
            });
    } else {
        vectorised(
            #[inline(always)]
            || {
                for (i, (o, x)) in out.chunks_mut(width).zip(input.chunks(width)).enumerate() {
                    f(i, x, o);
                }
            },
        );
    }
}

/// Applies `f(i, row)` to every row `i` of width `width` of `data`, in place, in parallel when
/// allowed.
pub(crate) fn rows_map_in_place(
    data: &mut [f32],
    width: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
    if parallel() && data.len() >= 1 << 15 {
        data.par_chunks_mut(width).enumerate().for_each(|(i, row)| {
            vectorised(
                #[inline(always)]
                || f(i, row),
            )
        });
    } else {
        vectorised(
            #[inline(always)]
            || {
                for (i, row) in data.chunks_mut(width).enumerate() {
                    f(i, row);
                }
            },
        );
    }
}

/// Lanes of the reductions below: eight independent partial results, so the loops vectorise
/// (a single running f32 sum is a serial dependency the compiler must keep in order).
const LANES: usize = 8;

/// `Σ f(x_i)` over a row, accumulated in [`LANES`] partial sums of `f`'s type (f32, or f64
/// where a sum must not be decided by rounding).
#[inline(always)]
pub(crate) fn lane_sum<T>(x: &[f32], f: impl Fn(f32) -> T) -> T
where
    T: Copy + Default + std::ops::AddAssign + std::iter::Sum<T>,
{
    let mut acc = [T::default(); LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += f(c[k]);
        }
    }
    let mut total = acc.into_iter().sum::<T>();
    for &v in tail {
        total += f(v);
    }
    total
}

/// `Σ a_i·b_i`, accumulated in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    lane_sum2(a, b, |x, y| x * y)
}

/// `Σ f(a_i, b_i)` over two rows (the shorter one's length), in [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn lane_sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let full = n - n % LANES;
    for (ca, cb) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
    {
        for k in 0..LANES {
            acc[k] += f(ca[k], cb[k]);
        }
    }
    let mut total = acc.iter().sum::<f32>();
    for (&x, &y) in a[full..].iter().zip(&b[full..]) {
        total += f(x, y);
    }
    total
}

/// The largest element of a row (−∞ for an empty one; NaNs are skipped, as `f32::max` skips
/// them).
#[inline(always)]
pub fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    acc.iter()
        .chain(tail)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Softmax of a row in place: `x ← exp(x − max) / Σ exp(x − max)`.
#[inline(always)]
pub(crate) fn softmax_in_place(row: &mut [f32]) {
    let max = lane_max(row);
    row.iter_mut().for_each(|x| *x = exp(*x - max));
    let inv = 1.0 / lane_sum(row, |v| v);
    row.iter_mut().for_each(|x| *x *= inv);
}

/// `eˣ` in f32 without a library call, so loops over it vectorise: `x = n·ln2 + r` with
/// `|r| ≤ ln2/2`, a degree-6 Taylor polynomial for `eʳ` (truncation error below 2e-7 relative),
/// and `2ⁿ` built from its bits. Inputs below −87 give 0 (as `expf` underflows there).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to an integer
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // The integer n sits in the low bits of t: reading it from the bits avoids a float-to-int
    // conversion, which Rust saturates and the compiler then splits into scalar code.
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    let y = p * scale;
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

/// `eˣ` in f64 without a library call, so loops over it vectorise: `x = n·ln2 + r` with ln 2
/// split in two (its high part has 32 bits, so `n·ln2_hi` is exact) and `|r| ≤ ln2/2`, a
/// degree-13 Taylor polynomial for `eʳ` (truncation error below 1e-17 relative), and `2ⁿ` built
/// from its bits: within about one unit in the last place of `f64::exp` (test). Inputs below
/// −708 give 0 (where `exp` is subnormal or 0, nothing beside a term near 1 in a sum), above
/// 709 give +∞, and NaN gives NaN. Its multiply-adds are fused (`mul_add`, exact on every
/// target: one instruction where [`simd::vectorised`] runs, the C library's `fma` elsewhere),
/// so every target and every vector width gives the same bits.
#[inline(always)]
pub fn exp_f64(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000); // 0.693 147 180 369 …
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76); // ln 2 − LN2_HI
    const ROUND: f64 = 6_755_399_441_055_744.0; // 1.5·2⁵²: adding and subtracting it rounds
    let xc = x.clamp(-708.0, 709.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let ni = (t.to_bits() as i64).wrapping_sub(ROUND.to_bits() as i64);
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    // Horner's scheme written out (a loop over the coefficients would keep the lanes scalar).
    let p = r.mul_add(1.0 / 6_227_020_800.0, 1.0 / 479_001_600.0);
    let p = r.mul_add(p, 1.0 / 39_916_800.0);
    let p = r.mul_add(p, 1.0 / 3_628_800.0);
    let p = r.mul_add(p, 1.0 / 362_880.0);
    let p = r.mul_add(p, 1.0 / 40_320.0);
    let p = r.mul_add(p, 1.0 / 5_040.0);
    let p = r.mul_add(p, 1.0 / 720.0);
    let p = r.mul_add(p, 1.0 / 120.0);
    let p = r.mul_add(p, 1.0 / 24.0);
    let p = r.mul_add(p, 1.0 / 6.0);
    let p = r.mul_add(p, 0.5);
    let p = r.mul_add(r.mul_add(p, 1.0), 1.0);
    let scale = f64::from_bits((ni.wrapping_add(1023) as u64) << 52);
    let y = p * scale;
    // Selects, not branches, so that the lanes stay in vector registers.
    let y = if x > 709.0 { f64::INFINITY } else { y };
    if x < -708.0 {
        0.0
    } else {
        y
    }
}

/// Elements per call of [`exp_as_libm`].
pub(crate) const LIBM_EXP_BLOCK: usize = 64;

/// `out[j] = xs[j].exp()` for up to [`LIBM_EXP_BLOCK`] elements, bit for bit what the C library
/// returns (the `expf` that Rust's `f32::exp` and candle's `exp` call, so SwiGLU's values stay
/// those of the composed path), but in vector lanes instead of one call per element.
///
/// On x86-64 Linux with glibc and a CPU with AVX2 and FMA, glibc's `expf` is its FMA build of
/// one algorithm (glibc 2.28 and later): in f64, `z = x·32/ln 2` rounded to an integer `k` with
/// the `1.5·2⁵²` trick (one fused multiply-add), `r = z − k` (a second one, from the unrounded
/// product), `2^(k/32)` from a 32-entry table with `k/32`'s integer part added to its exponent,
/// a cubic in `r` evaluated with three fused multiply-adds as the library's machine code does,
/// one product and one rounding to f32. [`libm_exp_lane`] is that sequence with the library's
/// constants; inputs the library treats apart (`|x| ≥ 88`, ±∞, NaN) are handed to `f32::exp`
/// itself. Anywhere else (another C library, a CPU without FMA, whose `expf` is the library's
/// other build) every element calls `f32::exp`. The test
/// `kernels::tests::exp_as_libm_gives_the_library_bits` compares the two over every 61st f32 bit
/// pattern, every 5th of the main path's range, the boundaries and the rounding's ties.
#[inline(always)]
pub(crate) fn exp_as_libm(xs: &[f32], out: &mut [f32]) {
    let n = xs.len().min(out.len()).min(LIBM_EXP_BLOCK);
    let (xs, out) = (&xs[..n], &mut out[..n]);
    if !libm_exp_in_lanes() {
        out.iter_mut().zip(xs).for_each(|(o, &x)| *o = x.exp());
        return;
    }
    let mut apart = false;
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = libm_exp_lane(x);
        apart |= libm_exp_apart(x);
    }
    if apart {
        for (o, &x) in out.iter_mut().zip(xs) {
            if libm_exp_apart(x) {
                *o = x.exp();
            }
        }
    }
}

/// Whether [`exp_as_libm`] computes in lanes here: glibc on x86-64 and a CPU with AVX2 and FMA
/// (the CPUs glibc gives its FMA build of `expf`).
#[inline(always)]
fn libm_exp_in_lanes() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    {
        simd::cpu_has_avx2_fma()
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Whether glibc's `expf` leaves its main path for `x`: `|x| ≥ 88`, ±∞ or NaN (the top twelve
/// bits of `|x|` at least those of 88).
#[inline(always)]
fn libm_exp_apart(x: f32) -> bool {
    ((x.to_bits() >> 20) & 0x7ff) >= 0x42b
}

/// glibc's `2^(i/32)` table, each entry less `i << 47` (so that adding `k << 47` for `k ≡ i`
/// mod 32 gives `2^(k/32)`'s bits).
const LIBM_EXP2_TABLE: [u64; 32] = [
    0x3ff0_0000_0000_0000,
    0x3fef_d9b0_d315_8574,
    0x3fef_b558_6cf9_890f,
    0x3fef_9301_d012_5b51,
    0x3fef_72b8_3c7d_517b,
    0x3fef_5487_3168_b9aa,
    0x3fef_387a_6e75_6238,
    0x3fef_1e9d_f51f_dee1,
    0x3fef_06fe_0a31_b715,
    0x3fee_f1a7_373a_a9cb,
    0x3fee_dea6_4c12_3422,
    0x3fee_ce08_6061_892d,
    0x3fee_bfda_d536_2a27,
    0x3fee_b42b_569d_4f82,
    0x3fee_ab07_dd48_5429,
    0x3fee_a47e_b03a_5585,
    0x3fee_a09e_667f_3bcd,
    0x3fee_9f75_e8ec_5f74,
    0x3fee_a114_73eb_0187,
    0x3fee_a589_994c_ce13,
    0x3fee_ace5_422a_a0db,
    0x3fee_b737_b0cd_c5e5,
    0x3fee_c491_82a3_f090,
    0x3fee_d503_b23e_255d,
    0x3fee_e89f_995a_d3ad,
    0x3fee_ff76_f2fb_5e47,
    0x3fef_199b_dd85_529c,
    0x3fef_3720_dcef_9069,
    0x3fef_5818_dcfb_a487,
    0x3fef_7c97_337b_9b5f,
    0x3fef_a4af_a2a4_90da,
    0x3fef_d076_5b6e_4540,
];

/// glibc's `expf` main path for one lane (see [`exp_as_libm`]); meaningless where
/// [`libm_exp_apart`].
#[inline(always)]
fn libm_exp_lane(x: f32) -> f32 {
    const INV_LN2_32: f64 = f64::from_bits(0x4047_1547_652b_82fe); // 32/ln 2
    const SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000); // 1.5·2⁵²
    const C0: f64 = f64::from_bits(0x3ebc_6af8_4b91_2394);
    const C1: f64 = f64::from_bits(0x3f2e_bfce_50fa_c4f3);
    const C2: f64 = f64::from_bits(0x3f96_2e42_ff0c_52d6);
    let xd = f64::from(x);
    let shifted = INV_LN2_32.mul_add(xd, SHIFT);
    let ki = shifted.to_bits();
    let kd = shifted - SHIFT;
    let r = INV_LN2_32.mul_add(xd, -kd);
    let s = f64::from_bits(LIBM_EXP2_TABLE[(ki & 31) as usize].wrapping_add(ki << 47));
    let z = C0.mul_add(r, C1);
    let r2 = r * r;
    let y = C2.mul_add(r, 1.0);
    let y = z.mul_add(r2, y);
    (y * s) as f32
}

/// `tanh(u) = 1 − 2/(e^{2u} + 1)`, with the absolute error of f32 (about 1e-7) near 0, which is
/// what GELU needs.
#[inline(always)]
pub(crate) fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u) + 1.0)
}

/// `Σ x²` over the elements of `parts` in order, accumulated in f64 one element after the
/// other: bit for bit the sequential sum (`iter().map(|x| x·x as f64).sum::<f64>()`), but
/// computed a block at a time in vector lanes.
///
/// Why that is exact: a square of an f32 is exact in f64, and every term is `≥ 0`, so the
/// running sum `s` only grows. While it stays within one binade `[2ᵉ, 2ᵉ⁺¹)`, where doubles
/// are spaced `u = 2ᵉ⁻⁵²` apart, adding `q` rounds `s + q` to the multiple of `u` nearest it,
/// and `s` is itself a multiple of `u`: so `fl(s + q) = s + u·round(q/u)`, the same whatever
/// `s` is, except on a tie (`q/u` exactly halfway between two integers), which rounds to the
/// even multiple and so depends on `s`. A block of terms is therefore summed as the terms
/// rounded to multiples of `u` (`(q + 2ᵉ) − 2ᵉ`; their sums are exact, in any order, while below
/// `2ᵉ⁺¹`), checked for ties (`|q − round(q)| = u/2`), and accepted if the result is still below
/// `2ᵉ⁺¹` (had the sequential sum crossed into the next binade, this sum would be at or above it
/// too). A block with a tie, that crosses a binade or starts from a sum too small (or not
/// finite) is summed one term after the other instead.
pub fn sequential_sum_of_squares<'a>(parts: impl IntoIterator<Item = &'a [f32]>) -> f64 {
    const BLOCK: usize = 512;
    // Where `Sum` starts (the value of an empty sum).
    let mut acc: f64 = std::iter::empty::<f64>().sum();
    for part in parts {
        for block in part.chunks(BLOCK) {
            match block_in_binade(acc, block) {
                Some(next) => acc = next,
                None => {
                    for &x in block {
                        acc += f64::from(x) * f64::from(x);
                    }
                }
            }
        }
    }
    acc
}

/// `s + Σ x²` over `block` by [`sequential_sum_of_squares`]'s binade argument, or `None` where
/// it does not apply (then the block is summed term by term).
fn block_in_binade(s: f64, block: &[f32]) -> Option<f64> {
    // `s` in `[p, 2p)`, `p = 2ᵉ` normal and `2p` finite, doubles there spaced `u = p·2⁻⁵²`.
    let biased = s.to_bits() >> 52;
    if s.is_nan() || s <= 0.0 || !(60..=2045).contains(&biased) {
        return None;
    }
    let p = f64::from_bits(biased << 52);
    let half_u = f64::from_bits((biased - 53) << 52);
    const LANES: usize = 8;
    let (total, widest) = vectorised(
        #[inline(always)]
        || {
            // `(q + p) − p` is `q` rounded to a multiple of `u` (ties to even multiples), as
            // `s + q` rounds it, for `q < p`; a larger `q` puts the total past the binade.
            // `|q − r| ≤ u/2`, with equality exactly on a tie: the widest says whether any was.
            let mut total = [0f64; LANES];
            let mut widest = [0f64; LANES];
            let mut lanes = block.chunks_exact(LANES);
            for c in &mut lanes {
                for l in 0..LANES {
                    let q = f64::from(c[l]) * f64::from(c[l]);
                    let r = (q + p) - p;
                    let d = (q - r).abs();
                    total[l] += r;
                    widest[l] = if d > widest[l] { d } else { widest[l] };
                }
            }
            for (l, &x) in lanes.remainder().iter().enumerate() {
                let q = f64::from(x) * f64::from(x);
                let r = (q + p) - p;
                let d = (q - r).abs();
                total[l] += r;
                widest[l] = if d > widest[l] { d } else { widest[l] };
            }
            (
                total.iter().sum::<f64>(),
                widest.iter().fold(0f64, |a, &b| if b > a { b } else { a }),
            )
        },
    );
    // No tie, and the sum still inside the binade: every rounded term and every partial sum
    // (multiples of `u` below `2p`) was exact, and so is `s + total`. (NaN fails here too.)
    let next = s + total;
    (widest < half_u && next < 2.0 * p).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked sum of squares is the sequential one bit for bit: on gradients of many
    /// scales (so that the sum crosses binades inside blocks), with powers of two and halves
    /// (terms that round to a tie), zeros, a NaN, an infinity, tiny and huge values, empty
    /// parts and parts of every length around the block's.
    #[test]
    fn the_blocked_sum_of_squares_is_the_sequential_sum() {
        let oracle = |parts: &[Vec<f32>]| -> f64 {
            parts
                .iter()
                .flat_map(|p| p.iter())
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
        };
        let mut rng = edpo_data::rng::SplitMix64(17);
        let mut cases: Vec<Vec<Vec<f32>>> = vec![vec![], vec![vec![]], vec![vec![0.0; 700]]];
        for scale in [1e-30f64, 1e-6, 1e-3, 1.0, 1e3, 1e15] {
            let parts: Vec<Vec<f32>> = [1usize, 7, 511, 512, 513, 1024, 5000, 100_000]
                .iter()
                .map(|&n| (0..n).map(|_| (rng.normal() * scale) as f32).collect())
                .collect();
            cases.push(parts);
        }
        // Ties: a large sum, then terms that are exact powers of two around its spacing.
        let mut ties = vec![vec![1.0f32; 3000]];
        ties.push((0..4000).map(|i| 2f32.powi(-(i % 30))).collect());
        // 2⁻²¹ squared is half the spacing of doubles near 3000: every such term is a tie.
        ties.push(
            (0..4000)
                .map(|i| if i % 3 == 0 { 2f32.powi(-21) } else { 0.0 })
                .collect(),
        );
        cases.push(ties);
        // Growing terms: the sum crosses a binade in most blocks.
        cases.push(vec![(0..20_000).map(|i| (i as f32).sqrt() * 3.0).collect()]);
        // Not finite.
        let mut nan = vec![vec![0.5f32; 2000]];
        nan[0][1500] = f32::NAN;
        cases.push(nan);
        let mut inf = vec![vec![0.5f32; 2000]];
        inf[0][700] = f32::INFINITY;
        cases.push(inf);
        cases.push(vec![vec![f32::MAX; 600], vec![f32::MIN_POSITIVE; 600]]);
        for (i, parts) in cases.iter().enumerate() {
            let expected = oracle(parts);
            let found = sequential_sum_of_squares(parts.iter().map(Vec::as_slice));
            assert!(
                found.to_bits() == expected.to_bits() || (found.is_nan() && expected.is_nan()),
                "case {i}: {found:e} against the sequential {expected:e}"
            );
        }
        // And the fast path was taken: a large sum then small terms is not summed term by term.
        assert!(block_in_binade(1e6, &[1e-3; 512]).is_some());
    }

    /// The kernels' loops run through [`vectorised`] (AVX2 code on a CPU that has it) give the
    /// bits of the same expressions compiled here for the baseline target, over inputs that
    /// reach `exp`'s clamps and the rows' scalar tails (widths not a multiple of 8).
    #[test]
    fn vectorised_code_gives_the_scalar_bits() {
        use crate::composed::{GELU_C, SQRT_2_OVER_PI};
        use candle_core::{Device, Tensor};
        let (rows, width) = (7, 203);
        let xs: Vec<f32> = (0..rows * width)
            .map(|i| {
                let u = ((i as u64).wrapping_mul(2_654_435_761) % 100_003) as f32 / 100_003.0;
                (u - 0.5) * if i % 17 == 0 { 240.0 } else { 12.0 }
            })
            .collect();
        let t = Tensor::from_vec(xs.clone(), (rows, width), &Device::Cpu).expect("tensor");
        let values = |r: candle_core::Result<Tensor>| {
            r.and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("kernel")
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();

        let gelu: Vec<f32> = xs
            .iter()
            .map(|&v| 0.5 * v * (1.0 + tanh(SQRT_2_OVER_PI * (v + GELU_C * v * v * v))))
            .collect();
        assert_eq!(bits(&values(super::gelu(&t))), bits(&gelu));

        let mut soft = xs.clone();
        soft.chunks_mut(width).for_each(softmax_in_place);
        assert_eq!(bits(&values(super::softmax_last(&t))), bits(&soft));

        let targets: Vec<u32> = (0..rows as u32).map(|i| i * 29).collect();
        let gathered: Vec<f32> = xs
            .chunks(width)
            .zip(&targets)
            .map(|(z, &k)| {
                let max = lane_max(z);
                z[k as usize] - (max + lane_sum(z, |v| exp(v - max)).ln())
            })
            .collect();
        assert_eq!(
            bits(&values(super::log_softmax_gather(&t, &targets))),
            bits(&gathered)
        );

        let w = Tensor::from_vec(
            (0..width)
                .map(|k| 0.5 + k as f32 / 97.0)
                .collect::<Vec<f32>>(),
            width,
            &Device::Cpu,
        )
        .expect("weight");
        let ws = values(Ok(w.clone()));
        let rms: Vec<f32> = xs
            .chunks(width)
            .flat_map(|x| {
                let inv = 1.0 / (lane_sum(x, |v| v * v) / width as f32 + 1e-5).sqrt();
                x.iter()
                    .zip(&ws)
                    .map(|(&v, &wk)| v * inv * wk)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(bits(&values(super::rms_norm(&t, &w, 1e-5))), bits(&rms));

        // SwiGLU's gate and its backward: the scalar expressions with the library's `expf`.
        let (a, b) = (
            candle_core::Var::from_tensor(&t).expect("a"),
            candle_core::Var::from_tensor(&(t.sin().expect("sin") * 3.0).expect("b")).expect("b"),
        );
        let (av, bv) = (
            values(Ok(a.as_tensor().clone())),
            values(Ok(b.as_tensor().clone())),
        );
        let gy: Vec<f32> = (0..rows * width).map(|i| (i as f32 * 0.37).cos()).collect();
        let g = Tensor::from_vec(gy.clone(), (rows, width), &Device::Cpu).expect("g");
        let y = super::silu_mul(a.as_tensor(), b.as_tensor()).expect("silu mul");
        let grads = (&y * &g)
            .and_then(|p| p.sum_all())
            .and_then(|s| s.backward())
            .expect("backward");
        let grad = |v: &candle_core::Var| {
            values(
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .ok_or(candle_core::Error::Msg("no gradient".into())),
            )
        };
        let (mut sy, mut sda, mut sdb) = (Vec::new(), Vec::new(), Vec::new());
        for ((&v, &u), &gk) in av.iter().zip(&bv).zip(&gy) {
            let denominator = 1.0 + (-v).exp();
            let sig = 1.0 / denominator;
            sy.push((v / denominator) * u);
            // candle adds a gradient to the zeros it starts from: −0 arrives as +0.
            sda.push(0.0 + gk * u * sig * (1.0 + v * (1.0 - sig)));
            sdb.push(0.0 + gk * (v / denominator));
        }
        assert_eq!(bits(&values(Ok(y))), bits(&sy));
        assert_eq!(bits(&grad(&a)), bits(&sda));
        assert_eq!(bits(&grad(&b)), bits(&sdb));
    }

    #[test]
    fn exp_as_libm_gives_the_library_bits() {
        // Every 61st bit pattern (all signs, exponents and most mantissa residues); every 5th
        // of the library's main path where `e^x` is not 1 (`2⁻⁵ ≤ |x| < 88`, where a rounding
        // of `r` would show); the boundaries where the library leaves its main path; ties of
        // `x·32/ln 2`'s rounding.
        let mut special: Vec<f32> = Vec::new();
        for b in [
            0.0f32,
            -0.0,
            88.0,
            -88.0,
            88.722_83,
            -103.972_07,
            -103.278_92,
            1e-30,
            -1e-30,
        ] {
            for d in -3i32..=3 {
                special.push(f32::from_bits(b.to_bits().wrapping_add_signed(d)));
            }
        }
        special.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
        ]);
        special.extend((-2816..2816).map(|k| (k as f32 + 0.5) * (std::f32::consts::LN_2 / 32.0)));
        let main = 0x3d00_0000u32..0x42b0_0000;
        let inputs = (0..=u32::MAX)
            .step_by(61)
            .chain(main.clone().step_by(5))
            .chain(main.step_by(5).map(|b| b | 0x8000_0000))
            .map(f32::from_bits)
            .chain(special);
        let (mut block, mut out) = (Vec::with_capacity(LIBM_EXP_BLOCK), [0f32; LIBM_EXP_BLOCK]);
        let mut wrong = Vec::new();
        let mut check = |block: &mut Vec<f32>, wrong: &mut Vec<(f32, f32, f32)>| {
            vectorised(
                #[inline(always)]
                || exp_as_libm(block, &mut out),
            );
            for (&x, &o) in block.iter().zip(&out) {
                if o.to_bits() != x.exp().to_bits() && wrong.len() < 5 {
                    wrong.push((x, o, x.exp()));
                }
            }
            // The baseline build of the same code (its fused multiply-adds through the
            // library's `fma`) on some blocks: the same bits.
            if block[0].to_bits() % 4099 < 61 {
                let mut plain = [0f32; LIBM_EXP_BLOCK];
                exp_as_libm(block, &mut plain);
                assert_eq!(
                    plain[..block.len()]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    out[..block.len()]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>()
                );
            }
            block.clear();
        };
        for x in inputs {
            block.push(x);
            if block.len() == LIBM_EXP_BLOCK {
                check(&mut block, &mut wrong);
            }
        }
        if !block.is_empty() {
            check(&mut block, &mut wrong);
        }
        assert!(wrong.is_empty(), "(x, lanes, library): {wrong:?}");
    }

    #[test]
    fn exp_f64_is_within_a_few_ulps_of_the_library() {
        let mut worst = 0f64;
        let mut x = -708.0f64;
        while x < 709.0 {
            for dx in [0.0, 1e-9, 0.346_573_6, -0.346_573_6] {
                if !(-708.0..=709.0).contains(&(x + dx)) {
                    continue;
                }
                let e = (x + dx).exp();
                worst = worst.max((exp_f64(x + dx) - e).abs() / e);
            }
            x += 0.003_7;
        }
        assert!(worst < 3e-16, "worst relative error {worst:e}");
        assert_eq!(exp_f64(0.0), 1.0);
        assert_eq!(exp_f64(-709.0), 0.0);
        assert_eq!(exp_f64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_f64(710.0), f64::INFINITY);
        assert!(exp_f64(f64::NAN).is_nan());
        // The same bits from the vectorised loop as from the baseline build's.
        let xs: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.731).sin() * 90.0).collect();
        let scalar = lane_sum(&xs, |v| exp_f64(f64::from(v - 3.0)));
        let vector = vectorised(
            #[inline(always)]
            || lane_sum(&xs, |v| exp_f64(f64::from(v - 3.0))),
        );
        assert_eq!(vector.to_bits(), scalar.to_bits());
    }

    #[test]
    fn exp_is_accurate_over_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp(x) as f64) - (x as f64).exp()).abs() / (x as f64).exp();
            worst = worst.max(rel);
            x += 0.013;
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        for u in [-20.0f32, -3.0, -0.5, -1e-4, 0.0, 1e-4, 0.5, 3.0, 20.0] {
            assert!((tanh(u) - u.tanh()).abs() < 2e-7, "tanh({u})");
        }
    }
}
