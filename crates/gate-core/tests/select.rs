//! Selectors against naive references: budgets and their rounding, top-k (ties, NaN,
//! protection, exact counts), threshold, greedy eviction one arrival at a time, and PyramidKV
//! budgets by hand.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use gate_core::{
    evict_greedily, pyramid_budgets, select_threshold, select_top_k, Budget, Protection,
};
use proptest::prelude::*;

/// Naive top-k: pick the best remaining entry `keep` times by a linear scan, comparing the
/// tuple (protected, not NaN, score, index) lexicographically.
fn naive_top_k(scores: &[f32], keep: usize, protect: &Protection) -> Vec<bool> {
    let n = scores.len();
    let key = |i: usize| {
        let s = scores[i];
        let prot = i < protect.sinks || i + protect.recent >= n;
        (
            prot,
            !s.is_nan(),
            if s.is_nan() { 0.0 } else { s as f64 + 0.0 },
            i,
        )
    };
    let mut kept = vec![false; n];
    for _ in 0..keep.min(n) {
        let mut best: Option<usize> = None;
        for i in (0..n).filter(|&i| !kept[i]) {
            best = match best {
                None => Some(i),
                Some(b) => {
                    let (kb, ki) = (key(b), key(i));
                    let better = (ki.0, ki.1) > (kb.0, kb.1)
                        || ((ki.0, ki.1) == (kb.0, kb.1)
                            && (ki.2 > kb.2 || (ki.2 == kb.2 && ki.3 > kb.3)));
                    Some(if better { i } else { b })
                }
            };
        }
        if let Some(b) = best {
            kept[b] = true;
        }
    }
    kept
}

fn score_strategy() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => prop::sample::select(vec![0.0f32, -0.0, 1.0, 1.0, 2.5, -3.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]),
        6 => -10.0f32..10.0,
    ]
}

/// The reference of [`evict_greedily`]: after each arrival, the live entries (in order) are cut
/// to the budget by the naive top-k; returns the arrival after which each entry left.
fn naive_greedy(
    scores: &[f32],
    first_new: usize,
    budget: Budget,
    protect: &Protection,
) -> Vec<Option<usize>> {
    let mut live: Vec<usize> = (0..first_new).collect();
    let mut out = vec![None; scores.len()];
    for a in first_new..scores.len() {
        live.push(a);
        let keep = budget.keep_count(a + 1);
        if live.len() > keep {
            let s: Vec<f32> = live.iter().map(|&i| scores[i]).collect();
            let mask = naive_top_k(&s, keep, protect);
            let mut next = Vec::new();
            for (&i, &k) in live.iter().zip(&mask) {
                if k {
                    next.push(i);
                } else {
                    out[i] = Some(a);
                }
            }
            live = next;
        }
    }
    out
}

