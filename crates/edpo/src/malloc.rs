//! The C allocator's settings for this process, set once at start-up before any thread
//! exists (glibc on Linux; elsewhere nothing is changed).
//!
//! glibc's defaults return freed memory to the system eagerly: each thread allocating gets
//! its own arena whose heaps are shrunk and unmapped as blocks are freed, blocks above a
//! threshold that floats between 128 KiB and 32 MiB are mapped and unmapped one by one, and the
//! main heap's top is trimmed beyond twice that. A training step allocates and frees the
//! same large activations and gradients over and over, so every step faulted its memory back
//! in: on a 2-core Xeon, the 2-thread SmolLM2 step spent about 12% of its samples in the
//! kernel clearing fresh pages and about 11% in the inter-processor interrupts that unmapping
//! memory of a running multi-threaded process sends (`perf record`; `reports/bench/`,
//! sitting n). Here all threads share the main arena, blocks up to 32 MiB come from the heap
//! whatever was freed before, and the heap's top is kept up to 2 GiB, so a step reuses the
//! pages of the step before. A block larger than 32 MiB is still mapped on its own. The
//! blocks are the same, only when they go back differs: peak memory measured within 2% of
//! before (SmolLM2, 2 threads: 5244 against 5167–5205 MiB; a default-task run 326 against
//! 371 MB), and no number depends on it.
#![allow(unsafe_code)]

/// Blocks up to this size come from the heap.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// The heap's free top kept before any is returned to the system.
const TRIM_THRESHOLD: i32 = i32::MAX;

/// Applies the settings; returns whether glibc accepted every one (always `true` where there
/// is nothing to set). Call it before any thread starts.
pub fn configure() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        [
            (libc::M_ARENA_MAX, 1),
            (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        ]
        .into_iter()
        // Every setting is applied, whichever is refused.
        // SAFETY: `mallopt` takes two integers and changes only the allocator's parameters;
        // glibc takes its own lock for it, and the values are within its documented ranges
        // (it returns 0 for one it refuses).
        .filter(|&(param, value)| unsafe { libc::mallopt(param, value) } != 1)
        .count()
            == 0
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        true
    }
}

#[cfg(test)]
mod tests {
    /// glibc accepts every setting (a threshold beyond its maximum would be refused).
    #[test]
    fn glibc_accepts_the_settings() {
        assert!(super::configure());
    }
}
