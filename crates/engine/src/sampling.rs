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
    /// Checks every field: `Err` names the first one outside its domain.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let out_of_range = |field, what, value: f32, expected| SamplingError {
            field,
            what,
            value,
            expected,
        };
        let t = self.temperature;
        if !(t >= 0.0 && t.is_finite()) {
            return Err(out_of_range(
                "temperature",
                "temperature",
                t,
                "finite and >= 0",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(out_of_range("top_p", "top-p", self.top_p, "in (0, 1]"));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return Err(out_of_range("min_p", "min-p", self.min_p, "in [0, 1)"));
        }
        let r = self.repetition_penalty;
        if !(r > 0.0 && r.is_finite()) {
            return Err(out_of_range(
                "repetition_penalty",
                "repetition penalty",
                r,
                "finite and > 0",
            ));
        }
        Ok(())
    }

    /// The first field outside its domain: its name (as in this struct, which is also the
    /// OpenAI request field) and why; `None` when every field is valid.
    pub fn invalid_field(&self) -> Option<(&'static str, String)> {
        self.validate().err().map(|e| (e.field, e.to_string()))
    }
}

/// A sampling parameter outside its domain.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{what} must be {expected}, got {value}")]
pub struct SamplingError {
    /// The field, as named in [`SamplingParams`] (also the OpenAI request field).
    pub field: &'static str,
    /// The parameter in words (`top-p`).
    pub what: &'static str,
    /// The value given.
    pub value: f32,
    /// What it must be (`in (0, 1]`).
    pub expected: &'static str,
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
        // Candidates in order of logit, descending (ties: lower id first), sorted lazily: only
        // the prefix the filters and the draw look at is ever sorted (a full sort of a 49k
        // vocabulary costs milliseconds per token).
        let mut order = LazyOrder::new(&logits);
        if order.is_empty() {
            return argmax(&logits); // no logit is finite
        }
        if p.top_k > 0 {
            order.keep_best(p.top_k);
        }
        let max = logits[order.get(0) as usize];
        let weight = |i: u32| ((logits[i as usize] - max) / p.temperature).exp();
        let total: f32 = order.ids.iter().map(|&i| weight(i)).sum();
        let prob = |order: &mut LazyOrder<'_>, i: usize| weight(order.get(i)) / total;
        let mut cut = order.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut i = 0;
            while i < cut {
                acc += prob(&mut order, i);
                i += 1;
                if acc >= p.top_p {
                    break;
                }
            }
            cut = i;
        }
        if p.min_p > 0.0 {
            let floor = prob(&mut order, 0) * p.min_p;
            let mut keep = 1;
            while keep < cut && prob(&mut order, keep) >= floor {
                keep += 1;
            }
            cut = keep;
        }
        // The kept mass: the whole candidate set's is 1 by construction.
        let kept: f32 = if cut == order.len() {
            1.0
        } else {
            (0..cut).map(|i| prob(&mut order, i)).sum()
        };
        let mut r = self.rng.random::<f32>() * kept;
        for i in 0..cut {
            let x = prob(&mut order, i);
            if r < x {
                return order.get(i);
            }
            r -= x;
        }
        order.get(cut - 1)
    }
}

/// Token ids sorted by logit (descending, lower id first on ties; NaNs left out) on demand: a
/// prefix is sorted only when read, growing by doubling.
struct LazyOrder<'a> {
    logits: &'a [f32],
    ids: Vec<u32>,
    sorted: usize,
}

