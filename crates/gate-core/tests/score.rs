//! Scorers against naive references: random, StreamingLLM, key norm, group mean, H2O
//! accumulation through compaction, SnapKV pooling and selection, TOVA, NACL (plan, exact
//! counts, reproducible sampling, sampling distribution) and its proxy scores.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use gate_core::score::{
    avg_pool_same, group_mean, key_norm_scores, nacl_keep, nacl_proxy_scores, random_scores,
    seed_for, snapkv_keep, streaming_keep, tova_keep, H2oAccumulator, NaclConfig, NaclPlan,
};
use gate_core::{select_top_k, Protection};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn count(m: &[bool]) -> usize {
    m.iter().filter(|&&k| k).count()
}

/// Indices sorted best-first by the crate's ranking rule (NaN last, ties to the more recent).
fn ranked(scores: &[f64], idx: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut v: Vec<usize> = idx.collect();
    let key = |i: usize| {
        if scores[i].is_nan() {
            f64::NEG_INFINITY
        } else {
            scores[i]
        }
    };
    v.sort_by(|&a, &b| {
        let (na, nb) = (scores[a].is_nan(), scores[b].is_nan());
        na.cmp(&nb)
            .then(key(b).partial_cmp(&key(a)).unwrap())
            .then(b.cmp(&a))
    });
    v
}

#[test]
fn random_scores_are_seeded() {
    let a = random_scores(100, 7);
    assert_eq!(a, random_scores(100, 7));
    assert_ne!(a, random_scores(100, 8));
    assert!(a.iter().all(|&x| (0.0..1.0).contains(&x)));
    assert_ne!(seed_for(1, 0, 1), seed_for(1, 1, 0));
    assert_eq!(seed_for(1, 2, 3), seed_for(1, 2, 3));
}

#[test]
fn streaming_keeps_sinks_and_window() {
    let m = streaming_keep(10, 2, 5);
    assert_eq!(
        m,
        [true, true, false, false, false, false, false, true, true, true]
    );
    assert_eq!(count(&streaming_keep(10, 4, 2)), 2);
    assert_eq!(streaming_keep(10, 4, 2)[..2], [true, true]);
    assert_eq!(streaming_keep(3, 4, 10), [true; 3]);
}

#[test]
fn key_norm_is_negated_l2() {
    let keys = [3.0, 4.0, 0.0, 1.0, 0.0, 0.0];
    assert_eq!(key_norm_scores(&keys, 2).unwrap(), [-5.0, -1.0, -0.0]);
    assert!(key_norm_scores(&keys, 4)
        .unwrap_err()
        .to_string()
        .contains("head_dim"));
    assert!(key_norm_scores(&keys, 0).is_err());
}

#[test]
fn group_mean_averages_query_heads() {
    // 4 query heads, 2 KV heads, n = 2.
    let v = [1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0];
    assert_eq!(group_mean(&v, 4, 2, 2).unwrap(), [2.0, 3.0, 20.0, 30.0]);
    assert_eq!(group_mean(&v, 4, 1, 2).unwrap(), [11.0, 16.5]);
    assert!(group_mean(&v, 4, 3, 2).is_err());
    assert!(group_mean(&v, 4, 2, 3)
        .unwrap_err()
        .to_string()
        .contains("values.len()"));
}

/// A random causal attention row over `n` entries (sums to 1).
fn attention_row(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let w: Vec<f32> = (0..n).map(|_| rng.random::<f32>() + 1e-3).collect();
    let z: f32 = w.iter().sum();
    w.into_iter().map(|x| x / z).collect()
}

#[test]
fn h2o_matches_naive_through_compaction() {
    let mut rng = StdRng::seed_from_u64(3);
    for normalise in [false, true] {
        let mut acc = H2oAccumulator::new(2, 2, normalise).unwrap();
        // Naive: per retained entry, (sum, count).
        let mut naive: Vec<(f64, u64)> = Vec::new();
        let (layer, head) = (1, 0);
        // Prefill of 12 tokens, causal.
        let t = 12;
        let mut col = vec![0f32; t];
        for i in 0..t {
            for (j, a) in attention_row(&mut rng, i + 1).into_iter().enumerate() {
                col[j] += a;
            }
        }
        acc.add(layer, head, &col, t).unwrap();
        naive.extend((0..t).map(|j| (col[j] as f64, (t - j) as u64)));
        for step in 0..20 {
            // Decode: one query over retained + itself.
            let row = attention_row(&mut rng, naive.len() + 1);
            acc.add(layer, head, &row, 1).unwrap();
            naive.push((0.0, 0));
            for (e, &a) in naive.iter_mut().zip(&row) {
                e.0 += a as f64;
                e.1 += 1;
            }
            if step % 3 == 2 {
                let scores = acc.scores(layer, head).unwrap();
                let keep = select_top_k(
                    &scores,
                    8,
                    &Protection {
                        sinks: 0,
                        recent: 2,
                    },
                );
                acc.retain(layer, head, &keep).unwrap();
                let mut it = keep.iter();
                naive.retain(|_| *it.next().unwrap());
            }
            let want: Vec<f32> = naive
                .iter()
                .map(|&(s, c)| {
                    if normalise {
                        (s / c as f64) as f32
                    } else {
                        s as f32
                    }
                })
                .collect();
            let got = acc.scores(layer, head).unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{got:?} vs {want:?}"
                );
            }
        }
        assert_eq!(acc.len(0, 0).unwrap(), 0, "other heads untouched");
    }
}

