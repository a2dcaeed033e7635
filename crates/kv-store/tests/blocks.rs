//! Block accounting and sharing, scenario by scenario: evicting half of every head frees half
//! the bytes (in the sequence's and the pool's figures, and after a trim); sessions never share
//! blocks unless forked; the pool and sequences are `Send + Sync`; a fork shares every block and
//! writes go to copies of only the blocks written; a copy-on-write eviction without room for its
//! copies fails whole. (The random interleavings of the same operations are in `model.rs`.)
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use kv_store::{BlockPool, KvDtype, KvError, PoolConfig, SequenceKv};

/// Evicting half of every head frees real memory: bytes in use fall to within one block per head
/// of half the full figure, in the sequence's and in the pool's accounting.
#[test]
fn half_eviction_halves_bytes_in_use() {
    let (layers, heads, d, tokens) = (3, 4, 64, 1000usize);
    for dtype in [KvDtype::F32, KvDtype::F16] {
        let pool = BlockPool::new(PoolConfig::from_memory_budget(16, d, dtype, 64 << 20));
        let mut kv = SequenceKv::new(&pool, layers, heads);
        let pos: Vec<u32> = (0..tokens as u32).collect();
        let k: Vec<f32> = (0..tokens * heads * d).map(|i| (i % 97) as f32).collect();
        for l in 0..layers {
            kv.append(l, &k, &k, &pos).unwrap();
        }
        let full = kv.stats().bytes_in_use;
        assert_eq!(full, pool.stats().bytes_in_use);
        let mut x = 12345u64;
        for l in 0..layers {
            for h in 0..heads {
                // A different random half per head.
                let mut idx: Vec<usize> = (0..tokens).collect();
                for i in (1..tokens).rev() {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    idx.swap(i, (x >> 33) as usize % (i + 1));
                }
                let mut keep = vec![false; tokens];
                idx[..tokens / 2].iter().for_each(|&i| keep[i] = true);
                kv.evict(l, h, &keep).unwrap();
                assert_eq!(kv.retained(l, h), tokens / 2);
            }
        }
        let half = kv.stats().bytes_in_use;
        let slack = layers * heads * pool.config().block_bytes();
        assert!(
            half.abs_diff(full / 2) <= slack,
            "{dtype}: {half} bytes after eviction, full {full}"
        );
        assert_eq!(half, pool.stats().bytes_in_use);
        drop(kv);
        assert_eq!(pool.stats().bytes_in_use, 0);
        assert!(pool.stats().bytes_reserved >= full);
        assert!(pool.trim() >= full);
        assert_eq!(pool.stats().bytes_reserved, 0);
    }
}

/// Sessions are independent: one session's eviction never changes another's contents or blocks.
#[test]
fn sessions_do_not_share_blocks() {
    let pool = BlockPool::new(PoolConfig::from_token_capacity(8, 2, KvDtype::F32, 4096));
    let mut a = SequenceKv::new(&pool, 1, 1);
    let mut b = SequenceKv::new(&pool, 1, 1);
    let pos: Vec<u32> = (0..40).collect();
    let xs: Vec<f32> = (0..80).map(|i| i as f32).collect();
    a.append(0, &xs, &xs, &pos).unwrap();
    b.append(0, &xs, &xs, &pos).unwrap();
    let before = b.read_head(0, 0);
    let b_ids = b.block_ids(0, 0);
    let keep: Vec<bool> = (0..40).map(|i| i % 4 == 0).collect();
    a.evict(0, 0, &keep).unwrap();
    assert_eq!(a.retained(0, 0), 10);
    assert_eq!(a.positions(0, 0), (0..40).step_by(4).collect::<Vec<u32>>());
    assert_eq!(b.read_head(0, 0), before);
    assert_eq!(b.block_ids(0, 0), b_ids);
    assert_eq!(pool.stats().blocks_in_use, 2 + 5);
    let st = a.stats();
    assert_eq!(st.appended, vec![vec![40]]);
    assert_eq!(st.tokens_seen, vec![40]);
    assert_eq!(st.retained, vec![vec![10]]);
}

/// The pool is shared across threads and sessions move between them.
#[test]
fn pool_and_sequences_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<BlockPool>();
    assert_send_sync::<SequenceKv>();
    let pool = BlockPool::new(PoolConfig::from_token_capacity(4, 2, KvDtype::BF16, 1024));
    let handles: Vec<_> = (0..4u32)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let mut kv = SequenceKv::new(&pool, 1, 1);
                let pos: Vec<u32> = (0..10 + t).collect();
                let x = vec![t as f32; pos.len() * 2];
                kv.append(0, &x, &x, &pos).unwrap();
                kv.retained(0, 0)
            })
        })
        .collect();
    let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(total, 10 + 11 + 12 + 13);
    assert_eq!(pool.stats().blocks_in_use, 0);
    assert!(pool.stats().peak_blocks_in_use >= 3);
}