impl<'a> LazyOrder<'a> {
    fn new(logits: &'a [f32]) -> Self {
        let ids = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize].is_finite())
            .collect();
        LazyOrder {
            logits,
            ids,
            sorted: 0,
        }
    }

    fn better(logits: &[f32], a: u32, b: u32) -> std::cmp::Ordering {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Keeps only the `k` best ids (in no particular order yet).
    fn keep_best(&mut self, k: usize) {
        if k < self.ids.len() {
            let logits = self.logits;
            self.ids
                .select_nth_unstable_by(k - 1, |&a, &b| Self::better(logits, a, b));
            self.ids.truncate(k);
            self.sorted = 0;
        }
    }

    /// The `i`-th best id (`i < len`).
    fn get(&mut self, i: usize) -> u32 {
        if i >= self.sorted {
            let want = (i + 1).max(2 * self.sorted).max(64).min(self.ids.len());
            let logits = self.logits;
            let rest = &mut self.ids[self.sorted..];
            let n = want - self.sorted;
            if n < rest.len() {
                rest.select_nth_unstable_by(n - 1, |&a, &b| Self::better(logits, a, b));
            }
            rest[..n].sort_unstable_by(|&a, &b| Self::better(logits, a, b));
            self.sorted = want;
        }
        self.ids[i]
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

    /// The kept candidates and their probabilities by the naive full sort (the definition).
    fn naive_nucleus(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize].is_finite())
            .collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let max = logits[order[0] as usize];
        let w: Vec<f32> = order
            .iter()
            .map(|&i| ((logits[i as usize] - max) / p.temperature).exp())
            .collect();
        let total: f32 = w.iter().sum();
        let probs: Vec<f32> = w.iter().map(|x| x / total).collect();
        let mut cut = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            cut = probs
                .iter()
                .position(|&x| {
                    acc += x;
                    acc >= p.top_p
                })
                .map_or(cut, |i| i + 1);
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            cut = probs[..cut]
                .iter()
                .take_while(|&&x| x >= floor)
                .count()
                .max(1);
        }
        order.into_iter().zip(probs).take(cut).collect()
    }

    /// Draws land only on the naive nucleus, and over many draws each kept token comes up about
    /// as often as its probability (renormalised over the nucleus) says.
    #[test]
    fn lazy_order_keeps_the_naive_nucleus() {
        let logits: Vec<f32> = (0..2000)
            .map(|i| {
                ((i * 7919 % 1009) as f32 / 97.0).sin() * 4.0 + if i == 77 { f32::NAN } else { 0.0 }
            })
            .collect();
        for (top_k, top_p, min_p) in [
            (0, 1.0, 0.0),
            (40, 1.0, 0.0),
            (0, 0.9, 0.0),
            (0, 1.0, 0.05),
            (100, 0.8, 0.01),
        ] {
            let p = SamplingParams {
                temperature: 0.7,
                top_k,
                top_p,
                min_p,
                ..params()
            };
            let nucleus = naive_nucleus(&logits, &p);
            let ids: std::collections::HashMap<u32, f32> = nucleus.iter().copied().collect();
            let mass: f32 = nucleus.iter().map(|x| x.1).sum();
            let mut s = Sampler::new(p.clone());
            let draws = 2000;
            let mut hits = std::collections::HashMap::new();
            for _ in 0..draws {
                let t = s.sample(&logits, &[]);
                assert!(
                    ids.contains_key(&t),
                    "{top_k} {top_p} {min_p}: {t} outside the nucleus"
                );
                *hits.entry(t).or_insert(0usize) += 1;
            }
            let (&top, &pt) = nucleus.first().map(|(i, p)| (i, p)).unwrap();
            let freq = hits.get(&top).copied().unwrap_or(0) as f32 / draws as f32;
            assert!(
                (freq - pt / mass).abs() < 0.05,
                "{top_k} {top_p} {min_p}: {freq} vs {}",
                pt / mass
            );
        }
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
        let e = bad.validate().unwrap_err();
        assert_eq!((e.field, e.value), ("temperature", -1.0));
        assert_eq!(e.to_string(), "temperature must be finite and >= 0, got -1");
        let hot = SamplingParams {
            temperature: f32::INFINITY,
            ..Default::default()
        };
        assert_eq!(
            hot.invalid_field(),
            Some((
                "temperature",
                "temperature must be finite and >= 0, got inf".to_string()
            ))
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
