//! What a decoder step relies on: keys stay rotated for their cache positions through any
//! eviction and repack (a repack moves the fewest keys), `truncate_from` undoes a pass's appends
//! exactly, and a reservation makes a step's blocks certain whatever other sequences do — also
//! on a copy-on-write fork, whose writes (appends, truncation, evictions, repacks) never reach
//! the sequence it shares blocks with.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kv_store::{BlockPool, KeyShift, KvDtype, KvError, PoolConfig, SequenceKv};
use proptest::prelude::*;

const D: usize = 4;
const BS: usize = 4;

fn pool(capacity_blocks: usize) -> BlockPool {
    BlockPool::new(PoolConfig {
        block_size: BS,
        head_dim: D,
        dtype: KvDtype::F32,
        capacity_blocks,
    })
}

/// Appends `n` entries to every head of `layer`: key `[cache position, id, 0, 0]` (the position
/// a decoder would rotate it for, a unique id), value `[id; D]`.
fn append(kv: &mut SequenceKv, layer: usize, start: u32, n: usize, next_id: &mut f32) {
    let heads = kv.n_kv_heads();
    let (mut k, mut v) = (Vec::new(), Vec::new());
    for t in 0..n {
        for h in 0..heads {
            let at = kv.next_cache_position(layer, h).unwrap_or(0) as usize + t;
            *next_id += 1.0;
            k.extend([at as f32, *next_id, 0.0, 0.0]);
            v.extend([*next_id; D]);
        }
    }
    let positions: Vec<u32> = (start..start + n as u32).collect();
    kv.append(layer, &k, &v, &positions).unwrap();
}

/// A mask keeping entry `i` of `n` iff bit `i % 64` of `bits` is set (at least one kept).
fn mask(n: usize, bits: u64) -> Vec<bool> {
    let mut m: Vec<bool> = (0..n).map(|i| bits >> (i % 64) & 1 == 1).collect();
    if n > 0 && !m.iter().any(|&k| k) {
        m[n - 1] = true;
    }
    m
}

/// The length of the longest run of consecutive cache positions.
fn longest_run(at: &[u32]) -> usize {
    let (mut best, mut run) = (0, 0);
    for (i, &p) in at.iter().enumerate() {
        run = if i > 0 && at[i - 1] + 1 == p {
            run + 1
        } else {
            1
        };
        best = usize::max(best, run);
    }
    best
}

