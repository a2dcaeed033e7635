//! The crate's one error type, [`KvError`].
//!
//! Invariant: every fallible public operation reports through this enum, and every message names
//! the layer / KV head / length / value that was wrong, so an engine can log it verbatim.

use thiserror::Error;

/// Everything that can go wrong in the KV store.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KvError {
    /// A layer index past the sequence's layer count.
    #[error("layer {layer} is out of range: the sequence has {n_layers} layers")]
    LayerOutOfRange {
        /// The offending layer index.
        layer: usize,
        /// Number of layers of the sequence.
        n_layers: usize,
    },
    /// A KV head index past the sequence's KV head count.
    #[error(
        "KV head {head} of layer {layer} is out of range: the sequence has {n_kv_heads} KV heads"
    )]
    HeadOutOfRange {
        /// Layer the access was for.
        layer: usize,
        /// The offending KV head index.
        head: usize,
        /// Number of KV heads per layer.
        n_kv_heads: usize,
    },
    /// The pool cannot supply the blocks an append needs; nothing was appended.
    #[error(
        "out of KV blocks: appending {tokens} token(s) to layer {layer} needs {requested} more \
         block(s) but the pool has {free} free of {total}"
    )]
    OutOfBlocks {
        /// Layer of the failed append.
        layer: usize,
        /// Tokens the append tried to add (per head).
        tokens: usize,
        /// Blocks the append needed.
        requested: usize,
        /// Blocks free in the pool at the time.
        free: usize,
        /// Capacity of the pool in blocks.
        total: usize,
    },
    /// The pool cannot set aside the blocks a step may need; nothing was reserved.
    #[error(
        "out of KV blocks: this step may need {requested} more block(s) but the pool has {free} \
         free of {total}"
    )]
    ReserveFailed {
        /// Blocks the reservation asked for beyond what the sequence holds or had reserved.
        requested: usize,
        /// Blocks free in the pool at the time.
        free: usize,
        /// Capacity of the pool in blocks.
        total: usize,
    },
    /// The pool cannot supply the copies of shared blocks an eviction or a repack of cache
    /// positions would write to (copy-on-write after a fork); nothing was changed.
    #[error(
        "out of KV blocks: writing to layer {layer} KV head {head} (an eviction or a repack) \
         touches {requested} block(s) shared with a fork, which must be copied first, but the \
         pool has {free} free of {total}"
    )]
    OutOfBlocksForCopy {
        /// Layer of the failed eviction or repack.
        layer: usize,
        /// KV head of the failed eviction or repack.
        head: usize,
        /// Copies the eviction or repack needed.
        requested: usize,
        /// Blocks free in the pool at the time.
        free: usize,
        /// Capacity of the pool in blocks.
        total: usize,
    },
    /// A buffer argument has the wrong number of elements.
    #[error("layer {layer}: `{what}` has length {got}, expected {expected}")]
    ShapeMismatch {
        /// Layer of the call.
        layer: usize,
        /// Which argument (e.g. `k`, `v`, `positions`, `q`).
        what: &'static str,
        /// Length the call required.
        expected: usize,
        /// Length it was given.
        got: usize,
    },
    /// A per-entry mask (keep mask or visibility flags) does not match a head's retained count.
    #[error("layer {layer} KV head {head}: `{what}` has length {got}, but the head retains {retained} entries")]
    MaskLength {
        /// Layer of the call.
        layer: usize,
        /// KV head of the mask.
        head: usize,
        /// Which mask (`keep` or `visible_until`).
        what: &'static str,
        /// Retained entries of that head.
        retained: usize,
        /// Length of the mask given.
        got: usize,
    },
    /// The number of query heads is not a positive multiple of the KV heads.
    #[error(
        "layer {layer}: q holds {n_q_heads} query heads per row, which is not a positive multiple \
         of the {n_kv_heads} KV heads"
    )]
    GroupMismatch {
        /// Layer of the call.
        layer: usize,
        /// Query heads inferred from `q.len() / (n_q * head_dim)`.
        n_q_heads: usize,
        /// KV heads of the sequence.
        n_kv_heads: usize,
    },
    /// `prob_sums` asked for query rows that do not exist.
    #[error("layer {layer}: prob_sums rows {start}..{end} are not within the {n_q} query rows")]
    RowRange {
        /// Layer of the call.
        layer: usize,
        /// Range start.
        start: usize,
        /// Range end.
        end: usize,
        /// Number of query rows.
        n_q: usize,
    },
    /// A pool configuration that cannot work (zero block size or head dim).
    #[error("invalid pool config: {field} = {value} (must be at least 1)")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: usize,
    },
    /// A dtype name that is not `f32`, `f16` or `bf16`.
    #[error("unknown KV dtype `{0}` (expected f32, f16, bf16, q8_0 or q4_0)")]
    UnknownDtype(String),
}

impl KvError {
    /// Whether the pool ran out of blocks (for an append, a step's reservation or a
    /// copy-on-write): a larger pool or more eviction would have avoided it.
    pub fn is_out_of_blocks(&self) -> bool {
        matches!(
            self,
            KvError::OutOfBlocks { .. }
                | KvError::ReserveFailed { .. }
                | KvError::OutOfBlocksForCopy { .. }
        )
    }
}
