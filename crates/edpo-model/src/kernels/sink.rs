//! Gradient sinks: a trained weight's gradient written by the fused kernels' backward passes
//! straight into a buffer the trainer owns, instead of returned to candle.
//!
//! Returned to candle, each contribution to a weight's gradient costs a zero-filled tensor of
//! the weight's size (`GradStore::or_insert`), a sum into a third (`add`), and for an embedding
//! looked up by `index_select` a zeroed copy of the whole table besides (`index_add`): at
//! SmolLM2's size, five freshly mapped 113 MB tensors per step for the tied embedding alone.
//! A weight with a sink ([`SinkSet::install`]) instead has its gradient accumulated in the
//! sink's buffer, one per shard of the batch, kept from step to step; the trainer reads and
//! clears it after each backward pass ([`GradSink::take`]).
//!
//! The numbers are candle's: candle sums a weight's contributions in the order its backward
//! pass meets them, from zero, and so does a sink (the first contribution is written, each
//! later one computed on its own and then added, as candle adds it; a lookup's rows are added
//! one by one into the sum so far, as candle's `index_add` adds them). The only difference is the
//! sign of a zero (`0 + (−0) = +0` in candle, `−0` here), which nothing downstream reads: squared
//! in the norm, or scaled into AdamW's moments (which start at `+0`), it gives what `+0` gives.
//!
//! The kernels ask [`sink_for`] for the weight they differentiate; a weight without a sink, or
//! a run without any, is differentiated as before. A weight's every use must then go through a
//! kernel that knows sinks, or through [`tap`] where candle's own operations use it; the
//! trainer refuses a step where one weight's gradient came both ways.
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor, TensorId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

/// One weight's gradient, accumulated per shard.
#[derive(Debug)]
pub struct GradSink {
    len: usize,
    shards: Mutex<Vec<Arc<Mutex<Pending>>>>,
}

/// A shard's sum so far: `live` once a contribution has been written.
#[derive(Debug, Default)]
struct Pending {
    data: Vec<f32>,
    live: bool,
}

fn registry() -> &'static RwLock<HashMap<TensorId, Arc<GradSink>>> {
    static SINKS: OnceLock<RwLock<HashMap<TensorId, Arc<GradSink>>>> = OnceLock::new();
    SINKS.get_or_init(|| RwLock::new(HashMap::new()))
}

/// How many sinks are installed (a lookup with none is one atomic load).
static INSTALLED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD_INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// A contribution that is not the first, before it is added.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` (a backward pass) with its contributions going to shard `index` of every sink.
pub fn in_shard<R>(index: usize, f: impl FnOnce() -> R) -> R {
    let before = SHARD_INDEX.with(|s| s.replace(index));
    let out = f();
    SHARD_INDEX.with(|s| s.set(before));
    out
}

/// The sink of `weight`, if one is installed.
pub fn sink_for(weight: &Tensor) -> Option<Arc<GradSink>> {
    if INSTALLED.load(Ordering::Relaxed) == 0 {
        return None;
    }
    registry().read().ok()?.get(&weight.id()).cloned()
}

impl GradSink {
    fn new(len: usize) -> Self {
        Self {
            len,
            shards: Mutex::new(Vec::new()),
        }
    }

    /// The pending sum of `shard`, made on first use.
    fn slot(&self, shard: usize) -> candle_core::Result<Arc<Mutex<Pending>>> {
        let mut shards = match self.shards.lock() {
            Ok(s) => s,
            Err(_) => bail!("gradient sink: a backward pass panicked"),
        };
        while shards.len() <= shard {
            shards.push(Arc::default());
        }
        Ok(shards[shard].clone())
    }

    /// Adds one contribution: `write` sets every element of the slice it is given (of the
    /// weight's size) to the contribution; what it returns is returned.
    pub fn contribute<R>(
        &self,
        write: impl FnOnce(&mut [f32]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let slot = self.slot(SHARD_INDEX.with(std::cell::Cell::get))?;
        let Ok(mut pending) = slot.lock() else {
            bail!("gradient sink: a backward pass panicked")
        };
        if !pending.live {
            pending.data.resize(self.len, 0.0);
            let out = write(&mut pending.data)?;
            pending.live = true;
            return Ok(out);
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.resize(self.len, 0.0);
            let out = write(&mut scratch)?;
            for (p, &c) in pending.data.iter_mut().zip(scratch.iter()) {
                *p += c;
            }
            Ok(out)
        })
    }

    /// Adds the gradient of a row lookup (`index_select` along dimension 0): row `j` of `grad`
    /// (`ids.len() × width`) added to row `ids[j]` of the sum, in the order of `ids`, as candle's
    /// backward pass adds it (`index_add` on the weight's gradient so far, zero if none).
    pub fn contribute_rows(
        &self,
        ids: &[u32],
        grad: &[f32],
        width: usize,
    ) -> candle_core::Result<()> {
        if grad.len() != ids.len() * width || !self.len.is_multiple_of(width.max(1)) {
            bail!(
                "gradient sink: {} rows of {width} for {} ids",
                grad.len(),
                ids.len()
            );
        }
        let rows = self.len / width.max(1);
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
            bail!("gradient sink: row {bad} of a table of {rows}");
        }
        let slot = self.slot(SHARD_INDEX.with(std::cell::Cell::get))?;
        let Ok(mut pending) = slot.lock() else {
            bail!("gradient sink: a backward pass panicked")
        };
        if !pending.live {
            pending.data.clear();
            pending.data.resize(self.len, 0.0);
            pending.live = true;
        }
        for (&i, g) in ids.iter().zip(grad.chunks_exact(width)) {
            let row = &mut pending.data[i as usize * width..][..width];
            row.iter_mut().zip(g).for_each(|(r, &v)| *r += v);
        }
        Ok(())
    }

    /// Hands `shard`'s sum to `f` and clears it, when a backward pass contributed to it;
    /// returns whether one did. `f` may take the sum by swapping another vector of the weight's
    /// size into its place (the next backward pass overwrites whatever that holds).
    pub fn take(
        &self,
        shard: usize,
        f: impl FnOnce(&mut Vec<f32>),
    ) -> Result<bool, candle_core::Error> {
        let slot = self.slot(shard)?;
        let Ok(mut pending) = slot.lock() else {
            bail!("gradient sink: a backward pass panicked")
        };
        if !pending.live {
            return Ok(false);
        }
        f(&mut pending.data);
        pending.data.resize(self.len, 0.0);
        pending.live = false;
        Ok(true)
    }

    /// Drops whatever every shard holds (after a failed step).
    pub fn clear(&self) {
        if let Ok(shards) = self.shards.lock() {
            for s in shards.iter() {
                if let Ok(mut p) = s.lock() {
                    p.live = false;
                }
            }
        }
    }
}

