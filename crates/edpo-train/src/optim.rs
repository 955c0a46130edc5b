//! AdamW with in-place updates, and gradient buffers with global-norm clipping.
//!
//! The update follows `torch.optim.AdamW` exactly, in this order: decoupled weight decay
//! `θ ← θ·(1 − lr·λ)`, moments `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, then
//! `θ ← θ − (lr/(1−β₁ᵗ))·m / (√v/√(1−β₂ᵗ) + ε)`. On the CPU it runs as one pass over each
//! parameter's storage (a candle in-place op), so a step builds no graph and allocates no
//! tensors; on another device the same update runs on a host copy that is written back.

use crate::{Error, Result};
use candle_core::{CpuStorage, InplaceOp1, Layout};
use edpo_model::kernels::sink::SinkSet;
use edpo_model::Param;
use std::cell::RefCell;

/// AdamW hyper-parameters (PyTorch's defaults except weight decay, which TRL sets to 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay β₁.
    pub beta1: f64,
    /// Second-moment decay β₂.
    pub beta2: f64,
    /// Denominator ε.
    pub eps: f64,
    /// Decoupled weight decay λ, applied to parameters whose `decay` flag is set.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Gradients summed over the micro-batches of one optimizer step, one buffer per trainable
/// parameter (a frozen one, such as the base under LoRA adapters, has an empty buffer: candle's
/// backward pass computes its gradient too, but it is neither kept, clipped nor counted in the
/// norm).
///
/// Made [`with_sinks`](Self::with_sinks), the trainable matrices (every linear map's weight,
/// the embeddings, the LM head) get gradient sinks ([`edpo_model::kernels::sink`]): the fused
/// kernels write their gradients there instead of into candle's store, which saves the store's
/// zero-filled tensors and sums at every contribution. The sums are the same numbers.
#[derive(Debug, Clone)]
pub struct GradBuffers {
    grads: Vec<Vec<f32>>,
    /// Per buffer: nothing has been added since it was zeroed.
    zeroed: Vec<bool>,
    sinks: Option<std::sync::Arc<SinkSet>>,
}

impl GradBuffers {
    /// Zeroed buffers shaped like the trainable `params` (empty for frozen ones).
    pub fn new(params: &[Param]) -> Self {
        Self {
            grads: params
                .iter()
                .map(|p| match p.var {
                    Some(_) => vec![0.0; p.tensor.elem_count()],
                    None => Vec::new(),
                })
                .collect(),
            zeroed: vec![true; params.len()],
            sinks: None,
        }
    }

    /// [`new`](Self::new), with gradient sinks installed for the trainable matrices while these
    /// buffers (or a clone of them) live. Fails if another trainer's sinks hold one of them.
    pub fn with_sinks(params: &[Param]) -> Result<Self> {
        let sinks = SinkSet::install(
            params
                .iter()
                .map(|p| (&p.tensor, p.var.is_some() && p.tensor.rank() == 2)),
        )?;
        Ok(Self {
            sinks: Some(std::sync::Arc::new(sinks)),
            ..Self::new(params)
        })
    }

    /// Adds the gradients of `store` (from one backward pass). A parameter the loss does not
    /// reach gets none, which adds nothing.
    pub fn add(
        &mut self,
        params: &[Param],
        store: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        self.add_shard(params, store, 0)
    }

    /// Adds the gradients of the backward pass of shard `shard` (run inside
    /// [`edpo_model::kernels::sink::in_shard`] with that index): its `store`, and for a
    /// parameter with a sink, what the sink holds for the shard.
    pub fn add_shard(
        &mut self,
        params: &[Param],
        store: &candle_core::backprop::GradStore,
        shard: usize,
    ) -> Result<()> {
        if self.grads.len() != params.len() {
            return Err(crate::Error::Config(format!(
                "gradient buffers for {} parameters given {}",
                self.grads.len(),
                params.len()
            )));
        }
        for (i, (buf, p)) in self.grads.iter_mut().zip(params).enumerate() {
            if p.var.is_none() {
                continue;
            }
            let stored = store.get(&p.tensor);
            if let Some(sink) = self.sinks.as_ref().and_then(|s| s.get(i)) {
                let zeroed = &mut self.zeroed[i];
                let sunk = sink.take(shard, |g| {
                    if *zeroed && g.len() == buf.len() {
                        // `0 + g` is `g` (but for the sign of a zero, which neither the
                        // norm nor AdamW reads): the sum itself becomes the buffer.
                        std::mem::swap(buf, g);
                    } else {
                        for (b, x) in buf.iter_mut().zip(g.iter()) {
                            *b += x;
                        }
                    }
                })?;
                *zeroed &= !sunk;
                if sunk {
                    if stored.is_some() {
                        return Err(crate::Error::Config(format!(
                            "parameter `{}`: its gradient came partly through its sink and \
                             partly through candle's store, so their sum's order is unknown",
                            p.name
                        )));
                    }
                    continue;
                }
            }
            if let Some(g) = stored {
                self.zeroed[i] = false;
                // Read on the host: the buffers are host memory whatever the device.
                let g = g.to_device(&candle_core::Device::Cpu)?.contiguous()?;
                edpo_model::kernels::with_f32(&g, |g| {
                    for (b, x) in buf.iter_mut().zip(g) {
                        *b += x;
                    }
                })?;
            }
        }
        Ok(())
    }