#[test]
fn h2o_rejects_bad_calls() {
    let mut acc = H2oAccumulator::new(1, 1, false).unwrap();
    acc.add(0, 0, &[0.5, 0.5], 2).unwrap();
    assert!(acc
        .add(0, 0, &[1.0], 1)
        .unwrap_err()
        .to_string()
        .contains("column_sums"));
    assert!(acc
        .add(0, 0, &[0.1, 0.1, 0.1, 0.7], 1)
        .unwrap_err()
        .to_string()
        .contains("n_queries"));
    assert!(acc
        .retain(0, 0, &[true])
        .unwrap_err()
        .to_string()
        .contains("keep.len()"));
    assert!(acc
        .scores(1, 0)
        .unwrap_err()
        .to_string()
        .contains("layer index 1"));
    assert!(acc
        .scores(0, 3)
        .unwrap_err()
        .to_string()
        .contains("kv head index 3"));
    assert!(H2oAccumulator::new(0, 1, false).is_err());
    acc.clear();
    assert_eq!(acc.len(0, 0).unwrap(), 0);
}

#[test]
fn avg_pool_counts_padding() {
    // count_include_pad: divisor always 5, zeros beyond both ends.
    let x = [5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0];
    assert_eq!(
        avg_pool_same(&x, 5).unwrap(),
        [1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0]
    );
    assert_eq!(avg_pool_same(&x, 1).unwrap(), x);
    assert!(avg_pool_same(&x, 4)
        .unwrap_err()
        .to_string()
        .contains("odd"));
}

/// Naive SnapKV: explicit zero padding, pooled prefix, rank, take top C - w plus the window.
fn naive_snapkv(sums: &[f32], w: usize, cap: usize) -> Vec<bool> {
    let n = sums.len();
    let w = w.min(n);
    let prefix = n - w;
    let mut keep = vec![false; n];
    if cap <= w {
        for k in keep.iter_mut().skip(n - cap.min(n)) {
            *k = true;
        }
        return keep;
    }
    let mut padded = vec![0f64; 2];
    padded.extend(sums[..prefix].iter().map(|&x| x as f64));
    padded.extend([0.0, 0.0]);
    let pooled: Vec<f64> = (0..prefix)
        .map(|j| (padded[j..j + 5].iter().sum::<f64>() / 5.0) as f32 as f64)
        .collect();
    for i in ranked(&pooled, 0..prefix).into_iter().take(cap - w) {
        keep[i] = true;
    }
    for k in keep.iter_mut().skip(prefix) {
        *k = true;
    }
    keep
}

proptest! {
    #[test]
    fn snapkv_matches_naive(
        sums in prop::collection::vec(prop_oneof![3 => 0.0f32..4.0, 1 => Just(1.0f32), 1 => Just(f32::NAN)], 0..60),
        w in 0usize..12,
        cap in 0usize..70,
    ) {
        let got = snapkv_keep(&sums, w, cap, 5).unwrap();
        prop_assert_eq!(count(&got), cap.min(sums.len()));
        prop_assert_eq!(got, naive_snapkv(&sums, w, cap));
    }
}

#[test]
fn tova_drops_the_least_attended() {
    assert_eq!(
        tova_keep(&[0.3, 0.1, 0.4, 0.2], 3),
        [true, false, true, true]
    );
    // Tie: the older entry goes.
    assert_eq!(tova_keep(&[0.1, 0.1, 0.8], 2), [false, true, true]);
}

