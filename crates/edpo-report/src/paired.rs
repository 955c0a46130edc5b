//! Paired comparisons across the runs of a sweep: each method's frontier over evaluation
//! checkpoints, its values at fixed KL along that frontier, differences between methods with
//! intervals from a paired bootstrap over seeds and prompts, and the minimum detectable
//! difference at 80% power.
//!
//! Runs of the same seed share the data order, the evaluation prompts and the sampling
//! streams (`per_prompt.jsonl`), so two runs' numbers on one prompt differ only through the
//! policies: the comparison resamples seeds and prompts jointly and keeps each prompt's pair
//! together.
//!
//! A method's frontier is chosen on the validation prompts: among every evaluation checkpoint
//! of every setting of the method (means over seeds), and the reference itself at KL 0 (win
//! rate ½, reward gain 0, exact under common random numbers), the checkpoints no other
//! checkpoint beats on both lower KL and higher validation win rate. Values at a fixed KL are
//! interpolated linearly along it between the two neighbouring frontier points, prompt by
//! prompt and seed by seed, from the test numbers; a KL beyond a frontier's last point is not
//! extrapolated, and one below its first checkpoint is not interpolated from the reference. The interval conditions on the chosen frontier.

use crate::runs::Trace;
use std::collections::BTreeMap;

/// Resamples of the paired bootstrap.
pub const RESAMPLES: usize = 2000;

/// z-values of a two-sided 5% test and of 80% power.
const Z_ALPHA: f64 = 1.959_963_984_540_054;
const Z_POWER: f64 = 0.841_621_233_572_914_3;

/// The smallest true difference a two-sided 5% test detects with 80% power, given the
/// standard error of the difference.
pub fn mde80(se: f64) -> f64 {
    (Z_ALPHA + Z_POWER) * se
}

/// A mean with its bootstrap standard error and 95% percentile interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// Mean over seeds and prompts.
    pub mean: f64,
    /// Lower end of the 95% interval.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
    /// Bootstrap standard error.
    pub se: f64,
}

impl Interval {
    /// Whether the interval excludes 0.
    pub fn excludes_zero(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }
}

/// SplitMix64, for the bootstrap's draws (the report depends on no model crate).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

/// Paired bootstrap over seeds and prompts of `values[seed][prompt]` (every seed the same
/// prompts): each resample draws seeds and prompts with replacement, independently, and takes
/// the mean. `None` without data or with seeds of unequal prompt counts.
pub fn paired_bootstrap(values: &[Vec<f64>], resamples: usize, seed: u64) -> Option<Interval> {
    let ns = values.len();
    let np = values.first()?.len();
    if np == 0 || values.iter().any(|v| v.len() != np) {
        return None;
    }
    let mean = values.iter().flatten().sum::<f64>() / (ns * np) as f64;
    let mut rng = Rng(seed ^ 0xB007);
    let mut stats = Vec::with_capacity(resamples);
    let mut prompt_count = vec![0u32; np];
    let mut seed_count = vec![0u32; ns];
    for _ in 0..resamples {
        prompt_count.iter_mut().for_each(|c| *c = 0);
        seed_count.iter_mut().for_each(|c| *c = 0);
        for _ in 0..np {
            prompt_count[rng.below(np)] += 1;
        }
        for _ in 0..ns {
            seed_count[rng.below(ns)] += 1;
        }
        let mut total = 0.0;
        for (row, &m) in values.iter().zip(&seed_count) {
            if m > 0 {
                let dot: f64 = row
                    .iter()
                    .zip(&prompt_count)
                    .map(|(v, &c)| v * f64::from(c))
                    .sum();
                total += f64::from(m) * dot;
            }
        }
        stats.push(total / (ns * np) as f64);
    }
    stats.sort_by(f64::total_cmp);
    let at = |q: f64| stats[((q * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    let m = stats.iter().sum::<f64>() / resamples as f64;
    let var = stats.iter().map(|s| (s - m).powi(2)).sum::<f64>() / (resamples - 1).max(1) as f64;
    Some(Interval {
        mean,
        lo: at(0.025),
        hi: at(0.975),
        se: var.sqrt(),
    })
}

/// Indices of the Pareto frontier of `(kl, y)` points (lower KL and higher y better), in
/// order of increasing KL: a point is kept when every point of lower or equal KL has a lower
/// y (of equal points, the first).
pub fn pareto(points: &[(f64, f64)]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..points.len())
        .filter(|&i| points[i].0.is_finite() && points[i].1.is_finite())
        .collect();
    idx.sort_by(|&a, &b| {
        points[a]
            .0
            .total_cmp(&points[b].0)
            .then(points[b].1.total_cmp(&points[a].1))
    });
    let mut out = Vec::new();
    let mut best = f64::NEG_INFINITY;
    for i in idx {
        if points[i].1 > best {
            best = points[i].1;
            out.push(i);
        }
    }
    out
}

/// Where `kl` falls on a frontier given by its KL values in increasing order: the two
/// neighbouring points and the weight of the second (`None` outside the frontier's range).
pub fn interpolate(frontier_kl: &[f64], kl: f64) -> Option<(usize, usize, f64)> {
    let first = *frontier_kl.first()?;
    if kl < first || kl > *frontier_kl.last()? {
        return None;
    }
    if frontier_kl.len() == 1 {
        return Some((0, 0, 0.0));
    }
    for (a, w) in frontier_kl.windows(2).enumerate() {
        if kl <= w[1] {
            let span = w[1] - w[0];
            let t = if span > 0.0 { (kl - w[0]) / span } else { 1.0 };
            return Some((a, a + 1, t));
        }
    }
    None
}

/// The per-prompt metrics compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Win against the reference.
    Win,
    /// Gold reward minus the reference's.
    RewardGain,
    /// Exact sequence KL.
    Kl,
}

impl Metric {
    fn of<'a>(&self, p: &'a edpo_rundir::PerPrompt) -> &'a [f64] {
        match self {
            Metric::Win => &p.win,
            Metric::RewardGain => &p.reward_diff,
            Metric::Kl => &p.kl,
        }
    }

    /// The reference's own value on every prompt.
    fn at_reference(&self) -> f64 {
        match self {
            Metric::Win => 0.5,
            Metric::RewardGain | Metric::Kl => 0.0,
        }
    }
}

