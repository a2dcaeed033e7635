//! The block pool: fixed-size blocks of one KV head's keys and values, shared by every sequence
//! of an engine ([`BlockPool`], [`PoolConfig`], [`PoolStats`]).
//!
//! Invariants:
//! - a block id is owned by at most one [`Block`] at a time; ids and buffers of released blocks
//!   go back to free lists and are reused;
//! - a [`Block`] may be held by several sequences at once (a fork shares it copy-on-write, see
//!   `sequence/`); it counts once in `blocks_in_use` and comes back once, from its last holder;
//! - `blocks_in_use + blocks_set_aside <= capacity_blocks`: an allocation that would exceed it
//!   fails as a whole, leaving the pool unchanged; blocks set aside for one sequence
//!   (a reservation, see `SequenceKv::reserve_blocks`) are handed only to that sequence;
//! - a block buffer is 64-byte aligned and [`PoolConfig::block_bytes`] long: keys
//!   `[block_size, head_dim]` first, then values `[block_size, head_dim]`, in the pool's dtype;
//! - buffers are allocated lazily (zeroed) on first use; released buffers are cached for reuse
//!   until [`BlockPool::trim`] hands them back to the allocator.

use std::sync::{Arc, Mutex, MutexGuard};

use bytemuck::{Pod, Zeroable};

use crate::{KvDtype, KvError};

/// Default number of tokens per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Alignment unit of block buffers (one cache line).
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C, align(64))]
pub(crate) struct Line([u8; 64]);

/// Shape and size of a [`BlockPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Tokens per block (default [`DEFAULT_BLOCK_SIZE`]).
    pub block_size: usize,
    /// Elements per key (and per value) vector.
    pub head_dim: usize,
    /// Element type stored in blocks.
    pub dtype: KvDtype,
    /// Maximum number of blocks the pool hands out at once.
    pub capacity_blocks: usize,
}

impl PoolConfig {
    /// Bytes of one block as allocated: K and V of `block_size` tokens of one KV head in `dtype`,
    /// rounded up to a multiple of 64 bytes.
    pub fn block_bytes(&self) -> usize {
        self.lines_per_block() * std::mem::size_of::<Line>()
    }

    /// A pool whose blocks fit in `bytes` (e.g. `--kv-memory-mb` × 2^20).
    pub fn from_memory_budget(
        block_size: usize,
        head_dim: usize,
        dtype: KvDtype,
        bytes: usize,
    ) -> Self {
        let mut cfg = PoolConfig {
            block_size,
            head_dim,
            dtype,
            capacity_blocks: 0,
        };
        cfg.capacity_blocks = bytes / cfg.block_bytes().max(1);
        cfg
    }

    /// A pool holding `head_tokens` entries in total, counted over every (sequence, layer, KV
    /// head) table: e.g. `sessions × n_layers × n_kv_heads × context`. Each table may waste up to
    /// one partly filled block; add `block_size` per table to the count to cover that.
    pub fn from_token_capacity(
        block_size: usize,
        head_dim: usize,
        dtype: KvDtype,
        head_tokens: usize,
    ) -> Self {
        PoolConfig {
            block_size,
            head_dim,
            dtype,
            capacity_blocks: head_tokens.div_ceil(block_size.max(1)),
        }
    }

    /// Capacity in bytes (`capacity_blocks × block_bytes`).
    pub fn capacity_bytes(&self) -> usize {
        self.capacity_blocks * self.block_bytes()
    }

    /// Bytes of one stored key (or value) vector.
    pub(crate) fn entry_bytes(&self) -> usize {
        self.dtype.entry_bytes(self.head_dim)
    }

    fn lines_per_block(&self) -> usize {
        (2 * self.block_size * self.entry_bytes()).div_ceil(std::mem::size_of::<Line>())
    }

    fn validate(&self) -> Result<(), KvError> {
        for (field, value) in [("block_size", self.block_size), ("head_dim", self.head_dim)] {
            if value == 0 {
                return Err(KvError::InvalidConfig { field, value });
            }
        }
        Ok(())
    }
}

/// A snapshot of a pool's accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Capacity in blocks.
    pub blocks_total: usize,
    /// Blocks owned by sequences.
    pub blocks_in_use: usize,
    /// Blocks set aside for sequences that reserved them, not yet handed out.
    pub blocks_set_aside: usize,
    /// Blocks any sequence can still take (`blocks_total - blocks_in_use - blocks_set_aside`).
    pub blocks_free: usize,
    /// Bytes of one block.
    pub block_bytes: usize,
    /// Bytes of the blocks owned by sequences.
    pub bytes_in_use: usize,
    /// Bytes allocated from the system: blocks in use plus released buffers cached for reuse.
    pub bytes_reserved: usize,
    /// Highest `blocks_in_use` seen since the pool was created.
    pub peak_blocks_in_use: usize,
}

/// One block owned by a sequence: its id and its buffer.
pub(crate) struct Block {
    pub(crate) id: u32,
    buf: Box<[Line]>,
}

impl Block {
    /// The block's bytes (keys then values).
    pub(crate) fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.buf)
    }

    /// The block's bytes, mutable.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.buf)
    }
}

