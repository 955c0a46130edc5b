//! Training a byte-level BPE tokenizer (the `tokenizers` crate) on a corpus and saving it as
//! `tokenizer.json`, with `<|endoftext|>` as its only special token (the EOS of the models
//! trained with it).

use crate::{Error, Result};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

/// The EOS token of tokenizers trained here.
pub const EOS: &str = "<|endoftext|>";

/// Trains a byte-level BPE of `vocab_size` tokens (EOS included) on `texts` and writes it to
/// `path`. Returns the EOS id.
pub fn train_bpe<'a>(
    texts: impl Iterator<Item = &'a str> + Send,
    vocab_size: usize,
    path: &Path,
) -> Result<u32> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| Error::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        ByteLevel,
        PostProcessorWrapper,
        ByteLevelDecoder,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
    .with_decoder(Some(ByteLevelDecoder::default()))
    .build()
    .map_err(err)?;
    tokenizer.train(&mut trainer, texts).map_err(err)?;
    tokenizer.save(path, false).map_err(err)?;
    let eos = tokenizer.token_to_id(EOS).ok_or_else(|| Error::Tokenizer {
        path: path.to_path_buf(),
        message: "EOS missing after training".into(),
    })?;
    Ok(eos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PairTokenizer;

    #[test]
    fn trains_loads_and_round_trips() -> Result<()> {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let path = dir.join("tokenizer.json");
        let corpus = [
            "a quiet triumph of acting",
            "a dull mess of a film",
            "funny and warm",
        ]
        .repeat(20);
        let eos = train_bpe(corpus.iter().copied(), 300, &path)?;
        let tok = PairTokenizer::from_file(&path, eos)?;
        let ids = tok.encode("a quiet film")?;
        assert!(!ids.is_empty() && !ids.contains(&eos));
        assert_eq!(tok.decode(&ids)?, "a quiet film");
        assert_eq!(tok.token_to_id(EOS), Some(eos));
        Ok(())
    }
}