proptest! {
    #[test]
    fn keys_follow_their_cache_positions_through_repacks(
        steps in proptest::collection::vec((1..12usize, any::<u64>(), 0..40u32), 1..12)
    ) {
        let shifted = Arc::new(AtomicUsize::new(0));
        let counter = shifted.clone();
        // Stands in for a rotary re-rotation: the key's position coordinate moves by `delta`.
        let shift: KeyShift = Arc::new(move |keys: &mut [f32], delta: i64| {
            for key in keys.chunks_exact_mut(D) {
                key[0] += delta as f32;
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        let pool = pool(1024);
        let mut kv = SequenceKv::with_cache_positions(&pool, 1, 2, shift);
        let (mut next_id, mut pos) = (0.0, 0u32);
        let mut ids: Vec<Vec<f32>> = vec![Vec::new(); 2];
        for (n, bits, max_span) in steps {
            let before = next_id;
            append(&mut kv, 0, pos, n, &mut next_id);
            pos += n as u32;
            for (h, head_ids) in ids.iter_mut().enumerate() {
                head_ids.extend((0..n).map(|t| before + 1.0 + (t * 2 + h) as f32));
                let keep = mask(kv.retained(0, h), bits.rotate_left(h as u32 * 7));
                kv.evict(0, h, &keep).unwrap();
                let mut flags = keep.iter();
                head_ids.retain(|_| *flags.next().unwrap());
            }
            let spans: Vec<u32> = (0..2)
                .map(|h| {
                    let at = kv.cache_positions(0, h);
                    at.last().map_or(0, |&l| l + 1 - at[0])
                })
                .collect();
            let runs: Vec<usize> = (0..2).map(|h| longest_run(&kv.cache_positions(0, h))).collect();
            shifted.store(0, Ordering::Relaxed);
            kv.repack_cache_positions(max_span).unwrap();
            // Heads wider than the span were closed, moving only keys outside the longest run.
            let expected: usize = (0..2)
                .filter(|&h| spans[h] > max_span)
                .map(|h| kv.retained(0, h) - runs[h])
                .sum();
            prop_assert_eq!(shifted.load(Ordering::Relaxed), expected);
            for (h, head_ids) in ids.iter().enumerate() {
                let at = kv.cache_positions(0, h);
                if spans[h] > max_span {
                    prop_assert!(at.windows(2).all(|w| w[1] == w[0] + 1), "{:?}", at);
                }
                prop_assert!(at.windows(2).all(|w| w[1] > w[0]));
                let keys = kv.read_head(0, h).keys;
                for (i, key) in keys.chunks_exact(D).enumerate() {
                    prop_assert_eq!(key[0], at[i] as f32, "entry {} is not at its position", i);
                    prop_assert_eq!(key[1], head_ids[i], "entry {} is not the one kept", i);
                }
            }
        }
    }

    #[test]
    fn truncate_from_undoes_the_appends_of_a_pass(
        before in proptest::collection::vec((1..9usize, any::<u64>()), 0..6),
        pass in 1..9usize,
    ) {
        let pool = pool(256);
        let mut kv = SequenceKv::with_cache_positions(&pool, 2, 2, Arc::new(|_: &mut [f32], _| {}));
        let (mut next_id, mut pos) = (0.0, 0u32);
        for (n, bits) in before {
            for layer in 0..2 {
                append(&mut kv, layer, pos, n, &mut next_id);
                for h in 0..2 {
                    let keep = mask(kv.retained(layer, h), bits ^ h as u64);
                    kv.evict(layer, h, &keep).unwrap();
                }
            }
            pos += n as u32;
        }
        let stats = kv.stats();
        let pool_stats = pool.stats();
        let contents: Vec<_> = (0..4).map(|i| kv.read_head(i / 2, i % 2)).collect();
        let at: Vec<_> = (0..4).map(|i| kv.cache_positions(i / 2, i % 2)).collect();
        for layer in 0..2 {
            append(&mut kv, layer, pos, pass, &mut next_id);
        }
        kv.truncate_from(pos);
        prop_assert_eq!(kv.stats(), stats);
        let mut after = pool.stats();
        // Freed buffers stay cached for reuse; the peak remembers the pass.
        after.bytes_reserved = pool_stats.bytes_reserved;
        after.peak_blocks_in_use = pool_stats.peak_blocks_in_use;
        prop_assert_eq!(after, pool_stats);
        for (i, head) in contents.iter().enumerate() {
            prop_assert_eq!(&kv.read_head(i / 2, i % 2), head);
            prop_assert_eq!(&kv.cache_positions(i / 2, i % 2), &at[i]);
        }
    }
}

proptest! {
    #[test]
    fn a_fork_truncates_evicts_and_repacks_without_touching_its_parent(
        before in proptest::collection::vec((1..9usize, any::<u64>()), 1..6),
        pass in 1..9usize,
        bits in any::<u64>(),
        max_span in 0..20u32,
    ) {
        let shift: KeyShift = Arc::new(|keys: &mut [f32], delta: i64| {
            for key in keys.chunks_exact_mut(D) {
                key[0] += delta as f32;
            }
        });
        let pool = pool(512);
        let mut parent = SequenceKv::with_cache_positions(&pool, 1, 2, shift);
        let (mut next_id, mut pos) = (0.0, 0u32);
        for (n, bits) in before {
            append(&mut parent, 0, pos, n, &mut next_id);
            for h in 0..2 {
                let keep = mask(parent.retained(0, h), bits ^ h as u64);
                parent.evict(0, h, &keep).unwrap();
            }
            pos += n as u32;
        }
        let heads = |kv: &SequenceKv| -> Vec<_> {
            (0..2).map(|h| (kv.read_head(0, h), kv.cache_positions(0, h))).collect()
        };
        let parent_heads = heads(&parent);
        let in_use = pool.stats().blocks_in_use;
        let mut fork = parent.fork();
        prop_assert!(fork.has_cache_positions());
        prop_assert_eq!(heads(&fork), parent_heads.clone());
        prop_assert_eq!(pool.stats().blocks_in_use, in_use, "a fork allocates nothing");
        // A failed pass on the fork, undone.
        fork.reserve_blocks(fork.blocks_held() + fork.blocks_to_append(pass)).unwrap();
        append(&mut fork, 0, pos, pass, &mut next_id);
        fork.truncate_from(pos);
        prop_assert_eq!(heads(&fork), parent_heads.clone());
        // Then a pass that stays, an eviction and a repack on the fork.
        append(&mut fork, 0, pos, pass, &mut next_id);
        for h in 0..2 {
            let keep = mask(fork.retained(0, h), bits.rotate_left(h as u32 * 5));
            fork.evict(0, h, &keep).unwrap();
        }
        fork.repack_cache_positions(max_span).unwrap();
        fork.release_reservation();
        prop_assert_eq!(heads(&parent), parent_heads, "the parent saw a write of its fork");
        for h in 0..2 {
            let at = fork.cache_positions(0, h);
            let keys = fork.read_head(0, h).keys;
            for (i, key) in keys.chunks_exact(D).enumerate() {
                prop_assert_eq!(key[0], at[i] as f32, "fork entry {} is not at its position", i);
            }
        }
        drop(fork);
        drop(parent);
        prop_assert_eq!(pool.stats().blocks_free, 512);
    }
}

#[test]
fn a_fork_reserves_copies_of_the_blocks_it_shares() -> Result<(), KvError> {
    let pool = pool(8);
    let shift: KeyShift = Arc::new(|_: &mut [f32], _| {});
    let mut parent = SequenceKv::with_cache_positions(&pool, 1, 1, shift);
    let mut id = 0.0;
    append(&mut parent, 0, 0, 10, &mut id); // 3 blocks, the last partly filled
    let mut fork = parent.fork();
    // The fork owns none of its 3 blocks: writing any of them takes a copy, so 3 are set aside.
    fork.reserve_blocks(3)?;
    assert_eq!(pool.stats().blocks_set_aside, 3);
    // Another sequence takes everything else.
    let mut other = SequenceKv::new(&pool, 1, 1);
    append(&mut other, 0, 0, 8, &mut id);
    assert_eq!(pool.stats().blocks_free, 0);
    // Evicting entry 5 rewrites blocks 1 and 2: their copies come from the reservation.
    let mut keep = vec![true; 10];
    keep[5] = false;
    fork.evict(0, 0, &keep)?;
    assert_eq!(fork.stats().blocks_shared, 1);
    assert_eq!(parent.stats().blocks_shared, 1);
    assert_eq!(parent.positions(0, 0), (0..10).collect::<Vec<u32>>());
    let kept: Vec<u32> = (0..10).filter(|&p| p != 5).collect();
    assert_eq!(fork.positions(0, 0), kept);
    assert_eq!(pool.stats().blocks_free, 0);
    // Without a reservation a repack that must copy shared blocks (1 and 2, holding entries
    // after the gap) fails and changes nothing.
    fork.release_reservation();
    assert_eq!(pool.stats().blocks_free, 1);
    let mut second = fork.fork();
    let before = second.cache_positions(0, 0);
    let err = second
        .repack_cache_positions(0)
        .expect_err("no block is free for the copy");
    assert!(
        matches!(
            err,
            KvError::OutOfBlocksForCopy {
                layer: 0,
                head: 0,
                requested: 2,
                free: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(second.cache_positions(0, 0), before);
    assert_eq!(second.stats().blocks_shared, 3);
    Ok(())
}

#[test]
fn a_reservation_is_certain_whatever_other_sequences_do() -> Result<(), KvError> {
    let pool = pool(10);
    let mut a = SequenceKv::new(&pool, 1, 1);
    let mut b = SequenceKv::new(&pool, 1, 1);
    let mut id = 0.0;
    append(&mut a, 0, 0, 4, &mut id); // 1 block held
    a.reserve_blocks(4)?; // 3 more set aside
    assert_eq!(pool.stats().blocks_set_aside, 3);
    assert_eq!(pool.stats().blocks_free, 6);
    // Another sequence cannot take the reserved blocks.
    append(&mut b, 0, 0, 24, &mut id);
    let err = b
        .append(0, &[0.0; D], &[0.0; D], &[24])
        .expect_err("the pool is full for b");
    assert!(matches!(err, KvError::OutOfBlocks { free: 0, .. }), "{err}");
    // A grows to its ceiling.
    append(&mut a, 0, 4, 12, &mut id);
    assert_eq!((a.blocks_held(), pool.stats().blocks_set_aside), (4, 0));
    // Freed blocks refill the reservation, not the pool.
    a.evict(0, 0, &mask(16, 0xff))?;
    assert_eq!((a.blocks_held(), pool.stats().blocks_set_aside), (2, 2));
    assert_eq!(pool.stats().blocks_free, 0);
    // A reservation the pool cannot make changes nothing.
    let err = a
        .reserve_blocks(9)
        .expect_err("only 2 + 2 blocks are possible");
    assert_eq!(
        err.to_string(),
        "out of KV blocks: this step may need 5 more block(s) but the pool has 0 free of 10"
    );
    assert_eq!(pool.stats().blocks_set_aside, 2);
    a.release_reservation();
    assert_eq!(pool.stats().blocks_free, 2);
    drop(b);
    drop(a);
    assert_eq!(pool.stats().blocks_free, 10);
    Ok(())
}
