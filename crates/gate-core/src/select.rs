//! Selectors: turn one (layer, KV head)'s per-entry scores into a keep mask.
//!
//! Owns [`Budget`], [`Protection`], [`select_top_k`], [`select_threshold`],
//! [`evict_greedily`] and [`pyramid_budgets`], plus the one ranking rule every top-k in this
//! crate uses.
//!
//! Invariants:
//! - A mask has exactly one flag per input entry, in entry order (oldest first).
//! - [`select_top_k`] keeps exactly `min(keep, n)` entries, never more: a budget is a hard cap.
//! - Ranking rule (one total order, used everywhere): protected entries rank above unprotected
//!   ones; within a tier a higher score wins; any NaN ranks below every number (including
//!   `-inf`); `-0.0 == +0.0`; on equal scores the more recent entry (higher index) wins. The
//!   result is therefore deterministic and independent of the sort algorithm.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use crate::error::{invalid, Result};

/// How many entries one (layer, KV head) may keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// Evict this fraction of the entries; must lie in `[0, 1)`.
    EvictRatio(f32),
    /// Keep at most this many entries; must be at least 1.
    Keep(usize),
}

impl Budget {
    /// Checks the budget's domain: a finite ratio in `[0, 1)`, or a keep count of at least 1.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Budget::EvictRatio(r) if !(0.0..1.0).contains(&r) => Err(invalid(
                "eviction ratio",
                r,
                "a finite eviction ratio in [0, 1)",
            )),
            Budget::Keep(0) => Err(invalid("keep count", 0, "at least 1 token per head")),
            _ => Ok(()),
        }
    }

    /// How many of `n` entries to keep.
    ///
    /// `EvictRatio(r)`: the evicted count is `round(r * n)` (computed in f64, halves rounded
    /// away from zero), so the measured ratio is within `0.5 / n` of `r`; the kept count is then
    /// raised to 1 if it would be 0 and `n > 0` (a head never becomes empty), which moves it by
    /// at most one token. `Keep(k)`: `min(k, n)`. Values outside the domain that
    /// [`Budget::validate`] rejects are clamped (a NaN ratio evicts nothing) rather than panic.
    pub fn keep_count(&self, n: usize) -> usize {
        match *self {
            Budget::EvictRatio(r) => {
                let r = if r.is_nan() {
                    0.0
                } else {
                    f64::from(r).clamp(0.0, 1.0)
                };
                // Exact for n < 2^53; the product is at most n, so the cast cannot overflow.
                let evict = ((r * n as f64).round() as usize).min(n);
                (n - evict).max(n.min(1))
            }
            Budget::Keep(k) => k.min(n),
        }
    }
}

/// Entries that are always kept: the first `sinks` and the last `recent` of a head.
///
/// Protected entries count toward the budget; when they alone exceed it, [`select_top_k`]
/// ranks them among themselves by score (see the module's ranking rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Protection {
    /// Number of leading (oldest) entries always kept, e.g. attention sinks.
    pub sinks: usize,
    /// Number of trailing (most recent) entries always kept.
    pub recent: usize,
}

impl Protection {
    /// No protected entries.
    pub const NONE: Protection = Protection {
        sinks: 0,
        recent: 0,
    };

    /// Whether entry `i` of `n` is protected.
    pub fn is_protected(&self, i: usize, n: usize) -> bool {
        i < self.sinks || i >= n.saturating_sub(self.recent)
    }

    /// Number of protected entries among `n`.
    pub fn count(&self, n: usize) -> usize {
        (0..n).filter(|&i| self.is_protected(i, n)).count()
    }
}

