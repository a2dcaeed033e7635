//! The KNorm baseline: `score_j = -||k_j||_2`, so the lowest-norm keys are kept.
//!
//! Invariant: needs only the (rotated) keys of one KV head, row-major `[n, head_dim]`; the norm
//! is accumulated in f64 so scores of long keys do not lose low bits to summation order.

use crate::error::{invalid, Result};

/// Negated L2 norm of each key; `keys` is row-major `[n, head_dim]`.
///
/// Errors: `head_dim == 0`, or `keys.len()` not a multiple of `head_dim`.
pub fn key_norm_scores(keys: &[f32], head_dim: usize) -> Result<Vec<f32>> {
    if head_dim == 0 || !keys.len().is_multiple_of(head_dim) {
        return Err(invalid(
            "key_norm_scores: keys.len() / head_dim",
            format!("{} / {head_dim}", keys.len()),
            "a non-zero head_dim dividing keys.len()",
        ));
    }
    Ok(keys
        .chunks_exact(head_dim)
        .map(|k| {
            -(k.iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt()) as f32
        })
        .collect())
}
