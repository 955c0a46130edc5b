//! ε-DPO's step decisions over a whole run (`decisions.json`), counted in bins of what might
//! explain them: the pair's true preference probability, the gold gap `|r_w − r_l|` of its two
//! responses, and the policy's implicit margin `Δ = (lw − rw) − (ll − rl)` when the step scored
//! it. Decisions taken while the policy is the reference (the first optimizer step, and the
//! first of an on-policy round that reset the reference: every `Δ` is 0, so the decision
//! follows rounding-level differences of the mixed logits) are counted apart, by true
//! preference probability.
//!
//! Files written before the apart counts existed hold only the true-preference bins, with the
//! first step's decisions in them; [`Decisions::start`] is `None` for them.

use crate::{Error, Result};
use serde_json::{json, Value};
use std::path::Path;

/// Number of true-preference-probability bins the writer uses.
pub const P_TRUE_BINS: usize = 10;

/// Edges of the gold-gap bins `|r_w − r_l|` (gold-reward units); a value beyond the last edge
/// is counted in the last bin.
pub const GAP_EDGES: [f64; 7] = [0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 8.0];

/// Edges of the implicit-margin bins `Δ` (nats); values beyond either end are counted in the
/// outer bins.
pub const MARGIN_EDGES: [f64; 8] = [-4.0, -1.0, -0.25, -0.05, 0.05, 0.25, 1.0, 4.0];

/// Decision counts in bins of one quantity: bin `k` of `n` holds `[edges[k], edges[k+1])`,
/// values outside the edges go to the outer bins.
#[derive(Debug, Clone, PartialEq)]
pub struct Binned {
    /// Bin edges, `bins + 1` values.
    pub edges: Vec<f64>,
    /// Pairs stepped +1 (β relaxed) per bin.
    pub relaxed: Vec<u64>,
    /// Pairs left at step 0 per bin.
    pub kept: Vec<u64>,
    /// Pairs stepped −1 (β strengthened) per bin.
    pub strengthened: Vec<u64>,
}

impl Binned {
    /// Empty bins with `edges`.
    pub fn new(edges: &[f64]) -> Self {
        let n = edges.len().saturating_sub(1);
        Self {
            edges: edges.to_vec(),
            relaxed: vec![0; n],
            kept: vec![0; n],
            strengthened: vec![0; n],
        }
    }

    /// Number of bins.
    pub fn bins(&self) -> usize {
        self.edges.len().saturating_sub(1)
    }

    /// Counts one decision (+1 relaxed, −1 strengthened, 0 kept) of a pair whose binned
    /// quantity is `value`; NaN is not counted.
    pub fn add(&mut self, value: f64, step: i8) {
        let n = self.bins();
        if n == 0 || value.is_nan() {
            return;
        }
        let bin = self.edges[1..n].iter().take_while(|&&e| value >= e).count();
        let counts = match step {
            1 => &mut self.relaxed,
            -1 => &mut self.strengthened,
            _ => &mut self.kept,
        };
        counts[bin] += 1;
    }

    /// Decisions counted in bin `k`.
    pub fn total(&self, k: usize) -> u64 {
        self.relaxed[k] + self.kept[k] + self.strengthened[k]
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        (0..self.bins()).all(|k| self.total(k) == 0)
    }

    /// Adds `other`'s counts bin by bin; `false` (and nothing added) when the edges differ.
    pub fn merge(&mut self, other: &Binned) -> bool {
        if self.edges != other.edges {
            return false;
        }
        for (a, b) in [
            (&mut self.relaxed, &other.relaxed),
            (&mut self.kept, &other.kept),
            (&mut self.strengthened, &other.strengthened),
        ] {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        true
    }

    fn to_json(&self) -> Value {
        json!({"edges": self.edges, "relaxed": self.relaxed, "kept": self.kept,
            "strengthened": self.strengthened})
    }
}

/// What is known of a pair when ε-DPO decides its step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecisionContext {
    /// The true probability that the chosen response is preferred.
    pub p_true: f64,
    /// The gold gap `|r_w − r_l|`, when the task has a gold reward.
    pub gold_gap: Option<f64>,
    /// The implicit margin `Δ` when the step scored the pair.
    pub margin: Option<f64>,
    /// Whether the decision was taken while the policy was the reference: at the first
    /// optimizer step, or the first of an on-policy round that reset the reference.
    pub at_start: bool,
}

