//! The Random baseline: uniform scores from a seeded generator, used with top-k per head.
//!
//! Invariant: the same `(n, seed)` always yields the same scores (a `StdRng` seeded with
//! `seed_from_u64`); different (layer, head) pairs get independent streams via [`seed_for`].

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `n` scores drawn uniformly from `[0, 1)` by a `StdRng` seeded with `seed`.
pub fn random_scores(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<f32>()).collect()
}

/// Derives the seed of one (layer, KV head) from a run seed (SplitMix64 finaliser over the
/// three values), so that heads draw independent, reproducible streams.
pub fn seed_for(seed: u64, layer: usize, head: usize) -> u64 {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let golden = 0x9e37_79b9_7f4a_7c15_u64;
    let a = mix(seed.wrapping_add(golden));
    let b = mix(a ^ (layer as u64).wrapping_add(golden.wrapping_mul(2)));
    mix(b ^ (head as u64).wrapping_add(golden.wrapping_mul(3)))
}