/// One evaluation checkpoint of one setting, averaged over seeds: the reference when
/// `setting` is `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The setting label, `None` for the reference.
    pub setting: Option<String>,
    /// The step evaluated after (the first seed's).
    pub step: usize,
    /// Whether this is each run's final evaluation, matched across seeds whatever its step (a
    /// run's steps may differ by seed: an on-policy round short of pairs takes fewer).
    pub last: bool,
    /// Mean exact KL on the test prompts.
    pub kl: f64,
    /// Mean win rate on the validation prompts (what the frontier is chosen by).
    pub val_win: f64,
    /// Mean win rate on the test prompts.
    pub win: f64,
    /// Mean reward gain on the test prompts.
    pub reward_gain: f64,
}

/// A run's evaluation after `step`, or its final one when `last` (matched across seeds whatever
/// its step).
fn evaluation(t: &Trace, step: usize, last: bool) -> Option<&edpo_rundir::PerPrompt> {
    if last {
        t.per_prompt.iter().max_by_key(|p| p.step)
    } else {
        t.per_prompt.iter().find(|p| p.step == step)
    }
}

/// Runs indexed for paired comparisons: (method, setting, seed) → per-prompt evaluations and
/// the validation win rate of each evaluated step.
pub struct Paired<'a> {
    runs: BTreeMap<(String, String, u64), &'a Trace>,
    seeds: Vec<u64>,
}

/// A method's checkpoints and the frontier chosen among them.
#[derive(Debug, Clone, PartialEq)]
pub struct Frontier {
    /// The method.
    pub method: String,
    /// Every checkpoint (the reference first).
    pub checkpoints: Vec<Checkpoint>,
    /// Indices of the frontier's checkpoints in order of KL.
    pub frontier: Vec<usize>,
}

impl Frontier {
    /// The frontier's KL values.
    pub fn kls(&self) -> Vec<f64> {
        self.frontier
            .iter()
            .map(|&i| self.checkpoints[i].kl)
            .collect()
    }

    /// The largest KL its frontier reaches.
    pub fn max_kl(&self) -> f64 {
        self.kls().last().copied().unwrap_or(0.0)
    }
}

impl Checkpoint {
    /// The reference itself: KL 0, win rate ½, reward gain 0 (exact under common random
    /// numbers).
    pub fn reference() -> Self {
        Self {
            setting: None,
            step: 0,
            last: false,
            kl: 0.0,
            val_win: 0.5,
            win: 0.5,
            reward_gain: 0.0,
        }
    }
}

