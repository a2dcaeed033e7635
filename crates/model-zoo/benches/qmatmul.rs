//! Quantized projection micro-benchmark (not a test): the default model's projection shapes
//! (fused q/k/v, o, fused gate/up, down, the tied LM head) for one activation row (decode) and
//! for 512 rows (a prefill chunk), comparing
//! - `candle q8_0`: candle's `QMatMul` on Q4_1 re-quantized to Q8_0 (agate's path before packing),
//! - `candle q4_1`: candle's `QMatMul` on Q4_1 as stored (scalar: no SIMD kernel in candle),
//! - `dense f32`: the weight dequantized and candle's f32 GEMM (prefill only; excludes the
//!   dequantization, which the old path paid on every call),
//! - `packed`: [`model_zoo::packed::PackedMatrix`] on the file's codes.
//!
//! Then one decode step's projections over all 30 layers and the LM head (weights far larger
//! than the caches, as in a real decode step): candle q8_0 against packed.
//!
//! Variants run in interleaved batches of ~50 ms; each keeps its best batch mean. GB/s counts the
//! weight bytes read per call. Threads: candle's pool size (`RAYON_NUM_THREADS`).
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench -p model-zoo --bench qmatmul [-- --json] [-- --quick]`.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use model_zoo::packed::PackedMatrix;

/// Seconds per call of each variant (best batch mean over interleaved rounds).
fn time(fs: &mut [&mut dyn FnMut()], batches: usize, batch: Duration) -> Vec<f64> {
    let iters: Vec<usize> = fs
        .iter_mut()
        .map(|f| {
            f();
            let t0 = Instant::now();
            f();
            ((batch.as_secs_f64() / t0.elapsed().as_secs_f64().max(1e-7)) as usize).max(1)
        })
        .collect();
    let mut best = vec![f64::INFINITY; fs.len()];
    for _ in 0..batches {
        for ((f, &n), b) in fs.iter_mut().zip(&iters).zip(&mut best) {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            *b = b.min(t.elapsed().as_secs_f64() / n as f64);
        }
    }
    best
}

/// The default model's projection shapes: name, rows, columns, stored type.
const SHAPES: [(&str, usize, usize, GgmlDType); 5] = [
    ("qkv", 960, 576, GgmlDType::Q4_1),
    ("o", 576, 576, GgmlDType::Q4_1),
    ("gate_up", 3072, 576, GgmlDType::Q4_1),
    ("down", 576, 1536, GgmlDType::Q4_1),
    ("lm_head", 49152, 576, GgmlDType::Q8_0),
];

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let quick = args.iter().any(|a| a == "--quick");
    let (batches, batch) = if quick {
        (3, Duration::from_millis(20))
    } else {
        (9, Duration::from_millis(50))
    };
    if !json {
        println!(
            "threads: {} | packed kernel: {}",
            candle_core::utils::get_num_threads(),
            if PackedMatrix::supported() {
                "avx512-vnni"
            } else {
                "portable"
            }
        );
        println!("| shape | rows | variant | µs/call | GB/s of weights |");
        println!("|---|---:|---|---:|---:|");
    }
    for shape in SHAPES {
        shape_bench(shape, json, batches, batch)?;
    }
    decode_sweep(json, batches)
}

/// One projection shape's variants, for one activation row and for 512.
fn shape_bench(
    (name, n, k, dtype): (&str, usize, usize, GgmlDType),
    json: bool,
    batches: usize,
    batch: Duration,
) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
    let stored = QTensor::quantize(&w, dtype)?;
    let raw = stored.data()?.into_owned();
    let requant = QTensor::quantize(&stored.dequantize(&dev)?, GgmlDType::Q8_0)?;
    let (q8_bytes, stored_bytes) = (
        requant.storage_size_in_bytes(),
        stored.storage_size_in_bytes(),
    );
    let dense = stored.dequantize(&dev)?;
    let q8 = QMatMul::from_qtensor(requant)?;
    let as_stored = QMatMul::from_qtensor(stored)?;
    let packed = PackedMatrix::from_ggml_parts(k, &[(dtype, n, &raw)]).expect("packs");
    for m in [1usize, 512] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut names = vec!["candle q8_0"];
        let mut bytes = vec![q8_bytes];
        let mut f_q8 = || {
            black_box(q8.forward(&x).unwrap());
        };
        let mut f_stored = || {
            black_box(as_stored.forward(&x).unwrap());
        };
        let mut f_dense = || {
            black_box(x.matmul(&dense.t().unwrap()).unwrap());
        };
        let mut f_packed = || {
            black_box(packed.matmul(&xv, m));
        };
        let mut fs: Vec<&mut dyn FnMut()> = vec![&mut f_q8];
        if m == 1 && dtype == GgmlDType::Q4_1 {
            names.push("candle q4_1");
            bytes.push(stored_bytes);
            fs.push(&mut f_stored);
        }
        if m > 1 {
            names.push("dense f32");
            bytes.push(n * k * 4);
            fs.push(&mut f_dense);
        }
        names.push("packed");
        bytes.push(packed.size_bytes());
        fs.push(&mut f_packed);
        let secs = time(&mut fs, batches, batch);
        for ((v, s), b) in names.iter().zip(&secs).zip(&bytes) {
            let gbs = *b as f64 / s / 1e9;
            if json {
                println!(
                    "{{\"shape\":\"{name}\",\"rows\":{m},\"variant\":\"{v}\",\"us_per_call\":{:.2},\"weight_gb_per_s\":{gbs:.2}}}",
                    s * 1e6
                );
            } else {
                println!("| {name} {n}x{k} | {m} | {v} | {:.1} | {gbs:.1} |", s * 1e6);
            }
        }
    }
    Ok(())
}

/// Every projection of a 30-layer decode step plus the LM head, one activation row each.
fn decode_sweep(json: bool, batches: usize) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let layer_shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let mut q8s = Vec::new();
    let mut packs = Vec::new();
    let (mut q8_bytes, mut packed_bytes) = (0, 0);
    let mut add = |n: usize, k: usize, dtype: GgmlDType| -> candle_core::Result<()> {
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
        let stored = QTensor::quantize(&w, dtype)?;
        let raw = stored.data()?.into_owned();
        let requant = QTensor::quantize(&stored.dequantize(&dev)?, GgmlDType::Q8_0)?;
        q8_bytes += requant.storage_size_in_bytes();
        q8s.push((k, QMatMul::from_qtensor(requant)?));
        let p = PackedMatrix::from_ggml_parts(k, &[(dtype, n, &raw)]).expect("packs");
        packed_bytes += p.size_bytes();
        packs.push(p);
        Ok(())
    };
    for _ in 0..30 {
        for (n, k) in layer_shapes {
            add(n, k, GgmlDType::Q4_1)?;
        }
    }
    add(49152, 576, GgmlDType::Q8_0)?;
    let x576 = Tensor::randn(0f32, 1.0, (1, 576), &dev)?;
    let x1536 = Tensor::randn(0f32, 1.0, (1, 1536), &dev)?;
    let (v576, v1536): (Vec<f32>, Vec<f32>) = (
        x576.flatten_all()?.to_vec1()?,
        x1536.flatten_all()?.to_vec1()?,
    );
    let mut f_q8 = || {
        for (k, m) in &q8s {
            black_box(m.forward(if *k == 576 { &x576 } else { &x1536 }).unwrap());
        }
    };
    let mut f_packed = || {
        for p in &packs {
            black_box(p.matmul(if p.cols() == 576 { &v576 } else { &v1536 }, 1));
        }
    };
    let secs = time(
        &mut [&mut f_q8, &mut f_packed],
        batches,
        Duration::from_millis(200),
    );
    for ((v, s), b) in ["candle q8_0", "packed"]
        .iter()
        .zip(&secs)
        .zip([q8_bytes, packed_bytes])
    {
        let gbs = b as f64 / s / 1e9;
        if json {
            println!(
                "{{\"shape\":\"decode step\",\"rows\":1,\"variant\":\"{v}\",\"us_per_call\":{:.2},\"weight_gb_per_s\":{gbs:.2}}}",
                s * 1e6
            );
        } else {
            println!(
                "| decode step (30 layers + head) | 1 | {v} | {:.1} | {gbs:.1} |",
                s * 1e6
            );
        }
    }
    Ok(())
}
