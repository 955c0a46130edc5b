//! Supervised fine-tuning by next-token likelihood, used to build a reference model from
//! text (the SFT stage that precedes preference optimisation).

use crate::optim::{ensure_finite, AdamW, AdamWConfig, GradBuffers};
use crate::Result;
use edpo_model::logprobs::sequence_logps;
use edpo_model::{CausalLm, SequenceBatch};

/// Trains `model` to maximise the likelihood of response tokens.
pub struct SftTrainer {
    optimizer: AdamW,
    grads: GradBuffers,
    max_grad_norm: Option<f64>,
    step: usize,
}

impl SftTrainer {
    /// Fresh optimizer state for `model`'s parameters (fails if another trainer in this
    /// process trains them at the same time: [`GradBuffers::with_sinks`]).
    pub fn new(model: &CausalLm, adamw: AdamWConfig, max_grad_norm: Option<f64>) -> Result<Self> {
        Ok(Self {
            optimizer: AdamW::new(model.params(), adamw),
            grads: GradBuffers::with_sinks(model.params())?,
            max_grad_norm,
            step: 0,
        })
    }

    /// One step on `(prompt, response)` sequences: loss `−Σ log π(y_t) / Σ |y|`, the mean
    /// negative log-likelihood per response token. Returns the loss.
    pub fn step(
        &mut self,
        model: &CausalLm,
        sequences: &[(&[u32], &[u32])],
        lr: f64,
    ) -> Result<f64> {
        let batch = SequenceBatch::new(sequences, 0)?;
        let tokens = batch.n_targets() as f64;
        let logps = sequence_logps(model, &batch)?;
        let loss = (logps.sum_all()? * (-1.0 / tokens))?;
        let value = f64::from(loss.to_scalar::<f32>()?);
        ensure_finite(value, "SFT loss", self.step)?;
        self.grads.zero();
        self.grads.add(model.params(), &loss.backward()?)?;
        let norm = self.grads.global_norm();
        ensure_finite(norm, "SFT gradient norm", self.step)?;
        let scale = GradBuffers::clip_factor(norm, self.max_grad_norm);
        let nonfinite = self
            .optimizer
            .step(model.params(), &self.grads, lr, scale)?;
        ensure_finite(
            if nonfinite > 0 { f64::NAN } else { 0.0 },
            "SFT parameter",
            self.step,
        )?;
        self.step += 1;
        Ok(value)
    }
}