/// A fork shares every block (the pool counts them once, each sequence reports them as held and
/// shared); writes go to copies: an append into the shared partly filled block copies that block
/// only, a compaction copies only the blocks it writes; the parent never changes; dropping the
/// parent leaves the fork's blocks alone, dropping both returns everything.
#[test]
fn forks_share_blocks_copy_on_write() {
    let pool = BlockPool::new(PoolConfig::from_token_capacity(8, 2, KvDtype::F32, 4096));
    let mut parent = SequenceKv::new(&pool, 1, 1);
    let pos: Vec<u32> = (0..20).collect();
    let xs: Vec<f32> = (0..40).map(|i| i as f32).collect();
    parent.append(0, &xs, &xs, &pos).unwrap();
    let before = parent.read_head(0, 0);
    let ids = parent.block_ids(0, 0);
    assert_eq!(pool.stats().blocks_in_use, 3);

    let mut fork = parent.fork();
    assert_eq!(fork.block_ids(0, 0), ids);
    assert_eq!(fork.read_head(0, 0), before);
    assert_eq!(pool.stats().blocks_in_use, 3, "a fork allocates nothing");
    let st = fork.stats();
    assert_eq!((st.blocks_in_use, st.blocks_shared), (3, 3));
    assert_eq!(st.bytes_shared, 3 * pool.config().block_bytes());

    // Append into the shared, partly filled third block: only that block is copied.
    fork.append(0, &[100.0, 101.0], &[100.0, 101.0], &[20])
        .unwrap();
    let fork_ids = fork.block_ids(0, 0);
    assert_eq!(fork_ids[..2], ids[..2]);
    assert_ne!(fork_ids[2], ids[2]);
    assert_eq!(pool.stats().blocks_in_use, 4);
    assert_eq!(parent.read_head(0, 0), before);
    assert_eq!(fork.retained(0, 0), 21);
    assert_eq!(fork.stats().blocks_shared, 2);

    // Keep entries 0..8 and every third after: block 0 is untouched and stays shared, block 1
    // is written (copied), block 2 (the fork's own) is written in place.
    let keep: Vec<bool> = (0..21).map(|i| i < 8 || i % 3 == 0).collect();
    fork.evict(0, 0, &keep).unwrap();
    let kept: Vec<u32> = (0..21).filter(|&i| i < 8 || i % 3 == 0).collect();
    assert_eq!(fork.positions(0, 0), kept);
    let fk = fork.read_head(0, 0).keys;
    let want: Vec<f32> = kept
        .iter()
        .flat_map(|&p| {
            if p == 20 {
                vec![100.0, 101.0]
            } else {
                vec![(2 * p) as f32, (2 * p + 1) as f32]
            }
        })
        .collect();
    assert_eq!(fk, want);
    assert_eq!(fork.block_ids(0, 0)[0], ids[0]);
    assert_eq!(fork.stats().blocks_shared, 1);
    assert_eq!(parent.read_head(0, 0), before);
    // Parent: 3 blocks; fork: block 0 shared, a copy of block 1 (its block 2 was freed by the
    // compaction: 13 entries need 2 blocks).
    assert_eq!(pool.stats().blocks_in_use, 4);

    drop(parent);
    assert_eq!(pool.stats().blocks_in_use, 2);
    assert_eq!(fork.stats().blocks_shared, 0);
    assert_eq!(fork.positions(0, 0), kept);
    drop(fork);
    assert_eq!(pool.stats().blocks_in_use, 0);
}

/// A copy-on-write eviction that cannot get its copies fails whole and changes nothing.
#[test]
fn an_eviction_without_room_for_its_copies_changes_nothing() {
    let pool = BlockPool::new(PoolConfig::from_token_capacity(4, 1, KvDtype::F32, 12));
    let mut parent = SequenceKv::new(&pool, 1, 1);
    let pos: Vec<u32> = (0..12).collect();
    let xs: Vec<f32> = (0..12).map(|i| i as f32).collect();
    parent.append(0, &xs, &xs, &pos).unwrap();
    let mut fork = parent.fork();
    let keep: Vec<bool> = (0..12).map(|i| i % 2 == 0).collect();
    let err = fork.evict(0, 0, &keep).unwrap_err();
    assert_eq!(
        err,
        KvError::OutOfBlocksForCopy {
            layer: 0,
            head: 0,
            requested: 2,
            free: 0,
            total: 3
        }
    );
    assert!(err.to_string().contains("shared with a fork"), "{err}");
    assert_eq!(fork.read_head(0, 0), parent.read_head(0, 0));
    drop(parent);
    // Now the fork holds its blocks alone and compacts in place.
    fork.evict(0, 0, &keep).unwrap();
    assert_eq!(
        fork.positions(0, 0),
        (0..12).step_by(2).collect::<Vec<u32>>()
    );
    assert_eq!(pool.stats().blocks_in_use, 2);
}
