//! Best-of-n from the reference, the yardstick every frontier is drawn against: for each test
//! prompt, [`SAMPLES`] responses from π_ref; for n = 1, 2, 4, …, [`MAX_N`] the gold-best of n is
//! kept. Its numbers are unbiased estimates from all the samples at once (order statistics
//! over every n-subset), not from one draw:
//! - win rate against an independent reference sample (ties ½): for distinct rewards exactly
//!   n/(n+1);
//! - reward gain: E[max of n rewards] − E[reward];
//! - KL(π_bon‖π_ref): the analytic bound log n − (n−1)/n, and the estimator of Beirami et al.,
//!   "Theoretical guarantees on the best-of-n alignment policy" (arXiv 2401.01879, §4):
//!   d_n(ε) with ε = π_ref(y_best), averaged over which sample is the best; it lies in
//!   [0, bound], is 0 at n = 1 and tends to the bound as ε → 0.
//!
//! The stage is cached once per pairs stage and sampling settings.

use crate::stages::StageCache;
use crate::task::TaskData;
use anyhow::{bail, Context, Result};
use edpo_eval::{mean_and_stderr, sample, sequence_logp, SamplingSettings};
use edpo_model::CausalLm;
use serde_json::json;

/// Reference samples per test prompt (more than [`MAX_N`], so that the best of `MAX_N` can be
/// compared with one sample more).
pub const SAMPLES: usize = 72;

/// The largest n.
pub const MAX_N: usize = 64;

/// The analytic bound on KL(π_bon‖π_ref): log n − (n−1)/n.
pub fn kl_bound(n: usize) -> f64 {
    let n = n as f64;
    n.ln() - (n - 1.0) / n
}

/// Beirami et al.'s d_n(ε): the KL of best-of-n when the best outcome has reference
/// probability ε.
pub fn kl_estimate(n: usize, eps: f64) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let nf = n as f64;
    let eps = eps.clamp(f64::MIN_POSITIVE, 1.0);
    if eps >= 1.0 {
        return 0.0;
    }
    let log_keep = nf * (-eps).ln_1p(); // n·log(1−ε)
    let keep = log_keep.exp(); // (1−ε)^n
    let hit = -log_keep.exp_m1(); // 1 − (1−ε)^n
    keep * (nf.ln() + (nf - 1.0) * (-eps).ln_1p() - (nf - 1.0) / nf) + hit * (hit.ln() - eps.ln())
}

/// C(a, k) / C(b, k) as a float, for a ≤ b (0 when a < k).
fn ratio_of_choose(a: usize, b: usize, k: usize) -> f64 {
    if a < k {
        return 0.0;
    }
    (0..k).map(|i| (a - i) as f64 / (b - i) as f64).product()
}

/// The probability that sample `i` (of `m`, in increasing reward order, distinct rewards) is
/// the best of a random n-subset that contains it: C(i, n−1)/C(m, n) with 0-based `i`.
fn best_weight(i: usize, m: usize, n: usize) -> f64 {
    if i + 1 < n {
        return 0.0;
    }
    // C(i, n−1) / C(m, n) = (n/m) · C(i, n−1)/C(m−1, n−1)
    n as f64 / m as f64 * ratio_of_choose(i, m - 1, n - 1)
}

/// E[max of n] from `sorted` (increasing) rewards: the mean over every n-subset.
pub fn expected_max(sorted: &[f64], n: usize) -> f64 {
    let m = sorted.len();
    sorted
        .iter()
        .enumerate()
        .map(|(i, r)| best_weight(i, m, n) * r)
        .sum()
}

/// Win rate (ties ½) of the best of n against one more reference sample, averaged over every
/// choice of the extra sample and of n others among `sorted` (increasing) rewards.
pub fn win_of_best(sorted: &[f64], n: usize) -> f64 {
    let m = sorted.len();
    if m <= n {
        return f64::NAN;
    }
    let mut total = 0.0;
    for y in sorted {
        // Among the m−1 others: how many are below y, and how many at most y.
        let below = sorted.partition_point(|r| r < y);
        let upto = sorted.partition_point(|r| r <= y) - 1;
        let p_le = ratio_of_choose(upto, m - 1, n);
        let p_lt = ratio_of_choose(below, m - 1, n);
        total += 1.0 - p_le + 0.5 * (p_le - p_lt);
    }
    total / m as f64
}

pub use edpo_rundir::BestOfN;

/// The n values: powers of two up to [`MAX_N`].
pub fn ns() -> Vec<usize> {
    (0..)
        .map(|k| 1usize << k)
        .take_while(|n| *n <= MAX_N)
        .collect()
}

