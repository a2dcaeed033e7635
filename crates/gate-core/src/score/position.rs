//! The StreamingLLM baseline: keep the first `sinks` entries and the most recent ones.
//!
//! Invariant: position-only (no scores), identical for every head; exactly `min(keep, n)`
//! entries are kept, sinks first, so it serves the same budgets as the other policies.

/// Keep mask over `n` entries: the first `min(sinks, keep)` entries, and the most recent
/// `keep - min(sinks, keep)` of the rest; exactly `min(keep, n)` kept.
///
/// StreamingLLM with sink count `S` and window `W` is `streaming_keep(n, S, S + W)`.
pub fn streaming_keep(n: usize, sinks: usize, keep: usize) -> Vec<bool> {
    let keep = keep.min(n);
    let head = sinks.min(keep);
    let tail = keep - head;
    (0..n).map(|i| i < head || i >= n - tail).collect()
}
