//! β-DPO: DPO with a batch-level β and a β-guided data filter (Wu et al., 2024, "β-DPO: Direct
//! Preference Optimization with Dynamic β", NeurIPS; the authors' trainer is
//! `junkangwu/beta-DPO`), as `docs/spec/baselines.md` specifies it.
//!
//! Per batch, with `A_i = Δ_i` (not multiplied by β) and running estimates `M₀`, `S₀` of the
//! mean and standard deviation of `A` (seeded from the first batch):
//! 1. weight each pair by `exp(−½·((A_i − M₀)/S₀)²)` and keep `round(keep_fraction·N)` pairs,
//!    sampled without replacement in proportion to the weights;
//! 2. `β_batch = max(β₀·(1 + a·(mean of A over the kept pairs − M₀)), 10⁻³)`, a constant;
//! 3. loss `−log σ(β_batch·Δ_i)` averaged over the kept pairs;
//! 4. then `M₀ ← m·M₀ + (1−m)·mean(A)`, `S₀ ← m·S₀ + (1−m)·std(A)` over the whole batch, with
//!    the momentum `m` and the sample (N − 1) standard deviation.
//!
//! The sampling is the only random part; [`BetaDpo::step_with_kept`] does everything else for
//! a given kept set, so it can be checked against a recorded one.

use crate::math::{mean, sample_std, sigmoid, softplus};
use crate::method::{non_negative, positive};
use crate::{reward_stats, Error, ObjectiveOutput, PairLogps};

/// β-DPO's hyper-parameters and running estimates of the mean and spread of `Δ`.
#[derive(Debug, Clone, PartialEq)]
pub struct BetaDpo {
    beta0: f64,
    a: f64,
    keep_fraction: f64,
    momentum: f64,
    /// `(M₀, S₀)`; `None` before the first batch.
    estimates: Option<(f64, f64)>,
}

/// What one β-DPO batch did, beside its [`ObjectiveOutput`].
#[derive(Debug, Clone, PartialEq)]
pub struct BetaDpoReport {
    /// `M₀` used for the filter and β (the first batch's own mean when there was none).
    pub m0_used: f64,
    /// `S₀` used for the filter.
    pub s0_used: f64,
    /// `mean(A)` over the whole batch.
    pub batch_mean: f64,
    /// Sample standard deviation of `A` over the whole batch.
    pub batch_std: f64,
    /// The filter weight of every pair.
    pub weights: Vec<f64>,
    /// The kept pairs, ascending.
    pub kept: Vec<usize>,
    /// `β₀·(1 + a·(mean(A over kept) − M₀))` before the clamp.
    pub beta_unclamped: f64,
    /// `β_batch`, clamped at [`BetaDpo::BETA_MIN`].
    pub beta: f64,
    /// `−log σ(β_batch·Δ_i)` for kept pairs, 0 for the others (one per pair).
    pub per_pair_losses: Vec<f64>,
    /// `M₀` after this batch's update.
    pub m0_next: f64,
    /// `S₀` after this batch's update.
    pub s0_next: f64,
}

impl BetaDpo {
    /// The floor of `β_batch`.
    pub const BETA_MIN: f64 = 1e-3;

    /// β-DPO with base coefficient `beta0` > 0, scale `a` ≥ 0, `keep_fraction` in (0, 1] and
    /// `momentum` in [0, 1); no running estimates yet.
    pub fn new(beta0: f64, a: f64, keep_fraction: f64, momentum: f64) -> Result<Self, Error> {
        positive("beta0", beta0)?;
        non_negative("a", a)?;
        if !(keep_fraction > 0.0 && keep_fraction <= 1.0) {
            return Err(Error::Parameter {
                name: "keep_fraction",
                value: keep_fraction,
                message: "must lie in (0, 1]",
            });
        }
        if !(0.0..1.0).contains(&momentum) {
            return Err(Error::Parameter {
                name: "momentum",
                value: momentum,
                message: "must lie in [0, 1)",
            });
        }
        Ok(Self {
            beta0,
            a,
            keep_fraction,
            momentum,
            estimates: None,
        })
    }

    /// The base coefficient `β₀`.
    pub fn beta0(&self) -> f64 {
        self.beta0
    }

    /// The scale `a` of β's response to the kept pairs' mean `Δ`.
    pub fn a(&self) -> f64 {
        self.a
    }

    /// The fraction of pairs the filter keeps.
    pub fn keep_fraction(&self) -> f64 {
        self.keep_fraction
    }

    /// The momentum of the running estimates.
    pub fn momentum(&self) -> f64 {
        self.momentum
    }

