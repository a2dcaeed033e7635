//! `SequenceKv::evict_tail` is `SequenceKv::evict` with every entry before the flagged tail
//! kept: under random appends, forks (shared blocks, copy-on-write) and evictions of random
//! tails, a store evicted by tails and one evicted by whole masks hold the same entries, the
//! same blocks and leave their pools with the same free blocks; a tail longer than the table is
//! refused and changes nothing.

#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use kv_store::{BlockPool, KvDtype, KvError, PoolConfig, SequenceKv};
use proptest::prelude::*;

const HEADS: usize = 2;
const D: usize = 8;

/// One step: append `n` tokens, fork (and keep the fork alive), or evict from a head the
/// entries whose bit is clear among its newest `tail` (bits repeat over longer tails).
#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Fork,
    Evict { head: usize, tail: usize, bits: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..40usize).prop_map(Op::Append),
        1 => Just(Op::Fork),
        5 => (0..HEADS, 0..80usize, any::<u64>())
            .prop_map(|(head, tail, bits)| Op::Evict { head, tail, bits }),
    ]
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 31 + seed * 7) % 97) as f32).collect()
}

/// Runs `ops` on two stores in two pools, one evicting by whole masks, the other by tails,
/// comparing them after every step.
fn run(dtype: KvDtype, ops: &[Op]) {
    let pools: Vec<BlockPool> = (0..2)
        .map(|_| BlockPool::new(PoolConfig::from_token_capacity(16, D, dtype, 8192)))
        .collect();
    let mut stores: Vec<SequenceKv> = pools.iter().map(|p| SequenceKv::new(p, 1, HEADS)).collect();
    let mut forks: Vec<SequenceKv> = Vec::new();
    let mut next = 0u32;
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Append(n) => {
                let positions: Vec<u32> = (next..next + n as u32).collect();
                next += n as u32;
                let (k, v) = (values(n * HEADS * D, step), values(n * HEADS * D, step + 1));
                for kv in &mut stores {
                    kv.append(0, &k, &v, &positions).unwrap();
                }
            }
            Op::Fork => forks.extend(stores.iter().map(SequenceKv::fork)),
            Op::Evict { head, tail, bits } => {
                let retained = stores[0].retained(0, head);
                let tail = tail.min(retained);
                let flags: Vec<bool> = (0..tail).map(|i| bits >> (i % 64) & 1 == 1).collect();
                let mut whole = vec![true; retained - tail];
                whole.extend(&flags);
                stores[0].evict(0, head, &whole).unwrap();
                stores[1].evict_tail(0, head, &flags).unwrap();
            }
        }
        for head in 0..HEADS {
            assert_eq!(stores[0].read_head(0, head), stores[1].read_head(0, head));
        }
        assert_eq!(stores[0].stats(), stores[1].stats(), "after {op:?}");
        assert_eq!(pools[0].stats(), pools[1].stats(), "after {op:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn evicting_a_tail_equals_evicting_by_a_whole_mask_f16(ops in prop::collection::vec(op(), 1..50)) {
        run(KvDtype::F16, &ops);
    }

    #[test]
    fn evicting_a_tail_equals_evicting_by_a_whole_mask_f32(ops in prop::collection::vec(op(), 1..50)) {
        run(KvDtype::F32, &ops);
    }
}

#[test]
fn a_tail_longer_than_the_table_is_refused_and_changes_nothing() {
    let pool = BlockPool::new(PoolConfig::from_token_capacity(16, D, KvDtype::F16, 1024));
    let mut kv = SequenceKv::new(&pool, 1, HEADS);
    let positions: Vec<u32> = (0..5).collect();
    kv.append(
        0,
        &values(5 * HEADS * D, 0),
        &values(5 * HEADS * D, 1),
        &positions,
    )
    .unwrap();
    let before = kv.read_head(0, 1);
    let err = kv.evict_tail(0, 1, &[false; 6]).unwrap_err();
    assert!(
        matches!(
            err,
            KvError::MaskLength {
                retained: 5,
                got: 6,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("keep_tail"), "{err}");
    assert_eq!(kv.read_head(0, 1), before);
    assert!(matches!(
        kv.evict_tail(2, 0, &[]),
        Err(KvError::LayerOutOfRange { .. })
    ));
}
