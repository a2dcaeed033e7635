//! The AVX-512 VNNI kernel: per tile and block, `vpdpbusd` of 16 rows' unsigned codes with
//! broadcast activation quads, for up to four activation rows at once.

use std::arch::x86_64::*;

use super::{PackedKind, PackedMatrix, QuantizedRows, SharedOut, BLOCK, TILE_ROWS};

/// # Safety
/// The CPU supports avx512f/bw/vnni; `dst` as in [`PackedMatrix::tiles_into`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn tiles_into(
    w: &PackedMatrix,
    range: std::ops::Range<usize>,
    acts: &QuantizedRows,
    dst: SharedOut,
) {
    unsafe {
        for t in range {
            let mut row = 0;
            while row < acts.m {
                match acts.m - row {
                    1 => tile::<1>(w, t, acts, row, dst),
                    2 => tile::<2>(w, t, acts, row, dst),
                    3 => tile::<3>(w, t, acts, row, dst),
                    _ => tile::<4>(w, t, acts, row, dst),
                }
                row += 4;
            }
        }
    }
}

/// [`super::quantize_block`] with AVX-512, bit for bit.
///
/// # Safety
/// The CPU supports avx512f/bw; `src` and `dst` hold 32 values.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_block(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    unsafe {
        let (a, b) = (
            _mm512_loadu_ps(src.as_ptr()),
            _mm512_loadu_ps(src.as_ptr().add(16)),
        );
        // max(x, acc) returns acc when x is NaN: NaNs are ignored, as by f32::max.
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(
            _mm512_abs_ps(b),
            _mm512_max_ps(_mm512_abs_ps(a), _mm512_setzero_ps()),
        ));
        let d = amax / 127.0;
        let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let mut sum = 0;
        for (h, v) in [a, b].into_iter().enumerate() {
            // Round to nearest even (the default mode); |v * inv| <= 127, a NaN becomes 0 below.
            let q = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)));
            _mm_storeu_si128(dst.as_mut_ptr().add(16 * h).cast(), q);
            sum += _mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(q));
        }
        (d, sum)
    }
}

/// Tile `t` for activation rows `row0..row0 + R`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn tile<const R: usize>(
    w: &PackedMatrix,
    t: usize,
    acts: &QuantizedRows,
    row0: usize,
    dst: SharedOut,
) {
    unsafe {
        // Two accumulators per row (even and odd blocks) shorten the f32 dependency chain. They
        // trade places after each block rather than being picked by `b & 1`, an index that kept
        // them in memory (a load and a store per row and block); at the end the two are added,
        // whichever holds which (f32 addition commutes exactly).
        let mut current = [_mm512_setzero_ps(); R];
        let mut other = [_mm512_setzero_ps(); R];
        for b in 0..w.blocks() {
            block::<R>(w, t, b, acts, row0, &mut current);
            std::mem::swap(&mut current, &mut other);
        }
        let valid = (w.rows - t * TILE_ROWS).min(TILE_ROWS);
        let mask: __mmask16 = if valid == TILE_ROWS {
            !0
        } else {
            (1u16 << valid) - 1
        };
        for (r, (e, o)) in current.iter().zip(&other).enumerate() {
            let out = dst.0.add((row0 + r) * w.rows + t * TILE_ROWS);
            _mm512_mask_storeu_ps(out, mask, _mm512_add_ps(*e, *o));
        }
    }
}

/// Block `b` of tile `t` for activation rows `row0..row0 + R`, added to `acc`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn block<const R: usize>(
    w: &PackedMatrix,
    t: usize,
    b: usize,
    acts: &QuantizedRows,
    row0: usize,
    acc: &mut [__m512; R],
) {
    unsafe {
        let base = w.bytes().as_ptr();
        let nibble = _mm512_set1_epi8(0x0f);
        let (d_at, m_at, codes_at) = w.offsets(t, b);
        let codes = base.add(codes_at);
        let mut dot = [_mm512_setzero_si512(); R];
        let a0 = acts
            .codes
            .as_ptr()
            .add(row0 * acts.blocks * BLOCK + b * BLOCK);
        let stride = acts.blocks * BLOCK;
        match w.kind {
            PackedKind::Q4 => {
                for g in 0..BLOCK / 8 {
                    let c = _mm512_load_si512(codes.add(g * 64).cast());
                    let lo = _mm512_and_si512(c, nibble);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(c), nibble);
                    for (r, dot) in dot.iter_mut().enumerate() {
                        let a = a0.add(r * stride + 8 * g).cast::<i32>();
                        let (qa, qb) = (a.read_unaligned(), a.add(1).read_unaligned());
                        *dot = _mm512_dpbusd_epi32(*dot, lo, _mm512_set1_epi32(qa));
                        *dot = _mm512_dpbusd_epi32(*dot, hi, _mm512_set1_epi32(qb));
                    }
                }
            }
            PackedKind::Q8 => {
                for g in 0..BLOCK / 4 {
                    let c = _mm512_load_si512(codes.add(g * 64).cast());
                    for (r, dot) in dot.iter_mut().enumerate() {
                        let a = a0.add(r * stride + 4 * g).cast::<i32>().read_unaligned();
                        *dot = _mm512_dpbusd_epi32(*dot, c, _mm512_set1_epi32(a));
                    }
                }
            }
        }
        let d = _mm512_cvtph_ps(_mm256_load_si256(base.add(d_at).cast()));
        let m = match w.kind {
            PackedKind::Q4 => _mm512_cvtph_ps(_mm256_load_si256(base.add(m_at).cast())),
            PackedKind::Q8 => _mm512_setzero_ps(),
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            let i = (row0 + r) * acts.blocks + b;
            let (da, sa) = (*acts.scales.get_unchecked(i), *acts.sums.get_unchecked(i));
            let part = match w.kind {
                PackedKind::Q4 => _mm512_fmadd_ps(
                    m,
                    _mm512_set1_ps(da * sa as f32),
                    _mm512_mul_ps(
                        _mm512_cvtepi32_ps(dot[r]),
                        _mm512_mul_ps(d, _mm512_set1_ps(da)),
                    ),
                ),
                PackedKind::Q8 => _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[r], _mm512_set1_epi32(128 * sa))),
                    _mm512_mul_ps(d, _mm512_set1_ps(da)),
                ),
            };
            *acc = _mm512_add_ps(*acc, part);
        }
    }
}
