//! The decoder's one CPU thread pool ([`CpuPool`]): candle's spin-barrier pool, on which candle's
//! quantized kernels, the packed projections and the KV store's attention all run. A second pool
//! (rayon's) spinning on the same cores between the layer's matrix products and its attention
//! costs each handoff a scheduler quantum on a 2-core machine; one pool hands work over in
//! microseconds.
//!
//! Invariant: work is only ever split over the pool's threads from outside the pool (a call made
//! from inside a pool thread runs inline, candle's own rule), so nested calls cannot deadlock.

use std::ops::Range;

/// Handle to candle's process-wide barrier pool (sized by `RAYON_NUM_THREADS` /
/// `CANDLE_NUM_THREADS` when first used).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuPool;

/// Multiply-adds below which attention stays on the calling thread: the pool's handoff costs a
/// few microseconds, about what 2^17 multiply-adds take.
const ATTENTION_MIN_WORK: usize = 1 << 17;

impl CpuPool {
    /// Calls `f` on disjoint ranges covering `0..n`, spread over the pool's threads.
    pub fn run_chunked(n: usize, f: impl Fn(Range<usize>) + Sync) {
        candle_core::utils::barrier_pool().execute_chunked(n, f);
    }
}

impl kv_store::Parallel for CpuPool {
    fn threads(&self) -> usize {
        candle_core::utils::barrier_pool().n_workers() + 1
    }

    fn min_work(&self) -> usize {
        ATTENTION_MIN_WORK
    }

    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        Self::run_chunked(n, |r| r.for_each(f));
    }
}
