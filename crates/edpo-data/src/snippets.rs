//! The movie-review snippets with human sentiment ratings (Hutto & Gilbert, ICWSM 2014, shipped
//! with `vaderSentiment` 3.3.2): reading, checking, cleaning, splitting and statistics, with
//! polars.
//!
//! The file is TSV without a header: `id`, mean rating on −4…+4 (of ≥ 20 raters), text; UTF-8
//! with CRLF line ends. Reading checks the recorded SHA-256 first (a truncated or corrupt file
//! fails there, naming the file and both digests), then parses every line: a line without
//! three fields or with a rating that is not a number is an error naming the file and line.
//! Cleaning collapses whitespace and drops empty texts and exact duplicates (counted). The
//! split is by a stable hash of the cleaned text, so it never depends on row order:
//! train 80%, validation 10%, test 10%.

use crate::{Error, Result};
use polars::prelude::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// One rated snippet.
#[derive(Debug, Clone, PartialEq)]
pub struct Snippet {
    /// The id in the source file.
    pub id: i64,
    /// Mean human rating, −4…+4.
    pub rating: f64,
    /// The cleaned text.
    pub text: String,
}

/// What preparation did, for the summary and the dataset README.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PrepareSummary {
    /// Lines read.
    pub rows_read: usize,
    /// Rows dropped for an empty text.
    pub dropped_empty: usize,
    /// Rows dropped as exact duplicates of an earlier text.
    pub dropped_duplicate: usize,
    /// Rows per split, with word-count and rating statistics.
    pub splits: Vec<SplitStats>,
}

/// Statistics of one split.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SplitStats {
    /// `train`, `validation` or `test`.
    pub split: String,
    /// Number of snippets.
    pub rows: usize,
    /// Mean words per snippet.
    pub mean_words: f64,
    /// Fewest words.
    pub min_words: i64,
    /// Most words.
    pub max_words: i64,
    /// Mean rating.
    pub mean_rating: f64,
}

fn polars_err(path: &Path) -> impl Fn(PolarsError) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// The split a text belongs to: by the first bytes of its SHA-256.
pub fn split_of(text: &str) -> &'static str {
    let digest = Sha256::digest(text.as_bytes());
    let bucket = u16::from_be_bytes([digest[0], digest[1]]) as f64 / 65536.0;
    if bucket < 0.8 {
        "train"
    } else if bucket < 0.9 {
        "validation"
    } else {
        "test"
    }
}

/// Hex SHA-256 of a file's bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads, checks and cleans the snippets file into a DataFrame with columns `id`, `rating`,
/// `text`, `words`, `split`.
pub fn read(path: &Path, expected_sha256: Option<&str>) -> Result<(DataFrame, PrepareSummary)> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(expected) = expected_sha256 {
        let found = sha256_hex(&bytes);
        if found != expected {
            return Err(Error::Row {
                path: path.to_path_buf(),
                line: 0,
                message: format!("checksum mismatch: SHA-256 is {found}, expected {expected} (corrupt, truncated or a different version)"),
            });
        }
    }
    let text = String::from_utf8(bytes).map_err(|e| Error::Row {
        path: path.to_path_buf(),
        line: 0,
        message: format!("not UTF-8 at byte {}", e.utf8_error().valid_up_to()),
    })?;
    let (mut ids, mut ratings, mut texts, mut words, mut splits) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut seen = std::collections::HashSet::new();
    let mut summary = PrepareSummary {
        rows_read: 0,
        dropped_empty: 0,
        dropped_duplicate: 0,
        splits: Vec::new(),
    };
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.trim_end_matches('\r');
        if raw.trim().is_empty() {
            continue;
        }
        summary.rows_read += 1;
        let bad = |message: String| Error::Row {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut fields = raw.splitn(3, '\t');
        let (Some(id), Some(rating), Some(body)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(bad(
                "expected three tab-separated fields: id, rating, text".into()
            ));
        };
        let id: i64 = id
            .trim()
            .parse()
            .map_err(|_| bad(format!("id `{id}` is not an integer")))?;
        let rating: f64 = rating
            .trim()
            .parse()
            .map_err(|_| bad(format!("rating `{rating}` is not a number")))?;
        if !(-4.0..=4.0).contains(&rating) {
            return Err(bad(format!("rating {rating} is outside −4…+4")));
        }
        let cleaned = body.split_whitespace().collect::<Vec<_>>().join(" ");
        if cleaned.is_empty() {
            summary.dropped_empty += 1;
            continue;
        }
        if !seen.insert(cleaned.clone()) {
            summary.dropped_duplicate += 1;
            continue;
        }
        ids.push(id);
        ratings.push(rating);
        words.push(cleaned.split(' ').count() as i64);
        splits.push(split_of(&cleaned));
        texts.push(cleaned);
    }
    // Each split's statistics, summed in file order (a parallel group-by would sum in an
    // order that varies from build to build, and the stage's summary with it).
    let mut names: Vec<&'static str> = splits.clone();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let rows: Vec<usize> = (0..splits.len()).filter(|&r| splits[r] == name).collect();
        let n = rows.len() as f64;
        summary.splits.push(SplitStats {
            split: name.to_string(),
            rows: rows.len(),
            mean_words: rows.iter().map(|&r| words[r] as f64).sum::<f64>() / n,
            min_words: rows.iter().map(|&r| words[r]).min().unwrap_or(0),
            max_words: rows.iter().map(|&r| words[r]).max().unwrap_or(0),
            mean_rating: rows.iter().map(|&r| ratings[r]).sum::<f64>() / n,
        });
    }
    let df =
        df!("id" => ids, "rating" => ratings, "text" => texts, "words" => words, "split" => splits)
            .map_err(polars_err(path))?;
    for split in ["train", "validation", "test"] {
        if !summary
            .splits
            .iter()
            .any(|s| s.split == split && s.rows > 0)
        {
            return Err(Error::Row {
                path: path.to_path_buf(),
                line: 0,
                message: format!("the {split} split is empty"),
            });
        }
    }
    Ok((df, summary))
}

