//! Config files and `--set` overrides: the YAML layer over the experiment crate's
//! [`RawConfig`] (the schema) and [`RunConfig`] (resolved). `--set key=value` overrides edit
//! the YAML tree before it is parsed, so an override is checked exactly like the file: an
//! unknown key or a wrong type is an error naming the key; errors in a file name its line.

use anyhow::{anyhow, bail, Context, Result};
use edpo_experiment::config::RawConfig;
use edpo_experiment::RunConfig;
use serde_yaml::Value;
use std::path::Path;

/// Reads a YAML file into a tree, with the file named in errors.
pub fn read_yaml(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Parses `key=value` (value as YAML) and sets it in the tree, creating sections as needed.
/// A value that is a mapping replaces the whole subtree (so `objective={kind: dpo, beta: 0.1}`
/// swaps the objective).
pub fn apply_set(tree: &mut Value, assignment: &str) -> Result<()> {
    let (key, value) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow!("override `{assignment}` is not of the form key=value"))?;
    let value: Value = serde_yaml::from_str(value)
        .map_err(|e| anyhow!("override `{key}`: value is not YAML: {e}"))?;
    set_path(tree, key, value)
}

/// Sets a dotted key in the tree.
pub fn set_path(tree: &mut Value, key: &str, value: Value) -> Result<()> {
    let mut node = tree;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            bail!("override key `{key}` has an empty component");
        }
        if node.is_null() {
            *node = Value::Mapping(Default::default());
        }
        let Value::Mapping(map) = node else {
            bail!(
                "override `{key}`: `{}` is not a section",
                parts[..i].join(".")
            );
        };
        let k = Value::String((*part).to_string());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map.entry(k).or_insert(Value::Null);
    }
    Ok(())
}

/// Reads a dotted key from the tree.
pub fn get_path<'a>(tree: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(tree, |node, part| node.get(part))
}

/// Parses and resolves a tree; `origin` names where it came from in errors.
/// The tree goes through YAML text so that schema errors carry the key path; the line numbers
/// of that text mean nothing to the user and are cut.
pub fn resolve_tree(tree: Value, origin: &str) -> Result<RunConfig> {
    let text = serde_yaml::to_string(&tree)?;
    let raw: RawConfig = serde_yaml::from_str(&text).map_err(|e| {
        let message = e.to_string();
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_string();
        anyhow!("{origin}: {message}")
    })?;
    raw.resolve().map_err(|e| anyhow!("{origin}: {e}"))
}

/// The 1-based line of a dotted key in block-style YAML text, if it can be found.
pub fn find_line(text: &str, dotted: &str) -> Option<usize> {
    let mut parts = dotted.split('.').peekable();
    let mut want = parts.next()?;
    let mut parent_indent: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if parent_indent.is_some_and(|p| indent <= p) {
            return None;
        }
        if trimmed
            .strip_prefix(want)
            .is_some_and(|rest| rest.starts_with(':'))
        {
            match parts.next() {
                None => return Some(i + 1),
                Some(next) => {
                    want = next;
                    parent_indent = Some(indent);
                }
            }
        }
    }
    None
}

/// Loads a config file, applies overrides, resolves.
pub fn load(path: &Path, sets: &[String]) -> Result<RunConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // Parse straight from text first so YAML syntax and schema errors carry line numbers.
    if sets.is_empty() {
        let raw: RawConfig = serde_yaml::from_str(&text).map_err(|e| {
            // A task-section error leads with its dotted key (`task.train_pairs: …`) and no
            // position; point at the key's line.
            let message = e.to_string();
            let line = message
                .split_once(": ")
                .filter(|(key, _)| key.contains('.') && !key.contains(' '))
                .and_then(|(key, _)| find_line(&text, key))
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            anyhow!("{}{line}: {message}", path.display())
        })?;
        return raw.resolve().map_err(|e| {
            // Semantic errors name their key; point at its line too.
            let line = e
                .to_string()
                .split('`')
                .nth(1)
                .and_then(|key| find_line(&text, key))
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            anyhow!("{}{line}: {e}", path.display())
        });
    }
    let mut tree: Value =
        serde_yaml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    for s in sets {
        apply_set(&mut tree, s)?;
    }
    resolve_tree(
        tree,
        &format!("{} with overrides {}", path.display(), sets.join(" ")),
    )
}
