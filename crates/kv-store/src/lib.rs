//! agate's KV store: a paged, per-head ragged, compacting KV cache that frees real memory, with
//! CPU attention over the retained entries.
//!
//! - [`BlockPool`] (one per engine, shared by every session) hands out fixed-size blocks, each
//!   holding the keys and values of `block_size` tokens of one KV head in the pool's
//!   [`KvDtype`]; it is sized by a memory budget or a token capacity ([`PoolConfig`]).
//! - [`SequenceKv`] (one per session) keeps a block table per (layer, KV head): append (prefill
//!   chunks, decode tokens, single heads), evict by keep-mask with compaction that returns every
//!   emptied block to the pool at once, copy-on-write forks ([`SequenceKv::fork`]: blocks are
//!   shared and reference-counted, a write to a shared block goes to a copy), truncation of a
//!   failed pass's appends, reservations that make a step's blocks certain before it starts,
//!   cache positions (gaps closed by a repack that shifts keys through a [`KeyShift`]), reads,
//!   accounting, and [`SequenceKv::attend`] (several sequences' calls at once:
//!   [`SequenceKv::attend_batch`]).
//! - [`attend_dense`] runs the same kernel over contiguous buffers (baseline for benches/tests).
//!
//! Invariants the crate guarantees: retained entries keep their original positions and order;
//! bytes in use follow the retained count up to one block per head; running out of blocks is a
//! [`KvError::OutOfBlocks`], never a panic or an overwrite; one sequence never sees another's
//! writes (shared blocks are copied before they are written); no public function panics on bad
//! input — it returns a [`KvError`].

mod attention;
mod dtype;
mod error;
mod pool;
mod sequence;
mod simd;

pub use attention::{attend_dense, AttendOptions, AttendOutput, DenseHead, Parallel, PAR_MIN_WORK};
pub use dtype::{KvDtype, KvSlice, Q8_BLOCK};
pub use error::KvError;
pub use pool::{BlockPool, PoolConfig, PoolStats, DEFAULT_BLOCK_SIZE};
pub use sequence::{AttendCall, HeadContents, KeyShift, SequenceKv, SequenceStats};
