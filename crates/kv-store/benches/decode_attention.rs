//! Decode-attention micro-benchmark (not a test): one layer of 9 query heads / 3 KV heads /
//! head_dim 64, one query row per step, at contexts 1k/4k/16k/32k, f32 and f16 storage.
//!
//! Compares the paged store (`SequenceKv::attend`) with the contiguous baseline
//! (`attend_dense`: the same kernel over one contiguous buffer per head, so the comparison
//! isolates paging) and with the paged store after evicting a random half of every head.
//! Prints a markdown table; `--json` prints one JSON object per line instead. `--quick` runs
//! shorter measurements. Timing: the best of several ~50 ms batches (least disturbed by other
//! processes); GB/s counts the K and V bytes of the retained entries read per step.
//!
//! Run: `cargo bench -p kv-store --bench decode_attention [-- --json]`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use half::f16;
use kv_store::{
    attend_dense, AttendOptions, BlockPool, DenseHead, KvDtype, KvSlice, PoolConfig, SequenceKv,
};

const HQ: usize = 9;
const HKV: usize = 3;
const D: usize = 64;
const BLOCK: usize = 16;

/// Deterministic pseudo-random values in [-1, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// Seconds per call of `f`: the best mean over `batches` batches of about `batch` each.
fn time(mut f: impl FnMut(), batches: usize, batch: Duration) -> f64 {
    f();
    let t0 = Instant::now();
    f();
    let once = t0.elapsed().as_secs_f64().max(1e-7);
    let iters = ((batch.as_secs_f64() / once) as usize).max(1);
    (0..batches)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() / iters as f64
        })
        .fold(f64::INFINITY, f64::min)
}

struct Row {
    dtype: KvDtype,
    ctx: usize,
    dense: f64,
    paged: f64,
    paged_half: f64,
}

fn bench(dtype: KvDtype, ctx: usize, rng: &mut Lcg, batches: usize, batch: Duration) -> Row {
    let k = rng.vec(ctx * HKV * D);
    let v = rng.vec(ctx * HKV * D);
    let pos: Vec<u32> = (0..ctx as u32).collect();
    let q = rng.vec(HQ * D);
    let qpos = [ctx as u32 - 1];
    let opts = AttendOptions::for_head_dim(D);

    let pool = BlockPool::new(PoolConfig::from_token_capacity(
        BLOCK,
        D,
        dtype,
        2 * HKV * (ctx + BLOCK),
    ));
    let mut full = SequenceKv::new(&pool, 1, HKV);
    full.append(0, &k, &v, &pos)
        .expect("pool sized for the context");
    let mut half = SequenceKv::new(&pool, 1, HKV);
    half.append(0, &k, &v, &pos)
        .expect("pool sized for the context");
    for h in 0..HKV {
        // A random half, always keeping the query's own (last) token.
        let keep: Vec<bool> = (0..ctx).map(|j| j == ctx - 1 || rng.next() < 0.0).collect();
        let mut keep = keep;
        let extra = keep.iter().filter(|&&x| x).count() as isize - (ctx / 2) as isize;
        // Trim or pad to exactly ctx/2 retained so the ratio is exact.
        let mut j = 0;
        let mut diff = extra;
        while diff != 0 && j < ctx - 1 {
            if diff > 0 && keep[j] {
                keep[j] = false;
                diff -= 1;
            } else if diff < 0 && !keep[j] {
                keep[j] = true;
                diff += 1;
            }
            j += 1;
        }
        half.evict(0, h, &keep).expect("mask of the head's length");
    }

    // Contiguous baseline: per head [ctx, D] in the same dtype.
    let per_head = |src: &[f32], h: usize| -> Vec<f32> {
        (0..ctx)
            .flat_map(|t| src[(t * HKV + h) * D..(t * HKV + h + 1) * D].to_vec())
            .collect()
    };
    let (dk, dv): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
        (0..HKV).map(|h| (per_head(&k, h), per_head(&v, h))).unzip();
    let to16 = |x: &Vec<f32>| x.iter().map(|&e| f16::from_f32(e)).collect::<Vec<f16>>();
    let (hk, hv): (Vec<Vec<f16>>, Vec<Vec<f16>>) =
        dk.iter().zip(&dv).map(|(a, b)| (to16(a), to16(b))).unzip();
    let heads: Vec<DenseHead<'_>> = (0..HKV)
        .map(|h| match dtype {
            KvDtype::F32 => DenseHead {
                keys: KvSlice::F32(&dk[h]),
                values: KvSlice::F32(&dv[h]),
                positions: &pos,
            },
            _ => DenseHead {
                keys: KvSlice::F16(&hk[h]),
                values: KvSlice::F16(&hv[h]),
                positions: &pos,
            },
        })
        .collect();

    let dense = time(
        || drop(black_box(attend_dense(&heads, D, &q, &qpos, &opts))),
        batches,
        batch,
    );
    let paged = time(
        || drop(black_box(full.attend(0, &q, &qpos, &opts))),
        batches,
        batch,
    );
    let paged_half = time(
        || drop(black_box(half.attend(0, &q, &qpos, &opts))),
        batches,
        batch,
    );
    Row {
        dtype,
        ctx,
        dense,
        paged,
        paged_half,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let quick = args.iter().any(|a| a == "--quick");
    let (batches, batch) = if quick {
        (3, Duration::from_millis(20))
    } else {
        (9, Duration::from_millis(50))
    };
    let threads = rayon::current_num_threads();
    let mut rng = Lcg(0x5eed);
    if !json {
        println!("decode attention, 1 layer: {HQ} query heads / {HKV} KV heads / head_dim {D}, block {BLOCK}, {threads} rayon threads");
        println!();
        println!("| dtype | context | dense tok/s | paged tok/s | paged/dense | paged 50% tok/s | 50%/full | dense GB/s | paged GB/s | paged 50% GB/s |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    for dtype in [KvDtype::F32, KvDtype::F16] {
        for ctx in [1024, 4096, 16384, 32768] {
            let r = bench(dtype, ctx, &mut rng, batches, batch);
            let bytes = |len: usize| (2 * HKV * len * D * r.dtype.size_bytes()) as f64;
            let gbs = |len: usize, t: f64| bytes(len) / t / 1e9;
            if json {
                println!(
                    "{{\"dtype\":\"{}\",\"context\":{},\"dense_tok_s\":{:.1},\"paged_tok_s\":{:.1},\"paged_half_tok_s\":{:.1},\"paged_over_dense\":{:.3},\"half_over_full\":{:.3},\"dense_gb_s\":{:.2},\"paged_gb_s\":{:.2},\"paged_half_gb_s\":{:.2},\"threads\":{}}}",
                    r.dtype,
                    r.ctx,
                    1.0 / r.dense,
                    1.0 / r.paged,
                    1.0 / r.paged_half,
                    r.dense / r.paged,
                    r.paged / r.paged_half,
                    gbs(r.ctx, r.dense),
                    gbs(r.ctx, r.paged),
                    gbs(r.ctx / 2, r.paged_half),
                    threads
                );
            } else {
                println!(
                    "| {} | {} | {:.0} | {:.0} | {:.2}× | {:.0} | {:.2}× | {:.1} | {:.1} | {:.1} |",
                    r.dtype,
                    r.ctx,
                    1.0 / r.dense,
                    1.0 / r.paged,
                    r.dense / r.paged,
                    1.0 / r.paged_half,
                    r.paged / r.paged_half,
                    gbs(r.ctx, r.dense),
                    gbs(r.ctx, r.paged),
                    gbs(r.ctx / 2, r.paged_half)
                );
            }
        }
    }
}
