//! The decode step's projection `y = W x` ([`HostMatrix`]): the gate's `wq`, `wk`, `wv` rows as
//! host copies, read once per token and layer (the default gates' 30 layers hold 6.6 M weights,
//! more than the L3 cache: the step streams them from memory, so their bytes set its cost), and
//! [`Int4Rows`], the 4-bit rounding of those rows a session's gates run with.
//!
//! Invariants:
//! - the weights are held as 4-bit codes and scales when built from [`Int4Rows`] (the values
//!   `d·q` the rounded gate's prefill also uses: 0.625 bytes a weight), else as f16
//!   when every weight is exactly an f16 value (gates loaded from an f16 file: half the bytes,
//!   the same values), else as f32; either way `y` is the exact products of those values summed
//!   in f32, so it equals the f32 computation up to the order of the additions (f32 rounding);
//! - [`Int4Rows`]: per row and [`CODE_BLOCK`]-column block (the last one may be shorter) a
//!   scale `d = max|w| / 7` and codes `q = round(w / d)` in `[-7, 7]`; a weight's value is
//!   `d·q`, within `d/2` of `w`, and finite (`7 d` stays finite even for `max|w| = f32::MAX`:
//!   `f32::MAX / 7` rounds down); a block whose `d` would not be a normal f32 (`max|w|` below
//!   `7 × f32::MIN_POSITIVE`, about 8e-38, where `w / d` loses its precision) has `d = 0` and
//!   all codes 0;
//! - layout: rows in groups of [`GROUP`], each group's rows interleaved in chunks of [`LANES`]
//!   columns (chunk `c` of the group's row `i` at `(c * k + i) * LANES` after the group's
//!   start, `k` its rows), each row padded with zeros to a whole number of chunks; codes go
//!   two to a byte, a block's [`LANES`] bytes one chunk (byte `l` holds column `l` in its low
//!   nibble and column `LANES + l` in its high one), their scales in the same order (block `b`
//!   of row `i` at `b * k + i` after the group's first scale): the kernel computes a group's
//!   rows at once and reads the weights as one sequential stream, which the hardware
//!   prefetcher follows (rows read side by side are separate short streams);
//! - on AVX-512 (runtime detected, F16C conversion in registers) each row of a group has its
//!   own accumulator register and every load of `x` serves the whole group; elsewhere a portable
//!   loop of the same shape; both give the same sums up to f32 rounding;
//! - [`HostMatrix::matvec`] shares groups out over candle's CPU thread pool (the decoder's,
//!   whose threads also stream the model's weights); a row's sum does not depend on which
//!   thread computes it or with which rows.
//!
//! Files: this one holds the layout, the rounding and the kernels; `tests.rs` the tests.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

use half::f16;

/// Rows of the projection below which [`HostMatrix::matvec`] stays on the calling thread (a
/// handoff to the pool costs a few microseconds, about what this many 576-wide rows take).
const PARALLEL_MIN_ROWS: usize = 64;

/// Lanes of one AVX-512 register of f32: the column chunk of the layout.
const LANES: usize = 16;

/// Rows computed at once, interleaved in the layout (the AVX-512 4-bit kernel names 1 to 4).
const GROUP: usize = 4;

/// Columns per scale of [`Int4Rows`] (GGUF's Q4_0 block): two chunks of the layout.
pub(super) const CODE_BLOCK: usize = 2 * LANES;

/// The largest code of [`Int4Rows`]: symmetric codes in `[-7, 7]`.
const CODE_MAX: i8 = 7;

/// A row-major `[rows, cols]` matrix rounded to 4 bits per row and [`CODE_BLOCK`] columns
/// (module header).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Int4Rows {
    cols: usize,
    /// `[rows, cols]`, one code per element.
    codes: Vec<i8>,
    /// `[rows, cols.div_ceil(CODE_BLOCK)]`.
    scales: Vec<f32>,
}

