//! Unit tests of the kernels: each against its scalar definition, and the portable paths
//! against this CPU's SIMD ones ([`both_paths`], also used by the attention kernel's test).

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
