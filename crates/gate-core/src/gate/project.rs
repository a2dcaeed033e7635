//! The decode step's projection `y = W x` ([`HostMatrix`]): the gate's `wq`, `wk`, `wv` rows as
//! host copies, read once per token and layer (the default gates' 30 layers hold 6.6 M weights,
//! more than the L3 cache: the step streams them from memory, so their bytes set its cost).
//!
//! Invariants:
//! - the weights are held as f16 when every one of them is exactly an f16 value (gates loaded
//!   from an f16 file, the committed ones: half the bytes of f32, the same values), else as
//!   f32; either way `y` is the exact products summed in f32, so it equals the f32 computation
//!   up to the order of the additions (f32 rounding);
//! - on AVX-512 (runtime detected, F16C conversion in registers) four rows are computed at a
//!   time, each with its own accumulator, sharing each load of `x`; elsewhere a portable loop in
//!   16-lane chunks; both give the same sums up to f32 rounding;
//! - [`HostMatrix::matvec`] shares rows out over candle's CPU thread pool (the decoder's, whose
//!   threads also stream the model's weights); a row's sum does not depend on which thread
//!   computes it or with which rows.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

use half::f16;

/// Rows of the projection below which [`HostMatrix::matvec`] stays on the calling thread (a
/// handoff to the pool costs a few microseconds, about what this many 576-wide rows take).
const PARALLEL_MIN_ROWS: usize = 64;

/// Lanes of one AVX-512 register of f32, the portable loop's chunk too.
const LANES: usize = 16;

/// A row-major `[rows, cols]` matrix held as f16 when that is exact, else as f32.
#[derive(Debug, Clone)]
pub(super) enum HostMatrix {
    /// Every weight is an f16 value.
    F16 { w: Vec<f16>, cols: usize },
    /// Some weight is not.
    F32 { w: Vec<f32>, cols: usize },
}

impl HostMatrix {
    /// The matrix `w` (`[w.len() / cols, cols]`), narrowed to f16 if no value changes.
    pub(super) fn new(w: Vec<f32>, cols: usize) -> Self {
        if w.iter().all(|&v| f16::from_f32(v).to_f32() == v) {
            HostMatrix::F16 {
                w: w.iter().map(|&v| f16::from_f32(v)).collect(),
                cols,
            }
        } else {
            HostMatrix::F32 { w, cols }
        }
    }

    fn cols(&self) -> usize {
        match self {
            HostMatrix::F16 { cols, .. } | HostMatrix::F32 { cols, .. } => *cols,
        }
    }

    /// Number of rows.
    pub(super) fn rows(&self) -> usize {
        let len = match self {
            HostMatrix::F16 { w, .. } => w.len(),
            HostMatrix::F32 { w, .. } => w.len(),
        };
        len.checked_div(self.cols()).unwrap_or(0)
    }

    /// `out[i] = W[rows.start + i] · x` for the rows of `rows` (`x.len() == cols`,
    /// `out.len() == rows.len()`).
    pub(super) fn rows_into(&self, rows: Range<usize>, x: &[f32], out: &mut [f32]) {
        let cols = self.cols();
        assert!(
            x.len() == cols && out.len() == rows.len() && rows.end <= self.rows(),
            "HostMatrix::rows_into: shapes"
        );
        let span = rows.start * cols..rows.end * cols;
        match self {
            HostMatrix::F16 { w, .. } => f16_rows(&w[span], x, out),
            HostMatrix::F32 { w, .. } => f32_rows(&w[span], x, out),
        }
    }

    /// `W x` (`x.len() == cols`), the rows shared out over candle's CPU thread pool (inline
    /// when called from one of its threads, or when there are few rows).
    pub(super) fn matvec(&self, x: &[f32]) -> Vec<f32> {
        let rows = self.rows();
        let pool = candle_core::utils::barrier_pool();
        if rows < PARALLEL_MIN_ROWS || pool.n_workers() == 0 {
            let mut out = vec![0f32; rows];
            self.rows_into(0..rows, x, &mut out);
            return out;
        }
        // f32 bits in atomics: disjoint rows written from several threads, read after the
        // pool's barrier (which orders every worker's writes before the call returns).
        let out: Vec<AtomicU32> = (0..rows).map(|_| AtomicU32::new(0)).collect();
        pool.execute_chunked(rows, |range| {
            let mut part = vec![0f32; range.len()];
            self.rows_into(range.clone(), x, &mut part);
            for (slot, y) in out[range].iter().zip(part) {
                slot.store(y.to_bits(), Ordering::Relaxed);
            }
        });
        out.into_iter()
            .map(|y| f32::from_bits(y.into_inner()))
            .collect()
    }
}

/// Whether the AVX-512 kernels can run (F16C included), detected once per call site's check.
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    #[cfg(test)]
    if tests::FORCE_PORTABLE.with(std::cell::Cell::get) {
        return false;
    }
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("f16c")
}

/// `out[r] = w[r] · x` for the f16 rows of `w` (`[out.len(), x.len()]`).
fn f16_rows(w: &[f16], x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x.len().is_multiple_of(LANES) && avx512() {
        // SAFETY: the features are present; `rows_into` checked the shapes and `x.len()` is a
        // multiple of the register width.
        unsafe { avx512::rows::<f16>(w, x, out) };
        return;
    }
    let mut row = vec![0f32; x.len()];
    for (r, y) in w.chunks_exact(x.len()).zip(out) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(r, &mut row);
        *y = dot(&row, x);
    }
}

