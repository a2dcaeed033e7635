//! The kernel on its portable paths against this CPU's SIMD paths, end to end.

use crate::simd::tests::both_paths;
use crate::{AttendOptions, BlockPool, KvDtype, PoolConfig, SequenceKv};

/// The whole kernel (decode and a prefill chunk, masked, with probabilities) gives the same
/// results on the portable paths as on this CPU's SIMD paths, for every dtype.
#[test]
fn portable_and_simd_attention_agree() {
    for dtype in KvDtype::ALL {
        let (heads, d, n) = (2, 64, 70);
        let pool = BlockPool::new(PoolConfig::from_token_capacity(16, d, dtype, 4096));
        let mut kv = SequenceKv::new(&pool, 1, heads);
        let vals = |len: usize, seed: f32| -> Vec<f32> {
            (0..len).map(|i| (i as f32 * 0.731 + seed).sin()).collect()
        };
        let pos: Vec<u32> = (0..n as u32).collect();
        kv.append(
            0,
            &vals(n * heads * d, 1.0),
            &vals(n * heads * d, 2.0),
            &pos,
        )
        .unwrap();
        let keep: Vec<bool> = (0..n).map(|i| i % 3 != 1).collect();
        kv.evict(0, 1, &keep).unwrap();
        // Every fourth key is hidden part-way through the prefill rows (positions 61..70).
        let until: Vec<Vec<u32>> = (0..heads)
            .map(|h| {
                (0..kv.retained(0, h))
                    .map(|i| {
                        if i % 4 == 2 {
                            (n - 6 + i % 5) as u32
                        } else {
                            u32::MAX
                        }
                    })
                    .collect()
            })
            .collect();
        for rows in [1usize, 9] {
            let q = vals(rows * heads * 3 * d, 3.0);
            let qpos = &pos[n - rows..];
            let opts = AttendOptions::for_head_dim(d)
                .visible_until(&until)
                .prob_sums(0..rows);
            let (a, b) = both_paths(|| kv.attend(0, &q, qpos, &opts).unwrap());
            for (x, y) in a.out.iter().zip(&b.out) {
                assert!((x - y).abs() <= 1e-5, "{dtype} rows {rows}: {x} vs {y}");
            }
            for (x, y) in a
                .prob_sums
                .iter()
                .flatten()
                .flatten()
                .zip(b.prob_sums.iter().flatten().flatten())
            {
                assert!((x - y).abs() <= 1e-5, "{dtype} rows {rows}: {x} vs {y}");
            }
        }
    }
}
