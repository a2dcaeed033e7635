//! One (layer, KV head) block table of a [`SequenceKv`](super::SequenceKv): its entries' slots
//! in reference-counted pool blocks, the writes (each to a block the table holds alone, copied
//! first when shared), the compaction an eviction runs and the key repack of cache positions.
//! The invariants are the sequence's (see its module header), per table.

use std::ops::Range;
use std::sync::Arc;

use crate::attention::{HeadView, Segment, Segments};
use crate::dtype::write_f32;
use crate::pool::Block;
use crate::{KvSlice, PoolConfig};

use super::KeyShift;

/// The only writable access to a held block. Every write path first makes the block the
/// table's alone ([`HeadTable::own`]), so this never finds it shared.
fn unique(block: &mut Arc<Block>) -> &mut Block {
    Arc::get_mut(block).expect("copy-on-write: a block is made unique before it is written")
}

/// Drops one holder of `block`; the last holder's block goes to `released` (for the pool).
pub(super) fn drop_holder(block: Arc<Block>, released: &mut Vec<Block>) {
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
    pub(super) blocks: Vec<Arc<Block>>,
    pub(super) positions: Vec<u32>,
    /// Free slots at the start of the first block (`< block_size`).
    pub(super) head: usize,
    /// Entries ever appended (since creation or the last clear).
    pub(super) appended: u64,
    /// Cache positions, indexed by slot like `positions` (empty unless the sequence has them).
    pub(super) cache_positions: Vec<u32>,
}

/// A keep flag per retained entry of a table, the first `skip` entries kept without a flag
/// (an eviction that reads only the newest entries costs what it reads, not the table's length).
#[derive(Clone, Copy)]
pub(super) struct KeepMask<'a> {
    pub(super) skip: usize,
    pub(super) tail: &'a [bool],
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
    pub(super) fn len(&self) -> usize {
        self.positions.len() - self.head
    }

    /// Positions of the retained entries, in order.
    pub(super) fn positions(&self) -> &[u32] {
        &self.positions[self.head..]
    }

    /// Cache positions of the retained entries, in order (empty without them).
    pub(super) fn entry_cache_positions(&self) -> &[u32] {
        self.cache_positions.get(self.head..).unwrap_or(&[])
    }

    /// Drops every entry and block.
    pub(super) fn clear_entries(&mut self, released: &mut Vec<Block>) {
        self.positions.clear();
        self.cache_positions.clear();
        self.head = 0;
        for block in self.blocks.drain(..) {
            drop_holder(block, released);
        }
    }

    /// Blocks this table must gain to hold `extra` more entries.
    pub(super) fn blocks_needed(&self, bs: usize, extra: usize) -> usize {
        (self.positions.len() + extra).div_ceil(bs) - self.blocks.len()
    }

    /// Entries the table can take before it needs another block.
    pub(super) fn spare(&self, bs: usize) -> usize {
        self.blocks.len() * bs - self.positions.len()
    }

    /// How many of the blocks `range` other tables hold too (each needs a copy before a write).
    pub(super) fn shared(&self, range: Range<usize>) -> usize {
        self.blocks[range]
            .iter()
            .filter(|b| Arc::strong_count(b) > 1)
            .count()
    }

    /// Copies a block an append would write (the partly filled last one) if it is shared.
    pub(super) fn shared_for_append(&self, bs: usize) -> usize {
        if self.positions.len().is_multiple_of(bs) {
            0
        } else {
            self.shared(self.blocks.len() - 1..self.blocks.len())
        }
    }

    /// Makes block `b` this table's alone: a shared block is replaced by a copy written into
    /// one of `fresh` (reserved by the caller), and this table's hold on the original is dropped.
    pub(super) fn own(&mut self, b: usize, fresh: &mut Vec<Block>, released: &mut Vec<Block>) {
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
    pub(super) fn write(&mut self, cfg: &PoolConfig, idx: usize, k: &[f32], v: &[f32]) {
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
    pub(super) fn compaction_writes(&self, bs: usize, keep: KeepMask<'_>) -> Range<usize> {
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
    pub(super) fn compact(
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
    pub(super) fn repack_writes(&self, bs: usize) -> Vec<usize> {
        self.repack_plan()
            .map_or_else(Vec::new, |(_, moves)| blocks_written(&moves, bs, self.head))
    }

    /// Makes the cache positions consecutive: the longest run of entries whose positions are
    /// already consecutive keeps them; every other run's keys are shifted to match. Shared
    /// blocks it writes are first copied into `fresh` (the caller reserved one per shared block
    /// of [`HeadTable::repack_writes`]); originals this table no longer holds go to `released`.
    pub(super) fn repack(
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
    pub(super) fn cache_span(&self) -> u32 {
        match self.entry_cache_positions().first() {
            Some(&first) => self.next_cache_position() - first,
            None => 0,
        }
    }

    /// The cache position a new entry takes (after the last one; 0 in an empty table).
    pub(super) fn next_cache_position(&self) -> u32 {
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
    pub(super) fn view<'a>(&'a self, cfg: &'a PoolConfig) -> HeadView<'a> {
        HeadView {
            segments: Segments::Table(self, cfg),
            len: self.len(),
        }
    }
}
