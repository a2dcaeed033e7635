//! The NACL baseline: one-shot eviction per layer right after its prefill attention.
//!
//! Proxy scores come from the last `P` prompt queries attending non-causally to all keys
//! ([`nacl_proxy_scores`]). Every head keeps its sinks and recent tokens, then the top `Kp`
//! by proxy score, then `Kr` more sampled **without replacement** with probabilities
//! `softmax(proxy)` over the remaining candidates ([`nacl_keep`]). Generated tokens are all
//! kept (the engine's business).
//!
//! Invariants: the sample is drawn with the Gumbel-top-k trick (key `proxy_j + G_j`, `G_j`
//! standard Gumbel, take the `Kr` largest), which has exactly the distribution of sequential
//! softmax sampling without replacement; one Gumbel variate is drawn per entry in entry order
//! from a `StdRng` seeded with the given seed, so the result is reproducible and no entry can
//! be chosen twice. Candidates with a NaN or `-inf` proxy have probability zero: they are taken
//! only when every other candidate is exhausted (then most recent first). The kept count is
//! exactly `min(n, sinks + recent + Kp + Kr)`.

use rand::distr::Open01;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};
use crate::select::{top_k_mask, Protection};

/// NACL's fractions of the prompt length `T`. Defaults are the released ones (`Kp = 0.12`,
/// `Kr = 0.07`, sinks + recent = 0.01, split evenly **\[choice\]**, proxy queries = 0.01).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NaclConfig {
    /// Fraction of the prompt used as proxy queries (its last tokens); at least one.
    pub proxy_frac: f32,
    /// Fraction of the prompt kept as leading sink tokens.
    pub sink_frac: f32,
    /// Fraction of the prompt kept as most recent tokens.
    pub recent_frac: f32,
    /// Fraction kept greedily by proxy score (`Kp`).
    pub kp_frac: f32,
    /// Fraction sampled by `softmax(proxy)` (`Kr`).
    pub kr_frac: f32,
    /// Prompts shorter than this are not evicted at all in the released-defaults mode
    /// (`keep = None` in [`NaclConfig::plan`]); a budget is always honoured. Default 512
    /// **\[choice\]**.
    pub min_len: usize,
}

impl Default for NaclConfig {
    fn default() -> Self {
        Self {
            proxy_frac: 0.01,
            sink_frac: 0.005,
            recent_frac: 0.005,
            kp_frac: 0.12,
            kr_frac: 0.07,
            min_len: 512,
        }
    }
}

/// The counts one NACL selection uses (all in entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NaclPlan {
    /// Leading entries always kept.
    pub sinks: usize,
    /// Trailing entries always kept.
    pub recent: usize,
    /// Entries kept greedily by proxy score.
    pub kp: usize,
    /// Entries sampled without replacement by `softmax(proxy)`.
    pub kr: usize,
}

impl NaclPlan {
    /// Total entries the plan keeps (before clamping to the prompt length).
    pub fn total(&self) -> usize {
        self.sinks + self.recent + self.kp + self.kr
    }
}

/// `round(frac * n)` in f64, as a count (fractions are validated non-negative and finite).
fn frac_of(frac: f32, n: usize) -> usize {
    (f64::from(frac) * n as f64).round() as usize
}