impl Int4Rows {
    /// The row-major matrix `w` (`[w.len() / cols, cols]`) rounded to 4 bits.
    pub(super) fn round(w: &[f32], cols: usize) -> Self {
        let max = f32::from(CODE_MAX);
        let mut codes = Vec::with_capacity(w.len());
        let mut scales = Vec::with_capacity(w.len().div_ceil(CODE_BLOCK));
        for row in w.chunks(cols.max(1)) {
            for block in row.chunks(CODE_BLOCK) {
                let d = block.iter().fold(0f32, |m, v| m.max(v.abs())) / max;
                let d = if d.is_normal() { d } else { 0.0 };
                scales.push(d);
                // |v / d| <= 7 to f32 rounding, so it rounds into [-7, 7].
                codes.extend(block.iter().map(|&v| match d > 0.0 {
                    true => (v / d).round() as i8,
                    false => 0,
                }));
            }
        }
        Int4Rows {
            cols,
            codes,
            scales,
        }
    }

    /// The codes block by block, row by row (the order of `scales`; a row's last block may be
    /// shorter).
    fn blocks(&self) -> impl Iterator<Item = &[i8]> {
        self.codes
            .chunks(self.cols.max(1))
            .flat_map(|row| row.chunks(CODE_BLOCK))
    }

    /// The values `d·q`, row-major.
    pub(super) fn values(&self) -> Vec<f32> {
        self.blocks()
            .zip(&self.scales)
            .flat_map(|(block, &d)| block.iter().map(move |&q| d * f32::from(q)))
            .collect()
    }
}

/// `w` (`[rows, cols]`, row-major) in the layout of the module header: groups of [`GROUP`] rows,
/// each row cut in chunks of `chunk` values interleaved with the group's other rows, each row
/// padded with zeros to `padded` values.
fn interleave<T: Copy + Default>(w: &[T], cols: usize, padded: usize, chunk: usize) -> Vec<T> {
    let rows = w.len().checked_div(cols).unwrap_or(0);
    let mut out = vec![T::default(); rows * padded];
    for (g, group) in w.chunks(GROUP * cols.max(1)).enumerate() {
        let k = group.len() / cols;
        let dst = &mut out[g * GROUP * padded..];
        for (i, row) in group.chunks_exact(cols).enumerate() {
            for (c, part) in row.chunks(chunk).enumerate() {
                let at = (c * k + i) * chunk;
                dst[at..at + part.len()].copy_from_slice(part);
            }
        }
    }
    out
}

/// The weights of a [`HostMatrix`] in the packed layout.
#[derive(Debug, Clone)]
enum Packed {
    /// Every weight is an f16 value.
    F16(Vec<f16>),
    /// Some weight is not.
    F32(Vec<f32>),
    /// Built from [`Int4Rows`]: codes two to a byte in the layout, one scale per row and block.
    Int4 { codes: Vec<u8>, scales: Vec<f32> },
}

/// A `[rows, cols]` matrix in the packed layout (module header): 4-bit when built from
/// [`Int4Rows`], else f16 when that is exact, else f32.
#[derive(Debug, Clone)]
pub(super) struct HostMatrix {
    rows: usize,
    cols: usize,
    w: Packed,
}

impl HostMatrix {
    /// The row-major matrix `w` (`[w.len() / cols, cols]`), packed, narrowed to f16 if no
    /// value changes.
    pub(super) fn new(w: &[f32], cols: usize) -> Self {
        let rows = w.len().checked_div(cols).unwrap_or(0);
        let packed = interleave(w, cols, cols.div_ceil(LANES) * LANES, LANES);
        let w = if packed.iter().all(|&v| f16::from_f32(v).to_f32() == v) {
            Packed::F16(packed.iter().map(|&v| f16::from_f32(v)).collect())
        } else {
            Packed::F32(packed)
        };
        HostMatrix { rows, cols, w }
    }

