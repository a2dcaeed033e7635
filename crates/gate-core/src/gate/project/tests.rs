//! Tests of the decode projection and the 4-bit rounding: sums against a naive f64 reference on
//! both kernels, the rounding's error bound and its zero and tiny blocks.

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

/// Both kernels, the three storage types, widths on and off the register width and the
/// 4-bit block, row counts on and off whole groups, whole and over a range of groups: the
/// sums of a naive f64 reference over the values held, to f32 rounding of the magnitudes
/// summed.
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
        let rounded = Int4Rows::round(&inexact, cols);
        let held = [
            (HostMatrix::new(&exact, cols), exact, 2),
            (HostMatrix::new(&inexact, cols), inexact, 4),
            (HostMatrix::from_int4(&rounded), rounded.values(), 0),
        ];
        // Bytes per weight: 2 (f16), 4 (f32), or 0 for a half byte and a scale per block.
        for (m, w, bytes_per_weight) in held {
            let narrow = bytes_per_weight == 2;
            assert_eq!(m.is_f16(), narrow, "{rows}x{cols}");
            let expected = match bytes_per_weight {
                0 => rows * m.width() / 2 + 4 * rows * cols.div_ceil(CODE_BLOCK),
                b => b * rows * m.width(),
            };
            assert_eq!(m.bytes(), expected);
            let want = reference(&w, &x);
            // Groups from the second on: rows 4.. (none when there is one group).
            let mut xp = x.clone();
            xp.resize(m.width(), 0.0);
            let groups = rows.div_ceil(GROUP);
            let (a, b) = both_paths(|| {
                let mut out = vec![0f32; rows.saturating_sub(GROUP)];
                m.groups_into(1.min(groups)..groups, &xp, &mut out);
                (m.matvec(&x), out)
            });
            for (whole, part) in [a, b] {
                let got = whole.iter().chain(&part);
                let expect = want.iter().chain(want.get(GROUP..).unwrap_or(&[]));
                assert_eq!(whole.len() + part.len(), rows + rows.saturating_sub(GROUP));
                for (&y, &(s, mag)) in got.zip(expect) {
                    let err = (f64::from(y) - s).abs();
                    assert!(err <= 1e-6 * mag + 1e-30, "{rows}x{cols}: {y} vs {s}");
                }
            }
        }
    }
}

/// Each block's largest weight gets the code ±7 and its exact value back (to f32
/// rounding), every weight is within half a step `d/2` of its value, a zero block and a
/// block too small for a normal scale are zero, a block holding f32::MAX stays finite, and
/// blocks are cut per row (widths on and off the block).
#[test]
fn int4_rounding_keeps_each_weight_within_half_a_step() {
    let mut rng = StdRng::seed_from_u64(4);
    for (rows, cols) in [(3, 576), (4, 40), (3, 3)] {
        let mut w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-0.1f32..0.1) * 10f32.powi(rng.random_range(-3..2)))
            .collect();
        w[..cols.min(CODE_BLOCK)].fill(0.0);
        // Row 1's first block: 5e-38 and subnormals; row 2's: the largest f32 values.
        let tiny = &mut w[cols..cols + cols.min(CODE_BLOCK)];
        tiny.fill(1e-40);
        tiny[0] = -5e-38;
        let huge = &mut w[2 * cols..2 * cols + cols.min(CODE_BLOCK)];
        huge[0] = f32::MAX;
        huge[huge.len() - 1] = -f32::MAX;
        let r = Int4Rows::round(&w, cols);
        let v = r.values();
        assert_eq!(v.len(), w.len());
        assert_eq!(r.scales.len(), rows * cols.div_ceil(CODE_BLOCK));
        let blocks = w.chunks(cols).flat_map(|row| row.chunks(CODE_BLOCK));
        let mut at = 0;
        for (b, block) in blocks.enumerate() {
            let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = r.scales[b];
            let first_of_row = (at % cols) == 0;
            if first_of_row && at < 2 * cols {
                // The zero block, the tiny one.
                assert_eq!(d, 0.0);
                assert!(v[at..at + block.len()].iter().all(|&y| y == 0.0));
                at += block.len();
                continue;
            }
            assert!(v[at..at + block.len()].iter().all(|y| y.is_finite()));
            assert_eq!(d, amax / 7.0);
            assert!((7.0 * d).is_finite());
            for (j, &x) in block.iter().enumerate() {
                let (q, y) = (r.codes[at + j], v[at + j]);
                assert!((-7..=7).contains(&q));
                assert!(
                    (y - x).abs() <= d / 2.0 * (1.0 + 1e-5),
                    "{x} -> {y} (d {d})"
                );
                if x.abs() == amax && amax > 0.0 {
                    assert_eq!(q.unsigned_abs(), 7);
                    assert!((y - x).abs() <= amax * 1e-6);
                }
            }
            at += block.len();
        }
    }
}
