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

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::attention::{attend_calls, attend_heads, HeadView, HeadsCall, Segment, Segments};
use crate::dtype::write_f32;
use crate::pool::Block;
use crate::{simd, AttendOptions, AttendOutput, BlockPool, KvError, KvSlice, Parallel, PoolConfig};

/// Rewrites keys whose cache position moved: `keys` is `[m, head_dim]` f32 (read from the
/// store, written back in the pool's dtype after the call), each moved by `delta` positions.
/// A decoder that rotates keys for their cache position passes a rotary re-rotation by `delta`
/// positions: rotations compose.
pub type KeyShift = Arc<dyn Fn(&mut [f32], i64) + Send + Sync>;

/// A copy of one KV head's retained entries, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeadContents {
    /// Keys `[retained, head_dim]` (converted to f32).
    pub keys: Vec<f32>,
    /// Values `[retained, head_dim]` (converted to f32).
    pub values: Vec<f32>,
    /// Absolute positions `[retained]`.
    pub positions: Vec<u32>,
}

/// One sequence's attention call in a batch ([`SequenceKv::attend_batch`]): the arguments of
/// [`SequenceKv::attend`].
#[derive(Clone)]
pub struct AttendCall<'a> {
    /// The sequence's store.
    pub kv: &'a SequenceKv,
    /// The layer attended.
    pub layer: usize,
    /// Queries, token-major `[n_q, n_q_heads, head_dim]`.
    pub q: &'a [f32],
    /// The queries' absolute positions.
    pub q_positions: &'a [u32],
    /// Masking, probabilities, and the pool that decides the call's split (as alone).
    pub opts: AttendOptions<'a>,
}

/// Accounting of one sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SequenceStats {
    /// Retained entries per `[layer][kv_head]`.
    pub retained: Vec<Vec<usize>>,
    /// Entries ever appended per `[layer][kv_head]` (since creation or the last `clear`).
    pub appended: Vec<Vec<u64>>,
    /// Tokens seen per layer: one past the highest position ever appended to any of its heads.
    pub tokens_seen: Vec<u64>,
    /// Blocks this sequence's tables hold (a block shared with a fork counts here in full).
    pub blocks_in_use: usize,
    /// Bytes of those blocks.
    pub bytes_in_use: usize,
    /// Of `blocks_in_use`, the blocks other sequences hold too (copy-on-write sharing after
    /// [`SequenceKv::fork`]); the pool counts each of them once.
    pub blocks_shared: usize,
    /// Bytes of the shared blocks.
    pub bytes_shared: usize,
}

impl SequenceStats {
    /// Retained entries summed over every layer and head.
    pub fn retained_total(&self) -> usize {
        self.retained.iter().flatten().sum()
    }
}

/// The only writable access to a held block. Every write path first makes the block the
/// table's alone ([`HeadTable::own`]), so this never finds it shared.
fn unique(block: &mut Arc<Block>) -> &mut Block {
    Arc::get_mut(block).expect("copy-on-write: a block is made unique before it is written")
}

/// Drops one holder of `block`; the last holder's block goes to `released` (for the pool).
fn drop_holder(block: Arc<Block>, released: &mut Vec<Block>) {
    released.extend(Arc::into_inner(block));
}

/// A run of entries a repack shifts: the shift (in positions) and the entries' indices.
type KeyMove = (i64, Range<usize>);

/// The blocks holding the entries of `moves` (ranges of entry indices, in order) in a table
/// whose first `head` slots are free, in order.
fn blocks_written(moves: &[KeyMove], bs: usize, head: usize) -> Vec<usize> {
    let mut blocks: Vec<usize> = moves
        .iter()
        .flat_map(|(_, span)| (head + span.start) / bs..(head + span.end).div_ceil(bs))
        .collect();
    blocks.dedup();
    blocks
}

/// One (layer, KV head) block table. Entry `i` lives in slot `head + i` (block `slot / bs`,
/// offset `slot % bs`); `positions` (and `cache_positions`) are indexed by slot, their first
/// `head` items unused. Cloning
/// it (a fork) shares every block.
#[derive(Default, Clone)]
pub(crate) struct HeadTable {
    blocks: Vec<Arc<Block>>,
    positions: Vec<u32>,
    /// Free slots at the start of the first block (`< block_size`).
    head: usize,
    appended: u64,
    /// Cache positions, indexed by slot like `positions` (empty unless the sequence has them).
    cache_positions: Vec<u32>,
}

