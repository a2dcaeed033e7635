//! Throughput benchmark, llama-bench style: for each context depth `d`, a fresh session is
//! filled with `d` tokens (untimed), then a prompt of `p` tokens is timed (prefill, time to first
//! token) and `n` tokens are generated greedily with end-of-sequence ignored (decode). Repeated
//! `r` times; medians and ranges are reported with the KV bytes in use and the peak RSS.
//!
//! Token ids are drawn uniformly from the vocabulary with a fixed seed, as llama-bench does, so
//! peers can run the same shapes; the content does not change the cost of the full cache.
//!
//! Every row also counts the bytes one decode step reads (the weights as held, plus the K and V
//! of every retained entry, averaged over the timed steps); [`measure_read_bandwidth`] measures
//! the machine's streaming-read bandwidth, and [`Roofline`] compares a decode figure with the
//! bound `bandwidth / bytes per token` (decode is memory-bound: each step reads every weight).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::policy::Policy;
use crate::sampling::SamplingParams;
use crate::session::GenerateRequest;

/// What to measure.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchSpec {
    /// Prompt tokens timed per run (`-p`).
    pub prompt: usize,
    /// Generated tokens timed per run (`-n`).
    pub generate: usize,
    /// Context already in the cache before the prompt (`-d`).
    pub depths: Vec<usize>,
    /// Runs per configuration (`-r`).
    pub repetitions: usize,
    /// Seed of the random token ids.
    pub seed: u64,
    /// Where RoPE places keys.
    pub positions: crate::Positions,
}

/// Median and range of one measured quantity.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Spread {
    /// Median over repetitions.
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Spread {
            median,
            min: values[0],
            max: values[n - 1],
        }
    }
}

/// One configuration's results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchRow {
    /// Policy name.
    pub policy: String,
    /// Context depth before the prompt.
    pub depth: usize,
    /// Prompt tokens.
    pub prompt: usize,
    /// Generated tokens.
    pub generate: usize,
    /// Seconds from the prompt to the first generated token.
    pub time_to_first_token_s: Spread,
    /// Prompt tokens per second.
    pub prefill_tokens_per_s: Spread,
    /// Generated tokens per second.
    pub decode_tokens_per_s: Spread,
    /// Process CPU milliseconds per prompt token (all threads; on a busy machine a steadier
    /// figure than wall time when run on one thread — spinning pool threads inflate it on more).
    pub prefill_cpu_ms_per_token: Spread,
    /// Process CPU milliseconds per generated token, as above.
    pub decode_cpu_ms_per_token: Spread,
    /// KV bytes in use at the end of a run.
    pub kv_bytes_in_use: usize,
    /// KV bytes a full cache would hold at the end of a run.
    pub kv_bytes_full: usize,
    /// Hard eviction ratio at the end of a run.
    pub eviction_ratio: f64,
    /// Peak resident memory of the process so far, bytes (Linux; 0 elsewhere).
    pub peak_rss_bytes: u64,
    /// Weight bytes one decode step reads (every projection and the LM head as held).
    pub weight_bytes_per_token: usize,
    /// K and V bytes one decode step reads (every retained entry), mean over the timed steps.
    pub kv_bytes_read_per_token: f64,
    /// The roofline of the decode figure, when the bandwidth was measured.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub roofline: Option<Roofline>,
}

/// A decode figure against the memory-bandwidth bound.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Roofline {
    /// Measured streaming-read bandwidth, GB/s (10^9 bytes).
    pub bandwidth_gb_per_s: f64,
    /// Bytes per decode step: weights plus retained K and V.
    pub bytes_per_token: f64,
    /// The bound: bandwidth / bytes per token.
    pub roofline_tokens_per_s: f64,
    /// Measured decode tokens/s over the bound.
    pub roofline_fraction: f64,
}

impl BenchRow {
    /// Sets the roofline of this row's decode figure for a bandwidth in bytes/s.
    pub fn with_roofline(mut self, bandwidth: f64) -> Self {
        let bytes = self.weight_bytes_per_token as f64 + self.kv_bytes_read_per_token;
        let bound = bandwidth / bytes.max(1.0);
        self.roofline = Some(Roofline {
            bandwidth_gb_per_s: bandwidth / 1e9,
            bytes_per_token: bytes,
            roofline_tokens_per_s: bound,
            roofline_fraction: self.decode_tokens_per_s.median / bound,
        });
        self
    }
}

