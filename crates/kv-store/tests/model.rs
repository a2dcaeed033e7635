//! Property tests of the store against a dense reference model (the scenario tests of block
//! accounting and sharing are in `blocks.rs`).
//!
//! Owns: random interleavings of append / append_head / evict / clear / drop / fork over several
//! sessions sharing one small pool. Invariants checked after every step: retained keys, values
//! and positions equal the reference (values rounded to the pool dtype), so no session ever sees
//! a write of another, forks included; every head holds no empty block (at most one partly
//! filled block at each end: between ceil(retained / block_size) and one more) and reports as
//! shared exactly those another table also holds; the pool counts every distinct block once; an
//! append needs exactly the blocks its tokens overflow the head's spare slots by (plus a copy of
//! a shared partly filled last block), and a failed append or eviction (pool exhausted, copies
//! of shared blocks included) returns its `OutOfBlocks*` error and changes nothing.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use kv_store::{BlockPool, KvDtype, KvError, PoolConfig, SequenceKv};
use proptest::prelude::*;
use std::collections::HashMap;

const LAYERS: usize = 2;
const HEADS: usize = 2;
const D: usize = 3;
const BS: usize = 4;
const SESSIONS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Append {
        s: usize,
        layer: usize,
        n: usize,
    },
    AppendHead {
        s: usize,
        layer: usize,
        head: usize,
        n: usize,
    },
    Evict {
        s: usize,
        layer: usize,
        head: usize,
        seed: u64,
    },
    Clear {
        s: usize,
    },
    Drop {
        s: usize,
    },
    Fork {
        from: usize,
        to: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0..SESSIONS;
    prop_oneof![
        4 => (s.clone(), 0..LAYERS, 1..9usize).prop_map(|(s, layer, n)| Op::Append { s, layer, n }),
        3 => (s.clone(), 0..LAYERS, 0..HEADS, 1..6usize)
            .prop_map(|(s, layer, head, n)| Op::AppendHead { s, layer, head, n }),
        4 => (s.clone(), 0..LAYERS, 0..HEADS, any::<u64>())
            .prop_map(|(s, layer, head, seed)| Op::Evict { s, layer, head, seed }),
        1 => s.clone().prop_map(|s| Op::Clear { s }),
        1 => s.clone().prop_map(|s| Op::Drop { s }),
        2 => (s.clone(), s).prop_map(|(from, to)| Op::Fork { from, to }),
    ]
}

/// Reference contents of one head: (key, value, position) per retained entry.
type RefHead = Vec<(Vec<f32>, Vec<f32>, u32)>;

struct Session {
    kv: SequenceKv,
    heads: Vec<RefHead>,
    next_pos: Vec<u32>,
}

impl Session {
    fn new(pool: &BlockPool) -> Self {
        Session {
            kv: SequenceKv::new(pool, LAYERS, HEADS),
            heads: vec![Vec::new(); LAYERS * HEADS],
            next_pos: vec![0; LAYERS],
        }
    }
}

struct World {
    pool: BlockPool,
    dtype: KvDtype,
    sessions: Vec<Session>,
    counter: f32,
}

impl World {
    fn new(dtype: KvDtype, capacity_blocks: usize) -> Self {
        let pool = BlockPool::new(PoolConfig {
            block_size: BS,
            head_dim: D,
            dtype,
            capacity_blocks,
        });
        let sessions = (0..SESSIONS).map(|_| Session::new(&pool)).collect();
        World {
            pool,
            dtype,
            sessions,
            counter: 0.0,
        }
    }