/// A keep flag per retained entry of a table, the first `skip` entries kept without a flag
/// (an eviction that reads only the newest entries costs what it reads, not the table's length).
#[derive(Clone, Copy)]
struct KeepMask<'a> {
    skip: usize,
    tail: &'a [bool],
}

impl KeepMask<'_> {
    /// Entries flagged (the table's retained count).
    fn len(&self) -> usize {
        self.skip + self.tail.len()
    }

    /// Whether entry `i` stays.
    fn keeps(&self, i: usize) -> bool {
        i < self.skip || self.tail[i - self.skip]
    }
}

/// See [`HeadTable::compaction_plan`].
struct CompactionPlan {
    first: usize,
    last: usize,
    after: usize,
    before: usize,
}

impl HeadTable {
    /// Retained entries.
    fn len(&self) -> usize {
        self.positions.len() - self.head
    }

    /// Positions of the retained entries, in order.
    fn positions(&self) -> &[u32] {
        &self.positions[self.head..]
    }

    /// Cache positions of the retained entries, in order (empty without them).
    fn entry_cache_positions(&self) -> &[u32] {
        self.cache_positions.get(self.head..).unwrap_or(&[])
    }

    /// Drops every entry and block.
    fn clear_entries(&mut self, released: &mut Vec<Block>) {
        self.positions.clear();
        self.cache_positions.clear();
        self.head = 0;
        for block in self.blocks.drain(..) {
            drop_holder(block, released);
        }
    }

    /// Blocks this table must gain to hold `extra` more entries.
    fn blocks_needed(&self, bs: usize, extra: usize) -> usize {
        (self.positions.len() + extra).div_ceil(bs) - self.blocks.len()
    }

    /// Entries the table can take before it needs another block.
    fn spare(&self, bs: usize) -> usize {
        self.blocks.len() * bs - self.positions.len()
    }

    /// How many of the blocks `range` other tables hold too (each needs a copy before a write).
    fn shared(&self, range: Range<usize>) -> usize {
        self.blocks[range]
            .iter()
            .filter(|b| Arc::strong_count(b) > 1)
            .count()
    }

    /// Copies a block an append would write (the partly filled last one) if it is shared.
    fn shared_for_append(&self, bs: usize) -> usize {
        if self.positions.len().is_multiple_of(bs) {
            0
        } else {
            self.shared(self.blocks.len() - 1..self.blocks.len())
        }
    }

    /// Makes block `b` this table's alone: a shared block is replaced by a copy written into
    /// one of `fresh` (reserved by the caller), and this table's hold on the original is dropped.
    fn own(&mut self, b: usize, fresh: &mut Vec<Block>, released: &mut Vec<Block>) {
        if Arc::get_mut(&mut self.blocks[b]).is_some() {
            return;
        }
        if let Some(mut copy) = fresh.pop() {
            copy.bytes_mut().copy_from_slice(self.blocks[b].bytes());
            drop_holder(
                std::mem::replace(&mut self.blocks[b], Arc::new(copy)),
                released,
            );
        }
    }

    /// Writes key `k` and value `v` into entry `idx`'s slot (its block must exist and be owned).
    fn write(&mut self, cfg: &PoolConfig, idx: usize, k: &[f32], v: &[f32]) {
        let (bs, eb) = (cfg.block_size, cfg.entry_bytes());
        let slot = self.head + idx;
        let off = (slot % bs) * eb;
        let bytes = unique(&mut self.blocks[slot / bs]).bytes_mut();
        write_f32(cfg.dtype, cfg.head_dim, &mut bytes[off..off + eb], k);
        write_f32(
            cfg.dtype,
            cfg.head_dim,
            &mut bytes[bs * eb + off..bs * eb + off + eb],
            v,
        );
    }

