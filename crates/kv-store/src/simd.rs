//! Vectorisable f32 inner loops of the attention kernel: dot product, axpy, max, a polynomial
//! `exp`, the chunk micro-kernels (scores of many query vectors against a transposed chunk
//! of keys, the probability-weighted sum of a chunk of values, the chunk transposition), and a
//! cache prefetch hint.
//!
//! Invariants: safe Rust written in fixed-width lane chunks so LLVM emits SIMD for the build's
//! `target-cpu`, except the AVX lane reduction, the AVX-512 16×16 transposition (runtime
//! detected, with a portable fallback that gives identical results) and the cache prefetch
//! hint (reads no value); results agree with the scalar definitions to f32 rounding (the `exp`
//! to about 2 ulp, and exactly 0 for inputs below -87, which includes `-inf`).

/// Lanes per chunk: two AVX2 registers or one AVX-512 register of f32.
const LANES: usize = 16;

/// `sum_i a[i] * b[i]` over the common length.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ar.iter().zip(br) {
        tail = x.mul_add(*y, tail);
    }
    hsum(acc) + tail
}

/// Sum of the lanes, with AVX shuffles when the build enables AVX.
#[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
#[inline(always)]
fn hsum(acc: [f32; LANES]) -> f32 {
    use std::arch::x86_64::{
        _mm256_add_ps, _mm256_castps256_ps128, _mm256_extractf128_ps, _mm256_loadu_ps, _mm_add_ps,
        _mm_add_ss, _mm_cvtss_f32, _mm_movehdup_ps, _mm_movehl_ps,
    };
    // SAFETY: avx (and so sse3) is enabled at compile time (cfg above); the two unaligned loads
    // read exactly the 16 f32 of `acc`.
    unsafe {
        let v = _mm256_add_ps(
            _mm256_loadu_ps(acc.as_ptr()),
            _mm256_loadu_ps(acc.as_ptr().add(8)),
        );
        let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
    }
}

/// Tree sum of the lanes (short dependency chain). Kept out of line: inlined, it makes LLVM
/// vectorise the caller's main loop with 2-wide vectors, and a running sum instead costs a
/// 16-add dependency chain per dot product.
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
#[inline(never)]
fn hsum(acc: [f32; LANES]) -> f32 {
    let h8: [f32; 8] = std::array::from_fn(|l| acc[l] + acc[l + 8]);
    let h4: [f32; 4] = std::array::from_fn(|l| h8[l] + h8[l + 4]);
    (h4[0] + h4[2]) + (h4[1] + h4[3])
}

/// `y[i] += alpha * x[i]` over the common length.
#[inline]
pub(crate) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = xi.mul_add(alpha, *yi);
    }
}

/// Bytes of a cache line, the stride of [`prefetch_l2`].
const CACHE_LINE: usize = 64;

