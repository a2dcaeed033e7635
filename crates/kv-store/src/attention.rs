//! Attention of new queries over retained KV entries on the CPU: options ([`AttendOptions`]),
//! result ([`AttendOutput`]), the kernel shared by the paged store and by the contiguous baseline
//! ([`attend_dense`]), and argument validation.
//!
//! Kernel invariants:
//! - keys and values are read in place, segment by segment (a block, or a contiguous run), f16 and
//!   bf16 converted on the fly in chunks of at most [`CHUNK`] entries — never gathered whole;
//! - one work unit = one KV head × a tile of query rows; the `G` query heads of the group and all
//!   rows of the tile share each pass over the head's segments (decode: one pass for `G` heads);
//! - softmax is two-pass (scores, then max-shifted exp) with f32 accumulators, so it is stable
//!   for any score magnitude; a query row with no visible key gets a zero output;
//! - key `j` is visible to query row `i` iff (`!causal` or `pos_j <= pos_i`) and (`visible[j]` or
//!   `pos_j == pos_i`);
//! - units run on rayon only when the whole call has at least [`PAR_MIN_WORK`] multiply-adds;
//!   probabilities are summed only when `prob_sums` is requested.

use std::ops::Range;

use rayon::prelude::*;

use crate::simd;
use crate::{KvError, KvSlice};

/// Entries converted (f16/bf16 → f32) per step of a pass.
const CHUNK: usize = 64;

/// Upper bound on the score scratch of one work unit, in f32s (query rows are tiled to fit).
const SCORE_BUDGET: usize = 1 << 18;

/// Multiply-adds (`query vectors × keys × head_dim`) below which a call runs on the calling
/// thread: rayon's fork/join costs more than it saves on short decode contexts.
pub const PAR_MIN_WORK: usize = 1 << 20;

/// Options of one attention call.
#[derive(Debug, Clone)]
pub struct AttendOptions<'a> {
    /// Factor applied to `q · k` before the softmax, usually `1/sqrt(head_dim)`.
    pub scale: f32,
    /// Causal (default): key `j` is visible to query `i` iff `pos_j <= pos_i`. Non-causal: every
    /// retained key is visible (NACL proxy scoring).
    pub causal: bool,
    /// In-context eviction: per KV head, one flag per retained entry of this layer. A key whose
    /// flag is false is visible only to the query at its own position (a token always sees
    /// itself). `None`: all visible.
    pub visible: Option<&'a [Vec<bool>]>,
    /// When `Some(rows)`: also return, per KV head and per retained key, the attention
    /// probability summed over query rows `rows` (indices into the `n_q` rows) and averaged over
    /// the `G` query heads of that KV head's group.
    pub prob_sums: Option<Range<usize>>,
}