    /// Moves the entry in slot `from` to slot `to` (keys, values and position; the target block
    /// is owned).
    fn move_slot(&mut self, cfg: &PoolConfig, from: usize, to: usize) {
        let (bs, eb) = (cfg.block_size, cfg.entry_bytes());
        let (fb, tb) = (from / bs, to / bs);
        for base in [0, bs * eb] {
            let (fo, to_) = (base + (from % bs) * eb, base + (to % bs) * eb);
            if fb == tb {
                unique(&mut self.blocks[fb])
                    .bytes_mut()
                    .copy_within(fo..fo + eb, to_);
            } else {
                let (src, dst) = if fb < tb {
                    let (lo, hi) = self.blocks.split_at_mut(tb);
                    (&lo[fb], &mut hi[0])
                } else {
                    let (lo, hi) = self.blocks.split_at_mut(fb);
                    (&hi[0], &mut lo[tb])
                };
                unique(dst).bytes_mut()[to_..to_ + eb].copy_from_slice(&src.bytes()[fo..fo + eb]);
            }
        }
        self.positions[to] = self.positions[from];
        if let Some(&p) = self.cache_positions.get(from) {
            self.cache_positions[to] = p;
        }
    }

    /// Where a compaction by `keep` moves entries: `None` when nothing is dropped, else the first
    /// and last dropped entries and the kept entries after the first (`after`) and before the
    /// last (`before`). The cheaper side moves: with `after <= before` the survivors after the
    /// first dropped entry shift towards the front, else those before the last dropped entry
    /// shift towards the back.
    fn compaction_plan(keep: KeepMask<'_>) -> Option<CompactionPlan> {
        let (skip, tail) = (keep.skip, keep.tail);
        let first = tail.iter().position(|&k| !k)?;
        let last = tail.iter().rposition(|&k| !k)?;
        Some(CompactionPlan {
            first: skip + first,
            last: skip + last,
            after: tail[first..].iter().filter(|&&k| k).count(),
            before: skip + tail[..last].iter().filter(|&&k| k).count(),
        })
    }

    /// The blocks a compaction by `keep` writes to (empty when nothing moves): towards the
    /// front, slots `head + first..head + first + after`; towards the back, the `before` slots
    /// ending at `head + last`.
    fn compaction_writes(&self, bs: usize, keep: KeepMask<'_>) -> Range<usize> {
        let Some(c) = Self::compaction_plan(keep) else {
            return 0..0;
        };
        let h = self.head;
        match (c.after <= c.before, c.after, c.before) {
            (true, 0, _) | (false, _, 0) => 0..0,
            (true, moved, _) => (h + c.first) / bs..(h + c.first + moved).div_ceil(bs),
            (false, _, moved) => (h + c.last + 1 - moved) / bs..(h + c.last) / bs + 1,
        }
    }

    /// Keeps the entries flagged in `keep` (one flag per entry), in order. The survivors on the
    /// cheaper side move ([`HeadTable::compaction_plan`]): towards the front, or towards the
    /// back (the first block then starts further in) — so dropping one old entry (a sliding
    /// window) moves only the entries before it, not the whole cache. Shared blocks that the
    /// compaction writes are first copied into `fresh` (the caller reserved
    /// [`HeadTable::shared`] of [`HeadTable::compaction_writes`] of them); blocks this table no
    /// longer holds alone or at all go to `released`.
    fn compact(
        &mut self,
        cfg: &PoolConfig,
        keep: KeepMask<'_>,
        fresh: &mut Vec<Block>,
        released: &mut Vec<Block>,
    ) {
        let bs = cfg.block_size;
        let Some(c) = Self::compaction_plan(keep) else {
            return;
        };
        for b in self.compaction_writes(bs, keep) {
            self.own(b, fresh, released);
        }
        let h = self.head;
        if c.after <= c.before {
            let mut w = h + c.first;
            for r in (c.first..keep.len()).filter(|&r| keep.keeps(r)) {
                self.move_slot(cfg, h + r, w);
                w += 1;
            }
            if w == h {
                // Nothing left: no first-block offset to keep either.
                self.clear_entries(released);
                return;
            }
            self.positions.truncate(w);
            self.cache_positions.truncate(w);
            for block in self.blocks.split_off(w.div_ceil(bs)) {
                drop_holder(block, released);
            }
        } else {
            let mut w = h + c.last;
            for r in (0..c.last).rev().filter(|&r| keep.keeps(r)) {
                self.move_slot(cfg, h + r, w);
                w -= 1;
            }
            // Slots up to `w` are free now: whole blocks go back, the rest become the head.
            let free = w + 1;
            let whole = free / bs;
            self.positions.drain(..whole * bs);
            if !self.cache_positions.is_empty() {
                self.cache_positions.drain(..whole * bs);
            }
            self.head = free - whole * bs;
            for block in self.blocks.drain(..whole) {
                drop_holder(block, released);
            }
        }
    }

