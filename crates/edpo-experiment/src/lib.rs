//! Experiments: everything between a resolved config and a finished run directory.
//!
//! # Overview
//! - [`config`]: the resolved run config ([`RunConfig`]) and its hash, and the raw config as
//!   written with its resolution ([`config::raw`]);
//! - [`task`]: the tasks behind one dispatcher ([`task::TaskConfig`]): each builds a reference
//!   model, a gold reward and preference pairs as cached stages, and hands a run its
//!   [`task::TaskData`];
//! - [`pairs`]: preference pairs sampled from a reference and labelled by a Bradley–Terry
//!   draw on the gold reward;
//! - [`stages`]: the stage cache (built in a private directory, renamed into place);
//! - [`runner`]: one run from config to run directory (the training loop, periodic
//!   evaluation, the final evaluation), resume, and task data shared between runs;
//! - [`evaluate`]: a policy's evaluation against the original reference, paired with it on
//!   common random numbers;
//! - [`best_of_n`]: the best-of-n yardstick from the reference (a cached stage);
//! - [`bandit`]: an exactly solvable bandit, where every objective's distance to the
//!   KL-regularised optimum and to the optimal frontier is exact;
//!
//! The run directory's files are defined once, in `edpo-rundir`, which the report crate reads.
//! This crate knows no command line and no YAML files (the binary parses them into a
//! [`config::RawConfig`]); errors are `anyhow` chains with context for a person to read.

pub mod bandit;
pub mod best_of_n;
pub mod check;
pub mod config;
pub mod evaluate;
pub mod hash;
pub mod pairs;
pub mod runner;
pub mod stages;
pub mod task;

pub use config::RunConfig;

/// The device every model of a run lives on: the one place a run's device is chosen. The
/// training path is device-independent (`edpo_model::ops` routes each operation to a fused
/// CPU kernel or to candle's own operations), so a build of candle with CUDA or Metal needs
/// only this function changed.
pub fn device() -> candle_core::Device {
    candle_core::Device::Cpu
}

/// What the unit tests share: a tiny random GPT-2 and a judge that counts a token.
#[cfg(test)]
pub(crate) mod testing {
    use crate::task::Judge;
    use edpo_model::{CausalLm, Gpt2Config, ModelConfig};

    /// Rewards the count of token 1 in the response.
    pub struct CountOnes;

    impl Judge for CountOnes {
        fn gold(&self, _prompt: &[u32], response: &[u32]) -> f64 {
            response.iter().filter(|&&t| t == 1).count() as f64
        }
    }

    /// A frozen one-layer GPT-2 over six tokens (EOS 5), seeded.
    pub fn tiny_model(seed: u64) -> CausalLm {
        let cfg = Gpt2Config {
            vocab_size: 6,
            n_positions: 32,
            n_embd: 8,
            n_layer: 1,
            n_head: 2,
            n_inner: 32,
            layer_norm_epsilon: 1e-5,
        };
        let raw = cfg.hf_json(5);
        CausalLm::random(ModelConfig::Gpt2(cfg), raw, seed, &crate::device(), false).expect("model")
    }
}
