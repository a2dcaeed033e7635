//! One session's cache: `n_layers × n_kv_heads` block tables over a shared [`BlockPool`]
//! ([`SequenceKv`]), with append, evict-by-mask compaction, copy-on-write forks, reads,
//! statistics and attention.
//!
//! Invariants, per (layer, KV head) table:
//! - entry `i` (in order of retention) lives in slot `head + i`: block `(head + i) / block_size`,
//!   offset `(head + i) % block_size`, with `head < block_size` free slots at the start of the
//!   first block (left by compaction towards the back, see `HeadTable::compact`);
//! - `blocks.len() == ceil((head + retained) / block_size)`: no empty block is ever held, so the
//!   bytes in use follow the retained count up to two partly filled blocks per head (the first
//!   and the last);
//! - operations are all-or-nothing: a failed call (bad argument, pool exhausted) changes nothing;
//!   every block a call may need (new blocks, copies of shared ones) is taken from the pool
//!   before anything is written;
//! - blocks are reference-counted: [`SequenceKv::fork`] shares every block with the new
//!   sequence, and a table writes only to blocks it holds alone — a shared block is copied into
//!   a fresh one first (copy-on-write), so no sequence ever sees another's writes;
//! - a block returns to the pool when its last holder drops it (evict, clear, truncate, drop),
//!   so the pool counts each physical block once however many sequences share it; every path
//!   that drops entries returns the emptied blocks to the pool in one call;
//! - cache positions (a sequence built by [`SequenceKv::with_cache_positions`]): besides its
//!   token position, every entry has a cache position, the one its key was rotated for: new
//!   entries take the positions after the table's last one, eviction leaves gaps, and
//!   [`SequenceKv::repack_cache_positions`] closes them — the longest run of entries whose
//!   positions are already consecutive stays, every other run's keys are shifted by the
//!   [`KeyShift`], so a repack moves the fewest keys; cache positions increase within a table
//!   and never exceed the last entry's token position; a fork carries them (and the shift);
//! - a reservation ([`SequenceKv::reserve_blocks`]) keeps `ceiling - owned` blocks set aside in
//!   the pool for this sequence, `owned` being the blocks it holds alone (a shared block may
//!   need a copy before it is written, so it counts as not yet paid for): appends, copies and
//!   repacks draw on it first, freed blocks refill it.
//!
//! Layout: the per-(layer, KV head) block table and its compaction and repack in `table.rs`;
//! reservations and the block accounting they rest on in `reservation.rs`; reads, statistics and
//! attention in `read.rs`; here the sequence itself (creation, cache positions, append, evict,
//! fork, truncation, clear).

mod read;
mod reservation;
mod table;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::{BlockPool, KvError, PoolConfig};

pub use read::{AttendCall, HeadContents, SequenceStats};
use reservation::Reservation;
pub(crate) use table::HeadTable;
use table::{drop_holder, KeepMask};

/// Rewrites keys whose cache position moved: `keys` is `[m, head_dim]` f32 (read from the
/// store, written back in the pool's dtype after the call), each moved by `delta` positions.
/// A decoder that rotates keys for their cache position passes a rotary re-rotation by `delta`
/// positions: rotations compose.
pub type KeyShift = Arc<dyn Fn(&mut [f32], i64) + Send + Sync>;

/// One session's KV cache: a block table per (layer, KV head), all drawing on one shared pool.
/// `Send + Sync`; dropping it returns every block to the pool.
pub struct SequenceKv {
    pool: BlockPool,
    cfg: PoolConfig,
    n_layers: usize,
    n_kv_heads: usize,
    /// `[layer * n_kv_heads + head]`.
    tables: Vec<HeadTable>,
    /// Per layer: one past the highest position appended.
    tokens_seen: Vec<u64>,
    /// Cache positions: how a key is shifted to another cache position.
    key_shift: Option<KeyShift>,
    /// Blocks set aside for this sequence, if it reserved any.
    reservation: Option<Reservation>,
    /// Whether another sequence may hold some of this one's blocks: set by a fork (of this
    /// sequence, or the fork it is), cleared when a count finds none shared. While clear, every
    /// block is held alone and counting them reads no block.
    may_share: AtomicBool,
}

impl std::fmt::Debug for SequenceKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequenceKv")
            .field("n_layers", &self.n_layers)
            .field("n_kv_heads", &self.n_kv_heads)
            .field("cache_positions", &self.key_shift.is_some())
            .field("reservation", &self.reservation)
            .field("stats", &self.stats())
            .finish()
    }
}

