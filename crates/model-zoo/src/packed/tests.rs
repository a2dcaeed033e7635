//! Tests of the packed format and both kernels, against candle's quantizer and dequantizer.

use super::*;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

/// A random matrix quantized by candle to `dtype`, its raw blocks and its dequantized values.
fn quantized(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let mut s = seed;
    let vals: Vec<f32> = (0..rows * cols)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        })
        .collect();
    let t = Tensor::from_vec(vals, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let deq = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (q.data().unwrap().into_owned(), deq)
}

#[test]
fn packing_keeps_every_value() {
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let (rows, cols) = (37, 96);
        let (raw, deq) = quantized(dtype, rows, cols, 7);
        let p = PackedMatrix::from_ggml_parts(cols, &[(dtype, rows, &raw)]).unwrap();
        assert_eq!(p.dequantize(), deq, "{dtype:?}");
    }
}

#[test]
fn stacked_parts_equal_their_concatenation() {
    let cols = 64;
    let (a, da) = quantized(GgmlDType::Q4_1, 16, cols, 1);
    let (b, db) = quantized(GgmlDType::Q4_0, 5, cols, 2);
    let p =
        PackedMatrix::from_ggml_parts(cols, &[(GgmlDType::Q4_1, 16, &a), (GgmlDType::Q4_0, 5, &b)])
            .unwrap();
    assert_eq!(p.rows(), 21);
    assert_eq!(p.dequantize(), [da, db].concat());
    assert!(PackedMatrix::from_ggml_parts(cols, &[(GgmlDType::Q4_1, 3, &a)]).is_none());
    assert!(PackedMatrix::from_ggml_parts(
        cols,
        &[(GgmlDType::Q4_1, 16, &a), (GgmlDType::Q8_0, 1, &[0; 68])]
    )
    .is_none());
}

/// Both kernels against f32 products of the dequantized weights with the dequantized
/// activations (the only error left is f32 summation order).
#[test]
fn kernels_match_the_dequantized_product() {
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q4_0, GgmlDType::Q8_0] {
        for (rows, cols, m) in [(16, 32, 1), (50, 96, 1), (33, 576, 3), (64, 160, 9)] {
            let (raw, w) = quantized(dtype, rows, cols, rows as u64);
            let p = PackedMatrix::from_ggml_parts(cols, &[(dtype, rows, &raw)]).unwrap();
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let acts = QuantizedRows::new(&x, m, cols);
            let xq: Vec<f32> = (0..m * cols)
                .map(|i| {
                    let (row, c) = (i / cols, i % cols);
                    let (a, d, _) = acts.block(row, c / BLOCK);
                    f32::from(a[c % BLOCK]) * d
                })
                .collect();
            let want: Vec<f32> = (0..m * rows)
                .map(|i| {
                    let (row, r) = (i / rows, i % rows);
                    (0..cols)
                        .map(|c| xq[row * cols + c] * w[r * cols + c])
                        .sum()
                })
                .collect();
            let mut portable = vec![f32::NAN; m * rows];
            // SAFETY: one thread, the whole output.
            unsafe { p.tiles_into_portable(0..p.tiles(), &acts, SharedOut(portable.as_mut_ptr())) };
            for (name, got) in [("portable", portable), ("dispatch", p.matmul(&x, m))] {
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{name} {dtype:?} {rows}x{cols} m={m}: {g} vs {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn simd_quantizer_equals_portable() {
    let mut vals: Vec<f32> = (0..32 * 40)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
        .collect();
    vals[5] = f32::NAN;
    vals[40..72].fill(0.0);
    vals[100] = 127.0 * 0.5; // ties
    for (i, src) in vals.chunks_exact(BLOCK).enumerate() {
        let (mut a, mut b) = ([0i8; BLOCK], [0i8; BLOCK]);
        let want = quantize_block(src, &mut a);
        let got = QuantizedRows::new(src, 1, BLOCK);
        b.copy_from_slice(&got.codes);
        // A block holding a NaN gets a NaN scale on top of the block quantizer's codes.
        let want_scale = if src.iter().all(|v| v.is_finite()) {
            want.0
        } else {
            f32::NAN
        };
        assert_eq!(got.scales[0].to_bits(), want_scale.to_bits(), "block {i}");
        assert_eq!(got.sums[0], want.1, "block {i}");
        assert_eq!(a, b, "block {i}");
    }
}

#[test]
fn a_non_finite_activation_poisons_its_row_only() {
    let (rows, cols, m) = (16, 64, 3);
    let (raw, _) = quantized(GgmlDType::Q8_0, rows, cols, 5);
    let p = PackedMatrix::from_ggml_parts(cols, &[(GgmlDType::Q8_0, rows, &raw)]).unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = vec![0.5f32; m * cols];
        x[cols + 40] = bad; // row 1, second block
        let out = p.matmul(&x, m);
        for (row, chunk) in out.chunks(rows).enumerate() {
            assert_eq!(
                chunk.iter().all(|v| v.is_nan()),
                row == 1,
                "{bad} in row 1: row {row} gave {chunk:?}"
            );
            assert!(row == 1 || chunk.iter().all(|v| v.is_finite()));
        }
    }
}

#[test]
fn zero_and_tiny_activations_quantize_to_zero_codes() {
    let q = QuantizedRows::new(&[0.0; 64], 2, 32);
    assert!(q.codes.iter().all(|&c| c == 0));
    assert_eq!(q.scales, vec![0.0, 0.0]);
}