/// Hints the CPU to load every cache line of `bytes` into its L2 cache, so that reading a run
/// that does not follow the previous one in memory (a KV block anywhere in the pool) does not
/// wait for the hardware prefetcher to notice a new stream. No effect on any value; a no-op off
/// x86-64. L2, not L1: a whole block's lines requested into L1 at once crowd out the demand
/// loads of the chunk being computed (measured: 15% slower on contiguous blocks, while L2
/// costs nothing there and makes scattered blocks as fast as contiguous ones).
#[inline]
pub(crate) fn prefetch_l2(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(CACHE_LINE) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        // SAFETY: sse is part of the x86-64 baseline; a prefetch reads no value and never
        // faults, and the pointer is inside `bytes` anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Keys per kernel chunk: one 16-lane vector of scores.
pub(crate) const CHUNK: usize = LANES;

/// `kt[c * CHUNK + j] = rows[j * d + c]` for `j < n`, and 0 for `n <= j < CHUNK`: a chunk of key
/// rows (`[n, d]`, `n <= CHUNK`) transposed so that one vector holds dimension `c` of every key.
pub(crate) fn transpose_chunk(rows: &[f32], n: usize, d: usize, kt: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if n == CHUNK && d.is_multiple_of(CHUNK) && avx512() {
        // SAFETY: avx512f is present; `rows` holds 16 rows of `d` and `kt` d rows of 16 (sliced
        // below, so out-of-bounds panics before any unchecked access).
        unsafe { transpose_avx512(&rows[..CHUNK * d], d, &mut kt[..CHUNK * d]) };
        return;
    }
    for (c, dst) in kt[..d * CHUNK].chunks_exact_mut(CHUNK).enumerate() {
        for (j, x) in dst.iter_mut().enumerate() {
            *x = if j < n { rows[j * d + c] } else { 0.0 };
        }
    }
}

/// 16×16 transpositions of a `[16, d]` chunk into `[d, 16]` (`d` a multiple of 16).
///
/// # Safety
/// The CPU supports avx512f; `rows.len() == kt.len() == 16 * d`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_avx512(rows: &[f32], d: usize, kt: &mut [f32]) {
    unsafe {
        use std::arch::x86_64::_mm512_loadu_ps;
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
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose16(r: [std::arch::x86_64::__m512; 16], dst: *mut f32) {
    unsafe {
        use std::arch::x86_64::*;
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

/// Which dimension (within a 16-column group) the `i`-th output of [`transpose_avx512`]'s last
/// stage holds (its 16 lanes are keys 0..16 in order); checked against the portable path by a test.
#[cfg(target_arch = "x86_64")]
const TRANSPOSE_DIM: [usize; 16] = [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15];

/// `s[q * CHUNK + j] = sum_c qs[q * d + c] * kt[c * CHUNK + j]` for every query vector `q` of
/// `qs` (`[nq, d]`) and key `j` of the transposed chunk `kt` (`[d, CHUNK]`).
pub(crate) fn scores_transposed(qs: &[f32], kt: &[f32], d: usize, s: &mut [f32]) {
    let nq = qs.len() / d.max(1);
    assert!(
        kt.len() >= d * CHUNK && s.len() >= nq * CHUNK,
        "scores_transposed: shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: avx512f is present; the shapes were checked above.
        unsafe { avx512::scores(qs, kt, d, nq, s) };
        return;
    }
    let mut q0 = 0;
    while q0 < nq {
        let n = (nq - q0).min(4);
        let (qg, sg) = (
            &qs[q0 * d..(q0 + n) * d],
            &mut s[q0 * CHUNK..(q0 + n) * CHUNK],
        );
        match n {
            1 => scores_group::<1>(qg, kt, d, sg),
            2 => scores_group::<2>(qg, kt, d, sg),
            3 => scores_group::<3>(qg, kt, d, sg),
            _ => scores_group::<4>(qg, kt, d, sg),
        }
        q0 += n;
    }
}

/// [`scores_transposed`] for `N` query vectors, two accumulators each (even and odd dimensions)
/// so that the FMA chains overlap; every index is static so that the accumulators stay in
/// registers.
#[inline(always)]
fn scores_group<const N: usize>(qs: &[f32], kt: &[f32], d: usize, s: &mut [f32]) {
    let mut even = [[0.0f32; CHUNK]; N];
    let mut odd = [[0.0f32; CHUNK]; N];
    let pairs = kt[..d * CHUNK].chunks_exact(2 * CHUNK);
    let tail = pairs.remainder();
    for (p, k) in pairs.enumerate() {
        let (k0, k1) = k.split_at(CHUNK);
        let k0: &[f32; CHUNK] = k0.try_into().expect("CHUNK lanes");
        let k1: &[f32; CHUNK] = k1.try_into().expect("CHUNK lanes");
        for q in 0..N {
            let (x0, x1) = (qs[q * d + 2 * p], qs[q * d + 2 * p + 1]);
            for l in 0..CHUNK {
                even[q][l] = x0.mul_add(k0[l], even[q][l]);
                odd[q][l] = x1.mul_add(k1[l], odd[q][l]);
            }
        }
    }
    if !tail.is_empty() {
        for q in 0..N {
            let x = qs[q * d + d - 1];
            for l in 0..CHUNK {
                even[q][l] = x.mul_add(tail[l], even[q][l]);
            }
        }
    }
    for q in 0..N {
        for l in 0..CHUNK {
            s[q * CHUNK + l] = even[q][l] + odd[q][l];
        }
    }
}

/// `acc[q * d..][c] += sum_j p[q * CHUNK + j] * values[j * d + c]` for every query vector `q` and
/// the `n` value rows of a chunk (`values`: `[n, d]`).
pub(crate) fn weighted_values(p: &[f32], values: &[f32], n: usize, d: usize, acc: &mut [f32]) {
    let nq = acc.len() / d.max(1);
    assert!(
        n <= CHUNK && p.len() >= nq * CHUNK && values.len() >= n * d,
        "weighted_values: shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(LANES) && avx512() {
        // SAFETY: avx512f is present; the shapes were checked above.
        unsafe { avx512::weighted_values(p, values, n, d, nq, acc) };
        return;
    }
    let mut q0 = 0;
    while q0 < nq {
        let k = (nq - q0).min(4);
        let (pg, ag) = (
            &p[q0 * CHUNK..(q0 + k) * CHUNK],
            &mut acc[q0 * d..(q0 + k) * d],
        );
        match k {
            1 => values_group::<1>(pg, values, n, d, ag),
            2 => values_group::<2>(pg, values, n, d, ag),
            3 => values_group::<3>(pg, values, n, d, ag),
            _ => values_group::<4>(pg, values, n, d, ag),
        }
        q0 += k;
    }
}

/// [`weighted_values`] for `N` query vectors: each 16-column slice of their accumulators stays
/// in registers across the chunk's rows, every value row read once for all `N`.
#[inline(always)]
fn values_group<const N: usize>(p: &[f32], values: &[f32], n: usize, d: usize, acc: &mut [f32]) {
    let full = d - d % LANES;
    for c0 in (0..full).step_by(LANES) {
        let mut r = [[0.0f32; LANES]; N];
        for (q, r) in r.iter_mut().enumerate() {
            r.copy_from_slice(&acc[q * d + c0..q * d + c0 + LANES]);
        }
        for j in 0..n {
            let v: &[f32; LANES] = values[j * d + c0..j * d + c0 + LANES]
                .try_into()
                .expect("LANES values");
            for (q, r) in r.iter_mut().enumerate() {
                let pj = p[q * CHUNK + j];
                for l in 0..LANES {
                    r[l] = v[l].mul_add(pj, r[l]);
                }
            }
        }
        for (q, r) in r.iter().enumerate() {
            acc[q * d + c0..q * d + c0 + LANES].copy_from_slice(r);
        }
    }
    if full < d {
        for q in 0..N {
            for j in 0..n {
                axpy(
                    &mut acc[q * d + full..(q + 1) * d],
                    p[q * CHUNK + j],
                    &values[j * d + full..(j + 1) * d],
                );
            }
        }
    }
}

/// One online-softmax step over a chunk: for every query vector `q` (row `q` of `s`, CHUNK raw
/// scores, `-inf` where masked), raises the running max `m[q]` to the chunk's (rescaling the
/// denominator `l[q]` and the accumulator row `acc[q * d..]` by `exp(old - new)`), replaces the
/// scores by `exp(score - m[q])` (0 where masked) and adds them to `l[q]`. A row with no finite
/// score becomes all zeros and leaves its state unchanged.
pub(crate) fn softmax_chunk(
    s: &mut [f32],
    m: &mut [f32],
    l: &mut [f32],
    acc: &mut [f32],
    d: usize,
) {
    assert!(
        s.len() >= m.len() * CHUNK && l.len() == m.len() && acc.len() >= m.len() * d,
        "softmax_chunk: shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: avx512f is present; the shapes were checked above.
        unsafe { avx512::softmax_chunk(s, m, l, acc, d) };
        return;
    }
    for (qi, sq) in s.chunks_exact_mut(CHUNK).take(m.len()).enumerate() {
        let mc = max(sq);
        if mc == f32::NEG_INFINITY {
            sq.fill(0.0);
            continue;
        }
        if mc > m[qi] {
            let f = exp(m[qi] - mc);
            acc[qi * d..(qi + 1) * d].iter_mut().for_each(|x| *x *= f);
            l[qi] *= f;
            m[qi] = mc;
        }
        l[qi] += exp_shifted_sum(sq, m[qi]);
    }
}

/// Whether this CPU runs the AVX-512 micro-kernels (detected once, then a load); unit tests can
/// force the portable paths on this thread.
#[cfg(target_arch = "x86_64")]
#[inline]
fn avx512() -> bool {
    #[cfg(test)]
    if tests::FORCE_PORTABLE.with(std::cell::Cell::get) {
        return false;
    }
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Whether the f16 kernels can convert in registers (AVX-512 and F16C).
#[cfg(target_arch = "x86_64")]
#[inline]
fn avx512_f16c() -> bool {
    avx512() && std::arch::is_x86_feature_detected!("f16c")
}

/// The keys of a chunk (`n <= CHUNK` rows of `d` f16) converted and transposed into `kt` like
/// [`transpose_chunk`]; `scratch` holds `CHUNK * d` floats for the portable path.
pub(crate) fn transpose_chunk_f16(
    rows: &[half::f16],
    n: usize,
    d: usize,
    scratch: &mut [f32],
    kt: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if n == CHUNK && d.is_multiple_of(CHUNK) && avx512_f16c() {
        assert!(
            rows.len() >= CHUNK * d && kt.len() >= CHUNK * d,
            "transpose_chunk_f16: shapes"
        );
        // SAFETY: the features are present; the shapes were checked above.
        unsafe { avx512::transpose_f16(rows, d, kt) };
        return;
    }
    use half::slice::HalfFloatSliceExt;
    rows[..n * d].convert_to_f32_slice(&mut scratch[..n * d]);
    transpose_chunk(&scratch[..n * d], n, d, kt);
}

/// [`weighted_values`] over `n` value rows stored as f16; `scratch` holds `CHUNK * d` floats for
/// the portable path.
pub(crate) fn weighted_values_f16(
    p: &[f32],
    values: &[half::f16],
    n: usize,
    d: usize,
    scratch: &mut [f32],
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(LANES) && avx512_f16c() {
        let nq = acc.len() / d.max(1);
        assert!(
            n <= CHUNK && p.len() >= nq * CHUNK && values.len() >= n * d,
            "weighted_values_f16: shapes"
        );
        // SAFETY: the features are present; the shapes were checked above.
        unsafe { avx512::weighted_values_f16(p, values, n, d, nq, acc) };
        return;
    }
    use half::slice::HalfFloatSliceExt;
    values[..n * d].convert_to_f32_slice(&mut scratch[..n * d]);
    weighted_values(p, &scratch[..n * d], n, d, acc);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! AVX-512 versions of the chunk micro-kernels: same operations and order per lane as the
    //! portable ones, with the accumulators pinned in registers and no bounds checks.

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
                super::transpose16(r, kt.as_mut_ptr().add(c0 * CHUNK));
            }
        }
    }
}

/// Maximum of a slice (`-inf` when empty).
#[inline]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    rem.iter()
        .chain(acc.iter())
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

/// `xs[i] = exp(xs[i] - shift)`; returns the sum of the results.
#[inline]
pub(crate) fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp(c[l] - shift);
            acc[l] += c[l];
        }
    }
    let mut tail = 0.0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

