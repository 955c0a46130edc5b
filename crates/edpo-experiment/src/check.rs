//! Validation of resolved config values, with errors naming the key.

use anyhow::{bail, Result};

/// `Ok` if `ok`, else an error naming `key`.
pub fn check(ok: bool, key: &str, message: impl std::fmt::Display) -> Result<()> {
    if ok {
        Ok(())
    } else {
        bail!("key `{key}`: {message}")
    }
}
