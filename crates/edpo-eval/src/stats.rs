//! Summary statistics with their uncertainty.

/// A win rate with its standard error and a 95% interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WinRate {
    /// Fraction of comparisons won, ties counted ½.
    pub rate: f64,
    /// Standard error of the mean of the per-comparison scores (1, ½, 0).
    pub stderr: f64,
    /// Lower end of the 95% interval (normal approximation, clamped to [0, 1]).
    pub lo: f64,
    /// Upper end of the 95% interval.
    pub hi: f64,
    /// Number of comparisons.
    pub n: usize,
}

/// The score of each comparison of `a[i]` with `b[i]`: a win 1, a tie ½ (|a − b| ≤ `tie`),
/// a loss 0.
pub fn win_scores(a: &[f64], b: &[f64], tie: f64) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if (x - y).abs() <= tie {
                0.5
            } else if x > y {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

/// Compares `a[i]` with `b[i]` ([`win_scores`]) and summarises the scores.
pub fn win_rate(a: &[f64], b: &[f64], tie: f64) -> WinRate {
    let scores = win_scores(a, b, tie);
    let (rate, stderr) = mean_and_stderr(&scores);
    WinRate {
        rate,
        stderr,
        lo: (rate - 1.96 * stderr).max(0.0),
        hi: (rate + 1.96 * stderr).min(1.0),
        n: scores.len(),
    }
}

/// Mean and standard error of the mean (sample standard deviation / √n).
pub fn mean_and_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_count_half() {
        let w = win_rate(&[1.0, 2.0, 3.0, 0.0], &[1.0, 1.0, 4.0, -1.0], 0.0);
        assert_eq!(w.rate, (0.5 + 1.0 + 0.0 + 1.0) / 4.0);
        assert_eq!(w.n, 4);
        assert!(w.lo <= w.rate && w.rate <= w.hi);
    }
}
