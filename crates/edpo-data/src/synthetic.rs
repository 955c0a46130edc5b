//! A synthetic language with a known reward, small enough to train on in seconds.
//!
//! Tokens `0..vocab` follow a seeded random Markov chain (each row of the transition matrix is
//! a softmax of Gaussian logits, so some continuations are much likelier than others); token
//! `vocab` is EOS. Every token has a gold reward drawn from N(0, 1); a response's gold reward
//! is the mean reward of its tokens (EOS excluded), so length alone earns nothing. Preference
//! pairs are labelled by a Bradley–Terry draw on the gold rewards, and each pair keeps its true
//! preference probability.

/// The language: transition matrix, start distribution and per-token rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct MarkovTask {
    /// Number of ordinary tokens; EOS is token `vocab`.
    pub vocab: usize,
    /// Row-stochastic transitions, `vocab × vocab`.
    pub transitions: Vec<f64>,
    /// Gold reward of each ordinary token.
    pub token_rewards: Vec<f64>,
}

/// The task's seeded generator.
use crate::rng::SplitMix64;

impl MarkovTask {
    /// A task with `vocab` ordinary tokens; `sharpness` scales the transition logits.
    pub fn new(vocab: usize, sharpness: f64, seed: u64) -> Self {
        let mut rng = SplitMix64(seed);
        let mut transitions = Vec::with_capacity(vocab * vocab);
        for _ in 0..vocab {
            let logits: Vec<f64> = (0..vocab).map(|_| sharpness * rng.normal()).collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let s: f64 = e.iter().sum();
            transitions.extend(e.iter().map(|x| x / s));
        }
        let token_rewards = (0..vocab).map(|_| rng.normal()).collect();
        Self {
            vocab,
            transitions,
            token_rewards,
        }
    }

    /// The EOS token id.
    pub fn eos(&self) -> u32 {
        self.vocab as u32
    }

    /// Continues `prefix` (or starts uniformly when empty) for `len` tokens.
    pub fn continue_chain(&self, prefix: &[u32], len: usize, rng: &mut SplitMix64) -> Vec<u32> {
        let mut out = Vec::with_capacity(len);
        let mut last = prefix
            .last()
            .copied()
            .filter(|&t| (t as usize) < self.vocab);
        for _ in 0..len {
            let next = match last {
                None => (rng.next_u64() % self.vocab as u64) as usize,
                Some(t) => {
                    let row =
                        &self.transitions[t as usize * self.vocab..(t as usize + 1) * self.vocab];
                    rng.categorical(row)
                }
            } as u32;
            out.push(next);
            last = Some(next);
        }
        out
    }

    /// Gold reward of a response: the mean token reward, EOS and out-of-range ids excluded
    /// (0 for a response with no ordinary token).
    pub fn reward(&self, response: &[u32]) -> f64 {
        let r: Vec<f64> = response
            .iter()
            .filter(|&&t| (t as usize) < self.vocab)
            .map(|&t| self.token_rewards[t as usize])
            .collect();
        if r.is_empty() {
            0.0
        } else {
            r.iter().sum::<f64>() / r.len() as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_row_stochastic() {
        let a = MarkovTask::new(8, 2.0, 3);
        assert_eq!(a, MarkovTask::new(8, 2.0, 3));
        for row in a.transitions.chunks(8) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        let mut rng = SplitMix64(1);
        let s = a.continue_chain(&[2], 5, &mut rng);
        assert_eq!(s.len(), 5);
        assert!(s.iter().all(|&t| t < 8));
        assert_eq!(a.reward(&[a.eos()]), 0.0);
    }
}