impl<'a> Paired<'a> {
    /// Indexes the traces that carry per-prompt evaluations; `None` when none does.
    pub fn new(traces: &'a [Trace]) -> Option<Self> {
        let mut runs = BTreeMap::new();
        let mut seeds = Vec::new();
        for t in traces.iter().filter(|t| !t.per_prompt.is_empty()) {
            runs.insert((t.method.clone(), t.setting.clone(), t.seed), t);
            if !seeds.contains(&t.seed) {
                seeds.push(t.seed);
            }
        }
        seeds.sort_unstable();
        (!runs.is_empty()).then_some(Self { runs, seeds })
    }

    /// The seeds every given (method, setting) ran with.
    fn common_seeds(&self, settings: &[(&str, &str)]) -> Vec<u64> {
        self.seeds
            .iter()
            .copied()
            .filter(|s| {
                settings.iter().all(|(m, set)| {
                    self.runs
                        .contains_key(&(m.to_string(), set.to_string(), *s))
                })
            })
            .collect()
    }

    /// Per-prompt values of one run at its final evaluation.
    fn final_values(
        &self,
        method: &str,
        setting: &str,
        seed: u64,
        metric: Metric,
    ) -> Option<&[f64]> {
        let t = self
            .runs
            .get(&(method.to_string(), setting.to_string(), seed))?;
        let last = t.per_prompt.iter().map(|p| p.step).max()?;
        self.values_at(method, setting, seed, last, metric)
    }

    /// Per-prompt values of one run at `step`.
    fn values_at(
        &self,
        method: &str,
        setting: &str,
        seed: u64,
        step: usize,
        metric: Metric,
    ) -> Option<&[f64]> {
        let t = self
            .runs
            .get(&(method.to_string(), setting.to_string(), seed))?;
        t.per_prompt
            .iter()
            .find(|p| p.step == step)
            .map(|p| metric.of(p))
    }

    /// The methods with paired data, in order of first appearance in `order`.
    pub fn methods(&self, order: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in order {
            if !out.contains(m) && self.runs.keys().any(|(rm, _, _)| rm == m) {
                out.push(m.clone());
            }
        }
        out
    }

    /// The settings of a method with paired data.
    fn settings_of(&self, method: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (m, s, _) in self.runs.keys() {
            if m == method && !out.contains(s) {
                out.push(s.clone());
            }
        }
        out
    }

    /// A method's checkpoints (means over the seeds every one of its settings ran with) and
    /// its frontier chosen on validation win rates.
    pub fn frontier(&self, method: &str) -> Frontier {
        let settings = self.settings_of(method);
        let pairs: Vec<(&str, &str)> = settings.iter().map(|s| (method, s.as_str())).collect();
        let seeds = self.common_seeds(&pairs);
        let mut checkpoints = vec![Checkpoint::reference()];
        for setting in &settings {
            let Some(first) = seeds
                .first()
                .and_then(|s| self.runs.get(&(method.to_string(), setting.clone(), *s)))
            else {
                continue;
            };
            let first_last = first.per_prompt.iter().map(|q| q.step).max();
            for p in &first.per_prompt {
                let last = Some(p.step) == first_last;
                let mut sums = [0.0; 4];
                let mut n = 0usize;
                for &seed in &seeds {
                    let t = self.runs[&(method.to_string(), setting.clone(), seed)];
                    let Some(pp) = evaluation(t, p.step, last) else {
                        continue;
                    };
                    let Some(val) = t.val_win_at(pp.step) else {
                        continue;
                    };
                    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
                    sums[0] += mean(&pp.kl);
                    sums[1] += val;
                    sums[2] += mean(&pp.win);
                    sums[3] += mean(&pp.reward_diff);
                    n += 1;
                }
                if n == seeds.len() && n > 0 {
                    let k = n as f64;
                    checkpoints.push(Checkpoint {
                        setting: Some(setting.clone()),
                        step: p.step,
                        last,
                        kl: sums[0] / k,
                        val_win: sums[1] / k,
                        win: sums[2] / k,
                        reward_gain: sums[3] / k,
                    });
                }
            }
        }
        let xy: Vec<(f64, f64)> = checkpoints.iter().map(|c| (c.kl, c.val_win)).collect();
        Frontier {
            method: method.to_string(),
            frontier: pareto(&xy),
            checkpoints,
        }
    }

