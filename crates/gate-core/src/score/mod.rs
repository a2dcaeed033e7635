//! Eviction scorers: per-entry scores (higher = more worth keeping) for one (layer, KV head),
//! or, where the policy is inherently a selection (StreamingLLM, SnapKV's window, TOVA, NACL's
//! sampling), the keep mask itself. Exactly the definitions of `docs/algorithms.md`.
//!
//! Owns the scorers and [`group_mean`]. Invariants: scorers never see models or caches, only
//! slices in entry order (oldest first), and any selection they make goes through the ranking
//! rule of [`crate::select`], so ties and NaNs behave identically across policies.

mod h2o;
mod knorm;
mod nacl;
mod position;
mod random;
mod snapkv;
mod tova;

pub use h2o::H2oAccumulator;
pub use knorm::key_norm_scores;
pub use nacl::{nacl_keep, nacl_proxy_scores, NaclConfig, NaclPlan};
pub use position::streaming_keep;
pub use random::{random_scores, seed_for};
pub use snapkv::{avg_pool_same, snapkv_keep, SNAPKV_KERNEL, SNAPKV_WINDOW};
pub use tova::tova_keep;

use crate::error::{invalid, Result};

/// Averages per-query-head rows into per-KV-head rows (GQA group mean).
///
/// `values` is row-major `[n_q_heads, n]`; KV head `g` averages query heads
/// `g*G .. g*G+G-1` with `G = n_q_heads / n_kv_heads`. Returns row-major `[n_kv_heads, n]`.
/// With `n_kv_heads == 1` this is the mean over all heads (TOVA's layer-wise score).
///
/// Errors: zero heads, `n_q_heads` not a multiple of `n_kv_heads`, or
/// `values.len() != n_q_heads * n`.
pub fn group_mean(
    values: &[f32],
    n_q_heads: usize,
    n_kv_heads: usize,
    n: usize,
) -> Result<Vec<f32>> {
    if n_kv_heads == 0 || n_q_heads == 0 || !n_q_heads.is_multiple_of(n_kv_heads) {
        return Err(invalid(
            "group_mean: n_q_heads / n_kv_heads",
            format!("{n_q_heads} / {n_kv_heads}"),
            "non-zero head counts with n_q_heads a multiple of n_kv_heads",
        ));
    }
    if values.len() != n_q_heads * n {
        return Err(invalid(
            "group_mean: values.len()",
            values.len(),
            format!("n_q_heads * n = {n_q_heads} * {n}"),
        ));
    }
    let g = n_q_heads / n_kv_heads;
    let mut out = vec![0f32; n_kv_heads * n];
    for (h, row) in values.chunks_exact(n.max(1)).take(n_q_heads).enumerate() {
        let dst = &mut out[(h / g) * n..(h / g + 1) * n];
        for (d, &v) in dst.iter_mut().zip(row) {
            *d += v;
        }
    }
    let inv = 1.0 / g as f32;
    out.iter_mut().for_each(|v| *v *= inv);
    Ok(out)
}
