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
//!
//! The process also restarts itself once at start-up with glibc's `hugetlb` tunable
//! ([`restart_with_huge_pages`]), so that the memory glibc takes from the kernel, the weights
//! a decoding step streams among it, sits on transparent huge pages.
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

/// The glibc tunable that, set to 1, has the allocator advise the memory it takes from the
/// kernel (the heap as it grows, each block mapped on its own) onto transparent huge pages,
/// and grow the heap by whole huge pages.
const HUGE_PAGES: &str = "glibc.malloc.hugetlb";

/// Restarts this process with `glibc.malloc.hugetlb=1` among its glibc tunables, unless the
/// environment already names that tunable (`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` keeps
/// 4 KiB pages). Returns only where nothing was restarted. Call it first thing in `main`.
///
/// A decoding step streams every weight from memory once; on 4 KiB pages one core read the
/// SmolLM2 weights at 9.4 GB/s and on 2 MiB pages at 16 GB/s, and SmolLM2 sampling ran at
/// 104–106 tokens/s against 95–97 with `hugetlb=0` on one thread, 139 against 131–134 on two
/// (`reports/bench/`, sitting p), with training speed and peak memory unchanged. glibc reads
/// its tunables only at start-up, hence the restart: the same program and arguments, the same
/// process id, one environment variable more (which the processes it starts inherit, so they
/// are not restarted again).
pub fn restart_with_huge_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        let current = std::env::var_os("GLIBC_TUNABLES").unwrap_or_default();
        let Some(value) = with_huge_pages(&current) else {
            return;
        };
        let mut args = std::env::args_os();
        let mut command = std::process::Command::new("/proc/self/exe");
        if let Some(first) = args.next() {
            command.arg0(first);
        }
        // `exec` returns only if the process could not be replaced.
        let error = command.args(args).env("GLIBC_TUNABLES", value).exec();
        eprintln!("warning: not restarted on huge pages ({error}); running on small pages");
    }
}

/// `GLIBC_TUNABLES` with [`HUGE_PAGES`]`=1` added to the tunables already there, or `None`
/// where they already name that tunable (whatever its value).
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
fn with_huge_pages(current: &std::ffi::OsStr) -> Option<std::ffi::OsString> {
    let named = current
        .to_string_lossy()
        .split(':')
        .any(|t| t.split('=').next() == Some(HUGE_PAGES));
    if named {
        return None;
    }
    let mut value = current.to_os_string();
    if !value.is_empty() {
        value.push(":");
    }
    value.push(HUGE_PAGES);
    value.push("=1");
    Some(value)
}

#[cfg(test)]
mod tests {
    /// glibc accepts every setting (a threshold beyond its maximum would be refused).
    #[test]
    fn glibc_accepts_the_settings() {
        assert!(super::configure());
    }

    /// The huge-page tunable joins the user's tunables, and a value the user gave is kept.
    #[test]
    fn huge_pages_join_the_tunables_already_set() {
        use std::ffi::OsStr;
        let with = |s: &str| super::with_huge_pages(OsStr::new(s));
        assert_eq!(with("").unwrap(), "glibc.malloc.hugetlb=1");
        assert_eq!(
            with("glibc.malloc.arena_max=2").unwrap(),
            "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
        );
        assert_eq!(with("glibc.malloc.hugetlb=0"), None);
        assert_eq!(
            with("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"),
            None
        );
    }
}
