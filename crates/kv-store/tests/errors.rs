//! Error cases of the public API: each bad call returns the right `KvError`, its message names
//! the layer / head / length / value involved, and the store is left unchanged.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use kv_store::{AttendOptions, BlockPool, KvDtype, KvError, PoolConfig, SequenceKv};

const D: usize = 4;

/// A 2-layer, 2-KV-head sequence with 5 tokens in every head, over a pool of `capacity` blocks.
fn setup(capacity: usize) -> (BlockPool, SequenceKv) {
    let pool = BlockPool::new(PoolConfig {
        block_size: 4,
        head_dim: D,
        dtype: KvDtype::F32,
        capacity_blocks: capacity,
    });
    let mut kv = SequenceKv::new(&pool, 2, 2);
    let x: Vec<f32> = (0..5 * 2 * D).map(|i| i as f32).collect();
    for l in 0..2 {
        kv.append(l, &x, &x, &[0, 1, 2, 3, 4]).unwrap();
    }
    (pool, kv)
}

fn err_msg<T: std::fmt::Debug>(r: Result<T, KvError>) -> (KvError, String) {
    let e = r.unwrap_err();
    let m = e.to_string();
    (e, m)
}

#[test]
fn append_errors() {
    let (pool, mut kv) = setup(64);
    let before = (kv.stats(), pool.stats());
    let x = vec![0.0f32; 2 * D];

    let (e, m) = err_msg(kv.append(1, &x[..5], &x, &[7]));
    assert_eq!(
        e,
        KvError::ShapeMismatch {
            layer: 1,
            what: "k",
            expected: 8,
            got: 5
        }
    );
    assert_eq!(m, "layer 1: `k` has length 5, expected 8");

    let (_, m) = err_msg(kv.append(0, &x, &x[..7], &[7]));
    assert_eq!(m, "layer 0: `v` has length 7, expected 8");

    let (_, m) = err_msg(kv.append(0, &x, &x, &[7, 8]));
    assert_eq!(m, "layer 0: `k` has length 8, expected 16");

    let (e, m) = err_msg(kv.append(2, &x, &x, &[7]));
    assert_eq!(
        e,
        KvError::LayerOutOfRange {
            layer: 2,
            n_layers: 2
        }
    );
    assert_eq!(m, "layer 2 is out of range: the sequence has 2 layers");

    let (e, m) = err_msg(kv.append_head(1, 2, &x[..D], &x[..D], &[7]));
    assert_eq!(
        e,
        KvError::HeadOutOfRange {
            layer: 1,
            head: 2,
            n_kv_heads: 2
        }
    );
    assert_eq!(
        m,
        "KV head 2 of layer 1 is out of range: the sequence has 2 KV heads"
    );

    let (_, m) = err_msg(kv.append_head(0, 1, &x, &x[..D], &[7]));
    assert_eq!(m, "layer 0: `k` has length 8, expected 4");

    assert_eq!(
        (kv.stats(), pool.stats()),
        before,
        "failed appends change nothing"
    );
}

#[test]
fn out_of_blocks_is_an_error_and_changes_nothing() {
    // 2 layers × 2 heads × 2 blocks (5 tokens, block 4) = 8 blocks used of 9.
    let (pool, mut kv) = setup(9);
    let before = (kv.stats(), pool.stats(), kv.read_head(1, 0));
    let x = vec![1.0f32; 4 * 2 * D];
    let (e, m) = err_msg(kv.append(1, &x, &x, &[5, 6, 7, 8]));
    assert_eq!(
        e,
        KvError::OutOfBlocks {
            layer: 1,
            tokens: 4,
            requested: 2,
            free: 1,
            total: 9
        }
    );
    assert_eq!(m, "out of KV blocks: appending 4 token(s) to layer 1 needs 2 more block(s) but the pool has 1 free of 9");
    assert_eq!((kv.stats(), pool.stats(), kv.read_head(1, 0)), before);
    // One head still fits.
    kv.append_head(1, 0, &x[..4 * D], &x[..4 * D], &[5, 6, 7, 8])
        .unwrap();
    assert_eq!(pool.stats().blocks_free, 0);
    // Evicting frees blocks for the other head.
    kv.evict(0, 0, &[true, false, false, false, false]).unwrap();
    assert_eq!(pool.stats().blocks_free, 1);
    kv.append_head(1, 1, &x[..4 * D], &x[..4 * D], &[5, 6, 7, 8])
        .unwrap();
}

#[test]
fn evict_errors() {
    let (_pool, mut kv) = setup(64);
    let (e, m) = err_msg(kv.evict(1, 0, &[true; 4]));
    assert_eq!(
        e,
        KvError::MaskLength {
            layer: 1,
            head: 0,
            what: "keep",
            retained: 5,
            got: 4
        }
    );
    assert_eq!(
        m,
        "layer 1 KV head 0: `keep` has length 4, but the head retains 5 entries"
    );
    let (_, m) = err_msg(kv.evict(0, 9, &[true; 5]));
    assert_eq!(
        m,
        "KV head 9 of layer 0 is out of range: the sequence has 2 KV heads"
    );
    let (_, m) = err_msg(kv.evict(5, 0, &[true; 5]));
    assert_eq!(m, "layer 5 is out of range: the sequence has 2 layers");
    assert_eq!(kv.retained(1, 0), 5);
    // Out-of-range reads are empty, not panics.
    assert_eq!(kv.retained(5, 0), 0);
    assert!(kv.positions(0, 7).is_empty());
    assert!(kv.read_head(9, 9).keys.is_empty());
    assert!(kv.key_norms(9, 0).is_empty());
    assert!(kv.block_ids(0, 2).is_empty());
}

