//! A decoding step's threads, kept awake between its parallel sections.
//!
//! A decoding step runs some 240 small parallel sections (each projection's product, each
//! layer's attention, the draw), a few hundred microseconds apart or less. On rayon each one
//! wakes a sleeping worker and lets it fall asleep again, and at two threads that scheduling
//! was an eighth of the step. Here the kernels' extra threads ([`super::threads`] − 1 of them,
//! started on first use and never stopped) wait for the next section spinning, for up to
//! [`SPIN`] after each, and only then park; a section is posted by bumping one atomic word.
//!
//! [`for_each_mut`] (and [`map`] on it) is the only entry: the calling thread leads, the
//! helpers take the other parts. One caller at a time holds the team; a second caller
//! meanwhile (another thread, or a part that itself splits) runs on rayon as before. No number
//! depends on which runs it: each part is computed whole by one thread.
//!
//! Depends on std and rayon only. The one unsafe step is handing helpers a borrowed closure
//! for the span of a section, which the leader outlives by waiting for every member.
#![allow(unsafe_code)]

use rayon::prelude::*;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a helper spins for the next section before it parks: longer than the serial gaps
/// inside a decoding step (norms, rope, the cache's writes), short enough that a helper gives
/// its core back soon after decoding ends.
pub const SPIN: Duration = Duration::from_micros(500);

/// The work of one section: called with each member's index (0 the leader) and the members.
type Section = dyn Fn(usize, usize) + Sync;

/// One helper thread as the leader sees it.
struct Helper {
    thread: Thread,
    /// Set while the helper is parked (or about to be): the leader then unparks it.
    parked: AtomicBool,
}

/// What the leader and the helpers share.
struct Shared {
    /// The section's number in the high bits and its members in the low [`MEMBER_BITS`]:
    /// one word, so that a helper reads both at once.
    posted: AtomicU64,
    /// The posted section, valid while it runs; written by the leader before `posted`, read
    /// by a member after it (the release/acquire pair orders them).
    section: UnsafeCell<Option<*const Section>>,
    /// Helpers that finished the current section.
    done: AtomicUsize,
    /// Whether a helper's part panicked in the current section.
    panicked: AtomicBool,
    helpers: Mutex<Vec<&'static Helper>>,
}

// SAFETY: `section` is written only by the leader while it holds the team (`LEADER`) and no
// member is running, and read only by members of the section it was written for; the closure
// it points to is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as for `Sync`; the pointer is the only field that is not `Send` by itself.
unsafe impl Send for Shared {}

const MEMBER_BITS: u32 = 8;

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| Shared {
        posted: AtomicU64::new(0),
        section: UnsafeCell::new(None),
        done: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
        helpers: Mutex::new(Vec::new()),
    })
}

/// Held by the caller leading a section.
static LEADER: Mutex<()> = Mutex::new(());

/// The team, unless another caller leads it now. A section that panicked leaves the lock
/// poisoned but the team sound (its leader waited for every member before unwinding), so the
/// poison is ignored.
fn take_the_lead() -> Option<std::sync::MutexGuard<'static, ()>> {
    match LEADER.try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