    /// What a repack does: the offset (`cache position - index`) of the longest run of entries
    /// whose cache positions are already consecutive, which stays, and every other run with the
    /// shift its keys need. `None` for an empty table.
    fn repack_plan(&self) -> Option<(i64, Vec<KeyMove>)> {
        // Runs of entries sharing `cache position - index`: (that offset, first index).
        let mut runs: Vec<(i64, usize)> = Vec::new();
        let cache_positions = self.entry_cache_positions();
        for (i, &p) in cache_positions.iter().enumerate() {
            let offset = i64::from(p) - i as i64;
            if runs.last().is_none_or(|&(o, _)| o != offset) {
                runs.push((offset, i));
            }
        }
        let ends = runs
            .iter()
            .skip(1)
            .map(|&(_, start)| start)
            .chain([cache_positions.len()]);
        let spans: Vec<(i64, Range<usize>)> = runs
            .iter()
            .zip(ends)
            .map(|(&(offset, start), end)| (offset, start..end))
            .collect();
        let anchor = spans
            .iter()
            .max_by_key(|(_, span)| span.len())
            .map(|&(offset, _)| offset)?;
        let moves = spans
            .into_iter()
            .filter(|(o, _)| *o != anchor)
            .map(|(offset, span)| (anchor - offset, span))
            .collect();
        Some((anchor, moves))
    }

    /// The blocks a repack writes to (those holding a shifted key), in order.
    fn repack_writes(&self, bs: usize) -> Vec<usize> {
        self.repack_plan()
            .map_or_else(Vec::new, |(_, moves)| blocks_written(&moves, bs, self.head))
    }

    /// Makes the cache positions consecutive: the longest run of entries whose positions are
    /// already consecutive keeps them; every other run's keys are shifted to match. Shared
    /// blocks it writes are first copied into `fresh` (the caller reserved one per shared block
    /// of [`HeadTable::repack_writes`]); originals this table no longer holds go to `released`.
    fn repack(
        &mut self,
        cfg: &PoolConfig,
        shift: &KeyShift,
        fresh: &mut Vec<Block>,
        released: &mut Vec<Block>,
    ) {
        let Some((anchor, moves)) = self.repack_plan() else {
            return;
        };
        for b in blocks_written(&moves, cfg.block_size, self.head) {
            self.own(b, fresh, released);
        }
        for (delta, span) in moves {
            let mut keys = self.read_keys(cfg, span.clone());
            shift(&mut keys, delta);
            self.write_keys(cfg, span.start, &keys);
        }
        let head = self.head;
        for (i, p) in self.cache_positions[head..].iter_mut().enumerate() {
            // Never below 0 or above the last position: the anchor run is among them.
            *p = (anchor + i as i64) as u32;
        }
    }

    /// The span of cache positions this table covers, its next entry included.
    fn cache_span(&self) -> u32 {
        match self.entry_cache_positions().first() {
            Some(&first) => self.next_cache_position() - first,
            None => 0,
        }
    }

    /// The cache position a new entry takes (after the last one; 0 in an empty table).
    fn next_cache_position(&self) -> u32 {
        self.cache_positions.last().map_or(0, |&p| p + 1)
    }

    /// The keys of entries `range`, as f32 `[range.len(), head_dim]`.
    fn read_keys(&self, cfg: &PoolConfig, range: Range<usize>) -> Vec<f32> {
        let (bs, eb, d) = (cfg.block_size, cfg.entry_bytes(), cfg.head_dim);
        let mut out = Vec::with_capacity(range.len() * d);
        let mut scratch = vec![0f32; d];
        for idx in range.start + self.head..range.end + self.head {
            let off = (idx % bs) * eb;
            let bytes = &self.blocks[idx / bs].bytes()[off..off + eb];
            out.extend_from_slice(KvSlice::from_bytes(cfg.dtype, d, bytes).view(
                0,
                1,
                d,
                &mut scratch,
            ));
        }
        out
    }