impl SequenceKv {
    /// An empty cache of `n_layers × n_kv_heads` tables drawing blocks from `pool`.
    pub fn new(pool: &BlockPool, n_layers: usize, n_kv_heads: usize) -> Self {
        SequenceKv {
            pool: pool.clone(),
            cfg: *pool.config(),
            n_layers,
            n_kv_heads,
            tables: (0..n_layers * n_kv_heads)
                .map(|_| HeadTable::default())
                .collect(),
            tokens_seen: vec![0; n_layers],
            key_shift: None,
            reservation: None,
            may_share: AtomicBool::new(false),
        }
    }

    /// An empty cache whose entries also have cache positions (see the module header); `shift`
    /// moves a key to another one when [`SequenceKv::repack_cache_positions`] closes gaps. The
    /// decoder's cache positions mode rotates keys for their cache position.
    pub fn with_cache_positions(
        pool: &BlockPool,
        n_layers: usize,
        n_kv_heads: usize,
        shift: KeyShift,
    ) -> Self {
        let mut kv = Self::new(pool, n_layers, n_kv_heads);
        kv.key_shift = Some(shift);
        kv
    }

    /// Whether entries have cache positions ([`SequenceKv::with_cache_positions`]).
    pub fn has_cache_positions(&self) -> bool {
        self.key_shift.is_some()
    }

    /// The cache position the next entry of (`layer`, `head`) takes; `None` without cache
    /// positions or out of range.
    pub fn next_cache_position(&self, layer: usize, head: usize) -> Option<u32> {
        self.key_shift.as_ref()?;
        self.table(layer, head).map(HeadTable::next_cache_position)
    }

    /// Cache positions of the retained entries of (`layer`, `head`), in order; empty without
    /// them or out of range.
    pub fn cache_positions(&self, layer: usize, head: usize) -> Vec<u32> {
        self.table(layer, head)
            .map_or_else(Vec::new, |t| t.entry_cache_positions().to_vec())
    }

    /// The widest span of cache positions any head covers, its next entry included (`next -
    /// first`): the largest query-key distance the next token would see. 0 without them.
    pub fn widest_cache_span(&self) -> u32 {
        self.tables
            .iter()
            .map(HeadTable::cache_span)
            .max()
            .unwrap_or(0)
    }

    /// Closes the gaps eviction left in the cache positions of every head whose span
    /// ([`SequenceKv::widest_cache_span`]) exceeds `max_span`, shifting the fewest keys (see the
    /// module header). Each repack shifts keys by whole gaps at once, rarely, so keys stored in
    /// f16 lose no rotation to rounding. A no-op without cache positions. Blocks shared with a
    /// fork that a repack writes are copied first (from the reservation, if any); if the pool
    /// cannot supply those copies the call fails with [`KvError::OutOfBlocksForCopy`] (naming
    /// the first head that needed one) and changes nothing.
    pub fn repack_cache_positions(&mut self, max_span: u32) -> Result<(), KvError> {
        let Some(shift) = self.key_shift.clone() else {
            return Ok(());
        };
        let bs = self.cfg.block_size;
        let due: Vec<usize> = (0..self.tables.len())
            .filter(|&i| self.tables[i].cache_span() > max_span)
            .collect();
        let copies: Vec<(usize, usize)> = due
            .iter()
            .map(|&i| {
                let t = &self.tables[i];
                let shared = t
                    .repack_writes(bs)
                    .into_iter()
                    .filter(|&b| t.shared(b..b + 1) > 0)
                    .count();
                (i, shared)
            })
            .collect();
        let requested = copies.iter().map(|&(_, n)| n).sum();
        let mut fresh = self.take_blocks(requested).map_err(|free| {
            let first = copies.iter().find(|&&(_, n)| n > 0).map_or(0, |&(i, _)| i);
            KvError::OutOfBlocksForCopy {
                layer: first / self.n_kv_heads,
                head: first % self.n_kv_heads,
                requested,
                free,
                total: self.cfg.capacity_blocks,
            }
        })?;
        let mut released = Vec::new();
        for i in due {
            self.tables[i].repack(&self.cfg, &shift, &mut fresh, &mut released);
        }
        released.append(&mut fresh);
        self.give_back(released);
        Ok(())
    }

    /// Number of layers.
    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    /// KV heads per layer.
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    /// Elements per key/value vector (the pool's).
    pub fn head_dim(&self) -> usize {
        self.cfg.head_dim
    }