    /// The running mean `M₀` of `Δ` (`None` before the first batch).
    pub fn m0(&self) -> Option<f64> {
        self.estimates.map(|(m0, _)| m0)
    }

    /// The running standard deviation `S₀` of `Δ` (`None` before the first batch).
    pub fn s0(&self) -> Option<f64> {
        self.estimates.map(|(_, s0)| s0)
    }

    /// How many of `n` pairs the filter keeps: `round(keep_fraction·n)` with ties to even (as
    /// Python's `round`, which the reference uses), at least 1 and at most `n`.
    pub fn keep_count(&self, n: usize) -> usize {
        ((self.keep_fraction * n as f64).round_ties_even() as usize).clamp(1.min(n), n)
    }

    /// `(M₀, S₀)` for a batch with margins `deltas`: the running estimates, or the batch's own
    /// mean and sample standard deviation before the first batch.
    fn estimates_for(&self, deltas: &[f64]) -> (f64, f64) {
        self.estimates
            .unwrap_or_else(|| (mean(deltas), sample_std(deltas)))
    }

    /// The filter weights `exp(−½·((A_i − M₀)/S₀)²)` of a batch with `A_i = deltas[i]`, using
    /// the estimates from before this batch (or the batch's own, for the first). With
    /// `S₀ = 0` (a first batch of one pair, or of equal margins) every weight is 1.
    pub fn filter_weights(&self, deltas: &[f64]) -> Vec<f64> {
        let (m0, s0) = self.estimates_for(deltas);
        if s0.is_nan() || s0 <= 0.0 {
            return vec![1.0; deltas.len()];
        }
        deltas
            .iter()
            .map(|&a| {
                let z = (a - m0) / s0;
                (-0.5 * (z * z)).exp()
            })
            .collect()
    }

    /// One batch: filter weights, [`BetaDpo::keep_count`] pairs sampled without replacement
    /// in proportion to them (draw by draw, each from the pairs not yet kept), then
    /// [`BetaDpo::step_with_kept`]. `uniform` must return independent draws from [0, 1) (a
    /// generator the caller seeds); each draw picks one pair. Should every pair left have
    /// weight 0, the draw is uniform over them.
    pub fn step(
        &mut self,
        logps: &PairLogps<'_>,
        uniform: &mut dyn FnMut() -> f64,
    ) -> Result<(ObjectiveOutput, BetaDpoReport), Error> {
        logps.check()?;
        let deltas: Vec<f64> = (0..logps.len()).map(|i| logps.delta(i)).collect();
        let weights = self.filter_weights(&deltas);
        let kept = sample_without_replacement(&weights, self.keep_count(deltas.len()), uniform);
        self.step_with_kept(logps, &kept)
    }

    /// One batch with the kept pairs given (any non-empty set of distinct pair indices): the
    /// deterministic part of [`BetaDpo::step`], which also updates `M₀` and `S₀`.
    ///
    /// `β_batch = max(β₀·(1 + a·(mean_{i∈K} Δ_i − M₀)), 10⁻³)`;
    /// `L = (1/|K|)·Σ_{i∈K} −log σ(β_batch·Δ_i)`, so `∂L/∂lw_i = −β_batch·σ(−β_batch·Δ_i)/|K|`
    /// `= −∂L/∂ll_i` for kept pairs and 0 for the others.
    ///
    /// The output's `losses` are the kept pairs' only (ascending), so its
    /// [`ObjectiveOutput::loss`] is the mean over kept pairs; the report has them per pair.
    /// `betas` is `β_batch` for every pair, and the rewards `β_batch·(lw − rw)`,
    /// `β_batch·(ll − rl)` cover every pair of the batch, kept or not. Statistics: those of
    /// DPO and `beta_dpo/m0`, `beta_dpo/s0` (after the update), `beta_dpo/kept_fraction`.
    pub fn step_with_kept(
        &mut self,
        logps: &PairLogps<'_>,
        kept: &[usize],
    ) -> Result<(ObjectiveOutput, BetaDpoReport), Error> {
        logps.check()?;
        let n = logps.len();
        let kept = check_kept(kept, n)?;
        let deltas: Vec<f64> = (0..n).map(|i| logps.delta(i)).collect();
        let batch_mean = mean(&deltas);
        let batch_std = sample_std(&deltas);
        let (m0_used, s0_used) = self.estimates_for(&deltas);
        let weights = self.filter_weights(&deltas);

        let kept_deltas: Vec<f64> = kept.iter().map(|&i| deltas[i]).collect();
        let beta_unclamped = self.beta0 * (1.0 + self.a * (mean(&kept_deltas) - m0_used));
        let beta = beta_unclamped.max(Self::BETA_MIN);

        let k = kept.len() as f64;
        let mut per_pair_losses = vec![0.0; n];
        let mut grad_chosen = vec![0.0; n];
        for &i in &kept {
            let x = beta * deltas[i];
            per_pair_losses[i] = softplus(-x);
            grad_chosen[i] = -beta * sigmoid(-x) / k;
        }
        let grad_rejected = grad_chosen.iter().map(|g| -g).collect();
        let losses = kept.iter().map(|&i| per_pair_losses[i]).collect();

        let m0_next = self.momentum * m0_used + (1.0 - self.momentum) * batch_mean;
        let s0_next = self.momentum * s0_used + (1.0 - self.momentum) * batch_std;
        self.estimates = Some((m0_next, s0_next));

        let betas = vec![beta; n];
        let mut stats = reward_stats(logps, &betas);
        stats.extend([
            ("beta_dpo/m0", m0_next),
            ("beta_dpo/s0", s0_next),
            ("beta_dpo/kept_fraction", k / n as f64),
        ]);
        let output = ObjectiveOutput {
            losses,
            grad_policy_chosen: grad_chosen,
            grad_policy_rejected: grad_rejected,
            grad_sequence_kl: None,
            betas,
            stats,
        };
        let report = BetaDpoReport {
            m0_used,
            s0_used,
            batch_mean,
            batch_std,
            weights,
            kept,
            beta_unclamped,
            beta,
            per_pair_losses,
            m0_next,
            s0_next,
        };
        Ok((output, report))
    }
}

