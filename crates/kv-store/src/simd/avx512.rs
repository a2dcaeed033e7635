//! AVX-512 versions of the chunk micro-kernels: same operations and order per lane as the
//! portable ones, with the accumulators pinned in registers and no bounds checks.
//! Also the 16×16 transposition of a chunk of keys (f32 in [`transpose`], f16 converted in
//! registers in [`transpose_f16`]).

use std::arch::x86_64::*;

use super::{CHUNK, LANES};

/// [`super::scores_transposed`] for `nq` query vectors, four at a time.
///
/// # Safety
/// avx512f; `qs`: `nq * d`, `kt`: `d * CHUNK`, `s`: `nq * CHUNK` floats at least.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn scores(qs: &[f32], kt: &[f32], d: usize, nq: usize, s: &mut [f32]) {
    unsafe {
        let mut q0 = 0;
        while q0 < nq {
            let (q, o) = (qs.as_ptr().add(q0 * d), s.as_mut_ptr().add(q0 * CHUNK));
            match nq - q0 {
                1 => scores_group::<1>(q, kt.as_ptr(), d, o),
                2 => scores_group::<2>(q, kt.as_ptr(), d, o),
                3 => scores_group::<3>(q, kt.as_ptr(), d, o),
                _ => scores_group::<4>(q, kt.as_ptr(), d, o),
            }
            q0 += 4;
        }
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn scores_group<const N: usize>(qs: *const f32, kt: *const f32, d: usize, s: *mut f32) {
    unsafe {
        let mut even = [_mm512_setzero_ps(); N];
        let mut odd = [_mm512_setzero_ps(); N];
        let mut c = 0;
        while c + 1 < d {
            let (k0, k1) = (
                _mm512_loadu_ps(kt.add(c * CHUNK)),
                _mm512_loadu_ps(kt.add((c + 1) * CHUNK)),
            );
            for q in 0..N {
                even[q] = _mm512_fmadd_ps(_mm512_set1_ps(*qs.add(q * d + c)), k0, even[q]);
                odd[q] = _mm512_fmadd_ps(_mm512_set1_ps(*qs.add(q * d + c + 1)), k1, odd[q]);
            }
            c += 2;
        }
        if c < d {
            let k = _mm512_loadu_ps(kt.add(c * CHUNK));
            for (q, e) in even.iter_mut().enumerate() {
                *e = _mm512_fmadd_ps(_mm512_set1_ps(*qs.add(q * d + c)), k, *e);
            }
        }
        for (q, (e, o)) in even.iter().zip(&odd).enumerate() {
            _mm512_storeu_ps(s.add(q * CHUNK), _mm512_add_ps(*e, *o));
        }
    }
}

/// `exp(x)` lane-wise, the same range reduction and polynomial as [`super::exp`] (0 below -87).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp(x: __m512) -> __m512 {
    let xc = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
        _mm512_set1_ps(88.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-std::f32::consts::LN_2), xc);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let y = _mm512_scalef_ps(p, n);
    let live = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-87.0));
    _mm512_maskz_mov_ps(live, y)
}

/// [`super::softmax_chunk`].
///
/// # Safety
/// avx512f; `s`: `m.len() * CHUNK`, `l`: `m.len()`, `acc`: `m.len() * d` floats at least.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn softmax_chunk(
    s: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    d: usize,
) {
    unsafe {
        for qi in 0..m.len() {
            let sp = s.as_mut_ptr().add(qi * CHUNK);
            let v = _mm512_loadu_ps(sp);
            let mc = _mm512_reduce_max_ps(v);
            if mc == f32::NEG_INFINITY {
                _mm512_storeu_ps(sp, _mm512_setzero_ps());
                continue;
            }
            let (mq, lq) = (m.get_unchecked_mut(qi), l.get_unchecked_mut(qi));
            if mc > *mq {
                let f = super::exp(*mq - mc);
                let a = acc.as_mut_ptr().add(qi * d);
                let fv = _mm512_set1_ps(f);
                let full = d - d % LANES;
                for c in (0..full).step_by(LANES) {
                    _mm512_storeu_ps(a.add(c), _mm512_mul_ps(_mm512_loadu_ps(a.add(c)), fv));
                }
                for c in full..d {
                    *a.add(c) *= f;
                }
                *lq *= f;
                *mq = mc;
            }
            let p = exp(_mm512_sub_ps(v, _mm512_set1_ps(*mq)));
            _mm512_storeu_ps(sp, p);
            *lq += _mm512_reduce_add_ps(p);
        }
    }
}

