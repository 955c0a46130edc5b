//! Shared stages (reference model, preference pairs, …) built once and cached by a hash of
//! what they depend on.
//!
//! A stage is built into a private temporary directory, marked complete, and renamed into
//! place; readers only ever see complete directories. Within a process, a lock per stage makes
//! concurrent runs wait for the one building it instead of building it twice; across
//! processes, the rename decides and the loser's copy is discarded.

use crate::hash::short_hash;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const COMPLETE: &str = ".complete";

/// A directory of cached stages.
pub struct StageCache {
    root: PathBuf,
    locks: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
}

impl StageCache {
    /// A cache rooted at `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// The directory of stage `name` for `key`, building it with `build` (which fills the
    /// directory it is given) if it is not cached yet. Returns the directory and whether this
    /// call built it.
    pub fn get_or_build(
        &self,
        name: &str,
        key: &impl Serialize,
        build: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<(PathBuf, bool)> {
        let dir = self.root.join(format!("{name}-{}", short_hash(key)?));
        let lock = {
            let mut locks = self
                .locks
                .lock()
                .map_err(|_| anyhow::anyhow!("stage lock poisoned"))?;
            locks.entry(dir.clone()).or_default().clone()
        };
        let _guard = lock
            .lock()
            .map_err(|_| anyhow::anyhow!("stage lock poisoned"))?;
        if dir.join(COMPLETE).exists() {
            return Ok((dir, false));
        }
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create {}", self.root.display()))?;
        let tmp = self
            .root
            .join(format!(".tmp-{name}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        build(&tmp).with_context(|| format!("building stage `{name}`"))?;
        std::fs::write(tmp.join(COMPLETE), serde_json::to_string_pretty(key)?)?;
        if dir.exists() && !dir.join(COMPLETE).exists() {
            // Left by a process killed mid-rename on a filesystem without atomic directory
            // replacement; it was never complete.
            std::fs::remove_dir_all(&dir)?;
        }
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => Ok((dir, true)),
            Err(_) if dir.join(COMPLETE).exists() => {
                std::fs::remove_dir_all(&tmp)?;
                Ok((dir, false))
            }
            Err(e) => Err(e).with_context(|| format!("cannot move stage into {}", dir.display())),
        }
    }
}
