//! The short hash that names run directories and stage cache entries: 12 hex digits of the
//! SHA-256 of a value's JSON.

use anyhow::Result;
use serde::Serialize;

/// A short hash (12 hex digits of SHA-256) of a value's JSON.
pub fn short_hash(value: &impl Serialize) -> Result<String> {
    use sha2::{Digest, Sha256};
    let json = serde_json::to_string(value)?;
    let digest = Sha256::digest(json.as_bytes());
    Ok(digest.iter().take(6).map(|b| format!("{b:02x}")).collect())
}