#[test]
fn nacl_plan_defaults_and_budget_mode() {
    let cfg = NaclConfig::default();
    let p = cfg.plan(10_000, None).unwrap();
    assert_eq!(
        p,
        NaclPlan {
            sinks: 50,
            recent: 50,
            kp: 1200,
            kr: 700
        }
    );
    assert_eq!(
        cfg.plan(100, None).unwrap().total(),
        100,
        "short prompts are not evicted"
    );
    for keep in [1, 7, 100, 2000, 5000, 10_000, 20_000] {
        let p = cfg.plan(10_000, Some(keep)).unwrap();
        assert_eq!(p.total(), keep.min(10_000), "{p:?}");
    }
    let p = cfg.plan(10_000, Some(2000)).unwrap();
    assert_eq!((p.sinks, p.recent), (50, 50));
    assert_eq!(p.kp, (1900.0f64 * 12.0 / 19.0).round() as usize);
    assert_eq!(cfg.proxy_count(10_000), 100);
    assert_eq!(cfg.proxy_count(10), 1);
    let bad = NaclConfig {
        kp_frac: 0.0,
        kr_frac: 0.0,
        ..cfg
    };
    assert!(bad
        .plan(100, Some(10))
        .unwrap_err()
        .to_string()
        .contains("kp_frac + kr_frac"));
    let bad = NaclConfig {
        sink_frac: f32::NAN,
        ..cfg
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("sink_frac"));
}

proptest! {
    #[test]
    fn nacl_keeps_exact_counts_and_the_greedy_part(
        proxy in prop::collection::vec(prop_oneof![4 => 0.0f32..3.0, 1 => Just(1.0f32), 1 => Just(f32::NAN), 1 => Just(f32::NEG_INFINITY)], 0..50),
        sinks in 0usize..4, recent in 0usize..4, kp in 0usize..10, kr in 0usize..10, seed in any::<u64>(),
    ) {
        let plan = NaclPlan { sinks, recent, kp, kr };
        let n = proxy.len();
        let got = nacl_keep(&proxy, &plan, seed);
        prop_assert_eq!(&got, &nacl_keep(&proxy, &plan, seed), "reproducible");
        prop_assert_eq!(count(&got), plan.total().min(n));
        let protect = Protection { sinks, recent };
        for (i, &k) in got.iter().enumerate() {
            prop_assert!(k || !protect.is_protected(i, n));
        }
        // The greedy part: the top kp unprotected by proxy (crate ranking rule) are kept.
        let proxy64: Vec<f64> = proxy.iter().map(|&x| x as f64).collect();
        for i in ranked(&proxy64, (0..n).filter(|&i| !protect.is_protected(i, n))).into_iter().take(kp) {
            prop_assert!(got[i], "greedy entry {} dropped", i);
        }
    }
}

#[test]
fn nacl_sampling_follows_softmax_without_replacement() {
    // No protection, no greedy part: entries 0..3 with weights 1 : 2 : 4.
    let proxy = [0.0f32, 2f32.ln(), 4f32.ln()];
    let trials = 20_000;
    let mut single = [0usize; 3];
    let mut pair_excluded = [0usize; 3];
    for seed in 0..trials {
        let one = nacl_keep(
            &proxy,
            &NaclPlan {
                sinks: 0,
                recent: 0,
                kp: 0,
                kr: 1,
            },
            seed,
        );
        single[one.iter().position(|&k| k).unwrap()] += 1;
        let two = nacl_keep(
            &proxy,
            &NaclPlan {
                sinks: 0,
                recent: 0,
                kp: 0,
                kr: 2,
            },
            seed,
        );
        assert_eq!(count(&two), 2);
        pair_excluded[two.iter().position(|&k| !k).unwrap()] += 1;
    }
    let w = [1.0, 2.0, 4.0];
    for i in 0..3 {
        let p = w[i] / 7.0;
        let freq = single[i] as f64 / trials as f64;
        assert!((freq - p).abs() < 0.015, "single draw {i}: {freq} vs {p}");
        // Excluded from a 2-sample: the other two were drawn first in either order.
        let (a, b) = ((i + 1) % 3, (i + 2) % 3);
        let p_ex = w[a] / 7.0 * w[b] / (7.0 - w[a]) + w[b] / 7.0 * w[a] / (7.0 - w[b]);
        let freq = pair_excluded[i] as f64 / trials as f64;
        assert!(
            (freq - p_ex).abs() < 0.015,
            "excluded {i}: {freq} vs {p_ex}"
        );
    }
}

#[test]
fn nacl_proxy_scores_match_naive() {
    let mut rng = StdRng::seed_from_u64(11);
    let (p, n, d) = (3, 9, 4);
    let q: Vec<f32> = (0..p * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let k: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    let got = nacl_proxy_scores(&q, &k, d).unwrap();
    let mut want = vec![0f64; n];
    for i in 0..p {
        let logits: Vec<f64> = (0..n)
            .map(|j| {
                (0..d)
                    .map(|c| q[i * d + c] as f64 * k[j * d + c] as f64)
                    .sum::<f64>()
                    / 2.0
            })
            .collect();
        let z: f64 = logits.iter().map(|l| l.exp()).sum();
        for j in 0..n {
            want[j] += logits[j].exp() / z;
        }
    }
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-6);
    }
    assert!((got.iter().map(|&x| x as f64).sum::<f64>() - p as f64).abs() < 1e-5);
    assert!(nacl_proxy_scores(&q, &k[..5], d).is_err());
}