#[cfg(test)]
thread_local! {
    /// Sections this thread has led (for the tests: whether the team, not rayon, ran them).
    static LED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// `f(0), …, f(parts − 1)` in order, computed across the kernels' threads when [`super::parallel`]
/// allows it (by this team, or on rayon while another caller holds it), on this thread
/// otherwise. Member `t` of `T` computes parts `t, t + T, …`.
pub fn map<R: Send>(parts: usize, f: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
    let mut slots: Vec<Option<R>> = (0..parts).map(|_| None).collect();
    for_each_mut(&mut slots, |i, slot| *slot = Some(f(i)));
    slots
        .into_iter()
        .map(|slot| slot.expect("every part of a section is computed before it returns"))
        .collect()
}

/// `f(i, &mut items[i])` for every item, split as [`map`] splits its parts. The items are
/// where the parts write their results in place (disjoint pieces of one output), so nothing a
/// helper allocates is freed by another thread.
pub fn for_each_mut<T: Send>(items: &mut [T], f: impl Fn(usize, &mut T) + Sync + Send) {
    let parts = items.len();
    let members = if super::parallel() {
        super::threads().min(parts).min((1 << MEMBER_BITS) - 1)
    } else {
        1
    };
    if members <= 1 {
        items.iter_mut().enumerate().for_each(|(i, x)| f(i, x));
        return;
    }
    let Some(_lead) = take_the_lead() else {
        items.par_iter_mut().enumerate().for_each(|(i, x)| f(i, x));
        return;
    };
    let slots: Vec<Mutex<&mut T>> = items.iter_mut().map(Mutex::new).collect();
    let section = |member: usize, members: usize| {
        for i in (member..parts).step_by(members) {
            // Each slot is locked by its one member only: never contended.
            let mut item = slots[i].lock().unwrap_or_else(|e| e.into_inner());
            f(i, &mut item);
        }
    };
    lead(members, &section);
}

/// Runs `section` on this thread (member 0) and `members − 1` helpers, and returns when all
/// are done; a panic in any member resumes here after every member has stopped.
fn lead(members: usize, section: &(dyn Fn(usize, usize) + Sync + '_)) {
    let team = shared();
    #[cfg(test)]
    LED.with(|led| led.set(led.get() + 1));
    let helpers: Vec<&'static Helper> = {
        let mut helpers = team.helpers.lock().unwrap_or_else(|e| e.into_inner());
        while helpers.len() < members - 1 {
            let index = helpers.len() + 1;
            // The last section posted, read here while no other can be posted (this thread
            // leads): a helper that read it itself could read the section it is started for.
            let seen = team.posted.load(Acquire) >> MEMBER_BITS;
            let (tx, rx) = std::sync::mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name(format!("edpo-team-{index}"))
                .spawn(move || {
                    let me: &'static Helper = Box::leak(Box::new(Helper {
                        thread: std::thread::current(),
                        parked: AtomicBool::new(false),
                    }));
                    let _ = tx.send(me);
                    serve(index, me, seen);
                });
            match spawned.ok().and_then(|_| rx.recv().ok()) {
                Some(helper) => helpers.push(helper),
                None => break,
            }
        }
        helpers.clone()
    };
    let members = members.min(helpers.len() + 1);
    // SAFETY: the reference outlives its use: this function returns only after every helper
    // taking part has finished the section (`done`), and helpers read it only while taking part.
    let erased: *const Section = unsafe {
        std::mem::transmute::<*const (dyn Fn(usize, usize) + Sync + '_), *const Section>(
            section as *const (dyn Fn(usize, usize) + Sync + '_),
        )
    };
    // SAFETY: no member is running (the previous section ended before its leader returned).
    unsafe { *team.section.get() = Some(erased) };
    team.done.store(0, Relaxed);
    team.panicked.store(false, Relaxed);
    let number = (team.posted.load(Relaxed) >> MEMBER_BITS) + 1;
    team.posted
        .store((number << MEMBER_BITS) | members as u64, SeqCst);
    for helper in &helpers[..members - 1] {
        if helper.parked.load(SeqCst) {
            helper.thread.unpark();
        }
    }
    let mine = catch_unwind(AssertUnwindSafe(|| section(0, members)));
    let mut spins = 0u32;
    while team.done.load(Acquire) < members - 1 {
        spins += 1;
        if spins < 1 << 16 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    if let Err(panic) = mine {
        resume_unwind(panic);
    }
    if team.panicked.load(Acquire) {
        panic!("a decoding thread panicked in a parallel section");
    }
}

/// A helper's loop from section number `seen` on: wait for a section it is a member of
/// (spinning for [`SPIN`], then parked), run its part, report it done.
fn serve(index: usize, me: &Helper, mut seen: u64) {
    let team = shared();
    loop {
        let posted = wait_for_section(team, me, seen);
        seen = posted >> MEMBER_BITS;
        let members = (posted & ((1 << MEMBER_BITS) - 1)) as usize;
        if index >= members {
            continue;
        }
        // SAFETY: this helper is a member of the section just posted, so the leader is
        // waiting for it and the pointer is live.
        let section = unsafe { (*team.section.get()).map(|s| &*s) };
        if let Some(section) = section {
            if catch_unwind(AssertUnwindSafe(|| section(index, members))).is_err() {
                team.panicked.store(true, Release);
            }
        }
        team.done.fetch_add(1, Release);
    }
}

/// The `posted` word of the first section after number `seen`.
fn wait_for_section(team: &Shared, me: &Helper, seen: u64) -> u64 {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let posted = team.posted.load(Acquire);
        if posted >> MEMBER_BITS != seen {
            return posted;
        }
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
            std::hint::spin_loop();
            continue;
        }
        // Park, announcing it first and looking once more, so that a section posted in
        // between is either seen here or unparks us (park's token makes an early unpark count).
        me.parked.store(true, SeqCst);
        let posted = team.posted.load(SeqCst);
        if posted >> MEMBER_BITS == seen {
            std::thread::park();
        }
        me.parked.store(false, SeqCst);
        let posted = team.posted.load(Acquire);
        if posted >> MEMBER_BITS != seen {
            return posted;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parts come back in order, each computed once, whoever computed it, across sections
    /// posted back to back, after the helpers have parked, and with a second caller at once.
    #[test]
    fn sections_return_every_part_in_order() {
        super::super::set_threads(3);
        for parts in [1usize, 2, 3, 7, 64] {
            let got = map(parts, |i| i * i);
            assert_eq!(got, (0..parts).map(|i| i * i).collect::<Vec<_>>());
        }
        std::thread::sleep(SPIN * 4);
        assert_eq!(map(5, |i| i + 1), vec![1, 2, 3, 4, 5]);
        let nested = map(3, |i| map(4, |j| i * 10 + j));
        assert_eq!(nested[2], vec![20, 21, 22, 23]);
        let callers: Vec<_> = (0..3)
            .map(|c| {
                std::thread::spawn(move || {
                    (0..200).map(|r| map(9, |i| c + r + i)[8]).sum::<usize>()
                })
            })
            .collect();
        for (c, caller) in callers.into_iter().enumerate() {
            let total: usize = caller.join().expect("caller");
            assert_eq!(total, (0..200).map(|r| c + r + 8).sum::<usize>());
        }
    }

    /// A part that panics, on the leader or on a helper, fails the caller's call only after
    /// every member has stopped, and the team serves the next section.
    #[test]
    fn a_panicking_part_fails_its_section_only() {
        super::super::set_threads(3);
        for bad in [0usize, 1, 2] {
            let failed = std::panic::catch_unwind(|| {
                map(3, |i| {
                    assert_ne!(i, bad, "part {bad} fails");
                    i
                })
            });
            assert!(failed.is_err(), "part {bad}'s panic reached the caller");
            assert_eq!(map(6, |i| 2 * i), vec![0, 2, 4, 6, 8, 10]);
        }
        // The team itself (not rayon's fallback) still leads sections: another test may hold
        // it for a moment, so a few tries.
        let before = LED.with(std::cell::Cell::get);
        let mut tries = 0;
        while LED.with(std::cell::Cell::get) == before && tries < 1000 {
            assert_eq!(map(3, |i| i), vec![0, 1, 2]);
            tries += 1;
        }
        assert!(
            LED.with(std::cell::Cell::get) > before,
            "the team was not used again"
        );
    }
}
