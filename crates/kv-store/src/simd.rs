//! Vectorisable f32 inner loops of the attention kernel: dot product, axpy, max and a
//! polynomial `exp` over slices.
//!
//! Invariants: safe Rust (but one AVX lane reduction where the build enables AVX) written in fixed-width lane chunks so LLVM emits SIMD for the
//! build's `target-cpu`; results agree with the scalar definitions to f32 rounding (the `exp`
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

/// `out[j] = dot(q, rows[j * q.len()..])` for each row of `rows` (and each slot of `out`).
/// Kept out of line: inlined into the kernel, LLVM vectorises across rows instead of along
/// each row, with narrow vectors.
#[inline(never)]
pub(crate) fn dots(q: &[f32], rows: &[f32], out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(q.len().max(1))) {
        *o = dot(q, row);
    }
}

/// `y[i] += alpha * x[i]` over the common length.
#[inline]
pub(crate) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = xi.mul_add(alpha, *yi);
    }
}

/// `acc[c] += sum_j p[j] * values[j * d + c]` for `d = acc.len()`: the weighted sum of a chunk of
/// value rows, with each 16-lane slice of `acc` held in registers across the whole chunk.
#[inline]
pub(crate) fn accumulate_rows(acc: &mut [f32], p: &[f32], values: &[f32]) {
    let d = acc.len();
    let mut lanes = acc.chunks_exact_mut(LANES);
    for (ci, a) in (&mut lanes).enumerate() {
        let mut r = [0.0f32; LANES];
        r.copy_from_slice(a);
        for (&pj, row) in p.iter().zip(values.chunks_exact(d)) {
            let v = &row[ci * LANES..(ci + 1) * LANES];
            for l in 0..LANES {
                r[l] = v[l].mul_add(pj, r[l]);
            }
        }
        a.copy_from_slice(&r);
    }
    let tail = lanes.into_remainder();
    let t0 = d - tail.len();
    for (&pj, row) in p.iter().zip(values.chunks_exact(d)) {
        axpy(tail, pj, &row[t0..]);
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
/// branch-free so that it vectorises. Returns 0 for `x < -87` (and for `-inf`).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2: f32 = std::f32::consts::LN_2;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E).round();
    let r = n.mul_add(-LN2, xc); // r = x - n ln2, |r| <= ln2/2
                                 // Taylor coefficients of e^r up to r^6: relative error < 2e-8 on |r| <= 0.35.
    let mut p = 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = p * scale;
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let d = 21;
            let rows: Vec<f32> = (0..3 * d).map(|i| i as f32 * 0.1).collect();
            let mut acc = vec![1.0f32; d];
            accumulate_rows(&mut acc, &[0.5, -1.0, 2.0], &rows);
            for (c, x) in acc.iter().enumerate() {
                let want = 1.0 + 0.5 * rows[c] - rows[d + c] + 2.0 * rows[2 * d + c];
                assert!((x - want).abs() < 1e-5);
            }
            let mut e = a.clone();
            let s = exp_shifted_sum(&mut e, 1.0);
            let want_s: f32 = a.iter().map(|x| (x - 1.0).exp()).sum();
            assert!((s - want_s).abs() < 1e-5 * want_s.max(1.0));
        }
    }
}
