//! Throughput benchmark, llama-bench style: for each context depth `d`, a fresh session is
//! filled with `d` tokens (untimed), then a prompt of `p` tokens is timed (prefill, time to first
//! token) and `n` tokens are generated greedily with end-of-sequence ignored (decode). Repeated
//! `r` times; medians and ranges are reported with the KV bytes in use and the peak RSS. With
//! several policies their runs alternate (see [`run`]), so the peers are measured side by side.
//!
//! Token ids are drawn uniformly from the vocabulary with a fixed seed, as llama-bench does, so
//! peers can run the same shapes; the content does not change the cost of the full cache. It
//! does change what an eviction policy keeps (Attention-Gate keeps more of random ids than of
//! prose), so a text file can stand in for them ([`BenchSpec::text`]): its tokens, repeated as
//! often as the depth and the prompt need.
//!
//! Every row also counts the bytes one decode step reads (the weights as held, plus the K and V
//! of every retained entry, averaged over the timed steps); [`measure_read_bandwidth`] measures
//! the machine's streaming-read bandwidth, and [`Roofline`] compares a decode figure with the
//! bound `bandwidth / bytes per token` (decode is memory-bound: each step reads every weight).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::data_file;
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
    /// A text file whose tokens (read in order, from the start again when they run out) are the
    /// context and then the prompt, instead of random ids. Only its beginning is read: 64
    /// bytes per token needed, at least 64 KiB.
    pub text: Option<std::path::PathBuf>,
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
    /// Runs the spreads are over (`-r`).
    pub repetitions: usize,
    /// Seconds from the prompt to the first generated token.
    pub time_to_first_token_s: Spread,
    /// Prompt tokens per second.
    pub prefill_tokens_per_s: Spread,
    /// Generated tokens per second (decode steps: every generated token after the first, which
    /// the prompt's prefill yields; 0 when `generate` < 2).
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
    /// Peak resident memory of the process once every policy's runs at this depth were done
    /// (the policies alternate, so it is theirs together), bytes (Linux; 0 elsewhere).
    pub peak_rss_bytes: u64,
    /// Weight bytes one decode step reads (every projection and the LM head as held, and the
    /// policy's own: Attention-Gate's gates).
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

/// Where a benchmark stands, told to [`run`]'s `progress` before each run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchProgress<'a> {
    /// Runs finished.
    pub done: usize,
    /// Runs in all.
    pub total: usize,
    /// The policy of the run about to start.
    pub policy: &'a str,
    /// Its depth.
    pub depth: usize,
    /// Its repetition, from 0.
    pub repetition: usize,
}

/// Runs the benchmark of every policy at every depth, telling `progress` before each run. Rows
/// come policy by policy, each policy's depths in order.
///
/// A depth's runs alternate the policies, in order on even repetitions and in reverse on odd
/// ones (ABBA): whatever drifts during the benchmark (the machine's load, its clock, the
/// pool's free blocks left by the run before) falls on every policy alike, so their figures
/// compare within one invocation.
pub fn run(
    engine: &Engine,
    policies: &[Policy],
    spec: &BenchSpec,
    progress: &mut dyn FnMut(BenchProgress<'_>),
) -> Result<Vec<BenchRow>> {
    check_sizes(engine, spec)?;
    let total = policies
        .len()
        .saturating_mul(spec.depths.len())
        .saturating_mul(spec.repetitions);
    let needed = spec.depths.iter().max().map_or(0, |d| d + spec.prompt);
    let text = spec
        .text
        .as_deref()
        .map(|p| text_tokens(engine, p, needed))
        .transpose()?;
    let mut done = 0;
    let mut rows: Vec<Vec<BenchRow>> = policies.iter().map(|_| Vec::new()).collect();
    for &depth in &spec.depths {
        let (filler, prompt) = match &text {
            Some(tokens) => text_run(tokens, depth, spec.prompt),
            None => random_tokens(engine, spec, depth),
        };
        let mut runs: Vec<Vec<RunFigures>> = policies.iter().map(|_| Vec::new()).collect();
        for rep in 0..spec.repetitions {
            for pi in abba_order(policies.len(), rep) {
                progress(BenchProgress {
                    done,
                    total,
                    policy: policies[pi].name(),
                    depth,
                    repetition: rep,
                });
                runs[pi].push(time_one_run(engine, &policies[pi], spec, &filler, &prompt)?);
                done += 1;
            }
        }
        for ((policy, runs), rows) in policies.iter().zip(&runs).zip(&mut rows) {
            rows.push(row_of(engine, policy, spec, depth, runs)?);
        }
    }
    Ok(rows.into_iter().flatten().collect())
}

/// The order of the policies in repetition `rep`: forward when it is even, reversed when odd.
fn abba_order(n: usize, rep: usize) -> Vec<usize> {
    if rep.is_multiple_of(2) {
        (0..n).collect()
    } else {
        (0..n).rev().collect()
    }
}

/// Bytes of a `--text` file read per token the benchmark needs: far more than any tokenizer's
/// longest token, so that the tokens taken are the file's own, in order, however long it is.
const TEXT_BYTES_PER_TOKEN: u64 = 64;

/// The tokens of the start of the text file `path` (no BOS; at least one, each in the model's
/// vocabulary): enough of it for `needed` tokens, not more — the file may be huge.
fn text_tokens(engine: &Engine, path: &std::path::Path, needed: usize) -> Result<Vec<u32>> {
    let max_bytes = (needed as u64)
        .saturating_mul(TEXT_BYTES_PER_TOKEN)
        .max(1 << 16);
    let text = data_file::read_text_prefix(path, max_bytes)?;
    let tokens = engine.tokenizer().encode(&text, false)?;
    let problem = |p: String| Err(data_file::data_error(path, None, p, None));
    if tokens.is_empty() {
        return problem("has no text to take the benchmark's tokens from".into());
    }
    let vocab = engine.model_config().vocab_size;
    if let Some(id) = tokens.iter().find(|&&id| id as usize >= vocab) {
        return problem(format!(
            "its text gives token {id}, outside the model's vocabulary of {vocab}: the \
             tokenizer does not fit these weights"
        ));
    }
    Ok(tokens)
}

/// The context (`depth` tokens) and the prompt (`prompt` tokens) taken in order from `tokens`
/// (not empty), from its start again whenever it runs out.
fn text_run(tokens: &[u32], depth: usize, prompt: usize) -> (Vec<u32>, Vec<u32>) {
    let mut ids = tokens.iter().copied().cycle();
    let filler = ids.by_ref().take(depth).collect();
    (filler, ids.take(prompt).collect())
}

/// The context and the prompt of a depth's runs: uniform token ids from `spec.seed`, the same
/// for every policy and repetition.
fn random_tokens(engine: &Engine, spec: &BenchSpec, depth: usize) -> (Vec<u32>, Vec<u32>) {
    let vocab = engine.model_config().vocab_size as u32;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut ids = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab)).collect() };
    (ids(depth), ids(spec.prompt))
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
                setting: "BenchSpec.sizes",
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