    /// The rounded matrix `m`, held as its codes (two to a byte) and scales.
    pub(super) fn from_int4(m: &Int4Rows) -> Self {
        let (cols, blocks) = (m.cols, m.cols.div_ceil(CODE_BLOCK));
        // Each row's blocks as LANES bytes each: column l low, column LANES + l high.
        let nibbles = |q: i8| q as u8 & 0x0f;
        let mut bytes = Vec::with_capacity(m.scales.len() * LANES);
        for block in m.blocks() {
            let code = |j: usize| block.get(j).copied().map_or(0, nibbles);
            bytes.extend((0..LANES).map(|l| code(l) | code(LANES + l) << 4));
        }
        let codes = interleave(&bytes, blocks * LANES, blocks * LANES, LANES);
        let scales = interleave(&m.scales, blocks, blocks, 1);
        HostMatrix {
            rows: m.codes.len().checked_div(cols).unwrap_or(0),
            cols,
            w: Packed::Int4 { codes, scales },
        }
    }

    /// The length of `x` in the layout: `cols` padded to whole chunks (blocks, for codes).
    fn width(&self) -> usize {
        let unit = match self.w {
            Packed::Int4 { .. } => CODE_BLOCK,
            Packed::F16(_) | Packed::F32(_) => LANES,
        };
        self.cols.div_ceil(unit) * unit
    }

    /// Bytes of weights (codes and scales included) one [`HostMatrix::matvec`] reads.
    pub(super) fn bytes(&self) -> usize {
        match &self.w {
            Packed::F16(w) => std::mem::size_of_val(w.as_slice()),
            Packed::F32(w) => std::mem::size_of_val(w.as_slice()),
            Packed::Int4 { codes, scales } => {
                codes.len() + std::mem::size_of_val(scales.as_slice())
            }
        }
    }

    /// Whether the weights are held as f16.
    #[cfg(test)]
    fn is_f16(&self) -> bool {
        matches!(self.w, Packed::F16(_))
    }

    /// `out[i] = W[g * GROUP + i] · x` for the rows of the groups `groups` (`x`: `cols` values
    /// padded with zeros to the layout's width; `out`: those rows).
    fn groups_into(&self, groups: Range<usize>, x: &[f32], out: &mut [f32]) {
        let padded = x.len();
        let row = |g: usize| (g * GROUP).min(self.rows);
        let rows = row(groups.start)..row(groups.end);
        assert!(
            padded == self.width() && out.len() == rows.len(),
            "HostMatrix::groups_into: shapes"
        );
        let span = rows.start * padded..rows.end * padded;
        match &self.w {
            Packed::F16(w) => kernel(&w[span], x, out),
            Packed::F32(w) => kernel(&w[span], x, out),
            Packed::Int4 { codes, scales } => {
                let blocks = padded / CODE_BLOCK;
                let scales = &scales[rows.start * blocks..rows.end * blocks];
                let bytes = rows.start * padded / 2..rows.end * padded / 2;
                kernel_int4(&codes[bytes], scales, x, out)
            }
        }
    }

    /// `W x` (`x.len() == cols`), groups of rows shared out over candle's CPU thread pool
    /// (inline when called from one of its threads, or when there are few rows).
    pub(super) fn matvec(&self, x: &[f32]) -> Vec<f32> {
        assert_eq!(x.len(), self.cols, "HostMatrix::matvec: x");
        let mut xp = x.to_vec();
        xp.resize(self.width(), 0.0);
        let (rows, groups) = (self.rows, self.rows.div_ceil(GROUP));
        let pool = candle_core::utils::barrier_pool();
        if rows < PARALLEL_MIN_ROWS || pool.n_workers() == 0 {
            let mut out = vec![0f32; rows];
            self.groups_into(0..groups, &xp, &mut out);
            return out;
        }
        // f32 bits in atomics: disjoint rows written from several threads, read after the
        // pool's barrier (which orders every worker's writes before the call returns).
        let out: Vec<AtomicU32> = (0..rows).map(|_| AtomicU32::new(0)).collect();
        pool.execute_chunked(groups, |range| {
            let mine = range.start * GROUP..(range.end * GROUP).min(rows);
            let mut part = vec![0f32; mine.len()];
            self.groups_into(range, &xp, &mut part);
            for (slot, y) in out[mine].iter().zip(part) {
                slot.store(y.to_bits(), Ordering::Relaxed);
            }
        });
        out.into_iter()
            .map(|y| f32::from_bits(y.into_inner()))
            .collect()
    }
}

