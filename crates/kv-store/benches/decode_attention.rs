//! Decode-attention micro-benchmark (not a test): one layer of 9 query heads / 3 KV heads /
//! head_dim 64, one query row per step, at contexts 1k/4k/16k/32k, f32 and f16 storage.
//!
//! Compares the paged store (`SequenceKv::attend`) with the contiguous baseline
//! (`attend_dense`: the same kernel over one contiguous buffer per head, so the comparison
//! isolates paging), with the paged store after evicting a random half of every head, and with
//! the paged store forced onto one thread (to calibrate `PAR_MIN_WORK`). Prints a markdown
//! table; `--json` prints one JSON object per line instead; `--quick` measures for less time.
//! Timing: variants run in interleaved batches of ~50 ms and each keeps its best batch mean
//! (least disturbed by other processes); GB/s counts the K and V bytes of the retained entries
//! read per step.
//!
//! `--cpu` reads process CPU time instead of wall time (with `RAYON_NUM_THREADS=1`): the way to
//! compare kernels on a busy machine.
//!
//! Run: `cargo bench -p kv-store --bench decode_attention [-- --json] [-- --cpu]`.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

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

/// Deterministic pseudo-random numbers.
struct Lcg(u64);

impl Lcg {
    fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 16
    }

    /// Values in [-1, 1).
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next_u64() % (1 << 24)) as f32 / (1 << 23) as f32 - 1.0)
            .collect()
    }

    /// A mask keeping exactly `kept` of `n` entries, chosen uniformly.
    fn mask(&mut self, n: usize, kept: usize) -> Vec<bool> {
        let mut idx: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            idx.swap(i, (self.next_u64() % (i as u64 + 1)) as usize);
        }
        let mut keep = vec![false; n];
        idx[..kept].iter().for_each(|&i| keep[i] = true);
        keep
    }
}

/// The clock the timings read: wall time, or (`--cpu`) this process's CPU time, which a busy
/// machine does not inflate (use it with `RAYON_NUM_THREADS=1`: idle pool threads spin).
#[derive(Clone, Copy)]
enum Clock {
    Wall,
    Cpu,
}

impl Clock {
    fn now(self) -> f64 {
        match self {
            Clock::Wall => {
                static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
                START.get_or_init(Instant::now).elapsed().as_secs_f64()
            }
            Clock::Cpu => {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: a valid clock id and a valid out-pointer.
                unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
                ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
            }
        }
    }
}

/// Seconds per call of each variant: the best mean over `batches` rounds, each round running a
/// batch of about `batch` of every variant in turn. A variant is called with a repeat count and
/// runs its operation that many times.
fn time(
    fs: &mut [&mut dyn FnMut(usize)],
    batches: usize,
    batch: Duration,
    clock: Clock,
) -> Vec<f64> {
    let iters: Vec<usize> = fs
        .iter_mut()
        .map(|f| {
            f(1);
            let t0 = clock.now();
            f(1);
            ((batch.as_secs_f64() / (clock.now() - t0).max(1e-7)) as usize).max(1)
        })
        .collect();
    let mut best = vec![f64::INFINITY; fs.len()];
    for _ in 0..batches {
        for ((f, &n), b) in fs.iter_mut().zip(&iters).zip(&mut best) {
            let t = clock.now();
            f(n);
            *b = b.min((clock.now() - t) / n as f64);
        }
    }
    best
}

/// Seconds per decode step of each variant at one (dtype, context).
struct Row {
    dtype: KvDtype,
    ctx: usize,
    dense: f64,
    paged: f64,
    paged_half: f64,
    paged_1t: f64,
    /// Seconds per prefill chunk of [`PREFILL`] rows appended after the context (paged).
    prefill: f64,
}

/// The contiguous baseline's copy of a context: per KV head `[ctx, D]`, in f32 and in f16.
struct Dense {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    keys16: Vec<Vec<f16>>,
    values16: Vec<Vec<f16>>,
}

impl Dense {
    /// The copy of token-major `[ctx, HKV, D]` keys `k` and values `v`.
    fn new(k: &[f32], v: &[f32], ctx: usize) -> Self {
        let per_head = |src: &[f32], h: usize| -> Vec<f32> {
            (0..ctx)
                .flat_map(|t| src[(t * HKV + h) * D..(t * HKV + h + 1) * D].to_vec())
                .collect()
        };
        let keys: Vec<Vec<f32>> = (0..HKV).map(|h| per_head(k, h)).collect();
        let values: Vec<Vec<f32>> = (0..HKV).map(|h| per_head(v, h)).collect();
        let to16 = |x: &Vec<f32>| x.iter().map(|&e| f16::from_f32(e)).collect::<Vec<f16>>();
        Dense {
            keys16: keys.iter().map(to16).collect(),
            values16: values.iter().map(to16).collect(),
            keys,
            values,
        }
    }

    /// The heads for [`attend_dense`] in `dtype`'s storage (f32, else f16) at `positions`.
    fn heads<'a>(&'a self, dtype: KvDtype, positions: &'a [u32]) -> Vec<DenseHead<'a>> {
        (0..HKV)
            .map(|h| {
                let (keys, values) = match dtype {
                    KvDtype::F32 => (KvSlice::F32(&self.keys[h]), KvSlice::F32(&self.values[h])),
                    _ => (
                        KvSlice::F16(&self.keys16[h]),
                        KvSlice::F16(&self.values16[h]),
                    ),
                };
                DenseHead {
                    keys,
                    values,
                    positions,
                }
            })
            .collect()
    }
}