/// `out[r] = w[r] · x` for the f32 rows of `w` (`[out.len(), x.len()]`).
fn f32_rows(w: &[f32], x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x.len().is_multiple_of(LANES) && avx512() {
        // SAFETY: as in `f16_rows`.
        unsafe { avx512::rows::<f32>(w, x, out) };
        return;
    }
    for (r, y) in w.chunks_exact(x.len()).zip(out) {
        *y = dot(r, x);
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
    //! The AVX-512 row kernel: four rows per pass over `x`, one accumulator register each.

    use std::arch::x86_64::*;

    use half::f16;

    use super::LANES;

    /// A weight element the kernel loads [`LANES`] at a time into f32 lanes.
    pub(super) trait Weight: Copy {
        /// # Safety
        /// avx512f and f16c; `p` points at `LANES` readable elements.
        unsafe fn load(p: *const Self) -> __m512;
    }

    impl Weight for f32 {
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
    }

    impl Weight for f16 {
        #[inline(always)]
        unsafe fn load(p: *const f16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
        }
    }

    /// `out[r] = w[r] · x` (`w`: `[out.len(), x.len()]`).
    ///
    /// # Safety
    /// avx512f and f16c; `x.len()` a multiple of [`LANES`]; `w.len() >= out.len() * x.len()`.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn rows<W: Weight>(w: &[W], x: &[f32], out: &mut [f32]) {
        let cols = x.len();
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut r = 0;
        while r + 4 <= out.len() {
            let row = |i: usize| wp.add((r + i) * cols);
            let (w0, w1, w2, w3) = (row(0), row(1), row(2), row(3));
            let mut acc = [_mm512_setzero_ps(); 4];
            for c in (0..cols).step_by(LANES) {
                let xv = _mm512_loadu_ps(xp.add(c));
                acc[0] = _mm512_fmadd_ps(W::load(w0.add(c)), xv, acc[0]);
                acc[1] = _mm512_fmadd_ps(W::load(w1.add(c)), xv, acc[1]);
                acc[2] = _mm512_fmadd_ps(W::load(w2.add(c)), xv, acc[2]);
                acc[3] = _mm512_fmadd_ps(W::load(w3.add(c)), xv, acc[3]);
            }
            for (y, a) in out[r..r + 4].iter_mut().zip(acc) {
                *y = _mm512_reduce_add_ps(a);
            }
            r += 4;
        }
        for (i, y) in out.iter_mut().enumerate().skip(r) {
            let p = wp.add(i * cols);
            let mut acc = _mm512_setzero_ps();
            for c in (0..cols).step_by(LANES) {
                acc = _mm512_fmadd_ps(W::load(p.add(c)), _mm512_loadu_ps(xp.add(c)), acc);
            }
            *y = _mm512_reduce_add_ps(acc);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::cell::Cell;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    thread_local! {
        /// Makes this thread's kernels take the portable path.
        pub(crate) static FORCE_PORTABLE: Cell<bool> = const { Cell::new(false) };
    }

    /// `f` on the portable path, then on this CPU's best path.
    fn both_paths<T>(mut f: impl FnMut() -> T) -> (T, T) {
        FORCE_PORTABLE.with(|c| c.set(true));
        let portable = f();
        FORCE_PORTABLE.with(|c| c.set(false));
        (portable, f())
    }

    /// `W x` in f64, and the bound `sum |w| |x|` that scales its rounding error.
    fn reference(w: &[f32], x: &[f32]) -> Vec<(f64, f64)> {
        w.chunks_exact(x.len())
            .map(|r| {
                r.iter().zip(x).fold((0.0, 0.0), |(s, m), (&a, &b)| {
                    let p = f64::from(a) * f64::from(b);
                    (s + p, m + p.abs())
                })
            })
            .collect()
    }

    /// Both kernels, both storage types, widths on and off the register width, row counts on
    /// and off the four-row pass and over rows ranges: the sums of a naive f64 reference to
    /// f32 rounding of the magnitudes summed.
    #[test]
    fn projection_matches_a_naive_reference() {
        let mut rng = StdRng::seed_from_u64(3);
        for (rows, cols) in [(7, 576), (384, 576), (5, 40), (1, 16), (9, 3)] {
            let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect();
            let exact: Vec<f32> = (0..rows * cols)
                .map(|_| f16::from_f32(rng.random_range(-0.1..0.1)).to_f32())
                .collect();
            let mut inexact = exact.clone();
            inexact[rows * cols / 2] += 1e-7;
            for (w, wide) in [(exact, false), (inexact, true)] {
                let m = HostMatrix::new(w.clone(), cols);
                assert_eq!(matches!(m, HostMatrix::F32 { .. }), wide, "{rows}x{cols}");
                let want = reference(&w, &x);
                let (a, b) = both_paths(|| {
                    let mut out = vec![0f32; rows - 1];
                    m.rows_into(1..rows, &x, &mut out);
                    (m.matvec(&x), out)
                });
                for (whole, part) in [a, b] {
                    let got = whole.iter().chain(&part);
                    let expect = want.iter().chain(&want[1..]);
                    for (&y, &(s, mag)) in got.zip(expect) {
                        let err = (f64::from(y) - s).abs();
                        assert!(err <= 1e-6 * mag + 1e-30, "{rows}x{cols}: {y} vs {s}");
                    }
                }
            }
        }
    }
}