/// The curve from per-prompt rewards and reference log-probs (`rewards[p][s]`, `logps[p][s]`).
pub fn curve(rewards: &[Vec<f64>], logps: &[Vec<f64>]) -> Vec<BestOfN> {
    ns().into_iter()
        .map(|n| {
            let (mut wins, mut gains, mut kls) = (Vec::new(), Vec::new(), Vec::new());
            for (r, lp) in rewards.iter().zip(logps) {
                let mut order: Vec<usize> = (0..r.len()).collect();
                order.sort_by(|&a, &b| r[a].total_cmp(&r[b]));
                let sorted: Vec<f64> = order.iter().map(|&i| r[i]).collect();
                let m = sorted.len();
                wins.push(win_of_best(&sorted, n));
                gains.push(expected_max(&sorted, n) - sorted.iter().sum::<f64>() / m as f64);
                kls.push(
                    order
                        .iter()
                        .enumerate()
                        .map(|(rank, &i)| best_weight(rank, m, n) * kl_estimate(n, lp[i].exp()))
                        .sum(),
                );
            }
            let (win_rate, win_rate_se) = mean_and_stderr(&wins);
            let (reward_gain, reward_gain_se) = mean_and_stderr(&gains);
            BestOfN {
                n,
                win_rate,
                win_rate_se,
                reward_gain,
                reward_gain_se,
                kl_bound: kl_bound(n),
                kl_estimate: mean_and_stderr(&kls).0,
            }
        })
        .collect()
}

/// The best-of-n curve of a task's test prompts under `settings`, from the stage cache.
pub fn best_of_n(
    data: &TaskData,
    cache: &StageCache,
    settings: &SamplingSettings,
) -> Result<Vec<BestOfN>> {
    let key = json!({"stage": "best-of-n", "pairs": data.prompts_key, "samples": SAMPLES,
        "temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p});
    let (dir, built) = cache.get_or_build("best-of-n", &key, |dir| {
        let judge = data.judge.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "key `eval.best_of_n`: the task has no gold reward to pick the best of n by"
            )
        })?;
        let reference = CausalLm::load(&data.reference_dir, &crate::device(), false)?;
        let prompts: Vec<Vec<u32>> = data
            .eval_prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), SAMPLES))
            .collect();
        let mut rewards = Vec::with_capacity(data.eval_prompts.len());
        let mut logps = Vec::with_capacity(data.eval_prompts.len());
        // In slices of prompts, to bound the memory of one batch.
        for (c, chunk) in prompts.chunks(SAMPLES * 32).enumerate() {
            let responses = sample(&reference, chunk, settings, 0xB0_B0 ^ c as u64)?;
            let seqs: Vec<(&[u32], &[u32])> = chunk
                .iter()
                .zip(&responses)
                .map(|(p, r)| (p.as_slice(), r.as_slice()))
                .collect();
            let lp = sequence_logp(&reference, &seqs)?;
            for (k, group) in seqs.chunks(SAMPLES).enumerate() {
                rewards.push(
                    group
                        .iter()
                        .map(|(p, r)| judge.gold(p, r))
                        .collect::<Vec<f64>>(),
                );
                logps.push(lp[k * SAMPLES..(k + 1) * SAMPLES].to_vec());
            }
        }
        let curve = curve(&rewards, &logps);
        std::fs::write(
            dir.join("best_of_n.json"),
            serde_json::to_string_pretty(&curve)?,
        )?;
        Ok(())
    })?;
    if built {
        tracing::info!(dir = %dir.display(), "sampled the best-of-n yardstick");
    }
    let path = dir.join("best_of_n.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let curve: Vec<BestOfN> =
        serde_json::from_str(&text).with_context(|| format!("{}: malformed", path.display()))?;
    if curve.is_empty() {
        bail!("{}: empty", path.display());
    }
    Ok(curve)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kl_of_best_of_one_is_zero_and_the_estimator_stays_under_the_bound() {
        assert_eq!(kl_bound(1), 0.0);
        assert_eq!(kl_estimate(1, 1e-9), 0.0);
        assert!((kl_bound(2) - (2f64.ln() - 0.5)).abs() < 1e-15);
        for n in [2, 4, 16, 64] {
            // Tends to the bound as the best outcome's probability vanishes, 0 at ε = 1.
            assert!((kl_estimate(n, 1e-30) - kl_bound(n)).abs() < 1e-9, "{n}");
            assert!(kl_estimate(n, 1.0).abs() < 1e-12);
            for eps in [1e-6, 1e-3, 0.1, 0.5, 0.9] {
                let d = kl_estimate(n, eps);
                assert!((0.0..=kl_bound(n) + 1e-12).contains(&d), "{n} {eps} {d}");
            }
        }
    }

    #[test]
    fn order_statistics_over_every_subset() {
        let sorted = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert!((expected_max(&sorted, 1) - 3.0).abs() < 1e-12);
        assert!((expected_max(&sorted, 5) - 5.0).abs() < 1e-12);
        // n = 2: pairs of 5 values, max averaged over the 10 pairs = 4.0.
        assert!((expected_max(&sorted, 2) - 4.0).abs() < 1e-12);
        // Distinct rewards: the best of n beats one more sample with probability n/(n+1).
        for n in 1..5 {
            let w = win_of_best(&sorted, n);
            assert!((w - n as f64 / (n + 1) as f64).abs() < 1e-12, "{n} {w}");
        }
        // All tied: every comparison is a tie.
        assert!((win_of_best(&[1.0; 6], 3) - 0.5).abs() < 1e-12);
    }
}
