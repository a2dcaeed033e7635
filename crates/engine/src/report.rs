//! KV reports: tokens seen vs. retained per layer and KV head, the hard eviction ratio, and every
//! byte of per-session state that grows with the tokens seen — the KV blocks the store holds plus
//! the eviction policy's own state (a gate's cache, accumulated scores, flags) — next to what a
//! full cache of the same block layout would hold.
//!
//! Invariants: `eviction_ratio = 1 - (sum of retained entries) / (tokens_seen * layers * heads)`;
//! `bytes_in_use = kv_block_bytes + policy_state_bytes`; `bytes_full` counts, for every (layer,
//! head), the blocks `tokens_seen` entries would need (KV only: the full cache has no policy
//! state), so `kv_block_bytes <= bytes_full` always and the two are comparable at block
//! granularity, while `bytes_in_use` may exceed `bytes_full` when a policy's state costs more
//! than its eviction saves. `kv_block_bytes` counts every block the session holds, including
//! blocks it shares copy-on-write with other sessions (a [`crate::SharedContext`] and its forks):
//! a forked session reports what the same session would hold on its own; `bytes_shared` says how
//! much of it is shared, and the pool ([`kv_store::PoolStats`]) counts each shared block once.

use kv_store::SequenceKv;

/// A snapshot of one session's cache.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct KvReport {
    /// Tokens fed through the model.
    pub tokens_seen: usize,
    /// Retained entries per (layer, head), averaged and rounded to the nearest token.
    pub tokens_retained: usize,
    /// Fraction of (token, layer, head) entries evicted.
    pub eviction_ratio: f64,
    /// Every byte of the session's growing state: `kv_block_bytes + policy_state_bytes`.
    pub bytes_in_use: usize,
    /// Bytes of the KV blocks this session holds.
    pub kv_block_bytes: usize,
    /// Bytes of the eviction policy's per-session state.
    pub policy_state_bytes: usize,
    /// KV bytes the same store would hold with nothing evicted (and no policy state).
    pub bytes_full: usize,
    /// Of `kv_block_bytes`, the bytes of blocks other sessions hold too (copy-on-write).
    pub bytes_shared: usize,
    /// Blocks held.
    pub blocks_in_use: usize,
    /// Retained entries, `[layer][kv_head]`.
    pub retained_per_layer_head: Vec<Vec<usize>>,
}

impl KvReport {
    /// Reads the store of a session that has seen `tokens_seen` tokens and whose policy holds
    /// `policy_state_bytes` of state.
    pub fn new(kv: &SequenceKv, tokens_seen: usize, policy_state_bytes: usize) -> Self {
        let retained: Vec<Vec<usize>> = (0..kv.n_layers())
            .map(|l| (0..kv.n_kv_heads()).map(|h| kv.retained(l, h)).collect())
            .collect();
        let heads = kv.n_layers() * kv.n_kv_heads();
        let total: usize = retained.iter().flatten().sum();
        let stats = kv.stats();
        let block_bytes = kv.pool().config().block_bytes();
        let blocks_full = heads * tokens_seen.div_ceil(kv.pool().config().block_size);
        KvReport {
            tokens_seen,
            tokens_retained: if heads == 0 {
                0
            } else {
                (total as f64 / heads as f64).round() as usize
            },
            eviction_ratio: if tokens_seen == 0 {
                0.0
            } else {
                1.0 - total as f64 / (tokens_seen * heads) as f64
            },
            bytes_in_use: stats.bytes_in_use + policy_state_bytes,
            kv_block_bytes: stats.bytes_in_use,
            policy_state_bytes,
            bytes_full: blocks_full * block_bytes,
            bytes_shared: stats.bytes_shared,
            blocks_in_use: stats.blocks_in_use,
            retained_per_layer_head: retained,
        }
    }

    /// The `kv` object of the `--json` contract.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tokens_seen": self.tokens_seen,
            "tokens_retained": self.tokens_retained,
            "eviction_ratio": self.eviction_ratio,
            "bytes_in_use": self.bytes_in_use,
            "kv_block_bytes": self.kv_block_bytes,
            "policy_state_bytes": self.policy_state_bytes,
            "bytes_full": self.bytes_full,
            "bytes_shared": self.bytes_shared,
            "blocks_in_use": self.blocks_in_use,
        })
    }
}