    /// The pool this sequence draws from.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    fn check_layer(&self, layer: usize) -> Result<(), KvError> {
        if layer < self.n_layers {
            Ok(())
        } else {
            Err(KvError::LayerOutOfRange {
                layer,
                n_layers: self.n_layers,
            })
        }
    }

    fn index(&self, layer: usize, head: usize) -> Result<usize, KvError> {
        self.check_layer(layer)?;
        if head < self.n_kv_heads {
            Ok(layer * self.n_kv_heads + head)
        } else {
            Err(KvError::HeadOutOfRange {
                layer,
                head,
                n_kv_heads: self.n_kv_heads,
            })
        }
    }

    fn table(&self, layer: usize, head: usize) -> Option<&HeadTable> {
        self.index(layer, head).ok().map(|i| &self.tables[i])
    }

    /// Appends `n = positions.len()` tokens to every KV head of `layer`. `k`, `v`: token-major
    /// `[n, n_kv_heads, head_dim]` f32 (converted to the pool's dtype). All-or-nothing: if the
    /// pool cannot supply the blocks, nothing is appended and [`KvError::OutOfBlocks`] is returned.
    pub fn append(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        positions: &[u32],
    ) -> Result<(), KvError> {
        self.check_layer(layer)?;
        self.append_range(layer, 0..self.n_kv_heads, k, v, positions)
    }

    /// Appends `n = positions.len()` tokens to KV head `head` of `layer` only (Attention-Gate
    /// decode appends a token only to the heads that keep it). `k`, `v`: `[n, head_dim]` f32.
    /// All-or-nothing, like [`SequenceKv::append`].
    pub fn append_head(
        &mut self,
        layer: usize,
        head: usize,
        k: &[f32],
        v: &[f32],
        positions: &[u32],
    ) -> Result<(), KvError> {
        self.index(layer, head)?;
        self.append_range(layer, head..head + 1, k, v, positions)
    }

    /// Appends to heads `heads` of a valid `layer` from `[n, heads.len(), head_dim]` sources.
    fn append_range(
        &mut self,
        layer: usize,
        heads: std::ops::Range<usize>,
        k: &[f32],
        v: &[f32],
        positions: &[u32],
    ) -> Result<(), KvError> {
        let (n, d, nh) = (positions.len(), self.cfg.head_dim, heads.len());
        for (what, got) in [("k", k.len()), ("v", v.len())] {
            if got != n * nh * d {
                return Err(KvError::ShapeMismatch {
                    layer,
                    what,
                    expected: n * nh * d,
                    got,
                });
            }
        }
        if n == 0 {
            return Ok(());
        }
        let base = layer * self.n_kv_heads;
        let bs = self.cfg.block_size;
        // New blocks, plus a copy of each shared partly filled last block (copy-on-write).
        let needs: Vec<usize> = heads
            .clone()
            .map(|h| self.tables[base + h].blocks_needed(bs, n))
            .collect();
        let copies: usize = heads
            .clone()
            .map(|h| self.tables[base + h].shared_for_append(bs))
            .sum();
        let requested = needs.iter().sum::<usize>() + copies;
        let mut fresh = self
            .take_blocks(requested)
            .map_err(|free| KvError::OutOfBlocks {
                layer,
                tokens: n,
                requested,
                free,
                total: self.cfg.capacity_blocks,
            })?;
        let mut released = Vec::new();
        for (slot, (h, need)) in heads.zip(needs).enumerate() {
            let cfg = self.cfg;
            let table = &mut self.tables[base + h];
            if !table.positions.len().is_multiple_of(bs) {
                table.own(table.blocks.len() - 1, &mut fresh, &mut released);
            }
            table
                .blocks
                .extend(fresh.drain(fresh.len() - need..).map(Arc::new));
            let start = table.len();
            for t in 0..n {
                let src = (t * nh + slot) * d;
                table.write(&cfg, start + t, &k[src..src + d], &v[src..src + d]);
            }
            if self.key_shift.is_some() {
                let next = table.next_cache_position();
                table
                    .cache_positions
                    .extend((0..n as u32).map(|t| next + t));
            }
            table.positions.extend_from_slice(positions);
            table.appended += n as u64;
        }
        // Copies reserved for blocks another holder let go of meanwhile are not needed.
        released.append(&mut fresh);
        self.give_back(released);
        let top = positions.iter().max().map_or(0, |&p| u64::from(p) + 1);
        self.tokens_seen[layer] = self.tokens_seen[layer].max(top);
        Ok(())
    }

    /// Blocks that appending `tokens` entries to every (layer, KV head) table would take from the
    /// pool: the most one forward pass of that many tokens can take, whatever a policy evicts.
    pub fn blocks_to_append(&self, tokens: usize) -> usize {
        let bs = self.cfg.block_size;
        self.tables
            .iter()
            .map(|t| t.blocks_needed(bs, tokens))
            .sum()
    }

    /// Keeps the retained entries of (`layer`, `head`) whose `keep` flag is true and removes the
    /// others: survivors move forward in order (compaction) and every emptied block returns to
    /// the pool at once. `keep.len()` must equal [`SequenceKv::retained`]. Blocks shared with a
    /// fork that the compaction writes to are copied first; if the pool cannot supply those
    /// copies the call fails with [`KvError::OutOfBlocksForCopy`] and changes nothing.
    pub fn evict(&mut self, layer: usize, head: usize, keep: &[bool]) -> Result<(), KvError> {
        let retained = self.tables[self.index(layer, head)?].len();
        if keep.len() != retained {
            return Err(KvError::MaskLength {
                layer,
                head,
                what: "keep",
                retained,
                got: keep.len(),
            });
        }
        self.evict_tail(layer, head, keep)
    }

    /// [`SequenceKv::evict`] with a flag for each of the newest `keep_tail.len()` retained
    /// entries of (`layer`, `head`) only; every older entry stays. Costs what it reads and
    /// moves (a policy that evicts only among recent entries never scans the whole table).
    /// `keep_tail.len()` must be at most [`SequenceKv::retained`].
    pub fn evict_tail(
        &mut self,
        layer: usize,
        head: usize,
        keep_tail: &[bool],
    ) -> Result<(), KvError> {
        let i = self.index(layer, head)?;
        let retained = self.tables[i].len();
        let Some(skip) = retained.checked_sub(keep_tail.len()) else {
            return Err(KvError::MaskLength {
                layer,
                head,
                what: "keep_tail (at most one flag per retained entry)",
                retained,
                got: keep_tail.len(),
            });
        };
        let keep = KeepMask {
            skip,
            tail: keep_tail,
        };
        let table = &self.tables[i];
        let requested = table.shared(table.compaction_writes(self.cfg.block_size, keep));
        let mut fresh =
            self.take_blocks(requested)
                .map_err(|free| KvError::OutOfBlocksForCopy {
                    layer,
                    head,
                    requested,
                    free,
                    total: self.cfg.capacity_blocks,
                })?;
        let mut released = Vec::new();
        self.tables[i].compact(&self.cfg, keep, &mut fresh, &mut released);
        released.append(&mut fresh);
        self.give_back(released);
        Ok(())
    }

    /// Entries (`layer`, `head`) can still take without another block (0 when out of range):
    /// what an append of `n` tokens needs is `ceil((n - spare) / block_size)` blocks.
    pub fn spare_slots(&self, layer: usize, head: usize) -> usize {
        self.table(layer, head)
            .map_or(0, |t| t.spare(self.cfg.block_size))
    }

    /// A new sequence with the same entries, sharing every block with this one (copy-on-write):
    /// no block is allocated or copied now; whichever sequence later writes to a shared block
    /// (an append into a partly filled block, a compaction, a repack) writes to its own copy.
    /// The pool counts each shared block once; each sequence's [`SequenceStats`] counts every
    /// block it holds and says how many of them are shared. The fork has the same cache
    /// positions (and key shift) as this sequence, and no reservation.
    pub fn fork(&self) -> SequenceKv {
        self.may_share.store(true, Ordering::Relaxed);
        SequenceKv {
            pool: self.pool.clone(),
            cfg: self.cfg,
            n_layers: self.n_layers,
            n_kv_heads: self.n_kv_heads,
            tables: self.tables.clone(),
            tokens_seen: self.tokens_seen.clone(),
            key_shift: self.key_shift.clone(),
            reservation: None,
            may_share: AtomicBool::new(true),
        }
    }

    /// Removes, from every table, the entries at `position` or later (each table's tail:
    /// positions grow within a table) and frees their blocks, setting `tokens_seen` back to at
    /// most `position`: undoes appends that no eviction has touched yet (a failed forward pass),
    /// leaving the tables and counts as they were before those appends. Nothing is written, so
    /// a block shared with a fork keeps the other holder's entries; a shared block that one of
    /// those appends copied stays this sequence's own copy (same contents, one more block in
    /// the pool until it is freed).
    pub fn truncate_from(&mut self, position: u32) {
        let bs = self.cfg.block_size;
        let mut released = Vec::new();
        for t in &mut self.tables {
            let kept = t.positions().partition_point(|&p| p < position);
            t.appended = t.appended.saturating_sub((t.len() - kept) as u64);
            if kept == 0 {
                t.clear_entries(&mut released);
                continue;
            }
            let end = t.head + kept;
            t.positions.truncate(end);
            t.cache_positions.truncate(end);
            for block in t.blocks.split_off(end.div_ceil(bs)) {
                drop_holder(block, &mut released);
            }
        }
        for seen in &mut self.tokens_seen {
            *seen = (*seen).min(u64::from(position));
        }
        self.give_back(released);
    }
    /// Drops every entry of every table, returns all blocks to the pool and resets the counts.
    pub fn clear(&mut self) {
        let mut released = Vec::new();
        for table in &mut self.tables {
            for block in std::mem::take(table).blocks {
                drop_holder(block, &mut released);
            }
        }
        self.tokens_seen.fill(0);
        self.give_back(released);
    }
}

impl Drop for SequenceKv {
    fn drop(&mut self) {
        self.release_reservation();
        self.clear();
    }
}
