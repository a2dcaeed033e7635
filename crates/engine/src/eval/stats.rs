//! 95% confidence intervals for what `agate eval` reports: Wilson score intervals for the mean
//! of 0/1 scores, percentile bootstrap over tasks for fractional scores, and over texts for
//! ratios of sums (perplexity, token-weighted next-token accuracy).
//!
//! Invariants: every interval is `[lo, hi]` with `lo <= hi`, within the statistic's range, and
//! contains the point estimate; the bootstrap is deterministic (a fixed seed and
//! [`BOOTSTRAP_SAMPLES`] resamples), so a rerun prints the same interval; empty input gives the
//! degenerate `[0, 0]` (or `[v, v]` for a single value).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The standard normal quantile of a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// Resamples drawn by the bootstrap intervals.
pub const BOOTSTRAP_SAMPLES: usize = 2000;

/// Seed of the bootstrap draws.
const BOOTSTRAP_SEED: u64 = 0x5EED_0011;

/// Wilson score interval of a proportion: `successes` of `n` at confidence `z`.
pub fn wilson(successes: usize, n: usize, z: f64) -> [f64; 2] {
    if n == 0 {
        return [0.0, 0.0];
    }
    let (n, p) = (n as f64, successes as f64 / n as f64);
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    // Exactly 0 (1) when no (every) task succeeded, where rounding would leave a hair.
    let lo = if successes == 0 {
        0.0
    } else {
        (centre - half).max(0.0)
    };
    let hi = if successes as f64 == n {
        1.0
    } else {
        (centre + half).min(1.0)
    };
    [lo, hi]
}

/// 95% interval of the mean of `scores`: Wilson when every score is 0 or 1, else a percentile
/// bootstrap over the scores.
pub fn mean_interval(scores: &[f64]) -> [f64; 2] {
    if scores.iter().all(|&s| s == 0.0 || s == 1.0) {
        let hits = scores.iter().filter(|&&s| s == 1.0).count();
        return wilson(hits, scores.len(), Z95);
    }
    let ones = vec![1.0; scores.len()];
    ratio_interval(scores, &ones, |x| x)
}

/// Percentile-bootstrap 95% interval of `f(Σ num / Σ den)` over items `(num[i], den[i])` resampled
/// with replacement (e.g. perplexity: `num` = a text's summed NLL, `den` = its scored tokens,
/// `f = exp`). `f` must be non-decreasing.
pub fn ratio_interval(num: &[f64], den: &[f64], f: impl Fn(f64) -> f64) -> [f64; 2] {
    let n = num.len().min(den.len());
    let stat = |sn: f64, sd: f64| f(if sd > 0.0 { sn / sd } else { 0.0 });
    let point = stat(num[..n].iter().sum(), den[..n].iter().sum());
    if n < 2 {
        return [point, point];
    }
    let mut rng = StdRng::seed_from_u64(BOOTSTRAP_SEED);
    let mut draws: Vec<f64> = (0..BOOTSTRAP_SAMPLES)
        .map(|_| {
            let (mut sn, mut sd) = (0.0, 0.0);
            for _ in 0..n {
                let i = rng.random_range(0..n);
                sn += num[i];
                sd += den[i];
            }
            stat(sn, sd)
        })
        .collect();
    draws.sort_by(f64::total_cmp);
    let at = |q: f64| {
        draws[((q * (BOOTSTRAP_SAMPLES - 1) as f64).round() as usize).min(draws.len() - 1)]
    };
    // Percentiles of a skewed resample can miss the point estimate by a hair: keep it inside.
    [at(0.025).min(point), at(0.975).max(point)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_by_hand() {
        // 8 of 10: centre (0.8 + 0.19207) / 1.38415 = 0.71668, half 0.22665 -> [0.4902, 0.9433].
        let [lo, hi] = wilson(8, 10, Z95);
        assert!(
            (lo - 0.4902).abs() < 1e-4 && (hi - 0.9433).abs() < 1e-4,
            "{lo} {hi}"
        );
        assert_eq!(wilson(0, 0, Z95), [0.0, 0.0]);
        let [lo, hi] = wilson(100, 100, Z95);
        assert!(lo > 0.96 && hi == 1.0);
        let [lo, hi] = wilson(0, 100, Z95);
        assert!(lo == 0.0 && hi < 0.04);
    }

    #[test]
    fn binary_scores_use_wilson_fractional_ones_the_bootstrap() {
        let binary: Vec<f64> = (0..10).map(|i| f64::from(u8::from(i < 8))).collect();
        assert_eq!(mean_interval(&binary), wilson(8, 10, Z95));
        let frac: Vec<f64> = (0..50).map(|i| (i % 5) as f64 / 4.0).collect();
        let [lo, hi] = mean_interval(&frac);
        let mean = frac.iter().sum::<f64>() / 50.0;
        assert!(lo < mean && mean < hi && hi - lo < 0.3, "{lo} {mean} {hi}");
        // Deterministic.
        assert_eq!(mean_interval(&frac), [lo, hi]);
        // One value: a point.
        assert_eq!(mean_interval(&[0.5]), [0.5, 0.5]);
    }

    #[test]
    fn ratio_interval_contains_the_pooled_ratio() {
        let nll = [30.0, 45.0, 20.0, 60.0, 38.0];
        let tokens = [10.0, 12.0, 9.0, 15.0, 11.0];
        let point = (193.0f64 / 57.0).exp();
        let [lo, hi] = ratio_interval(&nll, &tokens, f64::exp);
        assert!(lo <= point && point <= hi && lo < hi, "{lo} {point} {hi}");
    }
}