/// The kept indices, ascending, after checking they are distinct pairs of the batch.
fn check_kept(kept: &[usize], n: usize) -> Result<Vec<usize>, Error> {
    if kept.is_empty() {
        return Err(Error::Missing {
            name: "kept",
            method: "beta_dpo",
        });
    }
    let mut sorted = kept.to_vec();
    sorted.sort_unstable();
    for (index, pair) in sorted.iter().enumerate() {
        let message = if *pair >= n {
            "is not a pair of the batch"
        } else if index > 0 && sorted[index - 1] == *pair {
            "is kept twice"
        } else {
            continue;
        };
        return Err(Error::Input {
            name: "kept",
            index,
            value: *pair as f64,
            message,
        });
    }
    Ok(sorted)
}

/// `k` distinct indices drawn one at a time, each with probability proportional to its weight
/// among those not drawn yet (uniform if they all weigh 0); returned ascending.
fn sample_without_replacement(
    weights: &[f64],
    k: usize,
    uniform: &mut dyn FnMut() -> f64,
) -> Vec<usize> {
    let mut left: Vec<usize> = (0..weights.len()).collect();
    let mut kept = Vec::with_capacity(k);
    for _ in 0..k.min(weights.len()) {
        let u = uniform();
        let u = if u.is_finite() {
            u.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let weight = |i: usize| {
            let w = weights[i];
            if w.is_finite() && w > 0.0 {
                w
            } else {
                0.0
            }
        };
        let total: f64 = left.iter().map(|&i| weight(i)).sum();
        let position = if total > 0.0 && total.is_finite() {
            let target = u * total;
            let mut cumulative = 0.0;
            let mut last_positive = 0;
            let mut chosen = None;
            for (p, &i) in left.iter().enumerate() {
                if weight(i) > 0.0 {
                    last_positive = p;
                    cumulative += weight(i);
                    if target < cumulative {
                        chosen = Some(p);
                        break;
                    }
                }
            }
            // Rounding can leave target ≥ the running sum at the end: take the last candidate.
            chosen.unwrap_or(last_positive)
        } else {
            ((u * left.len() as f64) as usize).min(left.len() - 1)
        };
        kept.push(left.remove(position));
    }
    kept.sort_unstable();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64 mapped to [0, 1): a seeded uniform source for the tests.
    fn uniform(seed: u64) -> impl FnMut() -> f64 {
        let mut state = seed;
        move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    const LW: [f64; 5] = [-10.0, -3.0, -25.0, -7.0, -12.0];
    const LL: [f64; 5] = [-11.0, -2.0, -24.0, -9.0, -12.5];
    const RW: [f64; 5] = [-10.5, -3.2, -26.0, -7.5, -11.0];
    const RL: [f64; 5] = [-10.2, -2.5, -23.5, -8.0, -13.0];

    fn logps() -> PairLogps<'static> {
        PairLogps {
            policy_chosen: &LW,
            policy_rejected: &LL,
            reference_chosen: &RW,
            reference_rejected: &RL,
        }
    }

    #[test]
    fn step_keeps_distinct_pairs_reproducibly_and_seeds_the_estimates() {
        let mut a = BetaDpo::new(0.1, 0.5, 0.8, 0.9).unwrap();
        let mut b = a.clone();
        let (out_a, rep_a) = a.step(&logps(), &mut uniform(7)).unwrap();
        let (out_b, rep_b) = b.step(&logps(), &mut uniform(7)).unwrap();
        assert_eq!((&out_a, &rep_a), (&out_b, &rep_b));
        assert_eq!(rep_a.kept.len(), 4);
        assert!(rep_a.kept.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(out_a.losses.len(), 4);
        assert_eq!(out_a.grad_policy_chosen.len(), 5);
        // The first batch seeds M₀, S₀ with its own statistics, so the update keeps them.
        let deltas: Vec<f64> = (0..5).map(|i| logps().delta(i)).collect();
        assert!((a.m0().unwrap() - mean(&deltas)).abs() < 1e-15);
        assert!((a.s0().unwrap() - sample_std(&deltas)).abs() < 1e-15);
        let mean_kept = out_a.losses.iter().sum::<f64>() / 4.0;
        assert!((out_a.loss() - mean_kept).abs() < 1e-15);
        for i in 0..5 {
            if !rep_a.kept.contains(&i) {
                assert_eq!(rep_a.per_pair_losses[i], 0.0);
                assert_eq!(out_a.grad_policy_chosen[i], 0.0);
            }
        }
    }

    #[test]
    fn sampling_follows_the_weights() {
        let mut draw = uniform(3);
        let mut first = 0;
        let trials = 20_000;
        for _ in 0..trials {
            if sample_without_replacement(&[1.0, 3.0], 1, &mut draw) == [0] {
                first += 1;
            }
        }
        let p = f64::from(first) / f64::from(trials);
        assert!((p - 0.25).abs() < 0.015, "{p}");
        // Zero-weight pairs are drawn only once the positive ones are used up.
        for _ in 0..100 {
            assert_eq!(
                sample_without_replacement(&[0.0, 2.0, 0.0, 1.0], 2, &mut draw),
                [1, 3]
            );
        }
        assert_eq!(
            sample_without_replacement(&[0.0, 2.0, 0.0], 3, &mut draw),
            [0, 1, 2]
        );
    }

    #[test]
    fn beta_is_clamped_and_rounding_is_to_even() {
        let mut state = BetaDpo::new(0.1, 100.0, 0.5, 0.9).unwrap();
        // Keeping only the pair with the smallest Δ puts mean(A over kept) below M₀, and the
        // large `a` then drives β under the floor.
        let deltas: Vec<f64> = (0..5).map(|i| logps().delta(i)).collect();
        let lowest = (0..5)
            .min_by(|&i, &j| deltas[i].total_cmp(&deltas[j]))
            .unwrap();
        let (out, report) = state.step_with_kept(&logps(), &[lowest]).unwrap();
        assert!(report.beta_unclamped < BetaDpo::BETA_MIN);
        assert_eq!(report.beta, BetaDpo::BETA_MIN);
        assert_eq!(out.betas, vec![BetaDpo::BETA_MIN; 5]);
        assert_eq!(state.keep_count(5), 2); // round(2.5) = 2, as Python
        assert_eq!(state.keep_count(7), 4); // round(3.5) = 4
        assert_eq!(state.keep_count(1), 1);
    }

    #[test]
    fn bad_kept_sets_and_parameters_are_errors() {
        let mut state = BetaDpo::new(0.1, 0.5, 0.8, 0.9).unwrap();
        assert!(matches!(
            state.step_with_kept(&logps(), &[0, 5]),
            Err(Error::Input { name: "kept", .. })
        ));
        assert!(matches!(
            state.step_with_kept(&logps(), &[1, 1]),
            Err(Error::Input { name: "kept", .. })
        ));
        assert!(state.step_with_kept(&logps(), &[]).is_err());
        assert_eq!(state.m0(), None, "a failed step leaves the estimates alone");
        assert!(BetaDpo::new(0.0, 0.5, 0.8, 0.9).is_err());
        assert!(BetaDpo::new(0.1, -0.5, 0.8, 0.9).is_err());
        assert!(BetaDpo::new(0.1, 0.5, 0.0, 0.9).is_err());
        assert!(BetaDpo::new(0.1, 0.5, 0.8, 1.0).is_err());
    }

    #[test]
    fn a_single_pair_batch_has_uniform_weights() {
        let state = BetaDpo::new(0.1, 0.5, 0.8, 0.9).unwrap();
        assert_eq!(state.filter_weights(&[0.7]), vec![1.0]);
    }
}