proptest! {
    #[test]
    fn greedy_eviction_matches_top_k_after_every_arrival(
        scores in prop::collection::vec(score_strategy(), 0..60),
        ratio in 0.0f32..0.95,
        keep in 1usize..20,
        by_ratio in any::<bool>(),
        sinks in 0usize..5,
        recent in 0usize..8,
        first_new in 0usize..4,
    ) {
        let budget = if by_ratio { Budget::EvictRatio(ratio) } else { Budget::Keep(keep) };
        let protect = Protection { sinks, recent };
        // Start from a prefix that the budget never had to cut.
        let first_new = first_new.min(scores.len());
        let first_new = (0..=first_new)
            .take_while(|&p| (0..p).all(|a| budget.keep_count(a + 1) > a))
            .last()
            .unwrap_or(0);
        let got = evict_greedily(&scores, first_new, &|a| budget.keep_count(a + 1), &protect);
        prop_assert_eq!(got, naive_greedy(&scores, first_new, budget, &protect));
    }

    /// One arrival after a long retained prefix (a decode step), whatever the budget: the same
    /// evictions as the naive reference.
    #[test]
    fn one_arrival_matches_the_naive_reference(
        scores in prop::collection::vec(score_strategy(), 1..80),
        keep in 1usize..90,
        sinks in 0usize..6,
        recent in 0usize..10,
    ) {
        let protect = Protection { sinks, recent };
        let first_new = scores.len() - 1;
        let got = evict_greedily(&scores, first_new, &|_| keep, &protect);
        prop_assert_eq!(got, naive_greedy(&scores, first_new, Budget::Keep(keep), &protect));
    }

    #[test]
    fn top_k_matches_naive(
        scores in prop::collection::vec(score_strategy(), 0..40),
        keep in 0usize..45,
        sinks in 0usize..6,
        recent in 0usize..6,
    ) {
        let protect = Protection { sinks, recent };
        let got = select_top_k(&scores, keep, &protect);
        prop_assert_eq!(got.len(), scores.len());
        prop_assert_eq!(got.iter().filter(|&&k| k).count(), keep.min(scores.len()));
        prop_assert_eq!(got, naive_top_k(&scores, keep, &protect));
    }

    /// One entry over the budget (the decode-step case, a single pass in the selector).
    #[test]
    fn top_k_one_over_budget_matches_naive(
        scores in prop::collection::vec(score_strategy(), 1..60),
        sinks in 0usize..6,
        recent in 0usize..6,
    ) {
        let protect = Protection { sinks, recent };
        let keep = scores.len() - 1;
        prop_assert_eq!(select_top_k(&scores, keep, &protect), naive_top_k(&scores, keep, &protect));
    }

    #[test]
    fn threshold_matches_definition(
        scores in prop::collection::vec(score_strategy(), 0..40),
        tau in -5.0f32..5.0,
        sinks in 0usize..6,
        recent in 0usize..6,
    ) {
        let protect = Protection { sinks, recent };
        let n = scores.len();
        let got = select_threshold(&scores, tau, &protect);
        let want: Vec<bool> = (0..n).map(|i| scores[i] > tau || i < sinks || i + recent >= n).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn evict_ratio_within_one_token(n in 1usize..5000, r in 0.0f32..0.999) {
        let keep = Budget::EvictRatio(r).keep_count(n);
        prop_assert!(keep >= 1 && keep <= n);
        let measured = (n - keep) as f64 / n as f64;
        prop_assert!((measured - r as f64).abs() <= 1.0 / n as f64 + 1e-12, "n={} r={} keep={}", n, r, keep);
    }
}

#[test]
fn ties_go_to_the_more_recent_entry_and_nan_is_last() {
    let scores = [1.0, 1.0, 1.0, 1.0];
    assert_eq!(
        select_top_k(&scores, 2, &Protection::NONE),
        [false, false, true, true]
    );
    let scores = [f32::NAN, f32::NEG_INFINITY, 0.0, -0.0];
    assert_eq!(
        select_top_k(&scores, 1, &Protection::NONE),
        [false, false, false, true]
    );
    assert_eq!(
        select_top_k(&scores, 3, &Protection::NONE),
        [false, true, true, true]
    );
    assert_eq!(
        select_top_k(&[f32::NAN; 3], 1, &Protection::NONE),
        [false, false, true]
    );
}

#[test]
fn protected_entries_win_and_never_exceed_the_budget() {
    let scores = [0.0, 9.0, 8.0, 7.0, 0.0, 0.0];
    let p = Protection {
        sinks: 1,
        recent: 2,
    };
    assert_eq!(
        select_top_k(&scores, 4, &p),
        [true, true, false, false, true, true]
    );
    // Budget below the protected count: the protected ones compete by score (then recency).
    let scores = [5.0, 9.0, 8.0, 7.0, 1.0, 2.0];
    assert_eq!(
        select_top_k(&scores, 2, &p),
        [true, false, false, false, false, true]
    );
    assert_eq!(select_top_k(&scores, 0, &p), [false; 6]);
    assert_eq!(select_top_k(&[], 3, &p), Vec::<bool>::new());
}

#[test]
fn threshold_is_strict_and_nan_safe() {
    let s = [0.5, 0.6, f32::NAN, 0.4];
    assert_eq!(
        select_threshold(&s, 0.5, &Protection::NONE),
        [false, true, false, false]
    );
    assert_eq!(
        select_threshold(
            &s,
            f32::NAN,
            &Protection {
                sinks: 1,
                recent: 0
            }
        ),
        [true, false, false, false]
    );
}

#[test]
fn budget_rounding_and_validation() {
    assert_eq!(Budget::EvictRatio(0.5).keep_count(10), 5);
    assert_eq!(Budget::EvictRatio(0.25).keep_count(10), 7); // evict round(2.5) = 3
    assert_eq!(Budget::EvictRatio(0.0).keep_count(7), 7);
    assert_eq!(Budget::EvictRatio(0.99).keep_count(10), 1); // never empty
    assert_eq!(Budget::EvictRatio(0.5).keep_count(0), 0);
    assert_eq!(Budget::Keep(512).keep_count(100), 100);
    assert_eq!(Budget::Keep(3).keep_count(100), 3);
    assert_eq!(Budget::EvictRatio(f32::NAN).keep_count(4), 4);
    assert!(Budget::EvictRatio(0.7).validate().is_ok());
    assert!(Budget::Keep(1).validate().is_ok());
    for bad in [
        Budget::EvictRatio(1.0),
        Budget::EvictRatio(-0.1),
        Budget::EvictRatio(f32::NAN),
        Budget::Keep(0),
    ] {
        // Named as a user knows it, not by the Rust type.
        let msg = bad.validate().unwrap_err().to_string();
        assert!(
            (msg.contains("eviction ratio") || msg.contains("keep count"))
                && !msg.contains("Budget::"),
            "{msg}"
        );
    }
}

#[test]
fn pyramid_budgets_by_hand() {
    // C = 100, w = 20, L = 5, beta = 20, T = 1000: min = 4, max = 156, step = 38.
    assert_eq!(
        pyramid_budgets(100, 20, 5, 20.0, 1000).unwrap(),
        [176, 138, 100, 62, 24]
    );
    // C = 10, w = 2, L = 3: min = 0.4, max = 15.6 -> 17.6, 10, 2.4 -> largest remainder.
    assert_eq!(pyramid_budgets(10, 2, 3, 20.0, 100).unwrap(), [18, 10, 2]);
    // The reference's cap: T = 170, max = 156 > T - w = 150, so max = 150 and min = 2S - max = 10.
    assert_eq!(
        pyramid_budgets(100, 20, 5, 20.0, 170).unwrap(),
        [170, 135, 100, 65, 30]
    );
    // The reference's fallback: T = 150 < 2(C - w) = 160, uniform SnapKV budgets.
    assert_eq!(pyramid_budgets(100, 20, 5, 20.0, 150).unwrap(), [100; 5]);
    // Nothing to compress: C >= T.
    assert_eq!(pyramid_budgets(100, 20, 3, 20.0, 80).unwrap(), [80; 3]);
    assert_eq!(pyramid_budgets(50, 8, 1, 20.0, 500).unwrap(), [50]);
    assert_eq!(pyramid_budgets(8, 32, 4, 20.0, 500).unwrap(), [8; 4]);
    assert!(pyramid_budgets(100, 20, 0, 20.0, 500)
        .unwrap_err()
        .to_string()
        .contains("n_layers"));
    assert!(pyramid_budgets(100, 20, 4, 0.5, 500)
        .unwrap_err()
        .to_string()
        .contains("beta"));
}

/// PyramidKV's budgets: at T = 1009 on 30 layers the budgets average to the request at 0.25, 0.5
/// and 0.75 (so the measured ratio is within 1/T of it) and each lies in `[w, T]`.
#[test]
fn pyramid_budgets_meet_the_ratio_on_a_1k_prompt() {
    let (t, w, layers) = (1009usize, 32usize, 30usize);
    for ratio in [0.25f32, 0.5, 0.75] {
        let keep = Budget::EvictRatio(ratio).keep_count(t);
        let b = pyramid_budgets(keep, w, layers, 20.0, t).unwrap();
        let kept: usize = b.iter().sum();
        let measured = 1.0 - kept as f64 / (t * layers) as f64;
        assert!(
            (measured - f64::from(ratio)).abs() <= 1.0 / t as f64,
            "{ratio}: measured {measured}, budgets {b:?}"
        );
        assert!(b.iter().all(|&x| (w..=t).contains(&x)), "{ratio}: {b:?}");
        assert!(b.windows(2).all(|p| p[0] >= p[1]), "{ratio}: {b:?}");
    }
}

proptest! {
    #[test]
    fn pyramid_budgets_average_to_target_and_fall(c in 0usize..3000, w in 0usize..64, l in 1usize..40, beta in 1.0f32..40.0, t in 1usize..4000) {
        let b = pyramid_budgets(c, w, l, beta, t).unwrap();
        prop_assert_eq!(b.len(), l);
        prop_assert_eq!(b.iter().sum::<usize>(), c.min(t) * l);
        prop_assert!(b.windows(2).all(|p| p[0] >= p[1]));
        prop_assert!(b.iter().all(|&x| x <= t));
        if c.min(t) > w {
            prop_assert!(b.iter().all(|&x| x >= w));
        }
    }
}