impl NaclConfig {
    /// Checks that every fraction is finite and non-negative, `proxy_frac <= 1`, and
    /// `kp_frac + kr_frac > 0` (the budget mode divides by it).
    pub fn validate(&self) -> Result<()> {
        let fields = [
            ("NaclConfig.proxy_frac", self.proxy_frac),
            ("NaclConfig.sink_frac", self.sink_frac),
            ("NaclConfig.recent_frac", self.recent_frac),
            ("NaclConfig.kp_frac", self.kp_frac),
            ("NaclConfig.kr_frac", self.kr_frac),
        ];
        for (name, v) in fields {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(
                    name,
                    v,
                    "a finite, non-negative fraction of the prompt",
                ));
            }
        }
        if self.proxy_frac > 1.0 {
            return Err(invalid(
                "NaclConfig.proxy_frac",
                self.proxy_frac,
                "at most 1",
            ));
        }
        if self.kp_frac + self.kr_frac <= 0.0 {
            return Err(invalid(
                "NaclConfig.kp_frac + kr_frac",
                self.kp_frac + self.kr_frac,
                "a positive sum (the budget mode splits by their ratio)",
            ));
        }
        Ok(())
    }

    /// Number of proxy queries for an `n`-token prompt: `round(proxy_frac * n)`, at least 1
    /// (0 for an empty prompt).
    pub fn proxy_count(&self, n: usize) -> usize {
        frac_of(self.proxy_frac, n).clamp(n.min(1), n)
    }

    /// The counts for an `n`-token prompt.
    ///
    /// `keep = None`: released defaults, each count `round(frac * n)` (nothing evicted if
    /// `n < min_len`). `keep = Some(k)`: budget mode, exactly `min(k, n)` kept: sinks and
    /// recent as in the default mode (cut to fit `k`, sinks first), and the rest split between
    /// `Kp` and `Kr` in the ratio `kp_frac : kr_frac` (`Kp` rounded, `Kr` the remainder).
    pub fn plan(&self, n: usize, keep: Option<usize>) -> Result<NaclPlan> {
        self.validate()?;
        let sinks = frac_of(self.sink_frac, n);
        let recent = frac_of(self.recent_frac, n);
        match keep {
            None if n < self.min_len => Ok(NaclPlan {
                sinks: n,
                recent: 0,
                kp: 0,
                kr: 0,
            }),
            None => Ok(NaclPlan {
                sinks,
                recent,
                kp: frac_of(self.kp_frac, n),
                kr: frac_of(self.kr_frac, n),
            }),
            Some(k) => {
                let k = k.min(n);
                let sinks = sinks.min(k);
                let recent = recent.min(k - sinks);
                let rest = k - sinks - recent;
                let share =
                    f64::from(self.kp_frac) / (f64::from(self.kp_frac) + f64::from(self.kr_frac));
                let kp = ((rest as f64 * share).round() as usize).min(rest);
                Ok(NaclPlan {
                    sinks,
                    recent,
                    kp,
                    kr: rest - kp,
                })
            }
        }
    }
}

/// NACL keep mask for one KV head: sinks and recent, then the top `plan.kp` by `proxy`, then
/// `plan.kr` sampled without replacement by `softmax(proxy)` over what remains (seeded).
/// Exactly `min(n, plan.total())` entries are kept. See the module invariants for sampling.
pub fn nacl_keep(proxy: &[f32], plan: &NaclPlan, seed: u64) -> Vec<bool> {
    let n = proxy.len();
    let protect = Protection {
        sinks: plan.sinks,
        recent: plan.recent,
    };
    let protected = protect.count(n);
    let greedy = top_k_mask(
        n,
        protected + plan.kp,
        |i| protect.is_protected(i, n),
        |i| f64::from(proxy[i]),
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let gumbel: Vec<f64> = (0..n)
        .map(|_| {
            let u: f64 = rng.sample(Open01);
            -(-u.ln()).ln()
        })
        .collect();
    let already = greedy.iter().filter(|&&k| k).count();
    top_k_mask(
        n,
        already + plan.kr,
        |i| greedy[i],
        |i| f64::from(proxy[i]) + gumbel[i],
    )
}

/// NACL proxy scores for one query head: `proxy_j = sum_i softmax_j(q_i . k_j / sqrt(d))` over
/// the proxy queries `i`, computed **non-causally** against all keys. `queries` is row-major
/// `[p, head_dim]`, `keys` `[n, head_dim]`; accumulation in f64. Average the heads of a group
/// with [`crate::score::group_mean`].
///
/// Errors: `head_dim == 0`, or a slice length not a multiple of `head_dim`.
pub fn nacl_proxy_scores(queries: &[f32], keys: &[f32], head_dim: usize) -> Result<Vec<f32>> {
    if head_dim == 0
        || !queries.len().is_multiple_of(head_dim)
        || !keys.len().is_multiple_of(head_dim)
    {
        return Err(invalid(
            "nacl_proxy_scores: queries.len() / keys.len() / head_dim",
            format!("{} / {} / {head_dim}", queries.len(), keys.len()),
            "a non-zero head_dim dividing both lengths",
        ));
    }
    let n = keys.len() / head_dim;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut proxy = vec![0f64; n];
    let mut logits = vec![0f64; n];
    for q in queries.chunks_exact(head_dim) {
        for (l, k) in logits.iter_mut().zip(keys.chunks_exact(head_dim)) {
            *l = q
                .iter()
                .zip(k)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum::<f64>()
                * scale;
        }
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|&l| (l - max).exp()).sum();
        for (p, &l) in proxy.iter_mut().zip(&logits) {
            *p += (l - max).exp() / z;
        }
    }
    Ok(proxy.into_iter().map(|p| p as f32).collect())
}
