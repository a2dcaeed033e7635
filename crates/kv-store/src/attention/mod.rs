//! Attention of new queries over retained KV entries on the CPU: options ([`AttendOptions`]),
//! result ([`AttendOutput`]), the kernel shared by the paged store and by the contiguous baseline
//! ([`attend_dense`]), and argument validation.
//!
//! Kernel invariants:
//! - keys and values are read in place, one chunk of at most [`CHUNK`](crate::simd::CHUNK) entries at a time (a
//!   block, or a slice of a contiguous run), converted to f32 on the fly (keys transposed) —
//!   never gathered whole; each chunk's keys and values are read and converted once per work
//!   unit, for all its query vectors (one score vector of 16 keys per query vector); while a
//!   segment (a pool block, which may lie anywhere in memory after evictions) is computed, the
//!   next one is prefetched into L2, so a compacted cache reads as fast per entry as one whose
//!   blocks were allocated in order;
//! - one work unit = one KV head × a tile of query rows × a range of the head's entries; the `G`
//!   query heads of the group and the tile's rows share each pass (decode: one pass for `G`
//!   heads); parallel calls split long heads into key ranges (split-K) so that every thread works;
//! - softmax is online (running max and denominator per query vector, f32 accumulators), and
//!   split-K partials are merged by the same max-shift rule, so it is stable for any score
//!   magnitude; a query row with no visible key gets a zero output and zero probabilities;
//! - key `j` is visible to query row `i` iff (`!causal` or `pos_j <= pos_i`) and
//!   `pos_i <= visible_until[j]` (when a `visible_until` mask is given);
//! - units run in parallel (on rayon, or on the caller's [`Parallel`] pool) only when the whole
//!   call has at least [`Parallel::min_work`] multiply-adds ([`PAR_MIN_WORK`] for rayon); a
//!   batch of calls ([`SequenceKv::attend_batch`](crate::SequenceKv::attend_batch): one per
//!   sequence) runs all their units in one job, by the same rule on their summed work, while
//!   each call is split into the units it gets alone: its results do not depend on the batch;
//! - raw scores are kept, and probabilities summed, only when `prob_sums` is requested.
//!
//! Layout: the kernel of one work unit and the merge of partial results are in `kernel.rs`, the
//! portable-versus-SIMD test in `tests.rs`; here the API, validation, the split into units and
//! the dispatch of units to threads.

mod kernel;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::ops::Range;

use rayon::prelude::*;

use crate::sequence::HeadTable;
use crate::{KvError, KvSlice, PoolConfig};
use kernel::{attend_part, merge, Partial};

/// Upper bound on `query vectors × keys` of one work unit when probabilities are requested (query
/// rows are tiled to fit): it bounds the raw-score buffer kept for them.
const SCORE_BUDGET: usize = 1 << 18;

/// Query vectors (rows × group) a work unit aims at: each chunk of keys and values is converted
/// once per unit and used by all of them, while their state (about `2d + 16` floats each, with
/// the scaled query) stays in L1/L2. 32, 64 and 96 measured within 4% of each other (prefill of
/// 512 rows over 4k f16 entries, one thread).
const TILE_QUERY_VECTORS: usize = 64;

/// Work units aimed at per thread when a call runs in parallel.
const UNITS_PER_THREAD: usize = 4;

/// Fewest keys in a split-K part.
const MIN_PART_KEYS: usize = 512;

/// Multiply-adds (`query vectors × keys × head_dim`) below which a call runs on the calling
/// thread when it would run on rayon: rayon's fork/join costs more than it saves on short
/// decode contexts.
pub const PAR_MIN_WORK: usize = 1 << 20;

/// A thread pool an attention call can run its work units on, instead of rayon's global pool:
/// a decoder passes the pool its matrix products run on, so that one pool serves the whole
/// forward pass and two pools never spin against each other on the same cores.
pub trait Parallel: Sync + std::fmt::Debug {
    /// Threads the pool runs work on (the caller's included).
    fn threads(&self) -> usize;
    /// Multiply-adds below which a call stays on the calling thread (the pool's handoff cost).
    fn min_work(&self) -> usize {
        PAR_MIN_WORK
    }
    /// Calls `f(i)` for every `i < n`, possibly on several threads; returns when all returned.
    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync));
}

