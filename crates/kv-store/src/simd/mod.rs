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
//!
//! The AVX-512 versions of the chunk kernels (runtime detected, the portable ones here being the
//! fallback and the definition they follow) are in `avx512.rs`; the unit tests in `tests.rs`.

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
pub(crate) mod tests;

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
        unsafe { avx512::transpose(&rows[..CHUNK * d], d, &mut kt[..CHUNK * d]) };
        return;
    }
    for (c, dst) in kt[..d * CHUNK].chunks_exact_mut(CHUNK).enumerate() {
        for (j, x) in dst.iter_mut().enumerate() {
            *x = if j < n { rows[j * d + c] } else { 0.0 };
        }
    }
}

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
