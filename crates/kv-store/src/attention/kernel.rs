//! The attention kernel of one work unit ([`attend_part`]: one KV head × a tile of query rows ×
//! a range of the head's entries, read in place chunk by chunk with an online softmax) and the
//! merge of the units' partial results into the call's output ([`merge`]). The invariants are
//! the module's (see `attention/mod.rs`).

use super::{AttendOptions, AttendOutput, HeadView, Shape, Unit};
use crate::simd::{self, CHUNK};

/// Partial result of one unit, per query vector (`[rows][G]`): running max `m`, softmax
/// denominator `l` relative to `m`, un-normalised output `acc` `[.., d]`; and the raw scores
/// `[rows * G, keys.len()]` when probabilities were requested.
pub(super) struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
    scores: Option<Vec<f32>>,
}

impl Partial {
    /// The state before any key of `nqv` query vectors: no maximum, zero denominators and
    /// outputs, and `klen` raw scores per query vector (`-inf` until computed) when
    /// `keep_scores`.
    fn empty(nqv: usize, d: usize, klen: usize, keep_scores: bool) -> Self {
        Partial {
            m: vec![f32::NEG_INFINITY; nqv],
            l: vec![0.0f32; nqv],
            acc: vec![0.0f32; nqv * d],
            scores: keep_scores.then(|| vec![f32::NEG_INFINITY; nqv * klen]),
        }
    }
}

/// The unit's query vectors (its rows' `G` query heads of its KV head), pre-scaled by `scale`:
/// `[rows * G, d]`.
fn unit_queries(q: &[f32], sh: &Shape, u: &Unit, scale: f32) -> Vec<f32> {
    let (d, g) = (sh.d, sh.group);
    let mut qs = Vec::with_capacity(u.rows.len() * g * d);
    for row in u.rows.clone() {
        let src = (row * sh.n_q_heads + u.head * g) * d;
        qs.extend(q[src..src + g * d].iter().map(|x| x * scale));
    }
    qs
}

