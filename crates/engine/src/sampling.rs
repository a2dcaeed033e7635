//! Token sampling: greedy, temperature, top-k, top-p, min-p and repetition penalty, seeded.
//!
//! Invariants: `temperature == 0` is exactly greedy (argmax, lowest id wins ties); filters apply
//! in the order penalty → temperature → top-k → top-p → min-p; the same seed, params and logits
//! always give the same token; no input makes it panic: non-finite logits are never drawn (the
//! session refuses non-finite logits before sampling; all non-finite gives token 0).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling parameters. `validate` checks every value and names the bad one.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = off).
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely (0 = off).
    pub min_p: f32,
    /// Divide positive / multiply negative logits of recent tokens (1 = off).
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 42,
        }
    }
}

impl SamplingParams {
    /// Checks every value; the error names the flag and the value.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return Err(format!("min-p must be in [0, 1), got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// A seeded sampler.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler; `params` must have passed `validate`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// Picks the next token from `logits` given the tokens seen so far (for the penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut logits = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[start..] {
                if let Some(l) = logits.get_mut(t as usize) {
                    if seen.insert(t) {
                        let penalised = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                        // An extreme penalty must not turn a logit into an infinity.
                        *l = penalised.clamp(-f32::MAX, f32::MAX);
                    }
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(&logits);
        }
        // Candidates sorted by logit, descending (ties: lower id first).
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize].is_finite())
            .collect();
        if order.is_empty() {
            return argmax(&logits);
        }
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let max = logits[order[0] as usize];
        let mut probs: Vec<f32> = order
            .iter()
            .map(|&i| ((logits[i as usize] - max) / p.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let cut = probs
                .iter()
                .position(|&x| {
                    acc += x;
                    acc >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(cut);
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            let keep = probs.iter().take_while(|&&x| x >= floor).count().max(1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &x) in probs.iter().enumerate() {
            if r < x {
                return order[i];
            }
            r -= x;
        }
        order[probs.len() - 1]
    }
}

/// Index of the largest value; the lowest index wins ties; NaN never wins (all NaN: 0).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || (values[best].is_nan() && !v.is_nan()) {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            ..params()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 1.0, 0.9, 0.5], &[]), 1);
        }
    }

    #[test]
    fn top_p_restricts_to_nucleus() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top-p 0.7 keeps ids 0 and 1 only.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.7,
            ..params()
        });
        for _ in 0..200 {
            assert!(s.sample(&logits, &[]) <= 1);
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits = [3.0, 2.9, -5.0, -5.0];
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.1,
            ..params()
        });
        for _ in 0..200 {
            assert!(s.sample(&logits, &[]) <= 1);
        }
    }

    #[test]
    fn repetition_penalty_changes_greedy_choice() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[2.0, 1.5], &[0]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, ..params() });
            (0..30).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn non_finite_logits_never_panic_nor_win() {
        for temperature in [0.0, 0.7] {
            let mut s = Sampler::new(SamplingParams {
                temperature,
                top_k: 2,
                repetition_penalty: 1e-30,
                ..Default::default()
            });
            assert_eq!(s.sample(&[f32::NAN; 4], &[1]), 0);
            assert_eq!(s.sample(&[f32::NAN, 0.5, f32::NAN], &[]), 1);
            let t = s.sample(&[f32::INFINITY, 0.5, f32::NEG_INFINITY, 0.2], &[3]);
            assert!(t < 4);
        }
    }

    #[test]
    fn validation_names_the_value() {
        let bad = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert_eq!(
            bad.validate().unwrap_err(),
            "temperature must be >= 0, got -1"
        );
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            min_p: 1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
