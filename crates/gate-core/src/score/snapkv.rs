//! The SnapKV baseline (and PyramidKV, which is SnapKV under [`crate::pyramid_budgets`]):
//! once, at the end of prefill, score the prefix by the attention of the last `w` prompt
//! queries, smoothed by 1-D average pooling, and keep the top `C - w` plus the window itself.
//!
//! Invariants (the released SnapKV code): only the prefix (entries before the window) is
//! pooled and ranked; pooling is PyTorch's `avg_pool1d(kernel, stride 1, padding kernel/2)`
//! with its default `count_include_pad = True`, i.e. zeros beyond both ends of the prefix and
//! a constant divisor `kernel` (the window's own columns never leak into the prefix's scores).

use crate::error::{invalid, Result};
use crate::select::top_k_mask;

/// SnapKV's default observation window `w` (last prompt queries).
pub const SNAPKV_WINDOW: usize = 32;
/// SnapKV's default pooling kernel.
pub const SNAPKV_KERNEL: usize = 5;

/// "Same" 1-D average pooling, stride 1: `out[j] = sum(x[j-k/2 ..= j+k/2]) / k`, entries
/// outside `x` counting as zero (`count_include_pad = True`). NaN inputs propagate.
///
/// Errors: `kernel` even or zero (same padding needs an odd kernel).
pub fn avg_pool_same(x: &[f32], kernel: usize) -> Result<Vec<f32>> {
    if kernel.is_multiple_of(2) {
        return Err(invalid(
            "avg_pool_same: kernel",
            kernel,
            "an odd kernel size (same padding)",
        ));
    }
    let half = kernel / 2;
    let n = x.len();
    Ok((0..n)
        .map(|j| {
            let window = &x[j.saturating_sub(half)..(j + half + 1).min(n)];
            (window.iter().map(|&v| f64::from(v)).sum::<f64>() / kernel as f64) as f32
        })
        .collect())
}

/// SnapKV keep mask for one KV head at the end of prefill.
///
/// `window_sums[j]` is the attention the last `window` prompt queries gave entry `j` (summed
/// over those queries, group mean over the head's query heads), for all `n` prompt entries.
/// Keeps exactly `min(capacity, n)`: the last `min(window, n)` entries, and the top
/// `capacity - window` prefix entries by pooled score (crate ranking rule: ties to the more
/// recent, NaN last). If `capacity <= window`, only the most recent `capacity` are kept.
///
/// Errors: `kernel` even or zero.
pub fn snapkv_keep(
    window_sums: &[f32],
    window: usize,
    capacity: usize,
    kernel: usize,
) -> Result<Vec<bool>> {
    let n = window_sums.len();
    let prefix = n - window.min(n);
    let pooled = avg_pool_same(&window_sums[..prefix], kernel)?;
    Ok(top_k_mask(
        n,
        capacity,
        |i| i >= prefix,
        |i| pooled.get(i).map_or(0.0, |&v| f64::from(v)),
    ))
}