/// Compares two scores: NaN below everything, otherwise numeric order (`-0.0 == +0.0`).
pub(crate) fn cmp_score(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// The crate's ranking rule as a mask builder: keeps exactly `min(keep, n)` of the entries
/// `0..n`, protected tier first, then higher `score`, then higher index.
pub(crate) fn top_k_mask(
    n: usize,
    keep: usize,
    protected: impl Fn(usize) -> bool,
    score: impl Fn(usize) -> f64,
) -> Vec<bool> {
    let keep = keep.min(n);
    let mut mask = vec![false; n];
    if keep == 0 {
        return mask;
    }
    if keep == n {
        return vec![true; n];
    }
    // Best first: a total order over distinct indices, so the selection is deterministic.
    let better_first = |&a: &usize, &b: &usize| {
        protected(b)
            .cmp(&protected(a))
            .then_with(|| cmp_score(score(b), score(a)))
            .then_with(|| b.cmp(&a))
    };
    if keep + 1 == n {
        // One entry over the budget (a decode step): drop the last one in that order, found by
        // one pass instead of a selection over an index buffer.
        let worst = (0..n).max_by(better_first).unwrap_or(0);
        mask.iter_mut().for_each(|m| *m = true);
        mask[worst] = false;
        return mask;
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.select_nth_unstable_by(keep - 1, better_first);
    for &i in &idx[..keep] {
        mask[i] = true;
    }
    mask
}

/// Keeps exactly `min(keep, scores.len())` entries: the protected ones first, then the
/// highest scores, ties going to the more recent entry, NaN scores last.
///
/// If the protected entries alone exceed `keep`, only `keep` of them survive, chosen by the
/// same score rule: the budget is never exceeded.
pub fn select_top_k(scores: &[f32], keep: usize, protect: &Protection) -> Vec<bool> {
    let n = scores.len();
    top_k_mask(
        n,
        keep,
        |i| protect.is_protected(i, n),
        |i| f64::from(scores[i]),
    )
}

/// Keeps entry `i` iff `scores[i] > tau` (strictly; a NaN score or NaN `tau` keeps nothing),
/// plus every protected entry. The kept count is not bounded.
pub fn select_threshold(scores: &[f32], tau: f32, protect: &Protection) -> Vec<bool> {
    let n = scores.len();
    scores
        .iter()
        .enumerate()
        .map(|(i, &s)| s > tau || protect.is_protected(i, n))
        .collect()
}

/// Greedy eviction under a budget, one arrival at a time — what a head does when it evicts
/// whenever it exceeds its budget, played over several new entries at once so that a prefill
/// can hide, inside the pass, exactly the keys a token-by-token run would have removed.
///
/// Entries `0..first_new` are already retained (in order, oldest first); entries
/// `first_new..scores.len()` arrive one by one. After arrival `a` (whose query saw every live
/// entry, itself included), while more than `keep_after(a)` entries live, the worst live entry
/// is evicted by the crate's ranking rule over the live entries in order (protected: the first
/// `sinks` and the last `recent` live entries; then score; then recency). Returns, for every
/// entry, the arrival after which it was evicted (`None`: it survives all of them).
///
/// Evicting the worst entry one at a time keeps exactly what [`select_top_k`] keeps when the
/// budget is exceeded by one entry per arrival, as a budget that grows by at most one per token
/// is ([`Budget::keep_count`]). Cost: `O(log n + sinks + recent)` per eviction, after building
/// ordered sets of the live entries (`O(n log n)`); a single arrival (a decode step) takes linear
/// scans instead, `O(n)` per eviction, and nothing when it fits.
pub fn evict_greedily(
    scores: &[f32],
    first_new: usize,
    keep_after: &dyn Fn(usize) -> usize,
    protect: &Protection,
) -> Vec<Option<usize>> {
    let n = scores.len();
    if first_new + 1 == n {
        return evict_after_one_arrival(scores, keep_after(first_new), protect);
    }
    let mut evicted_after = vec![None; n];
    // Live entries, by index and by rank (worst first: lower score, then older).
    let key = |i: usize| (RankedScore(scores[i]), i);
    let mut live: BTreeSet<usize> = (0..first_new.min(n)).collect();
    let mut by_rank: BTreeSet<(RankedScore, usize)> = live.iter().map(|&i| key(i)).collect();
    for arrival in first_new..n {
        live.insert(arrival);
        by_rank.insert(key(arrival));
        let keep = keep_after(arrival);
        while live.len() > keep {
            // Protected: index at most the sinks-th live one, or at least the recent-th newest
            // (every live entry when fewer live).
            let sinks_end = (protect.sinks > 0)
                .then(|| live.iter().nth(protect.sinks - 1).or(live.last()))
                .flatten();
            let recent_start = (protect.recent > 0)
                .then(|| live.iter().nth_back(protect.recent - 1).or(live.first()))
                .flatten();
            let protected = |i: usize| {
                sinks_end.is_some_and(|&e| i <= e) || recent_start.is_some_and(|&s| i >= s)
            };
            let victim = by_rank
                .iter()
                .find(|(_, i)| !protected(*i))
                .or_else(|| by_rank.iter().next())
                .copied();
            let Some((score, i)) = victim else { break };
            by_rank.remove(&(score, i));
            live.remove(&i);
            evicted_after[i] = Some(arrival);
        }
    }
    evicted_after
}

/// [`evict_greedily`] when the last entry is the only arrival: every entry is live, and while more
/// than `keep` live, the worst live one goes by the same rule (protected: the first `sinks` and
/// the last `recent` live entries; then score; then age), found by a scan.
fn evict_after_one_arrival(
    scores: &[f32],
    keep: usize,
    protect: &Protection,
) -> Vec<Option<usize>> {
    let n = scores.len();
    let mut evicted_after = vec![None; n];
    let mut live = vec![true; n];
    let mut left = n;
    while left > keep {
        let live_indices = (0..n).filter(|&i| live[i]);
        let sinks_end = (protect.sinks > 0)
            .then(|| live_indices.clone().nth(protect.sinks - 1))
            .map(|e| e.unwrap_or(n));
        let recent_start = (protect.recent > 0)
            .then(|| live_indices.clone().rev().nth(protect.recent - 1))
            .map(|s| s.unwrap_or(0));
        let protected =
            |i: usize| sinks_end.is_some_and(|e| i <= e) || recent_start.is_some_and(|s| i >= s);
        let worst = |only_unprotected: bool| {
            live_indices
                .clone()
                .filter(|&i| !(only_unprotected && protected(i)))
                .min_by_key(|&i| (RankedScore(scores[i]), i))
        };
        let Some(victim) = worst(true).or_else(|| worst(false)) else {
            break;
        };
        live[victim] = false;
        evicted_after[victim] = Some(n - 1);
        left -= 1;
    }
    evicted_after
}

/// A score under the ranking rule's total order (NaN lowest, `-0.0 == +0.0`), for ordered sets.
#[derive(Clone, Copy, Debug)]
struct RankedScore(f32);

impl PartialEq for RankedScore {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for RankedScore {}

impl PartialOrd for RankedScore {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for RankedScore {
    fn cmp(&self, other: &Self) -> Ordering {
        cmp_score(f64::from(self.0), f64::from(other.0))
    }
}

/// PyramidKV per-layer keep budgets (window included) for a `prompt_len`-token cache, falling
/// linearly with depth, with the reference implementation's two safeguards
/// (`Zefan-Cai/PyramidKV`, `PyramidKVCluster.update_kv`).
///
/// With average budget `C = keep_avg`, window `w`, prompt length `T` and `S = C - w`:
/// - `C >= T`: nothing to compress, every layer keeps `T`;
/// - `C <= w`, one layer, or `T < 2S` (the pyramid's top would exceed the prompt): uniform
///   SnapKV budgets, every layer keeps `C`;
/// - otherwise `min = S/beta`, `max = 2S - min`; if `max > T - w` the top is capped,
///   `max = T - w` and `min = 2S - max` (so the mean stays `S`); layer `l` keeps
///   `b_l = w + max - l(max-min)/(L-1)` (real-valued, the spec's linear fall), rounded by
///   largest remainder (floor everything, give the leftover units to the layers with the largest
///   fractional parts, earlier layer first on ties, never above `T`).
///
/// So the budgets are non-increasing, each lies in `[min(C, w), T]`, and they sum to exactly
/// `L * min(C, T)`: the measured ratio is the requested one. (The reference steps by
/// `(max-min) // L` in integers, which lets its mean drift from `C`; the spec's `L-1` and exact
/// rounding keep it.) The layer keeps the top `b_l - w` prefix entries by SnapKV score plus the
/// `w`-token window.
///
/// Errors: `n_layers == 0`, or `beta` not finite or below 1 (the pyramid would invert).
pub fn pyramid_budgets(
    keep_avg: usize,
    window: usize,
    n_layers: usize,
    beta: f32,
    prompt_len: usize,
) -> Result<Vec<usize>> {
    if n_layers == 0 {
        return Err(invalid(
            "pyramid_budgets: n_layers",
            0,
            "at least one layer",
        ));
    }
    if !(beta.is_finite() && beta >= 1.0) {
        return Err(invalid("pyramid_budgets: beta", beta, "a finite beta >= 1"));
    }
    let (c, t) = (keep_avg.min(prompt_len), prompt_len);
    if n_layers == 1 || c <= window || t < 2 * (c - window) {
        return Ok(vec![c; n_layers]);
    }
    let span = (c - window) as f64;
    let mut min = span / f64::from(beta);
    let mut max = 2.0 * span - min;
    let top = (t - window) as f64;
    if max > top {
        max = top;
        min = 2.0 * span - max;
    }
    let step = (max - min) / (n_layers - 1) as f64;
    let real: Vec<f64> = (0..n_layers)
        .map(|l| (window as f64 + max - l as f64 * step).clamp(0.0, t as f64))
        .collect();
    // Non-negative, bounded by T: the casts are exact.
    let mut budgets: Vec<usize> = real.iter().map(|b| b.floor() as usize).collect();
    let target = c * n_layers;
    let mut leftover = target.saturating_sub(budgets.iter().sum());
    let mut by_fraction: Vec<usize> = (0..n_layers).collect();
    by_fraction
        .sort_by(|&a, &b| cmp_score(real[b].fract(), real[a].fract()).then_with(|| a.cmp(&b)));
    for &l in &by_fraction {
        if leftover == 0 {
            break;
        }
        if budgets[l] < t {
            budgets[l] += 1;
            leftover -= 1;
        }
    }
    Ok(budgets)
}
