//! The TOVA baseline: when a layer is over budget, drop the entries the *current* query
//! attends to least (attention averaged over all heads of the layer, see
//! [`crate::score::group_mean`] with one group).
//!
//! Invariant: layer-wise, so the same mask is applied to every KV head of the layer; ties drop
//! the older entry (the crate's ranking rule).

use crate::select::{select_top_k, Protection};

/// Keep mask for one TOVA step: keeps the `min(keep, n)` entries with the highest mean
/// attention from the current query (normally `n = keep + 1`: one entry is dropped).
pub fn tova_keep(mean_attention: &[f32], keep: usize) -> Vec<bool> {
    select_top_k(mean_attention, keep, &Protection::NONE)
}