/// [`super::weighted_values`] for `nq` query vectors (`d` a multiple of 16), four at a time.
///
/// # Safety
/// avx512f; `p`: `nq * CHUNK`, `values`: `n * d`, `acc`: `nq * d` floats at least.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn weighted_values(
    p: &[f32],
    values: &[f32],
    n: usize,
    d: usize,
    nq: usize,
    acc: &mut [f32],
) {
    unsafe {
        weighted_rows(p, F32Rows(values.as_ptr()), n, d, nq, acc);
    }
}

/// [`super::weighted_values`] over f16 value rows, converted in registers.
///
/// # Safety
/// avx512f and f16c; `values`: `n * d` halves; otherwise as [`weighted_values`].
#[target_feature(enable = "avx512f,f16c")]
pub(super) unsafe fn weighted_values_f16(
    p: &[f32],
    values: &[half::f16],
    n: usize,
    d: usize,
    nq: usize,
    acc: &mut [f32],
) {
    unsafe {
        weighted_rows(p, F16Rows(values.as_ptr().cast()), n, d, nq, acc);
    }
}

/// Rows of `d` values readable 16 lanes at a time as f32.
trait Rows: Copy {
    /// Lanes `c..c + 16` of row `j` (of width `d`).
    unsafe fn load(self, j: usize, d: usize, c: usize) -> __m512;
}

#[derive(Clone, Copy)]
struct F32Rows(*const f32);

impl Rows for F32Rows {
    #[inline(always)]
    unsafe fn load(self, j: usize, d: usize, c: usize) -> __m512 {
        unsafe { _mm512_loadu_ps(self.0.add(j * d + c)) }
    }
}

#[derive(Clone, Copy)]
struct F16Rows(*const u16);

impl Rows for F16Rows {
    #[inline(always)]
    unsafe fn load(self, j: usize, d: usize, c: usize) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(self.0.add(j * d + c).cast())) }
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn weighted_rows<R: Rows>(
    p: &[f32],
    rows: R,
    n: usize,
    d: usize,
    nq: usize,
    acc: &mut [f32],
) {
    unsafe {
        let mut q0 = 0;
        while q0 < nq {
            let (pq, aq) = (p.as_ptr().add(q0 * CHUNK), acc.as_mut_ptr().add(q0 * d));
            match nq - q0 {
                1 => values_group::<1, R>(pq, rows, n, d, aq),
                2 => values_group::<2, R>(pq, rows, n, d, aq),
                3 => values_group::<3, R>(pq, rows, n, d, aq),
                _ => values_group::<4, R>(pq, rows, n, d, aq),
            }
            q0 += 4;
        }
    }
}

