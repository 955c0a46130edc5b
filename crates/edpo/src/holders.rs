//! Who holds a run, and whether they are still there: this process as a lock owner (host,
//! pid, Slurm task), whether a process of this host is alive, whether a Slurm job is still
//! queued or running, and from these whether a run lock's holder is gone. Shared by every
//! launcher ([`crate::sweep`], [`crate::slurm`]) and by `edpo sweep status`.

use edpo_rundir::LockOwner;
use std::path::PathBuf;
use std::process::Command;

/// This machine's host name (as `hostname -s` prints it, which is what Slurm calls a node).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().split('.').next().unwrap_or_default().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Whether process `pid` of this host is alive (a zombie is not).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Whether a run lock's holder is gone: no heartbeat for [`edpo_rundir::lock::STALE_AFTER`];
/// its Slurm job is no longer active; or it ran on this host and its process has exited.
pub fn lock_is_stale(owner: &LockOwner, age_s: f64) -> bool {
    if age_s > edpo_rundir::lock::STALE_AFTER.as_secs_f64() {
        return true;
    }
    if let Some(job) = &owner.slurm_job {
        if job_active(job) == Some(false) {
            return true;
        }
    }
    owner.host == host_name() && !process_alive(owner.pid)
}

/// This process as a lock owner (with its Slurm job when it is a Slurm task).
pub fn this_owner() -> LockOwner {
    LockOwner::this_process(&host_name(), this_task())
}

/// Whether a Slurm job state is one of a job not yet ended.
pub fn state_active(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "CONFIGURING"
            | "COMPLETING"
            | "SUSPENDED"
            | "REQUEUED"
            | "REQUEUE_FED"
            | "REQUEUE_HOLD"
            | "RESIZING"
            | "SIGNALING"
            | "STAGE_OUT"
            | "RESV_DEL_HOLD"
            | "SPECIAL_EXIT"
            | "STOPPED"
    )
}

/// The path of Slurm command `name` if it is installed (on `PATH`).
pub fn command_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The Slurm job of this process when it runs as a Slurm task: `ARRAYJOB_TASK` for an array
/// task, the job id otherwise.
pub fn this_task() -> Option<String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (var("SLURM_ARRAY_JOB_ID"), var("SLURM_ARRAY_TASK_ID")) {
        (Some(job), Some(task)) => Some(format!("{job}_{task}")),
        _ => var("SLURM_JOB_ID"),
    }
}

/// Whether Slurm job `job` (`JOBID` or `JOBID_TASK`) is still queued or running: `None` when
/// Slurm cannot be asked (no `squeue`, or it failed for another reason than an unknown job).
pub fn job_active(job: &str) -> Option<bool> {
    command_path("squeue")?;
    let out = Command::new("squeue")
        .args(["-h", "-t", "all", "-o", "%T", "-j", job])
        .output()
        .ok()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // A job the controller has forgotten has ended.
        return err.contains("Invalid job id").then_some(false);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.split_whitespace().any(state_active))
}
