//! Shared stages (reference model, preference pairs, …) built once and cached by a hash of
//! what they depend on.
//!
//! A stage is built into a private temporary directory, given a manifest of its files (size
//! and SHA-256 of each), marked complete, and renamed into place; readers only ever see
//! complete directories. Every use of a cached stage checks it against its manifest first: a
//! file truncated, altered, missing or added since, or an entry without a manifest (built by
//! an older version), is reported and rebuilt, never used. Within a process, a lock per stage
//! makes concurrent runs wait for the one building it instead of building it twice; across
//! processes, the rename decides and the loser's copy is discarded.

use crate::hash::short_hash;
use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The version of the code that computes cached numbers. A stage's entry name hashes it with
/// the stage's key, so a cache built by code that computed other numbers is never reused.
/// Bump it with any change that alters what a stage builder writes (kernels, sampling,
/// pre-training, tokenisation, the gold model, …); the hash snapshot test then shows every
/// stage name moving, and nothing else.
pub const NUMERICS_VERSION: u32 = 1;

/// The cache entry name of stage `name` with key `key`: `name-<hash of numerics version and
/// key>`.
pub fn entry_name(name: &str, key: &impl Serialize) -> Result<String> {
    #[derive(Serialize)]
    struct Versioned<'a, K> {
        numerics_version: u32,
        key: &'a K,
    }
    let hash = short_hash(&Versioned {
        numerics_version: NUMERICS_VERSION,
        key,
    })?;
    Ok(format!("{name}-{hash}"))
}

const COMPLETE: &str = ".complete";
const MANIFEST: &str = ".manifest.json";

/// Every file under `dir` but the cache's own hidden markers, by relative path: its size and
/// SHA-256.
fn manifest(dir: &Path) -> Result<BTreeMap<String, (u64, String)>> {
    let mut out = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in
            std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))?
        {
            let path = entry?.path();
            let rel = path
                .strip_prefix(dir)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            if rel == COMPLETE || rel == MANIFEST {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let digest: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            out.insert(rel, (bytes.len() as u64, digest));
        }
    }
    Ok(out)
}

/// Why a complete stage directory cannot be used, if it cannot.
fn verify(dir: &Path) -> Option<String> {
    let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST)) else {
        return Some("it has no manifest (built by an older version)".into());
    };
    let Ok(recorded) = serde_json::from_str::<BTreeMap<String, (u64, String)>>(&text) else {
        return Some("its manifest is malformed".into());
    };
    let found = match manifest(dir) {
        Ok(found) => found,
        Err(e) => return Some(format!("{e:#}")),
    };
    for (file, (size, digest)) in &recorded {
        match found.get(file) {
            None => return Some(format!("`{file}` is missing")),
            Some((s, _)) if s != size => {
                return Some(format!("`{file}` has {s} bytes, {size} were written"))
            }
            Some((_, d)) if d != digest => return Some(format!("`{file}` was altered")),
            Some(_) => {}
        }
    }
    found
        .keys()
        .find(|f| !recorded.contains_key(*f))
        .map(|f| format!("`{f}` was added after it was built"))
}

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
        let entry = entry_name(name, key)?;
        let dir = self.root.join(&entry);
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
            match verify(&dir) {
                None => return Ok((dir, false)),
                Some(why) => {
                    tracing::warn!(stage = %dir.display(), "cached stage failed its check ({why}); rebuilding it");
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("cannot remove {}", dir.display()))?;
                }
            }
        }
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create {}", self.root.display()))?;
        // Named by the entry (with its key's hash) and the process: two runs of one process
        // building two stages of one kind (a best-of-n curve for each of two tasks) each have
        // their own, and the lock above keeps one builder per entry in a process.
        let tmp = self
            .root
            .join(format!(".tmp-{entry}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("cannot clear {}", tmp.display()))?;
        }
        let built = (|| -> Result<()> {
            std::fs::create_dir_all(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            build(&tmp)?;
            let manifest_path = tmp.join(MANIFEST);
            std::fs::write(
                &manifest_path,
                serde_json::to_string_pretty(&manifest(&tmp)?)?,
            )
            .with_context(|| format!("cannot write {}", manifest_path.display()))?;
            let complete = tmp.join(COMPLETE);
            std::fs::write(&complete, serde_json::to_string_pretty(key)?)
                .with_context(|| format!("cannot write {}", complete.display()))
        })();
        if let Err(e) = built {
            // A build that failed (a full disk, say) leaves nothing behind to take up space.
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!("building stage `{name}` in {}", tmp.display())));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two threads of one process building two stages of one kind at once: both built, each
    /// with its own files.
    #[test]
    fn two_stages_of_one_kind_build_at_once() -> Result<()> {
        let tmp_root = tempfile::Builder::new()
            .prefix("edpo-stages-")
            .tempdir()
            .expect("temp dir");
        let root = tmp_root.path().join("stages");
        let cache = StageCache::new(&root);
        let results: Vec<Result<(PathBuf, bool)>> = std::thread::scope(|scope| {
            let builds: Vec<_> = [1, 2]
                .map(|k| {
                    let cache = &cache;
                    scope.spawn(move || {
                        cache.get_or_build("curve", &serde_json::json!({"task": k}), |dir| {
                            std::thread::sleep(std::time::Duration::from_millis(200));
                            std::fs::write(dir.join("value.txt"), k.to_string())?;
                            Ok(())
                        })
                    })
                })
                .into_iter()
                .collect();
            builds
                .into_iter()
                .map(|b| {
                    b.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a build panicked")))
                })
                .collect()
        });
        for (k, result) in [1, 2].into_iter().zip(results) {
            let (dir, built) = result?;
            assert!(built);
            assert_eq!(
                std::fs::read_to_string(dir.join("value.txt"))?,
                k.to_string()
            );
        }
        std::fs::remove_dir_all(&root).ok();
        Ok(())
    }
}
