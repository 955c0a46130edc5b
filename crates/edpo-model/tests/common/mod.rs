//! What the model crate's integration tests share: the repository's test data and the fixed
//! sequences the GGUF and LoRA goldens were computed on (`tools/make_gguf_fixture.py`,
//! `tools/make_lora_golden.py` build the same ones).

#![allow(dead_code)]

use edpo_model::SequenceBatch;
use std::path::PathBuf;

/// `testdata/` at the repository root.
pub fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

/// Four prompt + response sequences over a 320-token vocabulary, response `i` scored.
pub fn golden_sequences() -> Result<SequenceBatch, Box<dyn std::error::Error>> {
    let seqs: Vec<(Vec<u32>, Vec<u32>)> = (0..4u32)
        .map(|i| {
            let prompt = (0..3 + i).map(|k| (k * 37 + i * 11) % 320).collect();
            let response = (0..5 + i).map(|k| (k * 53 + i * 7 + 1) % 320).collect();
            (prompt, response)
        })
        .collect();
    let views: Vec<(&[u32], &[u32])> = seqs
        .iter()
        .map(|(p, r)| (p.as_slice(), r.as_slice()))
        .collect();
    Ok(SequenceBatch::new(&views, 0)?)
}