/// The row of one policy at one depth from its runs (at least one).
fn row_of(
    engine: &Engine,
    policy: &Policy,
    spec: &BenchSpec,
    depth: usize,
    runs: &[RunFigures],
) -> Result<BenchRow> {
    let policy_weight_bytes = policy.decode_weight_bytes()?;
    let spread = |f: fn(&RunFigures) -> f64| Spread::of(runs.iter().map(f).collect());
    let kv = &runs.last().expect("at least one repetition").kv;
    Ok(BenchRow {
        policy: policy.name().to_string(),
        depth,
        prompt: spec.prompt,
        generate: spec.generate,
        repetitions: runs.len(),
        time_to_first_token_s: spread(|r| r.time_to_first_token_s),
        prefill_tokens_per_s: spread(|r| r.prefill_tokens_per_s),
        decode_tokens_per_s: spread(|r| r.decode_tokens_per_s),
        prefill_cpu_ms_per_token: spread(|r| r.prefill_cpu_ms_per_token),
        decode_cpu_ms_per_token: spread(|r| r.decode_cpu_ms_per_token),
        kv_bytes_in_use: kv.bytes_in_use,
        kv_bytes_full: kv.bytes_full,
        eviction_ratio: kv.eviction_ratio,
        peak_rss_bytes: peak_rss_bytes(),
        weight_bytes_per_token: engine.model().weight_bytes_per_token() + policy_weight_bytes,
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
        // No decode step (`generate` 1: the prefill samples the only token): 0, as the rate.
        decode_cpu_ms_per_token: match g.decode_steps {
            0 => 0.0,
            steps => (cpu2 - cpu1) * 1e3 / steps as f64,
        },
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
    fn a_text_run_takes_the_tokens_in_order_and_wraps() {
        assert_eq!(
            text_run(&[1, 2, 3], 4, 3),
            (vec![1, 2, 3, 1], vec![2, 3, 1])
        );
        assert_eq!(text_run(&[5, 6, 7, 8, 9], 0, 2), (vec![], vec![5, 6]));
        assert_eq!(text_run(&[5, 6, 7, 8, 9], 2, 2), (vec![5, 6], vec![7, 8]));
    }

    #[test]
    fn abba_reverses_every_odd_repetition() {
        assert_eq!(abba_order(3, 0), [0, 1, 2]);
        assert_eq!(abba_order(3, 1), [2, 1, 0]);
        assert_eq!(abba_order(3, 2), [0, 1, 2]);
        assert_eq!(abba_order(1, 1), [0]);
    }

    #[test]
    fn spread_median_even_and_odd() {
        let s = Spread::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(vec![4.0, 1.0, 2.0, 3.0]).median, 2.5);
    }
}