/// `N` query vectors' accumulators, two 16-column slices at a time (2N independent FMA
/// chains), each value row loaded once for all `N`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn values_group<const N: usize, R: Rows>(
    p: *const f32,
    rows: R,
    n: usize,
    d: usize,
    acc: *mut f32,
) {
    unsafe {
        let mut c0 = 0;
        while c0 < d {
            let two = c0 + LANES < d;
            let mut r = [[_mm512_setzero_ps(); 2]; N];
            for (q, r) in r.iter_mut().enumerate() {
                r[0] = _mm512_loadu_ps(acc.add(q * d + c0));
                if two {
                    r[1] = _mm512_loadu_ps(acc.add(q * d + c0 + LANES));
                }
            }
            for j in 0..n {
                let v0 = rows.load(j, d, c0);
                let v1 = if two { rows.load(j, d, c0 + LANES) } else { v0 };
                for (q, r) in r.iter_mut().enumerate() {
                    let pj = _mm512_set1_ps(*p.add(q * CHUNK + j));
                    r[0] = _mm512_fmadd_ps(pj, v0, r[0]);
                    r[1] = _mm512_fmadd_ps(pj, v1, r[1]);
                }
            }
            for (q, r) in r.iter().enumerate() {
                _mm512_storeu_ps(acc.add(q * d + c0), r[0]);
                if two {
                    _mm512_storeu_ps(acc.add(q * d + c0 + LANES), r[1]);
                }
            }
            c0 += 2 * LANES;
        }
    }
}

/// The f16 rows `[16, d]` of a full chunk converted and transposed into `kt` (`[d, 16]`).
///
/// # Safety
/// avx512f and f16c; `rows`: `16 * d` halves, `kt`: `d * 16` floats, `d` a multiple of 16.
#[target_feature(enable = "avx512f,f16c")]
pub(super) unsafe fn transpose_f16(rows: &[half::f16], d: usize, kt: &mut [f32]) {
    unsafe {
        let src = rows.as_ptr().cast::<u16>();
        for c0 in (0..d).step_by(CHUNK) {
            let r: [__m512; 16] = std::array::from_fn(|j| {
                _mm512_cvtph_ps(_mm256_loadu_si256(src.add(j * d + c0).cast()))
            });
            transpose16(r, kt.as_mut_ptr().add(c0 * CHUNK));
        }
    }
}

/// 16×16 transpositions of a `[16, d]` chunk into `[d, 16]` (`d` a multiple of 16).
///
/// # Safety
/// The CPU supports avx512f; `rows.len() == kt.len() == 16 * d`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose(rows: &[f32], d: usize, kt: &mut [f32]) {
    unsafe {
        for c0 in (0..d).step_by(CHUNK) {
            let r = std::array::from_fn(|j| _mm512_loadu_ps(rows.as_ptr().add(j * d + c0)));
            transpose16(r, kt.as_mut_ptr().add(c0 * CHUNK));
        }
    }
}

/// Stores the transpose of the 16×16 block `r` (row `j` = key `j`) as 16 rows of 16 at `dst`.
///
/// # Safety
/// avx512f; `dst` valid for 256 floats.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose16(r: [__m512; 16], dst: *mut f32) {
    unsafe {
        // Interleave pairs of rows, then quads, then 128-bit lanes twice.
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (base, k) = (4 * (i / 4), i % 4);
            let (a, b) = (t[base + k % 2], t[base + 2 + k % 2]);
            if k < 2 {
                _mm512_shuffle_ps::<0x44>(a, b)
            } else {
                _mm512_shuffle_ps::<0xee>(a, b)
            }
        });
        let v: [__m512; 16] = std::array::from_fn(|i| {
            let (base, k) = (8 * (i / 8), i % 8);
            let (a, b) = (u[base + k % 4], u[base + 4 + k % 4]);
            if k < 4 {
                _mm512_shuffle_f32x4::<0x88>(a, b)
            } else {
                _mm512_shuffle_f32x4::<0xdd>(a, b)
            }
        });
        for i in 0..16 {
            let (a, b) = (v[i % 8], v[8 + i % 8]);
            let w = if i < 8 {
                _mm512_shuffle_f32x4::<0x88>(a, b)
            } else {
                _mm512_shuffle_f32x4::<0xdd>(a, b)
            };
            _mm512_storeu_ps(dst.add(TRANSPOSE_DIM[i] * CHUNK), w);
        }
    }
}

/// Which dimension (within a 16-column group) the `i`-th output of [`transpose`]'s last
/// stage holds (its 16 lanes are keys 0..16 in order); checked against the portable path by a test.
const TRANSPOSE_DIM: [usize; 16] = [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15];
