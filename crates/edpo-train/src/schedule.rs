//! Learning-rate schedules: linear warm-up from 0, then constant, linear decay to 0, or
//! half-cosine decay to 0, with the multipliers of `transformers`' `get_*_schedule_with_warmup`
//! (so step 0 of a warm-up runs at learning rate 0, as there).

/// The shape after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Constant after warm-up.
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

/// A schedule over `total_steps` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub peak_lr: f64,
    /// Warm-up steps.
    pub warmup_steps: usize,
    /// Total optimizer steps.
    pub total_steps: usize,
    /// Shape after warm-up.
    pub kind: ScheduleKind,
}

impl Schedule {
    /// The learning rate at optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        self.peak_lr * self.multiplier(step)
    }

    fn multiplier(&self, step: usize) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        let progress = (s - w) / (t - w).max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers_multipliers() {
        // transformers.get_cosine_schedule_with_warmup(opt, 2, 10) multipliers, steps 0..10:
        // [0.0, 0.5, 1.0, 0.9619397662556434, 0.8535533905932737, 0.6913417161825449,
        //  0.5, 0.3086582838174551, 0.14644660940672627, 0.03806023374435663]
        let s = Schedule {
            peak_lr: 1.0,
            warmup_steps: 2,
            total_steps: 10,
            kind: ScheduleKind::Cosine,
        };
        let expected = [
            0.0,
            0.5,
            1.0,
            0.9619397662556434,
            0.8535533905932737,
            0.6913417161825449,
            0.5,
            0.3086582838174551,
            0.14644660940672627,
            0.03806023374435663,
        ];
        for (k, e) in expected.iter().enumerate() {
            assert!((s.lr(k) - e).abs() < 1e-12, "step {k}: {} vs {e}", s.lr(k));
        }
        let l = Schedule {
            kind: ScheduleKind::Linear,
            ..s
        };
        assert!((l.lr(6) - 0.5).abs() < 1e-12);
        let c = Schedule {
            kind: ScheduleKind::Constant,
            ..s
        };
        assert_eq!(c.lr(9), 1.0);
    }
}