/// `exp(x)` by range reduction to `2^n · 2^f`, `f ∈ [-0.5, 0.5]`, and a degree-6 polynomial;
/// branch-free and without float-to-int conversions (`n` is rounded by adding 1.5·2^23 and read
/// from the float's bits), so that loops over it vectorise. Returns 0 for `x < -87` (and for
/// `-inf`).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2: f32 = std::f32::consts::LN_2;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer (ties even)
    let xc = x.clamp(-87.0, 88.0);
    let t = xc.mul_add(LOG2E, ROUND);
    let n = t - ROUND;
    let r = n.mul_add(-LN2, xc); // r = x - n ln2, |r| <= ln2/2
                                 // Taylor coefficients of e^r up to r^6: relative error < 2e-8 on |r| <= 0.35.
    let mut p = 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // t's low mantissa bits hold n (|n| <= 127): 2^n has exponent field n + 127.
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    let y = p * scale;
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// Set by tests to run the portable kernels on a CPU that has AVX-512.
        pub(crate) static FORCE_PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Runs `f` once with the portable kernels and once with this CPU's, returning both results.
    pub(crate) fn both_paths<T>(mut f: impl FnMut() -> T) -> (T, T) {
        FORCE_PORTABLE.with(|p| p.set(true));
        let portable = f();
        FORCE_PORTABLE.with(|p| p.set(false));
        (portable, f())
    }

    #[test]
    fn portable_kernels_match_the_simd_ones() {
        let (n, d, nq) = (16usize, 64usize, 7usize);
        let rows: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let halves: Vec<half::f16> = rows.iter().map(|&x| half::f16::from_f32(x)).collect();
        let qs: Vec<f32> = (0..nq * d).map(|i| (i as f32 * 0.11).cos()).collect();
        let (a, b) = both_paths(|| {
            let mut kt = vec![0.0; d * CHUNK];
            let mut scratch = vec![0.0; CHUNK * d];
            transpose_chunk_f16(&halves, n, d, &mut scratch, &mut kt);
            let mut s = vec![0.0; nq * CHUNK];
            scores_transposed(&qs, &kt, d, &mut s);
            let (mut m, mut l) = (vec![0.5f32; nq], vec![1.0f32; nq]);
            let mut acc = vec![0.25f32; nq * d];
            s[3] = f32::NEG_INFINITY;
            softmax_chunk(&mut s, &mut m, &mut l, &mut acc, d);
            weighted_values_f16(&s, &halves, n, d, &mut scratch, &mut acc);
            weighted_values(&s, &rows, n, d, &mut acc);
            (kt, s, m, l, acc)
        });
        assert_eq!(a.0, b.0, "transposition");
        for (x, y) in [(&a.1, &b.1), (&a.2, &b.2), (&a.3, &b.3), (&a.4, &b.4)] {
            for (u, v) in x.iter().zip(y) {
                assert!((u - v).abs() <= 1e-5 * (1.0 + v.abs()), "{u} vs {v}");
            }
        }
    }

    #[test]
    fn exp_matches_std() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            assert!(
                ((got - want) / want).abs() < 1e-6,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
    }

    #[test]
    fn transposition_and_chunk_kernels_match_scalar() {
        for (n, d) in [(16usize, 64usize), (16, 32), (7, 64), (16, 8), (3, 5)] {
            let rows: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut kt = vec![f32::NAN; d * CHUNK];
            transpose_chunk(&rows, n, d, &mut kt);
            for c in 0..d {
                for j in 0..CHUNK {
                    let want = if j < n { rows[j * d + c] } else { 0.0 };
                    assert_eq!(kt[c * CHUNK + j], want, "n {n} d {d} c {c} j {j}");
                }
            }
            for nq in [1usize, 3, 4, 6, 9] {
                let qs: Vec<f32> = (0..nq * d).map(|i| (i as f32 * 0.11).cos()).collect();
                let mut s = vec![0.0; nq * CHUNK];
                scores_transposed(&qs, &kt, d, &mut s);
                for q in 0..nq {
                    for j in 0..n {
                        let want: f32 = (0..d).map(|c| qs[q * d + c] * rows[j * d + c]).sum();
                        assert!(
                            (s[q * CHUNK + j] - want).abs() < 1e-4,
                            "scores {nq} {q} {j}"
                        );
                    }
                }
                let mut acc = vec![0.5f32; nq * d];
                weighted_values(&s, &rows, n, d, &mut acc);
                for q in 0..nq {
                    for c in 0..d {
                        let want: f32 = 0.5
                            + (0..n)
                                .map(|j| s[q * CHUNK + j] * rows[j * d + c])
                                .sum::<f32>();
                        assert!((acc[q * d + c] - want).abs() < 1e-3 * (1.0 + want.abs()));
                    }
                }
            }
        }
    }

    #[test]
    fn dot_axpy_max_match_scalar() {
        for n in [0usize, 1, 7, 16, 31, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - want).abs() < 1e-5);
            let mut y = b.clone();
            axpy(&mut y, 0.5, &a);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
            }
            let m = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&a), m);
            let mut e = a.clone();
            let s = exp_shifted_sum(&mut e, 1.0);
            let want_s: f32 = a.iter().map(|x| (x - 1.0).exp()).sum();
            assert!((s - want_s).abs() < 1e-5 * want_s.max(1.0));
        }
    }
}
