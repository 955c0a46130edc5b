//! The run lock: one process at a time writes a run directory, on a local disk or a shared
//! filesystem (NFS, Lustre, GPFS), across the local launcher, `edpo train` and Slurm tasks.
//!
//! The lock is the file [`LOCK`] in the run directory, created with `O_CREAT | O_EXCL` (atomic
//! on NFSv3 and later and on every cluster filesystem; `flock` is not reliable there). It
//! holds its [`LockOwner`] as JSON, and its holder refreshes its modification time every
//! [`HEARTBEAT`] from a thread, so a lock whose holder died without removing it can be told
//! from a live one: the caller decides staleness from the owner and the heartbeat's age
//! (same host and the process is gone; its Slurm job has ended; no heartbeat for
//! [`STALE_AFTER`]). A stale lock is broken under a second lock file, so that two processes
//! breaking it at once cannot remove a lock the other has just taken. Dropping a [`RunLock`]
//! removes the file if it is still its own.

use crate::{now_unix, Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

/// The lock file in a run directory.
pub const LOCK: &str = ".lock";
/// How often a holder refreshes its lock.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// A lock not refreshed for this long is stale whoever holds it.
pub const STALE_AFTER: Duration = Duration::from_secs(300);
/// A lock file without a readable owner this old was left by a process that died between
/// creating and filling it.
pub const UNREADABLE_AFTER: Duration = Duration::from_secs(10);

/// Who holds a run lock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockOwner {
    /// The holder's host name.
    pub host: String,
    /// Its process id on that host.
    pub pid: u32,
    /// The Slurm job (`JOBID_TASK` for an array task), when it runs under Slurm.
    pub slurm_job: Option<String>,
    /// When it took the lock.
    pub acquired_unix: f64,
    /// A value unique to this acquisition.
    pub token: String,
}

impl LockOwner {
    /// This process on `host`, under `slurm_job` if any.
    pub fn this_process(host: &str, slurm_job: Option<String>) -> Self {
        let now = now_unix();
        Self {
            host: host.to_string(),
            pid: std::process::id(),
            slurm_job,
            acquired_unix: now,
            token: format!("{host}-{}-{}", std::process::id(), now.to_bits()),
        }
    }

    /// `host pid N (Slurm job J)`, for messages.
    pub fn describe(&self) -> String {
        match &self.slurm_job {
            Some(job) => format!("{} pid {} (Slurm job {job})", self.host, self.pid),
            None => format!("{} pid {}", self.host, self.pid),
        }
    }
}

/// A held run lock; dropping it releases it.
pub struct RunLock {
    path: PathBuf,
    token: String,
    stop: Option<mpsc::Sender<()>>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

/// The outcome of [`RunLock::acquire`].
pub enum Acquired {
    /// This process holds the lock.
    Held(RunLock),
    /// A live process holds it.
    Busy(LockOwner),
}

/// The lock of a run directory as found on disk: its owner (if readable) and how long ago it
/// was last refreshed.
#[derive(Debug, Clone)]
pub struct Found {
    /// The owner, or `None` for a file still being written or not a lock.
    pub owner: Option<LockOwner>,
    /// Seconds since its last heartbeat.
    pub age_s: f64,
}

/// Reads the lock of run directory `dir`, if there is one.
pub fn read_lock(dir: &Path) -> Option<Found> {
    read_found(&dir.join(LOCK))
}

fn read_found(path: &Path) -> Option<Found> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    let age_s = SystemTime::now()
        .duration_since(modified)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let owner = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    Some(Found { owner, age_s })
}

fn io_error<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Dir {
        action,
        path: path.to_path_buf(),
        source,
    }
}

impl RunLock {
    /// Takes the lock of run directory `dir` (created if absent) for `owner`. A lock held by
    /// another owner is broken if `is_stale(owner, seconds since its heartbeat)` says its
    /// holder is gone. An unreadable lock (being written: that takes milliseconds) is waited
    /// for, and broken once it is [`UNREADABLE_AFTER`] old.
    pub fn acquire(
        dir: &Path,
        owner: &LockOwner,
        is_stale: impl Fn(&LockOwner, f64) -> bool,
    ) -> Result<Acquired> {
        std::fs::create_dir_all(dir).map_err(io_error(dir, "create"))?;
        let path = dir.join(LOCK);
        let text = serde_json::to_string(owner)?;
        for _ in 0..300 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    if let Err(source) = file
                        .write_all(text.as_bytes())
                        .and_then(|()| file.sync_all())
                    {
                        // A lock this process created but could not fill (a full disk) would
                        // read as unowned to everyone else; it goes.
                        drop(file);
                        let _ = std::fs::remove_file(&path);
                        return Err(Error::Write { path, source });
                    }
                    return Ok(Acquired::Held(Self::held(path, owner.token.clone())));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(Error::Write { path, source }),
            }
            let Some(found) = read_found(&path) else {
                continue; // released between our attempt and the read
            };
            let stale = match &found.owner {
                Some(o) => o.token != owner.token && is_stale(o, found.age_s),
                None => found.age_s > UNREADABLE_AFTER.as_secs_f64(),
            };
            if !stale {
                match found.owner {
                    Some(o) => return Ok(Acquired::Busy(o)),
                    None => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
            }
            break_stale(&path, found.owner.as_ref())?;
        }
        Err(Error::Malformed {
            path,
            message: "the lock stayed unreadable or changed hands 300 times while it was being \
                      taken"
                .into(),
        })
    }

    fn held(path: PathBuf, token: String) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let beat = path.clone();
        let heartbeat = std::thread::Builder::new()
            .name("run-lock-heartbeat".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(HEARTBEAT) {
                    if let Ok(f) = std::fs::OpenOptions::new().append(true).open(&beat) {
                        let _ = f.set_modified(SystemTime::now());
                    }
                }
            })
            .ok();
        Self {
            path,
            token,
            stop: Some(stop),
            heartbeat,
        }
    }
}