    /// Fresh distinct values (exact in every dtype only after rounding, which the model does).
    fn values(&mut self, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| {
                self.counter += 1.0;
                (self.counter * 0.618_034).sin() * 3.0
            })
            .collect()
    }

    /// Blocks an append of `n` tokens to (`layer`, `head`) of session `s` needs.
    fn blocks_needed(&self, s: usize, layer: usize, head: usize, n: usize) -> usize {
        n.saturating_sub(self.sessions[s].kv.spare_slots(layer, head))
            .div_ceil(BS)
    }

    /// How many tables (over every session) hold each block id.
    fn holders(&self) -> HashMap<u32, usize> {
        let mut holders = HashMap::new();
        for sess in &self.sessions {
            for l in 0..LAYERS {
                for h in 0..HEADS {
                    for id in sess.kv.block_ids(l, h) {
                        *holders.entry(id).or_insert(0) += 1;
                    }
                }
            }
        }
        holders
    }

    /// Whether block `b` of session `s`'s (layer, head) table is held by another table too.
    fn is_shared(
        &self,
        holders: &HashMap<u32, usize>,
        s: usize,
        l: usize,
        h: usize,
        b: usize,
    ) -> bool {
        holders[&self.sessions[s].kv.block_ids(l, h)[b]] > 1
    }

    /// Blocks an append of `n` to one head needs: new ones, plus a copy of a shared partly
    /// filled last block.
    fn append_need(
        &self,
        holders: &HashMap<u32, usize>,
        s: usize,
        l: usize,
        h: usize,
        n: usize,
    ) -> usize {
        let kv = &self.sessions[s].kv;
        let held = kv.block_ids(l, h).len();
        let copy = kv.spare_slots(l, h) > 0 && self.is_shared(holders, s, l, h, held - 1);
        self.blocks_needed(s, l, h, n) + usize::from(copy)
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Append { s, layer, n } => self.append(s, layer, None, n),
            Op::AppendHead { s, layer, head, n } => self.append(s, layer, Some(head), n),
            Op::Evict {
                s,
                layer,
                head,
                seed,
            } => self.evict(s, layer, head, seed),
            Op::Clear { s } => {
                let sess = &mut self.sessions[s];
                sess.kv.clear();
                sess.heads.iter_mut().for_each(Vec::clear);
                sess.next_pos.fill(0);
            }
            Op::Drop { s } => {
                let fresh = Session::new(&self.pool);
                self.sessions[s] = fresh; // the old SequenceKv is dropped here
            }
            Op::Fork { from, to } => {
                let src = &self.sessions[from];
                let fork = Session {
                    kv: src.kv.fork(),
                    heads: src.heads.clone(),
                    next_pos: src.next_pos.clone(),
                };
                self.sessions[to] = fork; // the old one is dropped (its blocks, if last held)
            }
        }
    }

    /// [`Op::Append`] (`head: None`, every head of `layer`) and [`Op::AppendHead`] (that head
    /// only): `n` new tokens to session `s`.
    fn append(&mut self, s: usize, layer: usize, head: Option<usize>, n: usize) {
        let heads = head.map_or(0..HEADS, |h| h..h + 1);
        let nh = heads.len();
        let k = self.values(n * nh * D);
        let v = self.values(n * nh * D);
        let holders = self.holders();
        let need: usize = heads
            .clone()
            .map(|h| self.append_need(&holders, s, layer, h, n))
            .sum();
        let p0 = self.sessions[s].next_pos[layer];
        let pos: Vec<u32> = (p0..p0 + n as u32).collect();
        let free = self.pool.stats().blocks_free;
        let kv = &mut self.sessions[s].kv;
        let res = match head {
            None => kv.append(layer, &k, &v, &pos),
            Some(h) => kv.append_head(layer, h, &k, &v, &pos),
        };
        self.expect(
            res,
            need,
            free,
            layer,
            n,
            |sess, dtype| {
                for (slot, h) in heads.enumerate() {
                    for (t, &p) in pos.iter().enumerate() {
                        let at = (t * nh + slot) * D;
                        let r = |x: &[f32]| {
                            let mut e = x[at..at + D].to_vec();
                            dtype.round_entry(&mut e);
                            e
                        };
                        sess.heads[layer * HEADS + h].push((r(&k), r(&v), p));
                    }
                }
                sess.next_pos[layer] += n as u32;
            },
            s,
        );
    }

    /// [`Op::Evict`]: a random keep mask (drawn from `seed`) over (`layer`, `head`) of session
    /// `s`; it fails whole when the pool cannot supply the copies of the shared blocks it writes.
    fn evict(&mut self, s: usize, layer: usize, head: usize, seed: u64) {
        let len = self.sessions[s].heads[layer * HEADS + head].len();
        let mut x = seed | 1;
        let keep: Vec<bool> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                !x.is_multiple_of(3)
            })
            .collect();
        let need = self.eviction_copies(s, layer, head, &keep);
        let free = self.pool.stats().blocks_free;
        let res = self.sessions[s].kv.evict(layer, head, &keep);
        if need > free {
            let want = KvError::OutOfBlocksForCopy {
                layer,
                head,
                requested: need,
                free,
                total: self.pool.config().capacity_blocks,
            };
            assert_eq!(res, Err(want));
        } else {
            res.expect("evict with a mask of the right length");
            let mut it = keep.iter();
            self.sessions[s].heads[layer * HEADS + head].retain(|_| *it.next().unwrap());
        }
    }

    /// Copies of shared blocks an eviction by `keep` of (`layer`, `head`) of session `s` needs:
    /// the shared ones among the blocks the compaction writes (the survivors on the cheaper side
    /// move: after the first dropped entry towards the front, or before the last one towards the
    /// back).
    fn eviction_copies(&self, s: usize, layer: usize, head: usize, keep: &[bool]) -> usize {
        let holders = self.holders();
        let kv = &self.sessions[s].kv;
        // Free slots before the first entry.
        let front = kv.block_ids(layer, head).len() * BS - keep.len() - kv.spare_slots(layer, head);
        let (Some(first), Some(last)) = (
            keep.iter().position(|&k| !k),
            keep.iter().rposition(|&k| !k),
        ) else {
            return 0;
        };
        let after = keep[first..].iter().filter(|&&k| k).count();
        let before = keep[..last].iter().filter(|&&k| k).count();
        let written = if after <= before {
            if after == 0 {
                0..0
            } else {
                (front + first) / BS..(front + first + after).div_ceil(BS)
            }
        } else if before == 0 {
            0..0
        } else {
            (front + last + 1 - before) / BS..(front + last) / BS + 1
        };
        written
            .filter(|&b| self.is_shared(&holders, s, layer, head, b))
            .count()
    }

    /// Checks an append's result against the pool's free count before it, and updates the model.
    #[allow(clippy::too_many_arguments)]
    fn expect(
        &mut self,
        res: Result<(), KvError>,
        need: usize,
        free: usize,
        layer: usize,
        n: usize,
        update: impl FnOnce(&mut Session, KvDtype),
        s: usize,
    ) {
        if need > free {
            let want = KvError::OutOfBlocks {
                layer,
                tokens: n,
                requested: need,
                free,
                total: self.pool.config().capacity_blocks,
            };
            assert_eq!(res, Err(want));
        } else {
            res.expect("append within capacity");
            update(&mut self.sessions[s], self.dtype);
        }
    }

    fn check(&self) {
        let holders = self.holders();
        for (s, sess) in self.sessions.iter().enumerate() {
            let (mut sess_blocks, mut shared) = (0, 0);
            for l in 0..LAYERS {
                for h in 0..HEADS {
                    let want = &sess.heads[l * HEADS + h];
                    let got = sess.kv.read_head(l, h);
                    assert_eq!(sess.kv.retained(l, h), want.len());
                    assert_eq!(got.positions, want.iter().map(|e| e.2).collect::<Vec<_>>());
                    assert_eq!(sess.kv.positions(l, h), got.positions);
                    assert_eq!(
                        got.keys,
                        want.iter().flat_map(|e| e.0.clone()).collect::<Vec<_>>()
                    );
                    assert_eq!(
                        got.values,
                        want.iter().flat_map(|e| e.1.clone()).collect::<Vec<_>>()
                    );
                    let norms: Vec<f32> = want
                        .iter()
                        .map(|e| e.0.iter().map(|x| x * x).sum::<f32>().sqrt())
                        .collect();
                    for (a, b) in sess.kv.key_norms(l, h).iter().zip(&norms) {
                        assert!((a - b).abs() <= 1e-5 * b.max(1.0));
                    }
                    let bids = sess.kv.block_ids(l, h);
                    let (held, len) = (bids.len(), want.len());
                    let spare = sess.kv.spare_slots(l, h);
                    // Free slots at the front of the first block and at the end of the last one
                    // are each fewer than a block: no empty block is held.
                    assert!(
                        held * BS >= len + spare,
                        "{held} blocks for {len} + {spare} spare"
                    );
                    let front = held * BS - len - spare;
                    assert!(
                        front < BS && spare < BS.max(1),
                        "empty block held ({front}, {spare})"
                    );
                    assert!(len > 0 || held == 0, "blocks held for an empty head");
                    assert!(held <= len.div_ceil(BS) + 1);
                    shared += (0..held)
                        .filter(|&b| self.is_shared(&holders, s, l, h, b))
                        .count();
                    sess_blocks += held;
                }
            }
            let st = sess.kv.stats();
            assert_eq!(st.blocks_in_use, sess_blocks);
            assert_eq!(
                st.bytes_in_use,
                sess_blocks * self.pool.config().block_bytes()
            );
            assert_eq!(st.blocks_shared, shared);
            assert_eq!(st.bytes_shared, shared * self.pool.config().block_bytes());
            assert_eq!(
                st.retained_total(),
                sess.heads.iter().map(Vec::len).sum::<usize>()
            );
        }
        // The pool counts each physical block once, however many tables share it.
        let blocks = holders.len();
        let ps = self.pool.stats();
        assert_eq!(ps.blocks_in_use, blocks);
        assert_eq!(ps.blocks_free, ps.blocks_total - blocks);
        assert_eq!(ps.bytes_in_use, blocks * ps.block_bytes);
        assert!(ps.peak_blocks_in_use <= ps.blocks_total);
    }
}

fn run(dtype: KvDtype, capacity: usize, ops: &[Op]) {
    let mut w = World::new(dtype, capacity);
    for op in ops {
        w.apply(op);
        w.check();
    }
    w.sessions.clear();
    assert_eq!(
        w.pool.stats().blocks_in_use,
        0,
        "dropping every session returns every block"
    );
}

/// One property test per storage dtype: up to `max_ops` random operations over a pool of 4 to 40
/// blocks.
macro_rules! store_matches_reference {
    ($($name:ident: $dtype:ident, $max_ops:literal;)*) => {
        proptest! {
            #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
            $(
                #[test]
                fn $name(ops in prop::collection::vec(op(), 1..$max_ops), capacity in 4..40usize) {
                    run(KvDtype::$dtype, capacity, &ops);
                }
            )*
        }
    };
}

store_matches_reference! {
    store_matches_reference_f32: F32, 60;
    store_matches_reference_f16: F16, 60;
    store_matches_reference_bf16: BF16, 40;
    store_matches_reference_q8_0: Q8_0, 40;
    store_matches_reference_q4_0: Q4_0, 40;
}