/// Sets to `-inf` the scores of the keys a query row does not see: row `r` of the tile owns `G`
/// score vectors of [`CHUNK`] keys in `s`, and key `j` stays only where bit `j` of `shown[r]` is
/// set.
#[inline]
fn hide_scores(s: &mut [f32], shown: &[u32], g: usize) {
    for (r, &bits) in shown.iter().enumerate() {
        for sq in s[r * g * CHUNK..(r + 1) * g * CHUNK].chunks_exact_mut(CHUNK) {
            for (j, x) in sq.iter_mut().enumerate() {
                if bits >> j & 1 == 0 {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// Combines the partials of each (head, row tile) into normalised outputs and, when requested,
/// probability sums.
pub(super) fn merge(
    heads: &[HeadView<'_>],
    sh: &Shape,
    opts: &AttendOptions<'_>,
    units: &[Unit],
    partials: &[Partial],
    out_len: usize,
) -> AttendOutput {
    let (d, g) = (sh.d, sh.group);
    let mut out = vec![0.0f32; out_len];
    let mut prob_sums = opts.prob_sums.as_ref().map(|_| {
        heads
            .iter()
            .map(|h| vec![0.0f32; h.len])
            .collect::<Vec<_>>()
    });
    let mut i = 0;
    while i < units.len() {
        let (head, rows) = (units[i].head, units[i].rows.clone());
        let n = units[i..]
            .iter()
            .take_while(|u| u.head == head && u.rows == rows)
            .count();
        let (group_units, group) = (&units[i..i + n], &partials[i..i + n]);
        i += n;
        for qi in 0..rows.len() * g {
            let m = group.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.m[qi]));
            if m == f32::NEG_INFINITY {
                continue; // no visible key: zero output, zero probabilities
            }
            let factors: Vec<f32> = group.iter().map(|p| simd::exp(p.m[qi] - m)).collect();
            let inv_l = 1.0
                / group
                    .iter()
                    .zip(&factors)
                    .map(|(p, f)| p.l[qi] * f)
                    .sum::<f32>();
            let (row, gi) = (rows.start + qi / g, qi % g);
            let dst = (row * sh.n_q_heads + head * g + gi) * d;
            let o = &mut out[dst..dst + d];
            for (p, f) in group.iter().zip(&factors) {
                simd::axpy(o, f * inv_l, &p.acc[qi * d..(qi + 1) * d]);
            }
            let (Some(sums), Some(want)) = (prob_sums.as_mut(), opts.prob_sums.as_ref()) else {
                continue;
            };
            if !want.contains(&row) {
                continue;
            }
            for (u, p) in group_units.iter().zip(group) {
                let Some(scores) = &p.scores else { continue };
                let klen = u.keys.len();
                let dst = &mut sums[head][u.keys.clone()];
                let inv = inv_l / g as f32;
                for (acc, &s) in dst.iter_mut().zip(&scores[qi * klen..(qi + 1) * klen]) {
                    *acc += simd::exp(s - m) * inv;
                }
            }
        }
    }
    AttendOutput { out, prob_sums }
}

/// The kernel: one pass over the unit's key range in chunks of at most [`CHUNK`] entries
/// (never across a segment boundary). Per chunk: the keys, converted to f32 and transposed,
/// give the scores of every query vector of the unit at once; masked scores become `-inf`; an
/// online softmax per query vector turns them into weights; the values, converted once, are
/// accumulated for every query vector.
pub(super) fn attend_part(
    hv: &HeadView<'_>,
    until: Option<&[u32]>,
    q: &[f32],
    q_positions: &[u32],
    opts: &AttendOptions<'_>,
    sh: &Shape,
    u: &Unit,
) -> Partial {
    let (d, g) = (sh.d, sh.group);
    let nqv = u.rows.len() * g;
    let klen = u.keys.len();
    let qpos = &q_positions[u.rows.clone()];
    let last_pos = qpos.iter().copied().max().unwrap_or(0);
    let qs = unit_queries(q, sh, u, opts.scale);
    let mut p = Partial::empty(nqv, d, klen, opts.prob_sums.is_some());
    let mut scratch = vec![0.0f32; CHUNK * d];
    let mut kt = vec![0.0f32; d * CHUNK];
    let mut s = vec![0.0f32; nqv * CHUNK];
    let mut shown = vec![0u32; u.rows.len()];

    let mut seg_start = 0;
    let segments = hv.segments.list();
    for (i, seg) in segments.iter().enumerate() {
        let n = seg.positions.len();
        if let Some(next) = segments.get(i + 1).filter(|_| seg_start + n < u.keys.end) {
            // A segment is a block anywhere in the pool: start loading the next one now.
            next.keys.prefetch();
            next.values.prefetch();
        }
        let (lo, hi) = (u.keys.start.max(seg_start), u.keys.end.min(seg_start + n));
        let base = seg_start;
        seg_start += n;
        let mut c0 = lo.saturating_sub(base);
        while lo < hi && c0 < hi - base {
            let c1 = (c0 + CHUNK).min(hi - base);
            let cn = c1 - c0;
            let pos = &seg.positions[c0..c1];
            let j0 = base + c0; // index of the chunk's first entry in the head
            c0 = c1;
            if opts.causal && pos.iter().all(|&p| p > last_pos) {
                continue; // the whole chunk is in every row's future (prefill)
            }
            let every = (1u32 << cn) - 1;
            let (mut any, mut all) = (0u32, every);
            for (bits, &qp) in shown.iter_mut().zip(qpos) {
                *bits = visible_bits(pos, until.map(|u| &u[j0..j0 + cn]), qp, opts.causal);
                any |= *bits;
                all &= *bits;
            }
            if any == 0 {
                continue;
            }
            seg.keys
                .keys_transposed(c1 - cn, cn, d, &mut scratch, &mut kt);
            simd::scores_transposed(&qs, &kt, d, &mut s);
            if all != every || cn < CHUNK {
                hide_scores(&mut s, &shown, g);
            }
            if let Some(sc) = p.scores.as_mut() {
                let at = j0 - u.keys.start;
                for (qi, sq) in s.chunks_exact(CHUNK).enumerate() {
                    sc[qi * klen + at..qi * klen + at + cn].copy_from_slice(&sq[..cn]);
                }
            }
            simd::softmax_chunk(&mut s, &mut p.m, &mut p.l, &mut p.acc, d);
            seg.values
                .add_weighted(c1 - cn, cn, d, &s, &mut scratch, &mut p.acc);
        }
        if seg_start >= u.keys.end {
            break;
        }
    }
    p
}

/// Bit `j` set iff entry `j` of a chunk (positions `pos`, last visible query positions `until`)
/// is visible to the query at `qp` (see the module's visibility rule).
#[inline]
fn visible_bits(pos: &[u32], until: Option<&[u32]>, qp: u32, causal: bool) -> u32 {
    let mut bits = 0u32;
    for (j, &pj) in pos.iter().enumerate() {
        let shown = until.is_none_or(|u| qp <= u[j]);
        if (!causal || pj <= qp) && shown {
            bits |= 1 << j;
        }
    }
    bits
}