#[derive(Default)]
struct PoolState {
    in_use: usize,
    reserved: usize,
    peak: usize,
    next_id: u32,
    free_ids: Vec<u32>,
    cached: Vec<Box<[Line]>>,
}

struct PoolShared {
    cfg: PoolConfig,
    state: Mutex<PoolState>,
}

/// The engine-wide block pool. Cheap to clone (an `Arc`), `Send + Sync`; every clone is the same
/// pool.
#[derive(Clone)]
pub struct BlockPool {
    shared: Arc<PoolShared>,
}

impl std::fmt::Debug for BlockPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockPool")
            .field("config", &self.shared.cfg)
            .field("stats", &self.stats())
            .finish()
    }
}

impl BlockPool {
    /// Creates a pool. A zero `block_size` or `head_dim` is raised to 1 (use [`BlockPool::try_new`]
    /// to reject such a config instead). No memory is allocated until blocks are used.
    pub fn new(mut cfg: PoolConfig) -> Self {
        cfg.block_size = cfg.block_size.max(1);
        cfg.head_dim = cfg.head_dim.max(1);
        Self::build(cfg)
    }

    /// Creates a pool, rejecting a zero `block_size` or `head_dim` with [`KvError::InvalidConfig`].
    pub fn try_new(cfg: PoolConfig) -> Result<Self, KvError> {
        cfg.validate()?;
        Ok(Self::build(cfg))
    }

    fn build(cfg: PoolConfig) -> Self {
        BlockPool {
            shared: Arc::new(PoolShared {
                cfg,
                state: Mutex::new(PoolState::default()),
            }),
        }
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.cfg
    }

    /// Current accounting.
    pub fn stats(&self) -> PoolStats {
        let st = self.lock();
        let cfg = &self.shared.cfg;
        let block_bytes = cfg.block_bytes();
        PoolStats {
            blocks_total: cfg.capacity_blocks,
            blocks_in_use: st.in_use,
            blocks_set_aside: st.reserved,
            blocks_free: cfg.capacity_blocks.saturating_sub(st.in_use + st.reserved),
            block_bytes,
            bytes_in_use: st.in_use * block_bytes,
            bytes_reserved: (st.in_use + st.cached.len()) * block_bytes,
            peak_blocks_in_use: st.peak,
        }
    }

    /// Frees the cached buffers of released blocks back to the allocator; returns the bytes freed.
    pub fn trim(&self) -> usize {
        let mut st = self.lock();
        let freed = st.cached.len() * self.shared.cfg.block_bytes();
        st.cached = Vec::new();
        freed
    }

    /// True when `other` is a clone of this pool.
    pub fn same_pool(&self, other: &BlockPool) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Hands out `n` blocks, `reserved` of them (at most `n`) from the caller's reservation, or
    /// none: `Err(free_blocks)` when the rest exceeds the blocks free for anyone.
    pub(crate) fn alloc(&self, n: usize, reserved: usize) -> Result<Vec<Block>, usize> {
        let capacity = self.shared.cfg.capacity_blocks;
        let mut st = self.lock();
        let reserved = reserved.min(n).min(st.reserved);
        let free = capacity.saturating_sub(st.in_use + st.reserved);
        if n - reserved > free {
            return Err(free);
        }
        let lines = self.shared.cfg.lines_per_block();
        let blocks = (0..n)
            .map(|_| {
                let id = st.free_ids.pop().unwrap_or_else(|| {
                    st.next_id += 1;
                    st.next_id - 1
                });
                let buf = st
                    .cached
                    .pop()
                    .unwrap_or_else(|| vec![Line::zeroed(); lines].into_boxed_slice());
                Block { id, buf }
            })
            .collect();
        st.reserved -= reserved;
        st.in_use += n;
        st.peak = st.peak.max(st.in_use);
        Ok(blocks)
    }

    /// Takes blocks back (all at once, one lock); `to_reserve` of them (at most their number)
    /// stay set aside for the caller's reservation.
    pub(crate) fn release(&self, blocks: impl IntoIterator<Item = Block>, to_reserve: usize) {
        let mut st = self.lock();
        let mut n = 0;
        for b in blocks {
            n += 1;
            st.free_ids.push(b.id);
            st.cached.push(b.buf);
        }
        st.in_use = st.in_use.saturating_sub(n);
        st.reserved += to_reserve.min(n);
    }

    /// Sets `n` free blocks aside for one caller; `Err(free_blocks)` (and nothing set aside)
    /// when fewer are free.
    pub(crate) fn reserve(&self, n: usize) -> Result<(), usize> {
        let capacity = self.shared.cfg.capacity_blocks;
        let mut st = self.lock();
        let free = capacity.saturating_sub(st.in_use + st.reserved);
        if n > free {
            return Err(free);
        }
        st.reserved += n;
        Ok(())
    }

    /// Gives `n` set-aside blocks back to everyone.
    pub(crate) fn unreserve(&self, n: usize) {
        let mut st = self.lock();
        st.reserved = st.reserved.saturating_sub(n);
    }

    /// Locks the state; a poisoned lock is still consistent (no update can panic half-way).
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