/// Removes the stale lock at `path` if it is still the one that was judged stale, under the
/// lock `path.breaking` so that two breakers cannot both act.
fn break_stale(path: &Path, judged: Option<&LockOwner>) -> Result<()> {
    let breaking = path.with_extension("breaking");
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&breaking)
    {
        Ok(_) => {
            let now = read_found(path);
            let same = match (now.as_ref().and_then(|f| f.owner.as_ref()), judged) {
                (Some(a), Some(b)) => a.token == b.token,
                (None, None) => now.is_some(),
                _ => false,
            };
            if same {
                let _ = std::fs::remove_file(path);
            }
            std::fs::remove_file(&breaking).map_err(io_error(&breaking, "remove"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Another process is breaking it; a breaker that died leaves its file, which
            // expires.
            if read_found(&breaking).is_some_and(|f| f.age_s > UNREADABLE_AFTER.as_secs_f64()) {
                let _ = std::fs::remove_file(&breaking);
            }
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        }
        Err(source) => Err(Error::Write {
            path: breaking,
            source,
        }),
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
        let ours = read_found(&self.path)
            .and_then(|f| f.owner)
            .is_some_and(|o| o.token == self.token);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path that does not exist yet, in a fresh directory removed with the returned guard.
    fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("edpo-lock-{name}-"))
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path().join(name);
        (tmp, dir)
    }

    fn owner(pid: u32) -> LockOwner {
        LockOwner {
            host: "host-a".into(),
            pid,
            slurm_job: None,
            acquired_unix: 1.0e9,
            token: format!("t{pid}"),
        }
    }

    #[test]
    fn a_live_lock_is_busy_and_a_released_one_is_free() {
        let (_tmp, dir) = scratch("live");
        let Acquired::Held(lock) = RunLock::acquire(&dir, &owner(1), |_, _| false).unwrap() else {
            panic!("an absent lock must be taken");
        };
        match RunLock::acquire(&dir, &owner(2), |_, _| false).unwrap() {
            Acquired::Busy(o) => assert_eq!(o, owner(1)),
            Acquired::Held(_) => panic!("a live lock was taken twice"),
        }
        assert_eq!(read_lock(&dir).unwrap().owner, Some(owner(1)));
        drop(lock);
        assert!(read_lock(&dir).is_none(), "dropping the lock removes it");
        assert!(matches!(
            RunLock::acquire(&dir, &owner(2), |_, _| false).unwrap(),
            Acquired::Held(_)
        ));
    }

    #[test]
    fn a_stale_lock_is_broken_and_the_breaker_holds_it() {
        let (_tmp, dir) = scratch("stale");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(LOCK), serde_json::to_string(&owner(7)).unwrap()).unwrap();
        let judged = std::cell::RefCell::new(Vec::new());
        let got = RunLock::acquire(&dir, &owner(8), |o, age| {
            judged.borrow_mut().push((o.pid, age < 60.0));
            o.pid == 7
        })
        .unwrap();
        assert!(matches!(got, Acquired::Held(_)));
        assert_eq!(
            judged.borrow()[0],
            (7, true),
            "judged on the owner and a fresh age"
        );
        assert_eq!(read_lock(&dir).unwrap().owner, Some(owner(8)));
        assert!(!dir.join(".lock.breaking").exists());
    }

    #[test]
    fn an_old_empty_lock_is_broken_and_a_young_one_waited_for() {
        let (_tmp, dir) = scratch("empty");
        std::fs::create_dir_all(&dir).unwrap();
        let file = std::fs::File::create(dir.join(LOCK)).unwrap();
        file.set_modified(SystemTime::now() - UNREADABLE_AFTER - Duration::from_secs(1))
            .unwrap();
        drop(file);
        assert!(matches!(
            RunLock::acquire(&dir, &owner(3), |_, _| false).unwrap(),
            Acquired::Held(_)
        ));
        // A young empty lock filled a moment later by its writer is then that writer's.
        let (_tmp, dir) = scratch("filling");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::File::create(dir.join(LOCK)).unwrap();
        let path = dir.join(LOCK);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            std::fs::write(path, serde_json::to_string(&owner(4)).unwrap()).unwrap();
        });
        match RunLock::acquire(&dir, &owner(5), |_, _| false).unwrap() {
            Acquired::Busy(o) => assert_eq!(o.pid, 4),
            Acquired::Held(_) => panic!("a lock being written was taken"),
        }
        writer.join().unwrap();
    }

    #[test]
    fn many_threads_racing_for_a_stale_lock_leave_exactly_one_holder() {
        let (_tmp, dir) = scratch("race");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(LOCK), serde_json::to_string(&owner(99)).unwrap()).unwrap();
        let holders = std::sync::Mutex::new(Vec::new());
        let barrier = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for pid in 0..8 {
                let (dir, holders, barrier) = (&dir, &holders, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    // Every lock taken is held until all threads have tried.
                    if let Acquired::Held(lock) =
                        RunLock::acquire(dir, &owner(pid), |o, _| o.pid == 99).unwrap()
                    {
                        holders.lock().unwrap().push((pid, lock));
                    }
                });
            }
        });
        let holders = holders.into_inner().unwrap();
        let pids: Vec<u32> = holders.iter().map(|(pid, _)| *pid).collect();
        assert_eq!(pids.len(), 1, "holders: {pids:?}");
        assert_eq!(read_lock(&dir).unwrap().owner.unwrap().pid, pids[0]);
    }
}