impl<'a> AttendOptions<'a> {
    /// Causal attention with `scale`, no visibility mask, no probabilities.
    pub fn new(scale: f32) -> Self {
        AttendOptions {
            scale,
            causal: true,
            visible: None,
            prob_sums: None,
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

    /// Sets [`AttendOptions::visible`].
    pub fn visible(mut self, visible: &'a [Vec<bool>]) -> Self {
        self.visible = Some(visible);
        self
    }

    /// Sets [`AttendOptions::prob_sums`].
    pub fn prob_sums(mut self, rows: Range<usize>) -> Self {
        self.prob_sums = Some(rows);
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
pub(crate) struct Segment<'a> {
    /// Keys `[len, head_dim]`.
    pub(crate) keys: KvSlice<'a>,
    /// Values `[len, head_dim]`.
    pub(crate) values: KvSlice<'a>,
    /// Positions `[len]`.
    pub(crate) positions: &'a [u32],
}

/// All retained entries of one KV head, as segments in order.
pub(crate) struct HeadView<'a> {
    pub(crate) segments: Vec<Segment<'a>>,
    pub(crate) len: usize,
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
            segments: vec![Segment {
                keys: dh.keys,
                values: dh.values,
                positions: dh.positions,
            }],
            len,
        });
    }
    attend_heads(0, &views, head_dim, q, q_positions, opts)
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
    if row != 0 && (n_kv == 0 || n_q_heads == 0 || n_q_heads % n_kv != 0) {
        return Err(KvError::GroupMismatch {
            layer,
            n_q_heads,
            n_kv_heads: n_kv,
        });
    }
    if let Some(vis) = opts.visible {
        if vis.len() != n_kv {
            return Err(KvError::ShapeMismatch {
                layer,
                what: "visible (one Vec per KV head)",
                expected: n_kv,
                got: vis.len(),
            });
        }
        for (head, (flags, hv)) in vis.iter().zip(heads).enumerate() {
            if flags.len() != hv.len {
                return Err(KvError::MaskLength {
                    layer,
                    head,
                    what: "visible",
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

/// One KV head × a tile of query rows.
struct Unit {
    head: usize,
    rows: Range<usize>,
}

/// Output of one unit: `[rows][G][d]`, and its probability sums `[len]` when requested.
struct UnitOut {
    out: Vec<f32>,
    probs: Option<Vec<f32>>,
}

/// Validates and runs attention of `q` over `heads` (one view per KV head of `layer`).
pub(crate) fn attend_heads(
    layer: usize,
    heads: &[HeadView<'_>],
    head_dim: usize,
    q: &[f32],
    q_positions: &[u32],
    opts: &AttendOptions<'_>,
) -> Result<AttendOutput, KvError> {
    let sh = validate(layer, heads, head_dim, q, q_positions, opts)?;
    let mut units = Vec::new();
    let mut work = 0usize;
    for (head, hv) in heads.iter().enumerate() {
        if sh.n_q == 0 {
            break;
        }
        let tile = (SCORE_BUDGET / (sh.group * hv.len.max(1))).max(1);
        let mut r0 = 0;
        while r0 < sh.n_q {
            let r1 = (r0 + tile).min(sh.n_q);
            units.push(Unit { head, rows: r0..r1 });
            r0 = r1;
        }
        work += sh.n_q * sh.group * hv.len * sh.d;
    }
    let run = |u: &Unit| {
        let flags = opts.visible.map(|v| v[u.head].as_slice());
        attend_unit(&heads[u.head], flags, q, q_positions, opts, &sh, u)
    };
    let results: Vec<UnitOut> = if work >= PAR_MIN_WORK && units.len() > 1 {
        units.par_iter().map(run).collect()
    } else {
        units.iter().map(run).collect()
    };

    let mut out = vec![0.0f32; q.len()];
    let mut prob_sums = opts.prob_sums.as_ref().map(|_| {
        heads
            .iter()
            .map(|h| vec![0.0f32; h.len])
            .collect::<Vec<_>>()
    });
    let gd = sh.group * sh.d;
    for (u, r) in units.iter().zip(results) {
        for (i, row) in u.rows.clone().enumerate() {
            let dst = (row * sh.n_q_heads + u.head * sh.group) * sh.d;
            out[dst..dst + gd].copy_from_slice(&r.out[i * gd..(i + 1) * gd]);
        }
        if let (Some(all), Some(p)) = (prob_sums.as_mut(), r.probs) {
            simd::axpy(&mut all[u.head], 1.0, &p);
        }
    }
    Ok(AttendOutput { out, prob_sums })
}

/// The kernel: scores pass over keys, softmax per query vector, output pass over values.
fn attend_unit(
    hv: &HeadView<'_>,
    flags: Option<&[bool]>,
    q: &[f32],
    q_positions: &[u32],
    opts: &AttendOptions<'_>,
    sh: &Shape,
    u: &Unit,
) -> UnitOut {
    let (d, g, len) = (sh.d, sh.group, hv.len);
    let nrows = u.rows.len();
    let nqv = nrows * g;
    let qpos = &q_positions[u.rows.clone()];
    // Gather this group's query vectors, pre-scaled: [nrows * g, d].
    let mut qs = Vec::with_capacity(nqv * d);
    for row in u.rows.clone() {
        let src = (row * sh.n_q_heads + u.head * g) * d;
        qs.extend(q[src..src + g * d].iter().map(|x| x * opts.scale));
    }
    let mut scratch = vec![0.0f32; CHUNK * d];

    // Pass 1: scores [nqv, len].
    let mut scores = vec![0.0f32; nqv * len];
    let mut j = 0;
    for seg in &hv.segments {
        let n = seg.positions.len();
        let mut c0 = 0;
        while c0 < n {
            let c1 = (c0 + CHUNK).min(n);
            let keys = seg.keys.view(c0 * d, c1 * d, &mut scratch);
            for (k, &pos) in keys.chunks_exact(d).zip(&seg.positions[c0..c1]) {
                let shown = flags.is_none_or(|f| f[j]);
                for (r, &qp) in qpos.iter().enumerate() {
                    let vis = (!opts.causal || pos <= qp) && (shown || pos == qp);
                    for gi in 0..g {
                        let qi = r * g + gi;
                        scores[qi * len + j] = if vis {
                            simd::dot(&qs[qi * d..(qi + 1) * d], k)
                        } else {
                            f32::NEG_INFINITY
                        };
                    }
                }
                j += 1;
            }
            c0 = c1;
        }
    }

    // Softmax per query vector, normalised in place.
    for row in scores.chunks_exact_mut(len.max(1)) {
        let m = simd::max(row);
        if m == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let inv = 1.0 / simd::exp_shifted_sum(row, m);
        row.iter_mut().for_each(|p| *p *= inv);
    }

    // Pass 2: out [nqv, d] = P · V.
    let mut out = vec![0.0f32; nqv * d];
    let mut j = 0;
    for seg in &hv.segments {
        let n = seg.positions.len();
        let mut c0 = 0;
        while c0 < n {
            let c1 = (c0 + CHUNK).min(n);
            let values = seg.values.view(c0 * d, c1 * d, &mut scratch);
            for v in values.chunks_exact(d) {
                for (qi, o) in out.chunks_exact_mut(d).enumerate() {
                    let p = scores[qi * len + j];
                    if p != 0.0 {
                        simd::axpy(o, p, v);
                    }
                }
                j += 1;
            }
            c0 = c1;
        }
    }

    let probs = opts.prob_sums.as_ref().map(|want| {
        let mut sums = vec![0.0f32; len];
        let inv_g = 1.0 / g as f32;
        for row in want.start.max(u.rows.start)..want.end.min(u.rows.end) {
            let r = row - u.rows.start;
            for qi in r * g..(r + 1) * g {
                simd::axpy(&mut sums, inv_g, &scores[qi * len..(qi + 1) * len]);
            }
        }
        sums
    });
    UnitOut { out, probs }
}