    /// Overwrites the keys of the entries from `start` on with `keys` (`[m, head_dim]` f32).
    fn write_keys(&mut self, cfg: &PoolConfig, start: usize, keys: &[f32]) {
        let (bs, eb, d) = (cfg.block_size, cfg.entry_bytes(), cfg.head_dim);
        for (i, key) in keys.chunks_exact(d).enumerate() {
            let idx = self.head + start + i;
            let off = (idx % bs) * eb;
            write_f32(
                cfg.dtype,
                d,
                &mut unique(&mut self.blocks[idx / bs]).bytes_mut()[off..off + eb],
                key,
            );
        }
    }

    /// The table's entries as in-place segments, one per block.
    pub(crate) fn segments(&self, cfg: &PoolConfig) -> Vec<Segment<'_>> {
        let (bs, eb) = (cfg.block_size, cfg.entry_bytes());
        let end = self.positions.len();
        self.blocks
            .iter()
            .enumerate()
            .map(|(b, blk)| {
                let (lo, hi) = ((b * bs).max(self.head), ((b + 1) * bs).min(end));
                let (o, n) = (lo - b * bs, hi - lo);
                let bytes = blk.bytes();
                Segment {
                    keys: KvSlice::from_bytes(
                        cfg.dtype,
                        cfg.head_dim,
                        &bytes[o * eb..(o + n) * eb],
                    ),
                    values: KvSlice::from_bytes(
                        cfg.dtype,
                        cfg.head_dim,
                        &bytes[(bs + o) * eb..(bs + o + n) * eb],
                    ),
                    positions: &self.positions[lo..hi],
                }
            })
            .collect()
    }

    /// The table for an attention call (its segments are listed where a work unit runs).
    fn view<'a>(&'a self, cfg: &'a PoolConfig) -> HeadView<'a> {
        HeadView {
            segments: Segments::Table(self, cfg),
            len: self.len(),
        }
    }
}

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

/// A reservation: the sequence may grow to `ceiling` blocks; `withheld` are set aside now.
#[derive(Clone, Copy, Debug)]
struct Reservation {
    ceiling: usize,
    withheld: usize,
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

    /// Blocks this sequence holds (shared ones included).
    pub fn blocks_held(&self) -> usize {
        self.tables.iter().map(|t| t.blocks.len()).sum()
    }

    /// Blocks this sequence holds alone (not shared with a fork): the ones it has paid for.
    /// Blocks this sequence holds alone. Reads every block's holder count only while some may
    /// be shared ([`SequenceKv::may_share`]): per block freed, an eviction would otherwise read
    /// every block of the sequence.
    fn blocks_owned(&self) -> usize {
        let held: usize = self.tables.iter().map(|t| t.blocks.len()).sum();
        if !self.may_share.load(Ordering::Relaxed) {
            return held;
        }
        let shared: usize = self
            .tables
            .iter()
            .map(|t| t.shared(0..t.blocks.len()))
            .sum();
        if shared == 0 {
            // Sharing only starts at a fork, which sets the flag again.
            self.may_share.store(false, Ordering::Relaxed);
        }
        held - shared
    }

    /// Sets blocks aside so that this sequence can hold `ceiling` blocks in all (those it holds
    /// included) whatever other sequences do, until [`SequenceKv::release_reservation`]: appends,
    /// copies of shared blocks and repacks draw on the reservation first, and freed blocks refill
    /// it up to the ceiling. A block shared with a fork counts as not paid for (writing it takes
    /// a copy), so `ceiling - owned` blocks are set aside. Replaces an earlier reservation;
    /// fails with [`KvError::ReserveFailed`], changing nothing, when the pool cannot set that
    /// many aside.
    pub fn reserve_blocks(&mut self, ceiling: usize) -> Result<(), KvError> {
        let want = ceiling.saturating_sub(self.blocks_owned());
        let had = self.reservation.map_or(0, |r| r.withheld);
        if want > had {
            self.pool
                .reserve(want - had)
                .map_err(|free| KvError::ReserveFailed {
                    requested: want - had,
                    free,
                    total: self.cfg.capacity_blocks,
                })?;
        } else {
            self.pool.unreserve(had - want);
        }
        self.reservation = Some(Reservation {
            ceiling,
            withheld: want,
        });
        Ok(())
    }