    /// The buffers, in parameter order.
    pub fn grads(&self) -> &[Vec<f32>] {
        &self.grads
    }

    /// Global L2 norm over all parameters: the squares summed in f64 one after the other, in
    /// parameter order (computed a block at a time, with the same bits:
    /// [`edpo_model::kernels::sequential_sum_of_squares`]).
    pub fn global_norm(&self) -> f64 {
        edpo_model::kernels::sequential_sum_of_squares(self.grads.iter().map(Vec::as_slice)).sqrt()
    }

    /// The factor `torch.nn.utils.clip_grad_norm_` multiplies gradients by:
    /// `min(1, max_norm / (norm + 1e-6))`.
    pub fn clip_factor(norm: f64, max_norm: Option<f64>) -> f64 {
        match max_norm {
            Some(m) => (m / (norm + 1e-6)).min(1.0),
            None => 1.0,
        }
    }

    /// Sets every buffer to zero, and drops what the sinks hold.
    pub fn zero(&mut self) {
        for (g, zeroed) in self.grads.iter_mut().zip(&mut self.zeroed) {
            if !*zeroed {
                g.fill(0.0);
                *zeroed = true;
            }
        }
        if let Some(s) = &self.sinks {
            s.clear();
        }
    }
}

/// AdamW state: moments per parameter and the step count.
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    t: u64,
}

impl AdamW {
    /// Zero moments for the trainable `params` (none for frozen ones, such as a LoRA base).
    pub fn new(params: &[Param], config: AdamWConfig) -> Self {
        let zeros = || {
            params
                .iter()
                .map(|p| match p.var {
                    Some(_) => vec![0.0; p.tensor.elem_count()],
                    None => Vec::new(),
                })
                .collect()
        };
        Self {
            config,
            m: zeros(),
            v: zeros(),
            t: 0,
        }
    }

    /// Number of steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.t
    }

    /// One update of every trainable parameter with gradients `grads · grad_scale`
    /// (`grad_scale` carries the clipping factor). Returns how many parameter values are
    /// not finite after it (counted as each parameter is updated, without another pass).
    pub fn step(
        &mut self,
        params: &[Param],
        grads: &GradBuffers,
        lr: f64,
        grad_scale: f64,
    ) -> Result<usize> {
        self.t += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let mut nonfinite = 0;
        for (i, p) in params.iter().enumerate() {
            let Some(var) = &p.var else { continue };
            let op = Update {
                grad: &grads.grads[i],
                moments: RefCell::new((&mut self.m[i], &mut self.v[i])),
                decay: if p.decay {
                    (1.0 - lr * c.weight_decay) as f32
                } else {
                    1.0
                },
                grad_scale: grad_scale as f32,
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                step_size: (lr / bc1) as f32,
                bc2_sqrt: bc2.sqrt() as f32,
                eps: c.eps as f32,
                nonfinite: std::cell::Cell::new(0),
            };
            if var.device().is_cpu() {
                var.as_tensor().inplace_op1(&op)?;
            } else {
                // Another device: the same update on a host copy, written back.
                let shape = var.dims().to_vec();
                let mut theta = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                op.apply(&mut theta)?;
                let updated = candle_core::Tensor::from_vec(theta, shape, var.device())?;
                var.set(&updated)?;
            }
            nonfinite += op.nonfinite.get();
        }
        Ok(nonfinite)
    }
}

/// One parameter's AdamW update, run on its storage in place.
struct Update<'a> {
    grad: &'a [f32],
    moments: RefCell<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
    decay: f32,
    grad_scale: f32,
    beta1: f32,
    beta2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
    /// Values not finite after the update.
    nonfinite: std::cell::Cell<usize>,
}

impl InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("AdamW updates f32 parameters only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("AdamW needs contiguous parameters");
        };
        self.apply(&mut data[start..end])
    }
}

impl Update<'_> {
    /// The update of one parameter's values.
    fn apply(&self, theta: &mut [f32]) -> candle_core::Result<()> {
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        if theta.len() != self.grad.len() || m.len() != theta.len() {
            candle_core::bail!("AdamW: parameter, gradient and moments differ in size");
        }
        let (b1, b2) = (self.beta1, self.beta2);
        let (scale, decay, step_size) = (self.grad_scale, self.decay, self.step_size);
        let (bc2_sqrt, eps) = (self.bc2_sqrt, self.eps);
        let mut nonfinite = 0usize;
        // Blocks small enough to stay in cache: the update (no counter in its loop, so it
        // vectorises), then the block's non-finite values counted while it is still there.
        const BLOCK: usize = 4096;
        for (((p, g), m), v) in theta
            .chunks_mut(BLOCK)
            .zip(self.grad.chunks(BLOCK))
            .zip(m.chunks_mut(BLOCK))
            .zip(v.chunks_mut(BLOCK))
        {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = g * scale;
                *p *= decay;
                *m += (1.0 - b1) * (g - *m); // torch's lerp_ form
                *v = *v * b2 + g * g * (1.0 - b2);
                let denom = v.sqrt() / bc2_sqrt + eps;
                *p -= step_size * *m / denom;
            }
            nonfinite += p.iter().filter(|x| !x.is_finite()).count();
        }
        self.nonfinite.set(nonfinite);
        Ok(())
    }
}

/// Fails with [`Error::NonFinite`] unless `x` is finite.
pub fn ensure_finite(x: f64, what: &'static str, step: usize) -> Result<()> {
    if x.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite { what, step })
    }
}
