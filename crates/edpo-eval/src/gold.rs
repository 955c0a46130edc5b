//! Text judges: the gold sentiment model (ridge regression on hashed word n-grams, fitted to
//! human mean ratings) and a second, independent judge built on the VADER lexicon.
//!
//! The gold model maps a text to a predicted rating on the human −4…+4 scale; the trained policy
//! never sees it, only the preference labels drawn from it. The lexicon judge scores a text by
//! the mean valence of the lexicon words it contains (a simplification of VADER: no negation,
//! intensifier or punctuation rules), so reward hacking of the gold model shows up as
//! disagreement between the two.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Lower-cased word tokens: runs of letters, digits and apostrophes.
pub fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty() && *w != "'")
        .map(str::to_string)
        .collect()
}

fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h ^= 0x1f;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        for b in p.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// Sparse features of a text: presence of each unigram and bigram, hashed into `buckets`,
/// scaled to unit norm.
pub fn features(text: &str, buckets: usize) -> Vec<(usize, f64)> {
    let w = words(text);
    let mut idx: Vec<usize> = w
        .iter()
        .map(|a| (fnv1a(&[a]) % buckets as u64) as usize)
        .collect();
    idx.extend(
        w.windows(2)
            .map(|p| (fnv1a(&[&p[0], &p[1]]) % buckets as u64) as usize),
    );
    idx.sort_unstable();
    idx.dedup();
    let scale = 1.0 / (idx.len().max(1) as f64).sqrt();
    idx.into_iter().map(|i| (i, scale)).collect()
}

/// Ridge regression on hashed n-grams: `rating ≈ bias + w·φ(text)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldModel {
    /// Hash buckets.
    pub buckets: usize,
    /// Ridge penalty used.
    pub lambda: f64,
    /// Intercept (the mean training rating).
    pub bias: f64,
    /// One weight per bucket.
    pub weights: Vec<f64>,
}

impl GoldModel {
    /// Fits by conjugate gradient on `(ΦᵀΦ + λI)w = Φᵀ(y − ȳ)`.
    pub fn fit(texts: &[&str], ratings: &[f64], buckets: usize, lambda: f64) -> Self {
        let phi: Vec<Vec<(usize, f64)>> = texts.iter().map(|t| features(t, buckets)).collect();
        let bias = ratings.iter().sum::<f64>() / ratings.len().max(1) as f64;
        let y: Vec<f64> = ratings.iter().map(|r| r - bias).collect();
        let apply = |w: &[f64]| -> Vec<f64> {
            let mut out: Vec<f64> = w.iter().map(|x| lambda * x).collect();
            for row in &phi {
                let dot: f64 = row.iter().map(|&(i, v)| w[i] * v).sum();
                for &(i, v) in row {
                    out[i] += dot * v;
                }
            }
            out
        };
        let mut b = vec![0.0; buckets];
        for (row, yi) in phi.iter().zip(&y) {
            for &(i, v) in row {
                b[i] += v * yi;
            }
        }
        let mut w = vec![0.0; buckets];
        let mut r = b.clone();
        let mut p = r.clone();
        let mut rs: f64 = r.iter().map(|x| x * x).sum();
        let tol = 1e-10 * rs.max(1e-300);
        for _ in 0..500 {
            if rs <= tol {
                break;
            }
            let ap = apply(&p);
            let alpha = rs / p.iter().zip(&ap).map(|(a, b)| a * b).sum::<f64>();
            for k in 0..buckets {
                w[k] += alpha * p[k];
                r[k] -= alpha * ap[k];
            }
            let rs_new: f64 = r.iter().map(|x| x * x).sum();
            let beta = rs_new / rs;
            for k in 0..buckets {
                p[k] = r[k] + beta * p[k];
            }
            rs = rs_new;
        }
        Self {
            buckets,
            lambda,
            bias,
            weights: w,
        }
    }

    /// Predicted rating of a text.
    pub fn predict(&self, text: &str) -> f64 {
        self.bias
            + features(text, self.buckets)
                .iter()
                .map(|&(i, v)| self.weights[i] * v)
                .sum::<f64>()
    }
}

/// Pearson correlation.
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma) * (x - ma)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb) * (y - mb)).sum();
    cov / (va * vb).sqrt()
}

/// The VADER lexicon: word → mean valence (−4…+4).
#[derive(Debug, Clone, PartialEq)]
pub struct Lexicon {
    valence: HashMap<String, f64>,
}

impl Lexicon {
    /// Reads `vader_lexicon.txt` (`token<TAB>mean<TAB>std<TAB>ratings`); a malformed line is an
    /// error naming the file and line.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut valence = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mut f = line.split('\t');
            let (Some(tok), Some(mean)) = (f.next(), f.next()) else {
                return Err(format!(
                    "{}:{}: expected token and mean valence",
                    path.display(),
                    i + 1
                ));
            };
            let mean: f64 = mean.trim().parse().map_err(|_| {
                format!(
                    "{}:{}: valence `{mean}` is not a number",
                    path.display(),
                    i + 1
                )
            })?;
            valence.insert(tok.to_string(), mean);
        }
        Ok(Self { valence })
    }

    /// Mean valence of the lexicon words in `text` (0 when none is present).
    pub fn score(&self, text: &str) -> f64 {
        let hits: Vec<f64> = text
            .to_lowercase()
            .split_whitespace()
            .filter_map(|w| {
                let w = w.trim_matches(|c: char| !(c.is_alphanumeric() || c == '\''));
                self.valence.get(w).copied()
            })
            .collect();
        if hits.is_empty() {
            0.0
        } else {
            hits.iter().sum::<f64>() / hits.len() as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ridge_learns_a_separable_signal() {
        let texts = [
            "a great film",
            "great acting",
            "a terrible film",
            "terrible acting",
            "great fun",
            "terrible mess",
        ];
        let ratings = [3.0, 2.5, -3.0, -2.5, 3.0, -3.0];
        let m = GoldModel::fit(&texts, &ratings, 1 << 10, 0.1);
        assert!(m.predict("great") > m.predict("terrible"));
        let fitted: Vec<f64> = texts.iter().map(|t| m.predict(t)).collect();
        assert!(pearson(&fitted, &ratings) > 0.95);
    }

    #[test]
    fn lexicon_scores_mean_valence() {
        let tmp_dir = tempfile::Builder::new()
            .prefix("edpo-lex-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp_dir.path().join("lex");
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("lex.txt");
        std::fs::write(&p, "good\t1.9\t0.9\t[2, 2]\nbad\t-2.5\t0.6\t[-2, -3]\n").expect("write");
        let lex = Lexicon::from_file(&p).expect("lexicon");
        assert_eq!(lex.score("Good, but bad!"), (1.9 - 2.5) / 2.0);
        assert_eq!(lex.score("nothing here"), 0.0);
        std::fs::write(&p, "good\tvery\n").expect("write");
        assert!(Lexicon::from_file(&p)
            .expect_err("bad")
            .contains("lex.txt:1"));
    }
}