    /// Gives the blocks set aside by [`SequenceKv::reserve_blocks`] back to the pool.
    pub fn release_reservation(&mut self) {
        if let Some(r) = self.reservation.take() {
            self.pool.unreserve(r.withheld);
        }
    }

    /// Takes `n` blocks from the pool, from this sequence's reservation first; `Err(free)` (and
    /// nothing taken) when the rest exceeds the blocks free for anyone.
    fn take_blocks(&mut self, n: usize) -> Result<Vec<Block>, usize> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let from_reserve = self.reservation.map_or(0, |r| r.withheld.min(n));
        let fresh = self.pool.alloc(n, from_reserve)?;
        if let Some(r) = &mut self.reservation {
            r.withheld -= from_reserve;
        }
        Ok(fresh)
    }

    /// Returns blocks that left the tables (or were taken and not needed) to the pool,
    /// refilling the reservation first.
    fn give_back(&mut self, blocks: Vec<Block>) {
        if blocks.is_empty() {
            return;
        }
        let to_reserve = match self.reservation {
            Some(r) => {
                let room = r
                    .ceiling
                    .saturating_sub(self.blocks_owned() + r.withheld)
                    .min(blocks.len());
                if let Some(r) = &mut self.reservation {
                    r.withheld += room;
                }
                room
            }
            None => 0,
        };
        self.pool.release(blocks, to_reserve);
    }

    /// Retained entries of (`layer`, `head`); 0 when out of range.
    pub fn retained(&self, layer: usize, head: usize) -> usize {
        self.table(layer, head).map_or(0, HeadTable::len)
    }

    /// Positions of the retained entries, in order; empty when out of range.
    pub fn positions(&self, layer: usize, head: usize) -> Vec<u32> {
        self.retained_positions(layer, head).to_vec()
    }

    /// [`SequenceKv::positions`] borrowed (no copy: for per-token bookkeeping).
    pub fn retained_positions(&self, layer: usize, head: usize) -> &[u32] {
        self.table(layer, head).map_or(&[], HeadTable::positions)
    }

    /// Ids of the pool blocks held by (`layer`, `head`), in order; empty when out of range.
    pub fn block_ids(&self, layer: usize, head: usize) -> Vec<u32> {
        self.table(layer, head)
            .map_or_else(Vec::new, |t| t.blocks.iter().map(|b| b.id).collect())
    }

    /// A copy of the retained keys, values and positions of (`layer`, `head`), keys and values
    /// converted to f32; empty when out of range.
    pub fn read_head(&self, layer: usize, head: usize) -> HeadContents {
        let Some(t) = self.table(layer, head) else {
            return HeadContents::default();
        };
        let d = self.cfg.head_dim;
        let mut out = HeadContents {
            keys: Vec::with_capacity(t.len() * d),
            values: Vec::with_capacity(t.len() * d),
            positions: t.positions().to_vec(),
        };
        let mut scratch = vec![0.0f32; self.cfg.block_size * d];
        for seg in t.segments(&self.cfg) {
            let n = seg.positions.len();
            out.keys
                .extend_from_slice(seg.keys.view(0, n, d, &mut scratch));
            out.values
                .extend_from_slice(seg.values.view(0, n, d, &mut scratch));
        }
        out
    }

    /// L2 norm of each retained key of (`layer`, `head`), in order (KNorm policy); empty when out
    /// of range.
    pub fn key_norms(&self, layer: usize, head: usize) -> Vec<f32> {
        let Some(t) = self.table(layer, head) else {
            return Vec::new();
        };
        let d = self.cfg.head_dim;
        let mut scratch = vec![0.0f32; self.cfg.block_size * d];
        let mut norms = Vec::with_capacity(t.len());
        for seg in t.segments(&self.cfg) {
            let keys = seg.keys.view(0, seg.positions.len(), d, &mut scratch);
            norms.extend(keys.chunks_exact(d).map(|k| simd::dot(k, k).sqrt()));
        }
        norms
    }

    /// Attention of new queries over `layer`'s retained entries (which already include the
    /// just-appended chunk). `q`: token-major `[n_q, n_q_heads, head_dim]` f32 with `n_q_heads` a
    /// multiple of `n_kv_heads` (query head `h` uses KV head `h / G`); `q_positions`: the `n_q`
    /// absolute positions. Returns `out` as `[n_q, n_q_heads, head_dim]`, and probability sums
    /// when `opts.prob_sums` asks for them. See [`AttendOptions`] for masking.
    pub fn attend(
        &self,
        layer: usize,
        q: &[f32],
        q_positions: &[u32],
        opts: &AttendOptions<'_>,
    ) -> Result<AttendOutput, KvError> {
        attend_heads(self.heads_call(layer, q, q_positions, opts)?)
    }

    /// Several sequences' attention calls ([`SequenceKv::attend`] each) as one job: the work
    /// units of every call run together on `pool` (rayon's global pool when `None`), so a batch
    /// of decode rows, each too short to split over threads alone, keeps every thread busy at the
    /// cost of one handoff. Each call is validated and split into units as it is alone (by its
    /// own options), so its result is bit for bit what [`SequenceKv::attend`] returns for it.
    /// Returns one result per call, in order; a call's error leaves the others unaffected.
    pub fn attend_batch(
        calls: &[AttendCall<'_>],
        pool: Option<&dyn Parallel>,
    ) -> Vec<Result<AttendOutput, KvError>> {
        let mut results: Vec<Option<Result<AttendOutput, KvError>>> =
            calls.iter().map(|_| None).collect();
        let mut valid = Vec::with_capacity(calls.len());
        let mut heads_calls = Vec::with_capacity(calls.len());
        for (i, c) in calls.iter().enumerate() {
            match c.kv.heads_call(c.layer, c.q, c.q_positions, &c.opts) {
                Ok(call) => {
                    valid.push(i);
                    heads_calls.push(call);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        for (i, r) in valid.into_iter().zip(attend_calls(&heads_calls, pool)) {
            results[i] = Some(r);
        }
        results
            .into_iter()
            .map(|r| r.expect("every call answered"))
            .collect()
    }

    /// The views of `layer`'s KV heads for an attention call.
    fn heads_call<'a>(
        &'a self,
        layer: usize,
        q: &'a [f32],
        q_positions: &'a [u32],
        opts: &'a AttendOptions<'a>,
    ) -> Result<HeadsCall<'a>, KvError> {
        self.check_layer(layer)?;
        let base = layer * self.n_kv_heads;
        Ok(HeadsCall {
            layer,
            heads: self.tables[base..base + self.n_kv_heads]
                .iter()
                .map(|t| t.view(&self.cfg))
                .collect(),
            head_dim: self.cfg.head_dim,
            q,
            q_positions,
            opts,
        })
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

    /// Accounting of this sequence.
    pub fn stats(&self) -> SequenceStats {
        let h = self.n_kv_heads;
        let layer_tables = |l: usize| &self.tables[l * h..(l + 1) * h];
        let blocks_in_use: usize = self.tables.iter().map(|t| t.blocks.len()).sum();
        let blocks_shared: usize = self
            .tables
            .iter()
            .map(|t| t.shared(0..t.blocks.len()))
            .sum();
        SequenceStats {
            retained: (0..self.n_layers)
                .map(|l| layer_tables(l).iter().map(HeadTable::len).collect())
                .collect(),
            appended: (0..self.n_layers)
                .map(|l| layer_tables(l).iter().map(|t| t.appended).collect())
                .collect(),
            tokens_seen: self.tokens_seen.clone(),
            blocks_in_use,
            bytes_in_use: blocks_in_use * self.cfg.block_bytes(),
            blocks_shared,
            bytes_shared: blocks_shared * self.cfg.block_bytes(),
        }
    }
}

impl Drop for SequenceKv {
    fn drop(&mut self) {
        self.release_reservation();
        self.clear();
    }
}