/// Options of one attention call.
#[derive(Debug, Clone)]
pub struct AttendOptions<'a> {
    /// Factor applied to `q · k` before the softmax, usually `1/sqrt(head_dim)`.
    pub scale: f32,
    /// Causal (default): key `j` is visible to query `i` iff `pos_j <= pos_i`. Non-causal: every
    /// retained key is visible (NACL proxy scoring).
    pub causal: bool,
    /// In-context eviction: per KV head, one position per retained entry of this layer, the
    /// last query position that still sees the key (`u32::MAX`: every later query). A key is
    /// hidden from the queries after that position, as if it had been evicted right after
    /// attending them, which is how policies that evict inside a prefill chunk mask what they
    /// will remove. A value below the key's own position hides it from itself too; policies
    /// give at least the key's position. `None`: all visible.
    pub visible_until: Option<&'a [Vec<u32>]>,
    /// When `Some(rows)`: also return, per KV head and per retained key, the attention
    /// probability summed over query rows `rows` (indices into the `n_q` rows) and averaged over
    /// the `G` query heads of that KV head's group.
    pub prob_sums: Option<Range<usize>>,
    /// The pool parallel calls run on; `None`: rayon's global pool.
    pub parallel: Option<&'a dyn Parallel>,
}

impl<'a> AttendOptions<'a> {
    /// Causal attention with `scale`, no visibility mask, no probabilities.
    pub fn new(scale: f32) -> Self {
        AttendOptions {
            scale,
            causal: true,
            visible_until: None,
            prob_sums: None,
            parallel: None,
        }
    }

    /// [`AttendOptions::new`] with `scale = 1/sqrt(head_dim)`.
    pub fn for_head_dim(head_dim: usize) -> Self {
        Self::new(1.0 / (head_dim.max(1) as f32).sqrt())
    }

    /// Sets [`AttendOptions::causal`].
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Sets [`AttendOptions::visible_until`].
    pub fn visible_until(mut self, visible_until: &'a [Vec<u32>]) -> Self {
        self.visible_until = Some(visible_until);
        self
    }

    /// Sets [`AttendOptions::prob_sums`].
    pub fn prob_sums(mut self, rows: Range<usize>) -> Self {
        self.prob_sums = Some(rows);
        self
    }

    /// Sets [`AttendOptions::parallel`].
    pub fn parallel(mut self, pool: &'a dyn Parallel) -> Self {
        self.parallel = Some(pool);
        self
    }
}

impl Default for AttendOptions<'_> {
    /// Causal, `scale = 1`, no mask, no probabilities.
    fn default() -> Self {
        Self::new(1.0)
    }
}

/// Result of an attention call.
#[derive(Debug, Clone, PartialEq)]
pub struct AttendOutput {
    /// Token-major `[n_q, n_q_heads, head_dim]`.
    pub out: Vec<f32>,
    /// `[kv_head][retained]` probability sums, when requested.
    pub prob_sums: Option<Vec<Vec<f32>>>,
}

/// A contiguous run of one KV head's retained entries.
#[derive(Clone, Copy)]
pub(crate) struct Segment<'a> {
    /// Keys `[len, head_dim]`.
    pub(crate) keys: KvSlice<'a>,
    /// Values `[len, head_dim]`.
    pub(crate) values: KvSlice<'a>,
    /// Positions `[len]`.
    pub(crate) positions: &'a [u32],
}

/// All retained entries of one KV head: their count, and their segments in order.
pub(crate) struct HeadView<'a> {
    pub(crate) segments: Segments<'a>,
    pub(crate) len: usize,
}

/// The segments of a [`HeadView`].
pub(crate) enum Segments<'a> {
    /// Listed up front (the contiguous baseline: one segment).
    Listed(Vec<Segment<'a>>),
    /// A paged table, one segment per block, listed by each work unit that reads them: on the
    /// pool's threads, where reading the blocks' scattered headers (a cache miss each, after a
    /// pass over the weights) overlaps other units' work instead of delaying the handoff.
    Table(&'a HeadTable, &'a PoolConfig),
}

impl<'a> Segments<'a> {
    fn list(&self) -> Cow<'_, [Segment<'a>]> {
        match self {
            Segments::Listed(s) => Cow::Borrowed(s),
            Segments::Table(table, cfg) => Cow::Owned(table.segments(cfg)),
        }
    }
}

/// One KV head of a contiguous (dense) cache, for [`attend_dense`].
#[derive(Debug, Clone, Copy)]
pub struct DenseHead<'a> {
    /// Keys `[len, head_dim]`.
    pub keys: KvSlice<'a>,
    /// Values `[len, head_dim]`.
    pub values: KvSlice<'a>,
    /// Positions `[len]`.
    pub positions: &'a [u32],
}