/// ε-DPO's step decisions over a whole run.
#[derive(Debug, Clone, PartialEq)]
pub struct Decisions {
    /// By true preference probability, the first step's decisions left out (included in
    /// files written before [`Decisions::start`] existed).
    pub by_p_true: Binned,
    /// The first step's decisions by true preference probability (`None`: an older file).
    pub start: Option<Binned>,
    /// By gold gap, the first step left out (`None`: an older file).
    pub by_gap: Option<Binned>,
    /// By implicit margin, the first step left out (`None`: an older file).
    pub by_margin: Option<Binned>,
}

impl Default for Decisions {
    fn default() -> Self {
        let p_edges: Vec<f64> = (0..=P_TRUE_BINS)
            .map(|k| k as f64 / P_TRUE_BINS as f64)
            .collect();
        Self {
            by_p_true: Binned::new(&p_edges),
            start: Some(Binned::new(&p_edges)),
            by_gap: Some(Binned::new(&GAP_EDGES)),
            by_margin: Some(Binned::new(&MARGIN_EDGES)),
        }
    }
}

impl Decisions {
    /// Counts one pair's step (+1 relaxed, −1 strengthened, 0 kept).
    pub fn add(&mut self, context: DecisionContext, step: i8) {
        if context.at_start {
            if let Some(start) = &mut self.start {
                start.add(context.p_true, step);
                return;
            }
        }
        self.by_p_true.add(context.p_true, step);
        if let (Some(b), Some(gap)) = (&mut self.by_gap, context.gold_gap) {
            b.add(gap.abs(), step);
        }
        if let (Some(b), Some(margin)) = (&mut self.by_margin, context.margin) {
            b.add(margin, step);
        }
    }

    /// Whether no decision was counted.
    pub fn is_empty(&self) -> bool {
        self.by_p_true.is_empty() && self.start.as_ref().is_none_or(Binned::is_empty)
    }

    /// Adds `other`'s counts; `false` (and nothing added) when their bins differ.
    pub fn merge(&mut self, other: &Decisions) -> bool {
        let same = |a: &Option<Binned>, b: &Option<Binned>| match (a, b) {
            (Some(a), Some(b)) => a.edges == b.edges,
            (None, None) => true,
            _ => false,
        };
        if self.by_p_true.edges != other.by_p_true.edges
            || !same(&self.start, &other.start)
            || !same(&self.by_gap, &other.by_gap)
            || !same(&self.by_margin, &other.by_margin)
        {
            return false;
        }
        self.by_p_true.merge(&other.by_p_true);
        for (a, b) in [
            (&mut self.start, &other.start),
            (&mut self.by_gap, &other.by_gap),
            (&mut self.by_margin, &other.by_margin),
        ] {
            if let (Some(a), Some(b)) = (a.as_mut(), b) {
                a.merge(b);
            }
        }
        true
    }