/// Sinks for a set of weights, installed while this value lives.
#[derive(Debug)]
pub struct SinkSet {
    sinks: Vec<Option<(TensorId, Arc<GradSink>)>>,
}

impl SinkSet {
    /// Installs a sink for each weight marked `true` (f32 CPU tensors only; others are left
    /// to candle), in the order given. Fails, installing none, if one of them already has a
    /// sink: the same tensor trained twice at once in one process, where each trainer would
    /// see gradients of the other's steps.
    pub fn install<'a>(
        weights: impl IntoIterator<Item = (&'a Tensor, bool)>,
    ) -> candle_core::Result<Self> {
        let mut map = match registry().write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let chosen: Vec<Option<(TensorId, usize)>> = weights
            .into_iter()
            .map(|(w, on)| {
                let eligible = on && w.device().is_cpu() && w.dtype() == candle_core::DType::F32;
                eligible.then(|| (w.id(), w.elem_count()))
            })
            .collect();
        if let Some((_, len)) = chosen.iter().flatten().find(|(id, _)| map.contains_key(id)) {
            bail!(
                "gradient sink: a weight of {len} elements already has one (is the same model \
                 trained twice at once?)"
            );
        }
        let sinks = chosen
            .into_iter()
            .map(|c| {
                c.map(|(id, len)| {
                    let sink = Arc::new(GradSink::new(len));
                    map.insert(id, sink.clone());
                    INSTALLED.fetch_add(1, Ordering::Relaxed);
                    (id, sink)
                })
            })
            .collect();
        Ok(Self { sinks })
    }

    /// The sink of the `i`-th weight, if it has one.
    pub fn get(&self, i: usize) -> Option<&GradSink> {
        self.sinks.get(i)?.as_ref().map(|(_, s)| &**s)
    }

    /// Drops whatever every sink holds.
    pub fn clear(&self) {
        for (_, s) in self.sinks.iter().flatten() {
            s.clear();
        }
    }
}

impl Drop for SinkSet {
    fn drop(&mut self) {
        let mut map = match registry().write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (id, sink) in self.sinks.iter().flatten() {
            if map.get(id).is_some_and(|s| Arc::ptr_eq(s, sink)) {
                map.remove(id);
                INSTALLED.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// `weight` for candle's own operations, when it has a sink: an identity node whose backward
/// pass hands the gradient candle summed over those operations to the sink (the forward pass
/// copies the weight, so this is for small weights on the composed path). Without a sink,
/// `weight` itself.
pub fn tap(weight: &Tensor) -> candle_core::Result<Tensor> {
    match sink_for(weight) {
        Some(sink) => weight.apply_op1_arc(Arc::new(Box::new(Tap { sink }))),
        None => Ok(weight.clone()),
    }
}

struct Tap {
    sink: Arc<GradSink>,
}

impl CustomOp1 for Tap {
    fn name(&self) -> &'static str {
        "edpo-gradient-tap"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::slice(s, l, "gradient tap")?;
        Ok((CpuStorage::F32(x.to_vec()), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        super::with_f32(&g, |g| {
            self.sink.contribute(|dst| {
                dst.copy_from_slice(g);
                Ok(())
            })
        })??;
        Ok(None)
    }
}

/// Row lookup `table[ids]` (`index_select` along dimension 0) for a table with a sink, whose
/// backward pass adds the rows' gradients to the sink ([`GradSink::contribute_rows`]); without
/// a sink, candle's `index_select`.
pub fn embedding(table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let ids = ids.flatten_all()?;
    match sink_for(table) {
        Some(sink) => table.apply_op1_arc(Arc::new(Box::new(Lookup {
            sink,
            ids: ids.to_vec1::<u32>()?,
        }))),
        None => table.index_select(&ids, 0),
    }
}

struct Lookup {
    sink: Arc<GradSink>,
    ids: Vec<u32>,
}

impl CustomOp1 for Lookup {
    fn name(&self) -> &'static str {
        "edpo-embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let table = super::slice(s, l, "embedding")?;
        let (rows, width) = l.shape().dims2()?;
        let mut out = Vec::with_capacity(self.ids.len() * width);
        for &i in &self.ids {
            if i as usize >= rows {
                bail!("embedding: id {i} outside a table of {rows} rows");
            }
            out.extend_from_slice(&table[i as usize * width..][..width]);
        }
        Ok((CpuStorage::F32(out), Shape::from((self.ids.len(), width))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let width = arg.dim(1)?;
        let g = grad.contiguous()?;
        super::with_f32(&g, |g| self.sink.contribute_rows(&self.ids, g, width))??;
        Ok(None)
    }
}
