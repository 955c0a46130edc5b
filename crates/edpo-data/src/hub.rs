//! Where the Hugging Face hub cache is: the one definition, for models (`edpo-model`'s
//! `hf:ORG/NAME` sources) and datasets ([`crate::preferences`]'s `hf:ORG/NAME`).

use std::path::PathBuf;

/// The hub cache, as `huggingface_hub` finds it: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}