    /// The JSON object of `decisions.json`: the true-preference bins at the top level (as
    /// older files have them), the first step's, gold-gap and margin bins under `start`,
    /// `gold_gap` and `margin`.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"p_true_edges": self.by_p_true.edges, "relaxed": self.by_p_true.relaxed,
            "kept": self.by_p_true.kept, "strengthened": self.by_p_true.strengthened});
        for (key, b) in [
            ("start", &self.start),
            ("gold_gap", &self.by_gap),
            ("margin", &self.by_margin),
        ] {
            if let Some(b) = b {
                v[key] = b.to_json();
            }
        }
        v
    }

    /// Reads `decisions.json`; a missing key or bins of different counts is an error naming
    /// the file and key. `start`, `gold_gap` and `margin` are optional (older files).
    pub fn read(path: &Path) -> Result<Self> {
        let malformed = |message: String| Error::Malformed {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| malformed(e.to_string()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| malformed(format!("malformed JSON: {e}")))?;
        let bad = |what: &str| malformed(format!("`{what}` missing or malformed"));
        let binned = |v: &Value, edges_key: &str, what: &str| -> Result<Binned> {
            let floats = v[edges_key]
                .as_array()
                .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>());
            let counts = |key: &str| {
                v[key]
                    .as_array()
                    .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
            };
            let (Some(edges), Some(relaxed), Some(kept), Some(strengthened)) = (
                floats,
                counts("relaxed"),
                counts("kept"),
                counts("strengthened"),
            ) else {
                return Err(bad(what));
            };
            let b = Binned {
                edges,
                relaxed,
                kept,
                strengthened,
            };
            let n = b.bins();
            if n == 0
                || [&b.relaxed, &b.kept, &b.strengthened]
                    .iter()
                    .any(|c| c.len() != n)
            {
                return Err(bad(what));
            }
            Ok(b)
        };
        let optional = |key: &str| -> Result<Option<Binned>> {
            match v.get(key) {
                None => Ok(None),
                Some(inner) => binned(inner, "edges", key).map(Some),
            }
        };
        Ok(Decisions {
            by_p_true: binned(&v, "p_true_edges", "p_true_edges")?,
            start: optional("start")?,
            by_gap: optional("gold_gap")?,
            by_margin: optional("margin")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(p_true: f64, gap: f64, margin: f64, at_start: bool) -> DecisionContext {
        DecisionContext {
            p_true,
            gold_gap: Some(gap),
            margin: Some(margin),
            at_start,
        }
    }

    #[test]
    fn decisions_bin_by_truth_gap_and_margin_and_round_trip() {
        let mut d = Decisions::default();
        assert!(d.is_empty());
        d.add(at(0.0, 0.05, -9.0, false), 1);
        d.add(at(0.05, -3.0, 0.0, false), -1);
        d.add(at(0.55, 0.3, 0.3, false), 0);
        d.add(at(1.0, 20.0, 9.0, false), 1); // the last bins take what lies beyond
        d.add(at(-0.2, 0.1, -0.05, false), 0); // clamped into the first bin
        d.add(at(0.3, 0.1, 0.0, true), -1); // the first step: apart
        let p = &d.by_p_true;
        assert_eq!((p.relaxed[0], p.strengthened[0], p.kept[0]), (1, 1, 1));
        assert_eq!(p.kept[5], 1);
        assert_eq!(p.relaxed[9], 1);
        let start = d.start.as_ref().expect("start");
        assert_eq!(start.strengthened[3], 1);
        assert_eq!((0..start.bins()).map(|k| start.total(k)).sum::<u64>(), 1);
        let gap = d.by_gap.as_ref().expect("gap");
        // |−3| = 3 ∈ [2, 8); 0.1 ∈ [0.1, 0.25); 0.3 ∈ [0.25, 0.5); 20 → the last bin.
        assert_eq!(gap.relaxed[0], 1);
        assert_eq!(gap.strengthened[5], 1);
        assert_eq!(gap.kept[1], 1);
        assert_eq!(gap.kept[2], 1);
        assert_eq!(gap.relaxed[5], 1);
        let margin = d.by_margin.as_ref().expect("margin");
        // −9 → first; 0 ∈ [−0.05, 0.05); 0.3 ∈ [0.25, 1); 9 → last; −0.05 ∈ [−0.05, 0.05).
        assert_eq!(margin.relaxed[0], 1);
        assert_eq!(margin.strengthened[3], 1);
        assert_eq!(margin.kept[5], 1);
        assert_eq!(margin.relaxed[6], 1);
        assert_eq!(margin.kept[3], 1);

        let tmp_dir = tempfile::Builder::new()
            .prefix("edpo-decisions-")
            .tempdir()
            .expect("temp dir");

        let dir = tmp_dir.path().join("decisions");
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(crate::DECISIONS);
        crate::write_atomic(&path, d.to_json().to_string().as_bytes()).expect("write");
        assert_eq!(Decisions::read(&path).expect("read"), d);
        let mut twice = d.clone();
        assert!(twice.merge(&d));
        assert_eq!(twice.by_p_true.relaxed[9], 2);
        // An older file: true-preference bins only.
        std::fs::write(
            &path,
            r#"{"p_true_edges": [0, 0.5, 1], "relaxed": [1, 2], "kept": [0, 0], "strengthened": [0, 3]}"#,
        )
        .expect("write");
        let old = Decisions::read(&path).expect("older file");
        assert!(old.start.is_none() && old.by_gap.is_none() && old.by_margin.is_none());
        assert!(!twice.merge(&old), "different bins are not merged");
        std::fs::write(
            &path,
            r#"{"p_true_edges": [0, 1], "relaxed": [1, 2], "kept": [0], "strengthened": [0]}"#,
        )
        .expect("write");
        let err = Decisions::read(&path)
            .expect_err("bins disagree")
            .to_string();
        assert!(
            err.contains("decisions.json") && err.contains("p_true_edges"),
            "{err}"
        );
        std::fs::write(
            &path,
            r#"{"p_true_edges": [0, 1], "relaxed": [1], "kept": [0], "strengthened": [0], "margin": {"edges": [0]}}"#,
        )
        .expect("write");
        let err = Decisions::read(&path).expect_err("bad margin").to_string();
        assert!(err.contains("margin"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