/// Query rows of the prefill variant: a prompt chunk attending causally to itself and the context.
const PREFILL: usize = 512;

fn bench(
    dtype: KvDtype,
    ctx: usize,
    rng: &mut Lcg,
    batches: usize,
    batch: Duration,
    clock: Clock,
) -> Row {
    let k = rng.vec(ctx * HKV * D);
    let v = rng.vec(ctx * HKV * D);
    let pos: Vec<u32> = (0..ctx as u32).collect();
    let q = rng.vec(HQ * D);
    let qpos = [ctx as u32];
    let opts = AttendOptions::for_head_dim(D);

    let cfg = PoolConfig::from_token_capacity(BLOCK, D, dtype, 2 * HKV * (ctx + BLOCK));
    let pool = BlockPool::new(cfg);
    let mut full = SequenceKv::new(&pool, 1, HKV);
    full.append(0, &k, &v, &pos)
        .expect("pool sized for the context");
    let mut half = SequenceKv::new(&pool, 1, HKV);
    half.append(0, &k, &v, &pos)
        .expect("pool sized for the context");
    for h in 0..HKV {
        half.evict(0, h, &rng.mask(ctx, ctx / 2))
            .expect("mask of the head's length");
    }

    let dense = Dense::new(&k, &v, ctx);
    let heads = dense.heads(dtype, &pos);

    // Inside a 1-thread pool the kernel takes its sequential path.
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("1-thread pool");
    let step = |kv: &SequenceKv| drop(black_box(kv.attend(0, &q, &qpos, &opts)));
    // The prefill variant: the last PREFILL entries of `full` are the chunk's own tokens.
    let pq = rng.vec(PREFILL * HQ * D);
    let ppos: Vec<u32> = (ctx.saturating_sub(PREFILL) as u32..ctx as u32).collect();
    let pq = &pq[..ppos.len() * HQ * D];
    let t = time(
        &mut [
            &mut |n| {
                (0..n).for_each(|_| drop(black_box(attend_dense(&heads, D, &q, &qpos, &opts))))
            },
            &mut |n| (0..n).for_each(|_| step(&full)),
            &mut |n| (0..n).for_each(|_| step(&half)),
            &mut |n| one_thread.install(|| (0..n).for_each(|_| step(&full))),
            &mut |n| (0..n).for_each(|_| drop(black_box(full.attend(0, pq, &ppos, &opts)))),
        ],
        batches,
        batch,
        clock,
    );
    Row {
        dtype,
        ctx,
        dense: t[0],
        paged: t[1],
        paged_half: t[2],
        paged_1t: t[3],
        prefill: t[4] / ppos.len() as f64,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let quick = args.iter().any(|a| a == "--quick");
    let clock = if args.iter().any(|a| a == "--cpu") {
        Clock::Cpu
    } else {
        Clock::Wall
    };
    let (batches, batch) = if quick {
        (3, Duration::from_millis(20))
    } else {
        (9, Duration::from_millis(50))
    };
    let threads = rayon::current_num_threads();
    let mut rng = Lcg(0x5eed);
    if !json {
        println!(
            "decode attention, 1 layer: {HQ} query heads / {HKV} KV heads / head_dim {D}, \
             block {BLOCK}, {threads} rayon threads"
        );
        println!();
        println!(
            "| dtype | context | dense tok/s | paged tok/s | paged/dense | paged 50% tok/s | \
             50%/full | paged 1-thread tok/s | dense GB/s | paged GB/s | paged 50% GB/s | \
             prefill{PREFILL} tok/s |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    for dtype in [KvDtype::F32, KvDtype::F16] {
        for ctx in [1024, 4096, 16384, 32768] {
            let r = bench(dtype, ctx, &mut rng, batches, batch, clock);
            let gbs =
                |len: usize, t: f64| (2 * HKV * len * r.dtype.entry_bytes(D)) as f64 / t / 1e9;
            let (dense_gbs, paged_gbs, half_gbs) = (
                gbs(r.ctx, r.dense),
                gbs(r.ctx, r.paged),
                gbs(r.ctx / 2, r.paged_half),
            );
            if json {
                println!(
                    "{{\"dtype\":\"{}\",\"context\":{},\"threads\":{threads},\"dense_tok_s\":{:.1},\
                     \"paged_tok_s\":{:.1},\"paged_half_tok_s\":{:.1},\"paged_1thread_tok_s\":{:.1},\
                     \"paged_over_dense\":{:.3},\"half_over_full\":{:.3},\"dense_gb_s\":{dense_gbs:.2},\
                     \"paged_gb_s\":{paged_gbs:.2},\"paged_half_gb_s\":{half_gbs:.2},\
                     \"prefill_tok_s\":{:.1}}}",
                    r.dtype,
                    r.ctx,
                    1.0 / r.dense,
                    1.0 / r.paged,
                    1.0 / r.paged_half,
                    1.0 / r.paged_1t,
                    r.dense / r.paged,
                    r.paged / r.paged_half,
                    1.0 / r.prefill,
                );
            } else {
                println!(
                    "| {} | {} | {:.0} | {:.0} | {:.2}× | {:.0} | {:.2}× | {:.0} | {dense_gbs:.1} | \
                     {paged_gbs:.1} | {half_gbs:.1} | {:.0} |",
                    r.dtype,
                    r.ctx,
                    1.0 / r.dense,
                    1.0 / r.paged,
                    r.dense / r.paged,
                    1.0 / r.paged_half,
                    r.paged / r.paged_half,
                    1.0 / r.paged_1t,
                    1.0 / r.prefill,
                );
            }
        }
    }
}