/// Whether the AVX-512 kernel can run (F16C included).
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    #[cfg(test)]
    if tests::FORCE_PORTABLE.with(std::cell::Cell::get) {
        return false;
    }
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("f16c")
}

/// A weight element, f16 or f32, as the kernels read it.
trait Weight: Copy {
    fn to_f32(self) -> f32;

    /// [`LANES`] elements from `p` in f32 lanes.
    ///
    /// # Safety
    /// avx512f and f16c; `p` points at `LANES` readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Weight for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(p: *const f16) -> std::arch::x86_64::__m512 {
        unsafe {
            use std::arch::x86_64::{_mm256_loadu_si256, _mm512_cvtph_ps};
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
        }
    }
}

impl Weight for f32 {
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(p: *const f32) -> std::arch::x86_64::__m512 {
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

/// `out[r] = W[r] · x` for the packed groups of `w` (`out.len()` rows, `x` padded).
fn kernel<W: Weight>(w: &[W], x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the features are present; `groups_into` checked that `w` holds `out.len()`
        // rows of `x.len()` (a multiple of the register width) values.
        unsafe { avx512::groups(w, x, out) };
        return;
    }
    let padded = x.len();
    for (group, y) in w.chunks(GROUP * padded).zip(out.chunks_mut(GROUP)) {
        let k = y.len();
        let mut acc = [[0f32; LANES]; GROUP];
        for (chunk, xc) in group.chunks_exact(k * LANES).zip(x.chunks_exact(LANES)) {
            for (row, acc) in chunk.chunks_exact(LANES).zip(&mut acc) {
                for l in 0..LANES {
                    acc[l] += row[l].to_f32() * xc[l];
                }
            }
        }
        for (y, acc) in y.iter_mut().zip(acc) {
            *y = acc.iter().sum();
        }
    }
}

/// The two codes of a byte of the layout, sign-extended: (low nibble, high nibble).
fn codes_of(byte: u8) -> (i8, i8) {
    let b = byte as i8;
    ((b << 4) >> 4, b >> 4)
}

/// `out[r] = W[r] · x` for the packed groups of codes and scales (`out.len()` rows, `x`
/// padded to whole blocks).
fn kernel_int4(codes: &[u8], scales: &[f32], x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the features are present; `groups_into` checked that `codes` and `scales` hold
        // `out.len()` rows of `x.len()` (whole blocks) values.
        unsafe { avx512::groups_int4(codes, scales, x, out) };
        return;
    }
    let (padded, blocks) = (x.len(), x.len() / CODE_BLOCK);
    let groups = codes
        .chunks(GROUP * padded / 2)
        .zip(scales.chunks(GROUP * blocks));
    for ((group, group_scales), y) in groups.zip(out.chunks_mut(GROUP)) {
        let k = y.len();
        let mut acc = [[0f32; LANES]; GROUP];
        let blocks = group
            .chunks_exact(k * LANES)
            .zip(group_scales.chunks_exact(k));
        for ((block, d), xb) in blocks.zip(x.chunks_exact(CODE_BLOCK)) {
            for (i, acc) in acc[..k].iter_mut().enumerate() {
                for (l, &byte) in block[i * LANES..(i + 1) * LANES].iter().enumerate() {
                    let (low, high) = codes_of(byte);
                    let t = f32::from(low) * xb[l] + f32::from(high) * xb[LANES + l];
                    acc[l] += t * d[i];
                }
            }
        }
        for (y, acc) in y.iter_mut().zip(acc) {
            *y = acc.iter().sum();
        }
    }
}

