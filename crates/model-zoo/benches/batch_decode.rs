//! Batched decode micro-benchmark (not a test): the default model's decode step for 1 and for
//! `B` sequences (default 16) of ~150 tokens of context each, through
//! [`model_zoo::LlamaModel::forward_batch`] (what `agate serve`'s scheduler runs per step). The
//! two batch sizes run in interleaved rounds; each keeps its best step. Prints ms per step,
//! tokens/s (batch size / step time) and the calling thread's CPU time per step (with one
//! thread, a figure that moves little when other processes share the cores). The sequences'
//! caches grow by one token per step and are trimmed back after each round, so every round
//! decodes at the same context.
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench -p model-zoo --bench batch_decode [-- --batch 16]
//! [-- --steps N] [-- --only B]` (`--only B` runs just batch size `B` for `--steps` steps, e.g.
//! under `perf record --call-graph dwarf`; valgrind cannot run the AVX-512 kernels). The model:
//! `AGATE_MODEL` or `~/.cache/agate/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use std::path::PathBuf;
use std::time::Instant;

use kv_store::{BlockPool, KvDtype, PoolConfig, SequenceKv};
use model_zoo::{KeepAll, LlamaModel, LogitsFor, SequenceInput, WeightFormat};

const CONTEXT: usize = 150;

fn arg(args: &[String], name: &str) -> Option<usize> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

/// Nanoseconds the calling thread has run on a CPU (Linux `schedstat`; 0 elsewhere): with one
/// thread, a step's CPU time barely moves when other processes share the cores.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Decodes one token for each of `seqs` (the batch), `steps` times; returns the best step's
/// wall time and the calling thread's best CPU time per step (seconds), and restores the caches
/// to their starting length.
#[inline(never)]
fn decode(model: &LlamaModel, seqs: &mut [SequenceKv], steps: usize) -> (f64, f64) {
    let mut hooks: Vec<KeepAll> = seqs.iter().map(|_| KeepAll).collect();
    let start = CONTEXT as u32;
    let (mut best, mut best_cpu) = (f64::INFINITY, f64::INFINITY);
    for s in 0..steps {
        let tokens: Vec<[u32; 1]> = (0..seqs.len())
            .map(|i| [(7 * i + s) as u32 % 1000 + 10])
            .collect();
        let mut batch: Vec<SequenceInput<'_>> = seqs
            .iter_mut()
            .zip(&mut hooks)
            .zip(&tokens)
            .map(|((kv, hook), t)| SequenceInput {
                tokens: t,
                start: start + s as u32,
                kv,
                hook,
                logits_for: LogitsFor::Last,
            })
            .collect();
        let (t0, c0) = (Instant::now(), thread_cpu_ns());
        let out = model.forward_batch(&mut batch).expect("forward");
        best = best.min(t0.elapsed().as_secs_f64());
        best_cpu = best_cpu.min((thread_cpu_ns() - c0) as f64 * 1e-9);
        assert!(out.iter().all(|r| r.is_ok()));
    }
    for kv in seqs.iter_mut() {
        kv.truncate_from(start);
    }
    (best, best_cpu)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let batch = arg(&args, "--batch").unwrap_or(16);
    let steps = arg(&args, "--steps").unwrap_or(8);
    let only = arg(&args, "--only");
    let path = std::env::var_os("AGATE_MODEL").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/agate/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        },
        PathBuf::from,
    );
    let model = match model_zoo::load(&path, WeightFormat::Auto) {
        Ok(loaded) => loaded.model,
        Err(e) => {
            eprintln!(
                "batch_decode: cannot load {}: {e} (set AGATE_MODEL)",
                path.display()
            );
            std::process::exit(2);
        }
    };
    let cfg = model.config().clone();
    let n = only.unwrap_or(batch).max(1);
    // Room for every sequence's context and steps, plus a partly filled block per table.
    let pool = BlockPool::new(PoolConfig::from_token_capacity(
        16,
        cfg.head_dim,
        KvDtype::F16,
        n * (CONTEXT + steps + 16) * cfg.n_layers * cfg.n_kv_heads,
    ));
    let mut seqs: Vec<SequenceKv> = (0..n)
        .map(|i| {
            let mut kv = SequenceKv::new(&pool, cfg.n_layers, cfg.n_kv_heads);
            let prompt: Vec<u32> = (0..CONTEXT as u32)
                .map(|t| (t * 31 + i as u32 * 17) % 5000 + 10)
                .collect();
            model
                .forward(&prompt, 0, &mut kv, &mut KeepAll, LogitsFor::Last)
                .expect("prefill");
            kv
        })
        .collect();
    if only.is_some() {
        let (t, cpu) = decode(&model, &mut seqs, steps);
        println!(
            "batch {n}: best step {:.2} ms ({:.2} ms CPU of the calling thread), {:.1} tok/s",
            t * 1e3,
            cpu * 1e3,
            n as f64 / t
        );
        return;
    }
    let (mut one, mut many) = (
        (f64::INFINITY, f64::INFINITY),
        (f64::INFINITY, f64::INFINITY),
    );
    let best = |a: (f64, f64), b: (f64, f64)| (a.0.min(b.0), a.1.min(b.1));
    for _ in 0..5 {
        one = best(one, decode(&model, &mut seqs[..1], steps));
        many = best(many, decode(&model, &mut seqs, steps));
    }
    println!(
        "context {CONTEXT}: batch 1 {:.2} ms/step ({:.2} CPU) {:.1} tok/s; batch {batch} {:.2} ms/step ({:.2} CPU) {:.1} tok/s ({:.2}x)",
        one.0 * 1e3,
        one.1 * 1e3,
        1.0 / one.0,
        many.0 * 1e3,
        many.1 * 1e3,
        batch as f64 / many.0,
        one.0 * batch as f64 / many.0
    );
}
