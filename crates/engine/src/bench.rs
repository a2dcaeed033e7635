//! Throughput benchmark, llama-bench style: for each context depth `d`, a fresh session is
//! filled with `d` tokens (untimed), then a prompt of `p` tokens is timed (prefill, time to first
//! token) and `n` tokens are generated greedily with end-of-sequence ignored (decode). Repeated
//! `r` times; medians and ranges are reported with the KV bytes in use and the peak RSS.
//!
//! Token ids are drawn uniformly from the vocabulary with a fixed seed, as llama-bench does, so
//! peers can run the same shapes; the content does not change the cost of the full cache.

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
    /// KV bytes in use at the end of a run.
    pub kv_bytes_in_use: usize,
    /// KV bytes a full cache would hold at the end of a run.
    pub kv_bytes_full: usize,
    /// Hard eviction ratio at the end of a run.
    pub eviction_ratio: f64,
    /// Peak resident memory of the process so far, bytes (Linux; 0 elsewhere).
    pub peak_rss_bytes: u64,
}

/// Runs the benchmark for one policy; `progress` is called after each run with (done, total).
pub fn run(
    engine: &Engine,
    policy: &Policy,
    spec: &BenchSpec,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<BenchRow>> {
    if spec.repetitions == 0 || spec.prompt == 0 {
        return Err(EngineError::Invalid(
            "bench needs at least one repetition and a prompt of at least one token".into(),
        ));
    }
    let context = engine.model_config().max_position;
    let vocab = engine.model_config().vocab_size as u32;
    // Every size is checked before any work starts.
    for &depth in &spec.depths {
        let total = depth
            .checked_add(spec.prompt)
            .and_then(|t| t.checked_add(spec.generate));
        if total.is_none_or(|t| t > context) {
            return Err(EngineError::Invalid(format!(
                "depth {depth} + prompt {} + generate {} exceeds the model's context of {context} tokens",
                spec.prompt, spec.generate
            )));
        }
    }
    let total = spec.depths.len().saturating_mul(spec.repetitions);
    let mut rows = Vec::new();
    for (di, &depth) in spec.depths.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let mut ids =
            |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab)).collect() };
        let (filler, prompt) = (ids(depth), ids(spec.prompt));
        let (mut ttft, mut prefill, mut decode) = (Vec::new(), Vec::new(), Vec::new());
        let mut last_report = None;
        for rep in 0..spec.repetitions {
            let mut session = engine.session_with(policy.clone())?;
            session.set_positions(spec.positions)?;
            session.prefill(&filler)?;
            let request = GenerateRequest {
                max_tokens: spec.generate.max(1),
                sampling: SamplingParams::default(),
                stop: Vec::new(),
                stop_at_eos: false,
            };
            let g = session.generate_from_tokens(&prompt, &request)?;
            ttft.push(g.time_to_first_token_secs);
            prefill.push(g.prefill_tokens_per_s());
            decode.push(g.decode_tokens_per_s());
            last_report = Some(session.kv_report());
            progress((di * spec.repetitions).saturating_add(rep + 1), total);
        }
        let report = last_report.expect("at least one repetition");
        rows.push(BenchRow {
            policy: policy.name().to_string(),
            depth,
            prompt: spec.prompt,
            generate: spec.generate,
            time_to_first_token_s: Spread::of(ttft),
            prefill_tokens_per_s: Spread::of(prefill),
            decode_tokens_per_s: Spread::of(decode),
            kv_bytes_in_use: report.bytes_in_use,
            kv_bytes_full: report.bytes_full,
            eviction_ratio: report.eviction_ratio,
            peak_rss_bytes: peak_rss_bytes(),
        });
    }
    Ok(rows)
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
