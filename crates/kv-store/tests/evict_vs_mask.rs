//! Eviction is exact in every storage dtype: attention over a store whose entries were evicted
//! equals attention over a store that keeps them all and masks the same entries, bit for bit,
//! for a prefill chunk appended after the eviction (the shape of a chat turn after a one-shot
//! policy compressed the cache), also when attention probabilities are requested.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use kv_store::{AttendOptions, BlockPool, KvDtype, PoolConfig, SequenceKv};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn check(dtype: KvDtype) {
    for old in [37, 170] {
        for new in 1..=20 {
            for density in 1..5 {
                check_one(dtype, old, new, density);
            }
        }
    }
}

fn check_one(dtype: KvDtype, old: usize, new: usize, density: usize) {
    let (heads, q_heads, d) = (3, 9, 64);
    let pool = BlockPool::new(PoolConfig::from_token_capacity(16, d, dtype, 64 * 1024));
    let mut evicted = SequenceKv::new(&pool, 1, heads);
    let mut masked = SequenceKv::new(&pool, 1, heads);
    let positions: Vec<u32> = (0..old as u32).collect();
    let (k, v) = (values(old * heads * d, 1), values(old * heads * d, 2));
    for kv in [&mut evicted, &mut masked] {
        kv.append(0, &k, &v, &positions).unwrap();
    }
    let keep: Vec<Vec<bool>> = (0..heads)
        .map(|h| {
            (0..old)
                .map(|i| (i * 7 + h * 3) % 5 < density || i < 4)
                .collect()
        })
        .collect();
    for (h, mask) in keep.iter().enumerate() {
        evicted.evict(0, h, mask).unwrap();
    }
    let new_positions: Vec<u32> = (old as u32..(old + new) as u32).collect();
    let (k2, v2) = (values(new * heads * d, 3), values(new * heads * d, 4));
    for kv in [&mut evicted, &mut masked] {
        kv.append(0, &k2, &v2, &new_positions).unwrap();
    }
    let q = values(new * q_heads * d, 5);
    let scale = 1.0 / (d as f32).sqrt();
    let a = evicted
        .attend(
            0,
            &q,
            &new_positions,
            &AttendOptions::new(scale).prob_sums(0..new),
        )
        .unwrap();
    // Evicted keys visible to no query of the new chunk, kept ones and the chunk to all.
    let visible: Vec<Vec<u32>> = keep
        .iter()
        .map(|m| {
            m.iter()
                .map(|&kept| if kept { u32::MAX } else { 0 })
                .chain(std::iter::repeat_n(u32::MAX, new))
                .collect()
        })
        .collect();
    let b = masked
        .attend(
            0,
            &q,
            &new_positions,
            &AttendOptions::new(scale).visible_until(&visible),
        )
        .unwrap();
    let row = q_heads * d;
    for (r, (x, y)) in a.out.chunks(row).zip(b.out.chunks(row)).enumerate() {
        let diff = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-5,
            "{dtype:?} old {old} new {new} density {density}: query row {r} differs by {diff}"
        );
    }
}

#[test]
fn eviction_equals_masking_f32() {
    check(KvDtype::F32);
}

#[test]
fn eviction_equals_masking_f16() {
    check(KvDtype::F16);
}

#[test]
fn eviction_equals_masking_bf16() {
    check(KvDtype::BF16);
}

#[test]
fn eviction_equals_masking_q8_0() {
    check(KvDtype::Q8_0);
}

#[test]
fn eviction_equals_masking_q4_0() {
    check(KvDtype::Q4_0);
}
