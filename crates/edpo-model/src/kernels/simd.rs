//! Compiling the kernels' elementwise and row loops for AVX2 + FMA where the CPU has them,
//! with no change to a single bit of their results ([`vectorised`]). With [`super::gemm`], the
//! model's only `unsafe` code: one call behind a run-time CPU check.
#![allow(unsafe_code)]

/// Runs `f` compiled for AVX2 and FMA when this CPU has them, and for the baseline target
/// otherwise. The kernels' loops are written lane by lane ([`super::lane_sum`],
/// [`super::exp`]) so that the compiler vectorises them, but built for baseline x86-64 (SSE2)
/// it keeps most of them scalar; inlined here they become 8-lane AVX2 code. Rust never fuses
/// a product and a sum into one FMA on its own and vector lanes round as scalar operations do,
/// so each lane computes exactly what the scalar code computes: the same bits either way (held
/// by `kernels::tests::vectorised_code_gives_the_scalar_bits`).
#[inline(always)]
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if cpu_has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { avx2_fma(f) };
    }
    f()
}

/// Whether this CPU has AVX2 and FMA (the one check behind this module and [`super::gemm`]).
#[cfg(target_arch = "x86_64")]
pub(crate) fn cpu_has_avx2_fma() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Whether this CPU has AVX-512F (the GEMM's wider register tile).
#[cfg(target_arch = "x86_64")]
pub(crate) fn cpu_has_avx512f() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// Whether this CPU has AVX-512F: never off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn cpu_has_avx512f() -> bool {
    false
}

/// Whether this CPU has AVX2 and FMA: never off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn cpu_has_avx2_fma() -> bool {
    false
}

/// `f()` with AVX2 and FMA enabled for whatever is inlined into it.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_fma<R>(f: impl FnOnce() -> R) -> R {
    f()
}