/// Writes each split as `<dir>/<split>.parquet`.
pub fn write_splits(df: &DataFrame, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for split in ["train", "validation", "test"] {
        let path = dir.join(format!("{split}.parquet"));
        let mut part = df
            .column("split")
            .and_then(|c| c.str().map(|c| c.equal(split)))
            .and_then(|mask| df.filter(&mask))
            .and_then(|part| part.select(["id", "rating", "text"]))
            .map_err(polars_err(&path))?;
        let file = std::fs::File::create(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        ParquetWriter::new(file)
            .finish(&mut part)
            .map_err(polars_err(&path))?;
        written.push(path);
    }
    Ok(written)
}

/// Reads `<dir>/<split>.parquet` back.
pub fn read_split(dir: &Path, split: &str) -> Result<Vec<Snippet>> {
    let path = dir.join(format!("{split}.parquet"));
    let file = std::fs::File::open(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let df = ParquetReader::new(file)
        .finish()
        .map_err(polars_err(&path))?;
    let ids = df
        .column("id")
        .and_then(|c| c.i64().cloned())
        .map_err(polars_err(&path))?;
    let ratings = df
        .column("rating")
        .and_then(|c| c.f64().cloned())
        .map_err(polars_err(&path))?;
    let texts = df
        .column("text")
        .and_then(|c| c.str().cloned())
        .map_err(polars_err(&path))?;
    let mut out = Vec::with_capacity(df.height());
    for ((id, rating), text) in ids.iter().zip(ratings.iter()).zip(texts.iter()) {
        match (id, rating, text) {
            (Some(id), Some(rating), Some(text)) => out.push(Snippet {
                id,
                rating,
                text: text.to_string(),
            }),
            _ => {
                return Err(Error::Row {
                    path: path.clone(),
                    line: out.len() + 1,
                    message: "null value".into(),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` written to a file in a fresh directory (removed with the returned guard).
    fn write(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("edpo-snippets-{name}-"))
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path();
        let p = dir.join("snippets.txt");
        std::fs::write(&p, text).expect("write");
        (tmp, p)
    }

    fn many_rows() -> String {
        (0..200)
            .map(|i| {
                format!(
                    "{i}\t{}\tsnippet number {i} is {}\r\n",
                    (i % 9) as f64 - 4.0,
                    if i % 2 == 0 { "good" } else { "bad" }
                )
            })
            .collect()
    }

    #[test]
    fn prepares_and_round_trips_through_parquet() -> Result<()> {
        let mut text = many_rows();
        text.push_str("900\t1.0\t   \r\n901\t1.0\tsnippet number 3 is bad\r\n");
        let (_tmp, p) = write("ok", &text);
        let (df, summary) = read(&p, None)?;
        assert_eq!(summary.rows_read, 202);
        assert_eq!((summary.dropped_empty, summary.dropped_duplicate), (1, 1));
        assert_eq!(summary.splits.iter().map(|s| s.rows).sum::<usize>(), 200);
        let dir = p.parent().expect("dir").join("out");
        std::fs::create_dir_all(&dir).expect("out");
        write_splits(&df, &dir)?;
        let train = read_split(&dir, "train")?;
        assert_eq!(
            train.len(),
            summary
                .splits
                .iter()
                .find(|s| s.split == "train")
                .map(|s| s.rows)
                .unwrap_or(0)
        );
        assert!(train.iter().all(|s| split_of(&s.text) == "train"));
        Ok(())
    }

    #[test]
    fn bad_files_are_named_errors() {
        let (_tmp, p) = write("sum", &many_rows());
        let e = read(&p, Some("00")).expect_err("checksum");
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        let (_tmp, p) = write("row", "1\t2.0\tfine\r\n2\tgreat\tnot a rating\r\n");
        let e = read(&p, None).expect_err("rating");
        assert!(
            e.to_string().contains("snippets.txt:2: rating `great`"),
            "{e}"
        );
        let (_tmp, p) = write("fields", "1\t2.0\r\n");
        let e = read(&p, None).expect_err("fields");
        assert!(
            e.to_string()
                .contains(":1: expected three tab-separated fields"),
            "{e}"
        );
        let (_tmp, p) = write("empty", "1\t2.0\tonly one\r\n");
        let e = read(&p, None).expect_err("empty split");
        assert!(e.to_string().contains("split is empty"), "{e}");
    }
}