/// Bytes/s of a streaming read over a buffer far larger than the caches (512 MiB), split over
/// `threads` threads; the best of `passes` passes (the first touches the pages and is not
/// timed).
pub fn measure_read_bandwidth(threads: usize, passes: usize) -> f64 {
    const BYTES: usize = 512 << 20;
    let threads = threads.max(1);
    let buf: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let part = buf.len().div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..passes.max(1) {
        let started = std::time::Instant::now();
        let sum: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = buf
                .chunks(part)
                .map(|chunk| {
                    scope.spawn(move || chunk.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.min(started.elapsed().as_secs_f64());
    }
    BYTES as f64 / best
}

/// Runs the benchmark for one policy; `progress` is called after each run with (done, total).
pub fn run(
    engine: &Engine,
    policy: &Policy,
    spec: &BenchSpec,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<BenchRow>> {
    check_sizes(engine, spec)?;
    let total = spec.depths.len().saturating_mul(spec.repetitions);
    let mut rows = Vec::new();
    for (di, &depth) in spec.depths.iter().enumerate() {
        let done = di * spec.repetitions;
        let mut repeated = |rep: usize| progress(done.saturating_add(rep + 1), total);
        rows.push(run_depth(engine, policy, spec, depth, &mut repeated)?);
    }
    Ok(rows)
}

/// Every size of `spec` is checked before any work starts: at least one repetition and one
/// prompt token, and each depth with the prompt and the generated tokens within the context.
fn check_sizes(engine: &Engine, spec: &BenchSpec) -> Result<()> {
    for (setting, value) in [
        ("BenchSpec.repetitions", spec.repetitions),
        ("BenchSpec.prompt", spec.prompt),
    ] {
        if value == 0 {
            return Err(EngineError::Setting {
                setting,
                problem: "must be at least 1, got 0".into(),
            });
        }
    }
    let context = engine.model_config().max_position;
    for &depth in &spec.depths {
        let total = depth
            .checked_add(spec.prompt)
            .and_then(|t| t.checked_add(spec.generate));
        if total.is_none_or(|t| t > context) {
            return Err(EngineError::Setting {
                setting: "BenchSpec.depths",
                problem: format!(
                    "depth {depth} + prompt {} + generate {} exceeds the model's context of {context} tokens",
                    spec.prompt, spec.generate
                ),
            });
        }
    }
    Ok(())
}

/// The figures of one timed run.
struct RunFigures {
    time_to_first_token_s: f64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    prefill_cpu_ms_per_token: f64,
    decode_cpu_ms_per_token: f64,
    kv_bytes_read_per_token: f64,
    kv: crate::KvReport,
}

/// The row of one depth: `spec.repetitions` runs on the same token ids (seeded), `repeated`
/// called with each run's index when it is done.
fn run_depth(
    engine: &Engine,
    policy: &Policy,
    spec: &BenchSpec,
    depth: usize,
    repeated: &mut dyn FnMut(usize),
) -> Result<BenchRow> {
    let vocab = engine.model_config().vocab_size as u32;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab)).collect() };
    let (filler, prompt) = (ids(depth), ids(spec.prompt));
    let mut runs = Vec::with_capacity(spec.repetitions);
    for rep in 0..spec.repetitions {
        runs.push(time_one_run(engine, policy, spec, &filler, &prompt)?);
        repeated(rep);
    }
    let spread = |f: fn(&RunFigures) -> f64| Spread::of(runs.iter().map(f).collect());
    let kv = &runs.last().expect("at least one repetition").kv;
    Ok(BenchRow {
        policy: policy.name().to_string(),
        depth,
        prompt: spec.prompt,
        generate: spec.generate,
        time_to_first_token_s: spread(|r| r.time_to_first_token_s),
        prefill_tokens_per_s: spread(|r| r.prefill_tokens_per_s),
        decode_tokens_per_s: spread(|r| r.decode_tokens_per_s),
        prefill_cpu_ms_per_token: spread(|r| r.prefill_cpu_ms_per_token),
        decode_cpu_ms_per_token: spread(|r| r.decode_cpu_ms_per_token),
        kv_bytes_in_use: kv.bytes_in_use,
        kv_bytes_full: kv.bytes_full,
        eviction_ratio: kv.eviction_ratio,
        peak_rss_bytes: peak_rss_bytes(),
        weight_bytes_per_token: engine.model().weight_bytes_per_token(),
        kv_bytes_read_per_token: spread(|r| r.kv_bytes_read_per_token).median,
        roofline: None,
    })
}

/// One run: a fresh session filled with `filler` (untimed), then `prompt` prefilled and
/// `spec.generate` tokens decoded greedily (end of sequence ignored), timed.
fn time_one_run(
    engine: &Engine,
    policy: &Policy,
    spec: &BenchSpec,
    filler: &[u32],
    prompt: &[u32],
) -> Result<RunFigures> {
    let mut session = engine.session_with(policy.clone())?;
    session.set_positions(spec.positions)?;
    session.prefill(filler)?;
    let request = GenerateRequest {
        max_tokens: spec.generate.max(1),
        sampling: SamplingParams::default(),
        stop: Vec::new(),
        stop_at_eos: false,
    };
    let cpu0 = process_cpu_secs();
    let prefill_secs = session.prefill(prompt)?;
    let before = kv_bytes_read(&session);
    let cpu1 = process_cpu_secs();
    let mut g = session.generate(&request, &mut |_| true)?;
    let cpu2 = process_cpu_secs();
    g.prompt_tokens = prompt.len();
    g.prefill_secs = prefill_secs;
    g.time_to_first_token_secs += prefill_secs;
    Ok(RunFigures {
        time_to_first_token_s: g.time_to_first_token_secs,
        prefill_tokens_per_s: g.prefill_tokens_per_s(),
        decode_tokens_per_s: g.decode_tokens_per_s(),
        prefill_cpu_ms_per_token: (cpu1 - cpu0) * 1e3 / prompt.len() as f64,
        decode_cpu_ms_per_token: (cpu2 - cpu1) * 1e3 / g.decode_steps.max(1) as f64,
        kv_bytes_read_per_token: (before + kv_bytes_read(&session)) / 2.0,
        kv: session.kv_report(),
    })
}

/// K and V bytes one attention pass over the session's cache reads: every retained entry.
fn kv_bytes_read(session: &crate::session::Session) -> f64 {
    let kv = session.kv();
    let entry = kv.pool().config().dtype.entry_bytes(kv.head_dim());
    let retained: usize = kv.stats().retained.iter().flatten().sum();
    (2 * retained * entry) as f64
}

/// CPU seconds this process has used, all threads (0 where unknown).
fn process_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out-pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Peak resident set size of this process (`VmHWM`), in bytes; 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_median_even_and_odd() {
        let s = Spread::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(vec![4.0, 1.0, 2.0, 3.0]).median, 2.5);
    }
}