/// The contiguous baseline: the same kernel and semantics as
/// [`SequenceKv::attend`](crate::SequenceKv::attend), over one contiguous buffer per KV head
/// instead of blocks. Used by benchmarks and tests; errors name layer 0.
pub fn attend_dense(
    heads: &[DenseHead<'_>],
    head_dim: usize,
    q: &[f32],
    q_positions: &[u32],
    opts: &AttendOptions<'_>,
) -> Result<AttendOutput, KvError> {
    if head_dim == 0 {
        return Err(KvError::InvalidConfig {
            field: "head_dim",
            value: 0,
        });
    }
    let mut views = Vec::with_capacity(heads.len());
    for dh in heads {
        let len = dh.positions.len();
        for (what, got) in [("keys", dh.keys.len()), ("values", dh.values.len())] {
            if got != len * head_dim {
                return Err(KvError::ShapeMismatch {
                    layer: 0,
                    what,
                    expected: len * head_dim,
                    got,
                });
            }
        }
        views.push(HeadView {
            segments: Segments::Listed(vec![Segment {
                keys: dh.keys,
                values: dh.values,
                positions: dh.positions,
            }]),
            len,
        });
    }
    attend_heads(HeadsCall {
        layer: 0,
        heads: views,
        head_dim,
        q,
        q_positions,
        opts,
    })
}

/// Shape of a validated call.
struct Shape {
    d: usize,
    n_q: usize,
    n_q_heads: usize,
    group: usize,
}

fn validate(
    layer: usize,
    heads: &[HeadView<'_>],
    d: usize,
    q: &[f32],
    q_positions: &[u32],
    opts: &AttendOptions<'_>,
) -> Result<Shape, KvError> {
    let n_kv = heads.len();
    let n_q = q_positions.len();
    let row = n_q * d;
    let n_q_heads = q.len().checked_div(row).unwrap_or(0);
    if row == 0 && !q.is_empty() {
        return Err(KvError::ShapeMismatch {
            layer,
            what: "q",
            expected: 0,
            got: q.len(),
        });
    }
    if row != 0 && n_q_heads * row != q.len() {
        let expected = row * n_kv.max(1) * (n_q_heads / n_kv.max(1)).max(1);
        return Err(KvError::ShapeMismatch {
            layer,
            what: "q",
            expected,
            got: q.len(),
        });
    }
    if row != 0 && (n_kv == 0 || n_q_heads == 0 || !n_q_heads.is_multiple_of(n_kv)) {
        return Err(KvError::GroupMismatch {
            layer,
            n_q_heads,
            n_kv_heads: n_kv,
        });
    }
    if let Some(vis) = opts.visible_until {
        if vis.len() != n_kv {
            return Err(KvError::ShapeMismatch {
                layer,
                what: "visible_until (one Vec per KV head)",
                expected: n_kv,
                got: vis.len(),
            });
        }
        for (head, (flags, hv)) in vis.iter().zip(heads).enumerate() {
            if flags.len() != hv.len {
                return Err(KvError::MaskLength {
                    layer,
                    head,
                    what: "visible_until",
                    retained: hv.len,
                    got: flags.len(),
                });
            }
        }
    }
    if let Some(r) = &opts.prob_sums {
        if r.start > r.end || r.end > n_q {
            return Err(KvError::RowRange {
                layer,
                start: r.start,
                end: r.end,
                n_q,
            });
        }
    }
    let group = n_q_heads.checked_div(n_kv).unwrap_or(0);
    Ok(Shape {
        d,
        n_q,
        n_q_heads,
        group,
    })
}

/// One KV head × a tile of query rows × a range of that head's retained entries.
struct Unit {
    head: usize,
    rows: Range<usize>,
    keys: Range<usize>,
}

/// Splits the call into units: row tiles of about [`TILE_QUERY_VECTORS`] query vectors (fewer
/// when the raw scores of [`SCORE_BUDGET`] must be kept) and, when the call alone would run in
/// parallel, key ranges of at least [`MIN_PART_KEYS`] so that every thread gets work even with
/// few KV heads (split-K, merged by [`merge`]). Returns the units and the call's multiply-adds.
/// The split depends on this call and its options only, never on the calls it runs with.
fn plan(heads: &[HeadView<'_>], sh: &Shape, opts: &AttendOptions<'_>) -> (Vec<Unit>, usize) {
    let work: usize = heads.iter().map(|h| sh.n_q * sh.group * h.len * sh.d).sum();
    let (threads, min_work) = pool_size(opts.parallel);
    let parallel = work >= min_work && threads > 1;
    let rows_per_tile = TILE_QUERY_VECTORS.div_ceil(sh.group.max(1));
    let tiles: Vec<usize> = heads
        .iter()
        .map(|h| match opts.prob_sums {
            Some(_) => (SCORE_BUDGET / (sh.group.max(1) * h.len.max(1))).clamp(1, rows_per_tile),
            None => rows_per_tile,
        })
        .collect();
    let base_units: usize = tiles.iter().map(|t| sh.n_q.div_ceil(*t)).sum();
    let parts = if parallel {
        (UNITS_PER_THREAD * threads).div_ceil(base_units.max(1))
    } else {
        1
    };
    let mut units = Vec::new();
    for (head, (hv, tile)) in heads.iter().zip(tiles).enumerate() {
        let parts = parts.min(hv.len / MIN_PART_KEYS).max(1);
        let mut r0 = 0;
        while r0 < sh.n_q {
            let r1 = (r0 + tile).min(sh.n_q);
            for p in 0..parts {
                let keys = hv.len * p / parts..hv.len * (p + 1) / parts;
                units.push(Unit {
                    head,
                    rows: r0..r1,
                    keys,
                });
            }
            r0 = r1;
        }
    }
    (units, work)
}

/// Threads of `pool` (rayon's global pool when `None`) and the multiply-adds below which work
/// stays on the calling thread.
fn pool_size(pool: Option<&dyn Parallel>) -> (usize, usize) {
    match pool {
        Some(p) => (p.threads(), p.min_work()),
        None => (rayon::current_num_threads(), PAR_MIN_WORK),
    }
}

/// A validated call split into units ([`plan`]), and its multiply-adds.
struct Planned {
    shape: Shape,
    units: Vec<Unit>,
    work: usize,
}

/// One attention call of [`attend_calls`]: `q` of new query rows at `q_positions` over `heads`
/// (one view per KV head of `layer`).
pub(crate) struct HeadsCall<'a> {
    pub(crate) layer: usize,
    pub(crate) heads: Vec<HeadView<'a>>,
    pub(crate) head_dim: usize,
    pub(crate) q: &'a [f32],
    pub(crate) q_positions: &'a [u32],
    pub(crate) opts: &'a AttendOptions<'a>,
}

/// Validates and runs one attention call; its units run on `opts.parallel` (rayon when `None`).
pub(crate) fn attend_heads(call: HeadsCall<'_>) -> Result<AttendOutput, KvError> {
    let pool = call.opts.parallel;
    attend_calls(&[call], pool)
        .pop()
        .expect("one result per call")
}

/// Validates and runs several attention calls (e.g. one per sequence of a batch) as one job:
/// each call is validated and split into units exactly as it is alone ([`plan`]), and the units
/// of all of them run together, in parallel on `pool` (rayon when `None`) when their summed
/// work reaches the pool's threshold, so a batch of short calls costs one handoff instead of
/// one each, and its threads share out every call's units. A call's result is therefore bit for
/// bit what it gets alone. Returns one result per call, in order.
pub(crate) fn attend_calls(
    calls: &[HeadsCall<'_>],
    pool: Option<&dyn Parallel>,
) -> Vec<Result<AttendOutput, KvError>> {
    let planned: Vec<Result<Planned, KvError>> = calls
        .iter()
        .map(|c| {
            let shape = validate(c.layer, &c.heads, c.head_dim, c.q, c.q_positions, c.opts)?;
            let (units, work) = plan(&c.heads, &shape, c.opts);
            Ok(Planned { shape, units, work })
        })
        .collect();
    // Every unit of every valid call, as (call, unit index).
    let items: Vec<(usize, usize)> = planned
        .iter()
        .enumerate()
        .filter_map(|(c, p)| p.as_ref().ok().map(|p| (c, p.units.len())))
        .flat_map(|(c, n)| (0..n).map(move |u| (c, u)))
        .collect();
    let work: usize = planned.iter().flatten().map(|p| p.work).sum();
    let run = |&(c, u): &(usize, usize)| {
        let (call, p) = (&calls[c], planned[c].as_ref().expect("a valid call"));
        let unit = &p.units[u];
        let until = call.opts.visible_until.map(|v| v[unit.head].as_slice());
        attend_part(
            &call.heads[unit.head],
            until,
            call.q,
            call.q_positions,
            call.opts,
            &p.shape,
            unit,
        )
    };
    let (threads, min_work) = pool_size(pool);
    let parallel = work >= min_work && threads > 1 && items.len() > 1;
    let partials: Vec<Partial> = match (parallel, pool) {
        (false, _) => items.iter().map(run).collect(),
        (true, None) => items.par_iter().map(run).collect(),
        (true, Some(pool)) => {
            let slots: Vec<std::sync::OnceLock<Partial>> =
                items.iter().map(|_| std::sync::OnceLock::new()).collect();
            pool.for_each(items.len(), &|i| {
                let _ = slots[i].set(run(&items[i]));
            });
            // A unit the pool skipped (a broken pool) runs here: the result never misses one.
            slots
                .into_iter()
                .zip(&items)
                .map(|(slot, item)| slot.into_inner().unwrap_or_else(|| run(item)))
                .collect()
        }
    };
    // Each valid call's partials are a run of `partials`, in call order.
    let mut rest = partials.into_iter();
    calls
        .iter()
        .zip(planned)
        .map(|(call, p)| {
            let p = p?;
            let mine: Vec<Partial> = rest.by_ref().take(p.units.len()).collect();
            Ok(merge(
                &call.heads,
                &p.shape,
                call.opts,
                &p.units,
                &mine,
                call.q.len(),
            ))
        })
        .collect()
}