/// Dot product with 8 independent accumulators, so the compiler can keep them in one SIMD
/// register (a plain `sum()` is a strict sequential chain).
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 kernel: a group's rows per pass over `x`, one accumulator register each.

    use std::arch::x86_64::*;

    use super::{Weight, CODE_BLOCK, GROUP, LANES};

    /// `out[r] = W[r] · x` over the packed groups of `w`.
    ///
    /// # Safety
    /// avx512f and f16c; `x.len()` a multiple of [`LANES`]; `w` holds the packed groups of
    /// `out.len()` rows of `x.len()` values.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn groups<W: Weight>(w: &[W], x: &[f32], out: &mut [f32]) {
        unsafe {
            let (padded, xp) = (x.len(), x.as_ptr());
            for (g, y) in out.chunks_mut(GROUP).enumerate() {
                let k = y.len();
                let mut p = w.as_ptr().add(g * GROUP * padded);
                let mut acc = [_mm512_setzero_ps(); GROUP];
                if k == GROUP {
                    for c in (0..padded).step_by(LANES) {
                        let xv = _mm512_loadu_ps(xp.add(c));
                        acc[0] = _mm512_fmadd_ps(W::load(p), xv, acc[0]);
                        acc[1] = _mm512_fmadd_ps(W::load(p.add(LANES)), xv, acc[1]);
                        acc[2] = _mm512_fmadd_ps(W::load(p.add(2 * LANES)), xv, acc[2]);
                        acc[3] = _mm512_fmadd_ps(W::load(p.add(3 * LANES)), xv, acc[3]);
                        p = p.add(GROUP * LANES);
                    }
                } else {
                    for c in (0..padded).step_by(LANES) {
                        let xv = _mm512_loadu_ps(xp.add(c));
                        for a in &mut acc[..k] {
                            *a = _mm512_fmadd_ps(W::load(p), xv, *a);
                            p = p.add(LANES);
                        }
                    }
                }
                for (y, a) in y.iter_mut().zip(acc) {
                    *y = _mm512_reduce_add_ps(a);
                }
            }
        }
    }

    /// `out[r] = W[r] · x` over the packed groups of `codes` and `scales`.
    ///
    /// # Safety
    /// avx512f; `x.len()` a multiple of [`CODE_BLOCK`]; `codes` and `scales` hold the packed
    /// groups of `out.len()` rows of `x.len()` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn groups_int4(codes: &[u8], scales: &[f32], x: &[f32], out: &mut [f32]) {
        unsafe {
            let (padded, blocks) = (x.len(), x.len() / CODE_BLOCK);
            for (g, y) in out.chunks_mut(GROUP).enumerate() {
                let p = codes.as_ptr().add(g * GROUP * padded / 2);
                let d = scales.as_ptr().add(g * GROUP * blocks);
                // A group has GROUP (4) rows, the last one possibly fewer.
                match y.len() {
                    4 => y.copy_from_slice(&group_int4::<4>(p, d, x)),
                    3 => y.copy_from_slice(&group_int4::<3>(p, d, x)),
                    2 => y.copy_from_slice(&group_int4::<2>(p, d, x)),
                    _ => y.copy_from_slice(&group_int4::<1>(p, d, x)),
                }
            }
        }
    }

    /// The sums of one group of `K` rows, codes from `p` (a block's LANES bytes per row) and
    /// scales from `d`, each row in its own accumulator (a constant `K` keeps them in
    /// registers).
    #[target_feature(enable = "avx512f")]
    unsafe fn group_int4<const K: usize>(
        mut p: *const u8,
        mut d: *const f32,
        x: &[f32],
    ) -> [f32; K] {
        unsafe {
            let mut acc = [_mm512_setzero_ps(); K];
            for xb in x.chunks_exact(CODE_BLOCK) {
                let (x0, x1) = (
                    _mm512_loadu_ps(xb.as_ptr()),
                    _mm512_loadu_ps(xb.as_ptr().add(LANES)),
                );
                for (i, a) in acc.iter_mut().enumerate() {
                    // The bytes sign-extended: the high nibble is `>> 4`, the low one the
                    // low four bits sign-extended by `<< 28 >> 28`.
                    let bytes = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(i * LANES).cast()));
                    let low = _mm512_srai_epi32::<28>(_mm512_slli_epi32::<28>(bytes));
                    let high = _mm512_srai_epi32::<4>(bytes);
                    let t = _mm512_mul_ps(_mm512_cvtepi32_ps(low), x0);
                    let t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(high), x1, t);
                    *a = _mm512_fmadd_ps(t, _mm512_set1_ps(*d.add(i)), *a);
                }
                p = p.add(K * LANES);
                d = d.add(K);
            }
            acc.map(|a| _mm512_reduce_add_ps(a))
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
