//! A sequence's reservation (blocks set aside in the pool so that its next steps cannot run out)
//! and the block accounting it rests on: every block a [`SequenceKv`] takes or gives back goes
//! through `take_blocks` and `give_back`, which draw on and refill the reservation first.

use std::sync::atomic::Ordering;

use crate::pool::Block;
use crate::KvError;

use super::SequenceKv;

/// A reservation: the sequence may grow to `ceiling` blocks; `withheld` are set aside now.
#[derive(Clone, Copy, Debug)]
pub(super) struct Reservation {
    ceiling: usize,
    withheld: usize,
}

impl SequenceKv {
    /// Blocks this sequence holds (shared ones included).
    pub fn blocks_held(&self) -> usize {
        self.tables.iter().map(|t| t.blocks.len()).sum()
    }

    /// Blocks this sequence holds alone (not shared with a fork): the ones it has paid for. Reads every block's holder count only while some may
    /// be shared ([`SequenceKv::may_share`]): per block freed, an eviction would otherwise read
    /// every block of the sequence.
    pub(super) fn blocks_owned(&self) -> usize {
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
    pub(super) fn take_blocks(&mut self, n: usize) -> Result<Vec<Block>, usize> {
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
    pub(super) fn give_back(&mut self, blocks: Vec<Block>) {
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
}