    /// The settings a frontier's checkpoints come from.
    fn frontier_settings<'f>(&self, f: &'f Frontier) -> Vec<(&'f str, &'f str)> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for &i in &f.frontier {
            if let Some(s) = &f.checkpoints[i].setting {
                if !out.iter().any(|(_, o)| o == s) {
                    out.push((f.method.as_str(), s.as_str()));
                }
            }
        }
        out
    }

    /// Per-prompt values of a checkpoint for one seed.
    fn checkpoint_values(
        &self,
        f: &Frontier,
        i: usize,
        seed: u64,
        metric: Metric,
    ) -> Option<Vec<f64>> {
        let c = &f.checkpoints[i];
        let s = c.setting.as_ref()?;
        let t = self.runs.get(&(f.method.clone(), s.clone(), seed))?;
        evaluation(t, c.step, c.last).map(|p| metric.of(p).to_vec())
    }

    /// Per seed and prompt, the value of `metric` at KL `kl` along the frontier of `f`, for
    /// `seeds`; `None` where the frontier does not reach `kl` or a run is missing.
    fn along(&self, f: &Frontier, kl: f64, seeds: &[u64], metric: Metric) -> Option<Vec<Vec<f64>>> {
        let (a, b, t) = interpolate(&f.kls(), kl)?;
        let (ia, ib) = (f.frontier[a], f.frontier[b]);
        // Never between the reference and the first checkpoint: that straight line is not a
        // policy the method trained, and would stand in for one where it has no checkpoint.
        if f.checkpoints[ia].setting.is_none() && t < 1.0 {
            return None;
        }
        let mut out = Vec::with_capacity(seeds.len());
        for &seed in seeds {
            let va = self.checkpoint_values(f, ia, seed, metric);
            let vb = self.checkpoint_values(f, ib, seed, metric);
            let n = va.as_ref().or(vb.as_ref())?.len();
            let r = metric.at_reference();
            let va = va.unwrap_or_else(|| vec![r; n]);
            let vb = vb.unwrap_or_else(|| vec![r; n]);
            if va.len() != n || vb.len() != n {
                return None;
            }
            out.push(
                va.iter()
                    .zip(&vb)
                    .map(|(x, y)| (1.0 - t) * x + t * y)
                    .collect(),
            );
        }
        Some(out)
    }

    /// The value of `metric` at KL `kl` along a method's frontier, with its interval.
    pub fn at_kl(&self, f: &Frontier, kl: f64, metric: Metric) -> Option<Interval> {
        let seeds = self.common_seeds(&self.frontier_settings(f));
        let v = self.along(f, kl, &seeds, metric)?;
        paired_bootstrap(&v, RESAMPLES, kl.to_bits() ^ metric as u64)
    }

    /// `a − b` at KL `kl` along both frontiers, paired by seed and prompt.
    pub fn diff_at_kl(
        &self,
        a: &Frontier,
        b: &Frontier,
        kl: f64,
        metric: Metric,
    ) -> Option<Interval> {
        let mut settings = self.frontier_settings(a);
        settings.extend(self.frontier_settings(b));
        let seeds = self.common_seeds(&settings);
        let va = self.along(a, kl, &seeds, metric)?;
        let vb = self.along(b, kl, &seeds, metric)?;
        let d: Vec<Vec<f64>> = va
            .iter()
            .zip(&vb)
            .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p - q).collect())
            .collect();
        paired_bootstrap(&d, RESAMPLES, kl.to_bits() ^ 0xD1FF ^ metric as u64)
    }

    /// Setting `a`'s final evaluation against the frontier `f` at `a`'s own KL (its mean final
    /// KL over the common seeds), paired by seed and prompt: `a`'s KL, and the interval of
    /// `a − f` (`None` where `f` does not reach that KL, or a run is missing).
    pub fn diff_at_own_kl(
        &self,
        a: (&str, &str),
        f: &Frontier,
        metric: Metric,
    ) -> Option<(f64, Option<Interval>)> {
        let mut settings = vec![a];
        settings.extend(self.frontier_settings(f));
        let seeds = self.common_seeds(&settings);
        let mut own = Vec::with_capacity(seeds.len());
        let mut kl = 0.0;
        for &seed in &seeds {
            let k = self.final_values(a.0, a.1, seed, Metric::Kl)?;
            kl += k.iter().sum::<f64>() / k.len().max(1) as f64;
            own.push(self.final_values(a.0, a.1, seed, metric)?);
        }
        if seeds.is_empty() {
            return None;
        }
        let kl = kl / seeds.len() as f64;
        let Some(theirs) = self.along(f, kl, &seeds, metric) else {
            return Some((kl, None));
        };
        let mut d = Vec::with_capacity(seeds.len());
        for (x, y) in own.iter().zip(&theirs) {
            if x.len() != y.len() {
                return None;
            }
            d.push(x.iter().zip(y).map(|(p, q)| p - q).collect());
        }
        Some((
            kl,
            paired_bootstrap(&d, RESAMPLES, kl.to_bits() ^ 0x0A1C ^ metric as u64),
        ))
    }

    /// `a − b` between two settings' final evaluations, paired by seed and prompt.
    pub fn diff_final(&self, a: (&str, &str), b: (&str, &str), metric: Metric) -> Option<Interval> {
        let seeds = self.common_seeds(&[a, b]);
        let mut d = Vec::with_capacity(seeds.len());
        for &seed in &seeds {
            let va = self.final_values(a.0, a.1, seed, metric)?;
            let vb = self.final_values(b.0, b.1, seed, metric)?;
            if va.len() != vb.len() {
                return None;
            }
            d.push(va.iter().zip(vb).map(|(x, y)| x - y).collect());
        }
        paired_bootstrap(&d, RESAMPLES, 0xF1A1 ^ metric as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frontier_keeps_only_undominated_points_in_order_of_kl() {
        let pts = [
            (0.0, 0.5),
            (2.0, 0.7),
            (1.0, 0.6),
            (1.5, 0.55),
            (3.0, 0.65),
            (2.5, 0.9),
        ];
        assert_eq!(pareto(&pts), vec![0, 2, 1, 5]);
        // Equal KL: the higher point; NaN is never on a frontier.
        assert_eq!(pareto(&[(1.0, 0.2), (1.0, 0.4), (f64::NAN, 9.0)]), vec![1]);
    }

    #[test]
    fn interpolation_on_a_hand_made_frontier() {
        let kls = [0.0, 1.0, 3.0];
        assert_eq!(interpolate(&kls, 0.0), Some((0, 1, 0.0)));
        assert_eq!(interpolate(&kls, 0.5), Some((0, 1, 0.5)));
        assert_eq!(interpolate(&kls, 2.5), Some((1, 2, 0.75)));
        assert_eq!(interpolate(&kls, 3.0), Some((1, 2, 1.0)));
        assert_eq!(interpolate(&kls, 3.01), None);
        assert_eq!(interpolate(&kls, -0.1), None);
        // Values along it: win ½ at the reference, 0.6 at KL 1, 0.8 at KL 3.
        let wins = [0.5, 0.6, 0.8];
        let (a, b, t) = interpolate(&kls, 2.0).expect("inside");
        assert!(((1.0 - t) * wins[a] + t * wins[b] - 0.7).abs() < 1e-12);
    }

    #[test]
    fn the_bootstrap_covers_a_known_mean_and_its_error_shrinks_with_prompts() {
        // Deterministic pseudo-noise around 0.1 on 8 seeds × n prompts.
        let make = |n: usize| -> Vec<Vec<f64>> {
            let mut r = Rng(7);
            (0..8)
                .map(|_| {
                    (0..n)
                        .map(|_| 0.1 + (r.below(1000) as f64 / 1000.0 - 0.5))
                        .collect()
                })
                .collect()
        };
        let small = paired_bootstrap(&make(64), 1000, 1).expect("data");
        let large = paired_bootstrap(&make(1024), 1000, 1).expect("data");
        assert!(small.lo < 0.1 + 0.02 && small.hi > 0.1 - 0.02, "{small:?}");
        assert!(large.se < small.se / 2.0, "{small:?} {large:?}");
        assert!(large.lo < large.mean && large.mean < large.hi);
        // No difference at all: a zero-width interval around 0, which excludes nothing.
        let zero = paired_bootstrap(&vec![vec![0.0; 10]; 3], 100, 1).expect("data");
        assert_eq!((zero.mean, zero.lo, zero.hi, zero.se), (0.0, 0.0, 0.0, 0.0));
        assert!(!zero.excludes_zero());
        assert!(paired_bootstrap(&[vec![1.0], vec![1.0, 2.0]], 10, 1).is_none());
        assert!((mde80(0.01) - 0.028).abs() < 1e-3);
    }

    #[test]
    fn values_are_never_interpolated_from_the_reference() {
        let trace = |seed: u64| Trace {
            method: "A".into(),
            setting: "β=0.1".into(),
            seed,
            lines: Vec::new(),
            decisions: None,
            per_prompt: vec![edpo_rundir::PerPrompt {
                step: 10,
                win: vec![0.7, 0.5],
                reward_diff: vec![0.2, 0.0],
                kl: vec![2.0, 2.0],
            }],
            final_val_win: Some(0.6),
            task: String::new(),
        };
        let traces = [trace(0), trace(1)];
        let paired = Paired::new(&traces).expect("paired");
        let f = paired.frontier("A");
        assert_eq!(f.kls(), vec![0.0, 2.0]);
        // At the checkpoint: its numbers; below it: nothing, not a line from π_ref.
        let at = paired
            .at_kl(&f, 2.0, Metric::Win)
            .expect("at the checkpoint");
        assert!((at.mean - 0.6).abs() < 1e-12);
        assert!(paired.at_kl(&f, 1.0, Metric::Win).is_none());
        assert!(paired.at_kl(&f, 2.5, Metric::Win).is_none());
    }

    /// A run of `method` at `setting` with one evaluation after `step` on two prompts.
    fn one_eval(
        method: &str,
        setting: &str,
        seed: u64,
        step: usize,
        win: [f64; 2],
        kl: f64,
    ) -> Trace {
        Trace {
            method: method.into(),
            setting: setting.into(),
            seed,
            lines: Vec::new(),
            decisions: None,
            per_prompt: vec![edpo_rundir::PerPrompt {
                step,
                win: win.to_vec(),
                reward_diff: vec![0.0, 0.0],
                kl: vec![kl, kl],
            }],
            final_val_win: Some(win[0]),
            task: String::new(),
        }
    }

    /// A single-checkpoint setting against a two-point frontier at its own KL: the frontier's
    /// value is interpolated there, prompt by prompt; outside the frontier, no comparison.
    #[test]
    fn a_setting_is_compared_with_a_frontier_at_its_own_kl() {
        let run = |method: &str, setting: &str, seed: u64, win: [f64; 2], kl: f64| {
            one_eval(method, setting, seed, 10, win, kl)
        };
        let mut traces = Vec::new();
        for seed in [0, 1] {
            traces.push(run("DPO", "β=0.2", seed, [0.6, 0.6], 2.0));
            traces.push(run("DPO", "β=0.1", seed, [0.8, 0.7], 4.0));
            traces.push(run("B", "x", seed, [0.7, 0.7], 3.0));
            traces.push(run("C", "y", seed, [0.9, 0.9], 5.0));
        }
        let paired = Paired::new(&traces).expect("paired");
        let dpo = paired.frontier("DPO");
        assert_eq!(dpo.kls(), vec![0.0, 2.0, 4.0]);
        // Halfway: DPO's values are 0.7 and 0.65 on the two prompts.
        let (kl, d) = paired
            .diff_at_own_kl(("B", "x"), &dpo, Metric::Win)
            .expect("compared");
        assert_eq!(kl, 3.0);
        let d = d.expect("inside the frontier");
        assert!((d.mean - 0.025).abs() < 1e-12, "{d:?}");
        let (kl, d) = paired
            .diff_at_own_kl(("C", "y"), &dpo, Metric::Win)
            .expect("known");
        assert_eq!(kl, 5.0);
        assert!(d.is_none(), "beyond the frontier");
    }

    /// Runs of one setting whose final evaluations fall at different steps (an on-policy round
    /// short of pairs in one seed) still give one final checkpoint, averaged over both seeds.
    #[test]
    fn final_evaluations_are_matched_across_seeds_whatever_their_step() {
        let run =
            |seed: u64, step: usize, win: f64| one_eval("A", "β=0.1", seed, step, [win, win], 2.0);
        let traces = [run(0, 256, 0.6), run(1, 255, 0.8)];
        let paired = Paired::new(&traces).expect("paired");
        let f = paired.frontier("A");
        assert_eq!(f.kls(), vec![0.0, 2.0]);
        let c = &f.checkpoints[f.frontier[1]];
        assert!(c.last && (c.win - 0.7).abs() < 1e-12, "{c:?}");
        let at = paired.at_kl(&f, 2.0, Metric::Win).expect("both seeds");
        assert!((at.mean - 0.7).abs() < 1e-12);
    }
}
