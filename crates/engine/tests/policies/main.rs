//! Eviction policies through the engine, on a small random model (fast, every policy) and on
//! the default model:
//! - mask/physical equivalence: logits with evicted entries physically removed equal the logits
//!   of a full cache in which the same entries are masked (-inf), within f32 summation-order
//!   error: 1e-5 of the largest logit (at least 1e-4; the two layouts group the attention sums
//!   differently, ~4e-6 relative after 30 layers of the default model);
//! - budgets: every head keeps exactly `Budget::keep_count(T)` (the requested ratio within one
//!   token per head), Full evicts nothing, and KV bytes fall with the retained count;
//! - a long multi-turn conversation with `keep 512` keeps KV bytes flat while tokens grow;
//! - protected tokens that do not fit a fixed budget are refused;
//! - Attention-Gate's per-layer thresholds: one value in every layer is the uniform threshold,
//!   each layer flags by its own, and lists that do not fit are refused;
//! - Attention-Gate at the edges: protections wider than the positions' range, gates that
//!   overflow f32.
//!
//! `equivalence` holds the first, `thresholds` and `ag_limits` the last two, `budgets` the
//! others.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

#[path = "../common/mod.rs"]
mod common;

mod ag_limits;
mod budgets;
mod equivalence;
mod thresholds;

use std::collections::HashSet;

use engine::{Engine, PolicySpec};
use kv_store::SequenceKv;

/// A tiny random model (3 layers, 6 query / 2 KV heads) in a temp dir, loaded.
fn tiny_engine(kv_dtype: engine::KvDtype) -> (tempfile::TempDir, Engine) {
    common::tiny_engine(3, 11, kv_dtype, 512)
}

/// The policy `name` evicting the fraction `evict`, with the gates file `gates` (Attention-Gate).
fn spec(name: &str, evict: f32, gates: Option<&std::path::Path>) -> PolicySpec {
    PolicySpec {
        gates: gates.map(|p| p.to_path_buf()),
        ..common::evicting(name, evict)
    }
}

/// Every head's retained positions.
fn kept_positions(kv: &SequenceKv) -> Vec<Vec<HashSet<u32>>> {
    (0..kv.n_layers())
        .map(|l| {
            (0..kv.n_kv_heads())
                .map(|h| kv.positions(l, h).into_iter().collect())
                .collect()
        })
        .collect()
}
