//! The scheduler's counters, gauges and latency histograms, updated by its thread at step
//! boundaries and read as a consistent [`MetricsSnapshot`] by anyone (the server's `/metrics`).
//!
//! Invariants: counters only grow; histogram buckets are cumulative upper bounds in seconds, as
//! Prometheus expects (`count` is the `+Inf` bucket); gauges describe the last step boundary.

use std::time::Duration;

/// Upper bounds (seconds) of the time-to-first-token histogram.
pub const TTFT_BUCKETS: [f64; 11] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Upper bounds (seconds) of the per-token latency histogram.
pub const TOKEN_LATENCY_BUCKETS: [f64; 10] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A latency histogram with fixed buckets.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Histogram {
    /// Upper bounds of the buckets, ascending (seconds).
    pub bounds: Vec<f64>,
    /// Observations at or below each bound (cumulative).
    pub cumulative: Vec<u64>,
    /// Sum of every observation (seconds).
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds`.
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            cumulative: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, value: Duration) {
        let v = value.as_secs_f64();
        for (bound, n) in self.bounds.iter().zip(&mut self.cumulative) {
            if v <= *bound {
                *n += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

/// Everything the scheduler counts.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MetricsSnapshot {
    /// Requests accepted into the queue.
    pub requests_submitted: u64,
    /// Requests refused because the queue was full.
    pub requests_rejected: u64,
    /// Requests that finished with a result.
    pub requests_completed: u64,
    /// Requests that failed (bad prompt, pool too small, a failed step).
    pub requests_failed: u64,
    /// Requests whose caller went away before the end.
    pub requests_cancelled: u64,
    /// Times a running request gave its blocks back to make room (it resumes later).
    pub preemptions: u64,
    /// Prompt tokens run through the model (prefill).
    pub prompt_tokens: u64,
    /// Prompt tokens served from the prompt cache instead.
    pub prompt_tokens_cached: u64,
    /// Requests that continued a cached session.
    pub prompt_cache_hits: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Tokens evicted by the sessions' policies (entries averaged over layers and KV heads).
    pub tokens_evicted: f64,
    /// Batched forward steps run.
    pub steps: u64,
    /// Sequences summed over every step (divide by `steps` for the mean batch).
    pub step_sequences: u64,
    /// Seconds from submission to the first generated token.
    pub time_to_first_token: Histogram,
    /// Seconds between consecutive tokens of one request.
    pub token_latency: Histogram,
    /// Requests waiting for admission.
    pub queue_length: usize,
    /// Requests admitted and not finished.
    pub active_sessions: usize,
    /// Finished conversations kept for reuse.
    pub cached_sessions: usize,
    /// Blocks held by those cached conversations.
    pub cached_blocks: usize,
    /// Blocks of the KV pool in use (by every session, cached ones included).
    pub kv_blocks_in_use: usize,
    /// Blocks of the KV pool free.
    pub kv_blocks_free: usize,
    /// Most blocks ever in use at once.
    pub kv_blocks_peak: usize,
    /// Bytes of one block.
    pub kv_block_bytes: usize,
}

impl Default for MetricsSnapshot {
    fn default() -> Self {
        MetricsSnapshot {
            requests_submitted: 0,
            requests_rejected: 0,
            requests_completed: 0,
            requests_failed: 0,
            requests_cancelled: 0,
            preemptions: 0,
            prompt_tokens: 0,
            prompt_tokens_cached: 0,
            prompt_cache_hits: 0,
            generated_tokens: 0,
            tokens_evicted: 0.0,
            steps: 0,
            step_sequences: 0,
            time_to_first_token: Histogram::new(&TTFT_BUCKETS),
            token_latency: Histogram::new(&TOKEN_LATENCY_BUCKETS),
            queue_length: 0,
            active_sessions: 0,
            cached_sessions: 0,
            cached_blocks: 0,
            kv_blocks_in_use: 0,
            kv_blocks_free: 0,
            kv_blocks_peak: 0,
            kv_block_bytes: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for ms in [50, 100, 500, 2000] {
            h.observe(Duration::from_millis(ms));
        }
        assert_eq!(h.cumulative, vec![2, 3]);
        assert_eq!(h.count, 4);
        assert!((h.sum - 2.65).abs() < 1e-9);
    }
}