#[test]
fn attend_errors() {
    let (_pool, kv) = setup(64);
    let opts = AttendOptions::for_head_dim(D);
    let q = vec![0.5f32; 6 * D]; // 1 row × 6 query heads (G = 3)
    assert!(kv.attend(0, &q, &[5], &opts).is_ok());

    let (e, m) = err_msg(kv.attend(0, &q[..6 * D - 1], &[5], &opts));
    assert!(
        matches!(
            e,
            KvError::ShapeMismatch {
                layer: 0,
                what: "q",
                got: 23,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(m.starts_with("layer 0: `q` has length 23"), "{m}");

    let (e, m) = err_msg(kv.attend(1, &q[..3 * D], &[5], &opts));
    assert_eq!(
        e,
        KvError::GroupMismatch {
            layer: 1,
            n_q_heads: 3,
            n_kv_heads: 2
        }
    );
    assert_eq!(m, "layer 1: q holds 3 query heads per row, which is not a positive multiple of the 2 KV heads");

    let (_, m) = err_msg(kv.attend(3, &q, &[5], &opts));
    assert_eq!(m, "layer 3 is out of range: the sequence has 2 layers");

    let vis = vec![vec![u32::MAX; 5]];
    let (_, m) = err_msg(kv.attend(0, &q, &[5], &opts.clone().visible_until(&vis)));
    assert_eq!(
        m,
        "layer 0: `visible_until (one Vec per KV head)` has length 1, expected 2"
    );

    let vis = vec![vec![u32::MAX; 5], vec![u32::MAX; 6]];
    let (e, m) = err_msg(kv.attend(1, &q, &[5], &opts.clone().visible_until(&vis)));
    assert_eq!(
        e,
        KvError::MaskLength {
            layer: 1,
            head: 1,
            what: "visible_until",
            retained: 5,
            got: 6
        }
    );
    assert_eq!(
        m,
        "layer 1 KV head 1: `visible_until` has length 6, but the head retains 5 entries"
    );

    let (_, m) = err_msg(kv.attend(0, &q, &[5], &opts.clone().prob_sums(0..2)));
    assert_eq!(
        m,
        "layer 0: prob_sums rows 0..2 are not within the 1 query rows"
    );

    let (_, m) = err_msg(kv.attend(0, &q, &[], &opts));
    assert_eq!(m, "layer 0: `q` has length 24, expected 0");

    // No query rows, no queries: an empty result.
    let empty = kv
        .attend(0, &[], &[], &opts.clone().prob_sums(0..0))
        .unwrap();
    assert!(empty.out.is_empty());
    assert_eq!(empty.prob_sums, Some(vec![vec![0.0; 5]; 2]));
}

#[test]
fn config_and_dtype_errors() {
    let bad = PoolConfig {
        block_size: 0,
        head_dim: 8,
        dtype: KvDtype::F16,
        capacity_blocks: 4,
    };
    let e = BlockPool::try_new(bad).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid pool config: block_size = 0 (must be at least 1)"
    );
    assert_eq!(BlockPool::new(bad).config().block_size, 1);
    let e = "f8".parse::<KvDtype>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown KV dtype `f8` (expected f32, f16, bf16, q8_0 or q4_0)"
    );
    assert_eq!("BF16".parse::<KvDtype>(), Ok(KvDtype::BF16));
    assert_eq!("q8_0".parse::<KvDtype>(), Ok(KvDtype::Q8_0));
    assert_eq!("q4_0".parse::<KvDtype>(), Ok(KvDtype::Q4_0));
    assert_eq!(KvDtype::F16.to_string(), "f16");
}

#[test]
fn pool_sizing() {
    let cfg = PoolConfig::from_memory_budget(16, 64, KvDtype::F16, 1 << 20);
    assert_eq!(cfg.block_bytes(), 2 * 16 * 64 * 2);
    assert_eq!(cfg.capacity_blocks, (1 << 20) / 4096);
    // q8_0: 64 codes and two f16 scales per entry, 0.53x f16.
    let cfg = PoolConfig::from_memory_budget(16, 64, KvDtype::Q8_0, 1 << 20);
    assert_eq!(cfg.block_bytes(), 2 * 16 * 68);
    // q4_0: 32 bytes of nibbles and two scales, 0.28x f16.
    let cfg = PoolConfig::from_memory_budget(16, 64, KvDtype::Q4_0, 1 << 20);
    assert_eq!(cfg.block_bytes(), 2 * 16 * 36);
    let cfg = PoolConfig::from_token_capacity(16, 64, KvDtype::F32, 1000);
    assert_eq!(cfg.capacity_blocks, 63);
    assert_eq!(cfg.capacity_bytes(), 63 * 8192);
    // Tiny blocks are padded to whole 64-byte lines.
    assert_eq!(
        PoolConfig {
            block_size: 1,
            head_dim: 3,
            dtype: KvDtype::F16,
            capacity_blocks: 1
        }
        .block_bytes(),
        64
    );
}
