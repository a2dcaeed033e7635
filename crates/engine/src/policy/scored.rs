//! The hook behind every score-based baseline (Random, StreamingLLM, H2O, TOVA, SnapKV,
//! PyramidKV, KNorm, NACL): it asks the decoder for the attention statistics its scorer needs,
//! decides when to evict (at the end of a prefill, or whenever a head exceeds its budget), builds
//! each head's keep mask with gate-core's scorers and selectors, and evicts from the store.
//!
//! Invariants: after a triggered eviction every (layer, head) holds exactly
//! `min(retained, budget)` entries; per-entry state (H2O's accumulated attention) is compacted in
//! step with the store; attention statistics are computed only for passes that use them (H2O's
//! accumulation must see every query, so it asks on every pass).

use gate_core::score::{self, H2oAccumulator, NaclConfig};
use gate_core::select::{self, Budget, Protection};
use kv_store::{AttendOptions, SequenceKv};
use model_zoo::{AttentionOutcome, LayerHook, LayerPlan, ModelConfig, ModelError, Pass};

use super::{Policy, Recent};

/// When a policy evicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    /// Once at the end of every prefill; generated tokens are kept.
    PrefillEnd,
    /// After any pass that leaves a head over its budget.
    OverBudget,
}

/// What a policy scores with.
enum Scorer {
    Random {
        seed: u64,
        protect: Protection,
    },
    Streaming {
        sinks: usize,
    },
    H2o {
        acc: H2oAccumulator,
        recent: Recent,
        sinks: usize,
    },
    Tova {
        sinks: usize,
    },
    SnapKv {
        window: usize,
        kernel: usize,
        beta: Option<f32>,
    },
    KNorm {
        protect: Protection,
    },
    Nacl {
        config: NaclConfig,
        seed: u64,
    },
}

pub(super) struct ScoredHook {
    scorer: Scorer,
    trigger: Trigger,
    budget: Budget,
    n_layers: usize,
    head_dim: usize,
    pass: Pass,
}

fn gate_error(e: gate_core::GateError) -> ModelError {
    ModelError::Input(format!("eviction: {e}"))
}

impl ScoredHook {
    pub(super) fn new(policy: &Policy, cfg: &ModelConfig) -> model_zoo::Result<Self> {
        let (scorer, trigger, budget) = match policy {
            Policy::Random {
                budget,
                protect,
                seed,
            } => (
                Scorer::Random {
                    seed: *seed,
                    protect: *protect,
                },
                Trigger::OverBudget,
                *budget,
            ),
            Policy::Streaming { budget, sinks } => (
                Scorer::Streaming { sinks: *sinks },
                Trigger::OverBudget,
                *budget,
            ),
            Policy::H2o {
                budget,
                recent,
                sinks,
            } => (
                Scorer::H2o {
                    acc: H2oAccumulator::new(cfg.n_layers, cfg.n_kv_heads, false)
                        .map_err(gate_error)?,
                    recent: *recent,
                    sinks: *sinks,
                },
                Trigger::OverBudget,
                *budget,
            ),
            Policy::Tova { budget, sinks } => {
                (Scorer::Tova { sinks: *sinks }, Trigger::OverBudget, *budget)
            }
            Policy::SnapKv {
                budget,
                window,
                kernel,
            } => (
                Scorer::SnapKv {
                    window: *window,
                    kernel: *kernel,
                    beta: None,
                },
                Trigger::PrefillEnd,
                *budget,
            ),
            Policy::PyramidKv {
                budget,
                window,
                kernel,
                beta,
            } => (
                Scorer::SnapKv {
                    window: *window,
                    kernel: *kernel,
                    beta: Some(*beta),
                },
                Trigger::PrefillEnd,
                *budget,
            ),
            Policy::KNorm { budget, protect } => (
                Scorer::KNorm { protect: *protect },
                Trigger::PrefillEnd,
                *budget,
            ),
            Policy::Nacl {
                budget,
                config,
                seed,
            } => (
                Scorer::Nacl {
                    config: *config,
                    seed: *seed,
                },
                Trigger::PrefillEnd,
                *budget,
            ),
            Policy::Full | Policy::Ag { .. } => {
                return Err(ModelError::Input(format!(
                    "policy {} has no scored hook",
                    policy.name()
                )))
            }
        };
        Ok(ScoredHook {
            scorer,
            trigger,
            budget,
            n_layers: cfg.n_layers,
            head_dim: cfg.head_dim,
            pass: Pass::Decode,
        })
    }

    /// Whether this pass may evict.
    fn evicts_now(&self) -> bool {
        match self.trigger {
            Trigger::OverBudget => true,
            Trigger::PrefillEnd => self.pass == Pass::Prefill { final_chunk: true },
        }
    }

    /// The budget of one head of `layer` after `tokens_seen` tokens.
    fn keep_count(&self, layer: usize, tokens_seen: usize) -> model_zoo::Result<usize> {
        let keep = self.budget.keep_count(tokens_seen).max(1);
        Ok(match &self.scorer {
            Scorer::SnapKv {
                window,
                beta: Some(beta),
                ..
            } => select::pyramid_budgets(keep, *window, self.n_layers, *beta)
                .map_err(gate_error)?[layer]
                .max(1),
            _ => keep,
        })
    }

    /// Query rows whose attention the scorer needs in this pass of `n` new tokens.
    fn prob_rows(&self, n: usize) -> Option<std::ops::Range<usize>> {
        match &self.scorer {
            Scorer::H2o { .. } => Some(0..n),
            Scorer::Tova { .. } if self.evicts_now() => Some(n - 1..n),
            Scorer::SnapKv { window, .. } if self.evicts_now() => {
                Some(n.saturating_sub(*window)..n)
            }
            _ => None,
        }
    }

    /// The keep masks of every head of `layer`, each keeping `keep` entries.
    fn layer_masks(
        &mut self,
        layer: usize,
        keep: usize,
        tokens_seen: usize,
        outcome: &AttentionOutcome<'_>,
    ) -> model_zoo::Result<Vec<Vec<bool>>> {
        let kv: &SequenceKv = outcome.kv;
        let heads = kv.n_kv_heads();
        let missing =
            || ModelError::Input("eviction: the decoder returned no attention statistics".into());
        let per_head =
            |f: &mut dyn FnMut(usize) -> model_zoo::Result<Vec<bool>>| (0..heads).map(f).collect();
        match &mut self.scorer {
            Scorer::Random { seed, protect } => {
                let seed = seed.wrapping_add(tokens_seen as u64);
                per_head(&mut |h| {
                    let scores = score::random_scores(
                        kv.retained(layer, h),
                        score::seed_for(seed, layer, h),
                    );
                    Ok(select::select_top_k(&scores, keep, protect))
                })
            }
            Scorer::Streaming { sinks } => {
                per_head(&mut |h| Ok(score::streaming_keep(kv.retained(layer, h), *sinks, keep)))
            }
            Scorer::H2o { acc, recent, sinks } => {
                let protect = Protection {
                    sinks: *sinks,
                    recent: recent.count(keep),
                };
                per_head(&mut |h| {
                    Ok(select::select_top_k(
                        &acc.scores(layer, h).map_err(gate_error)?,
                        keep,
                        &protect,
                    ))
                })
            }
            Scorer::Tova { sinks } => {
                // The current query's attention averaged over every head of the layer; TOVA keeps
                // the same tokens in every head, so the heads' entries are aligned.
                let sums = outcome.prob_sums.as_ref().ok_or_else(missing)?;
                let n = sums[0].len();
                let mut mean = vec![0f32; n];
                for s in sums.iter().filter(|s| s.len() == n) {
                    mean.iter_mut()
                        .zip(s)
                        .for_each(|(m, v)| *m += v / heads as f32);
                }
                let protect = Protection {
                    sinks: *sinks,
                    recent: 0,
                };
                let mask = select::select_top_k(&mean, keep, &protect);
                per_head(&mut |_| Ok(mask.clone()))
            }
            Scorer::SnapKv { window, kernel, .. } => {
                let sums = outcome.prob_sums.as_ref().ok_or_else(missing)?;
                per_head(&mut |h| {
                    score::snapkv_keep(&sums[h], *window, keep, *kernel).map_err(gate_error)
                })
            }
            Scorer::KNorm { protect } => {
                let head_dim = self.head_dim;
                per_head(&mut |h| {
                    let keys = kv.read_head(layer, h).keys;
                    let scores = score::key_norm_scores(&keys, head_dim).map_err(gate_error)?;
                    Ok(select::select_top_k(&scores, keep, protect))
                })
            }
            Scorer::Nacl { config, seed } => {
                let proxy = nacl_proxy_sums(layer, config, outcome)?;
                per_head(&mut |h| {
                    let plan = config
                        .plan(kv.retained(layer, h), Some(keep))
                        .map_err(gate_error)?;
                    Ok(score::nacl_keep(
                        &proxy[h],
                        &plan,
                        score::seed_for(*seed, layer, h),
                    ))
                })
            }
        }
    }
}

/// NACL's proxy scores: attention of the last `proxy_frac` of this prefill's queries over every
/// retained key of `layer`, non-causal, summed over the proxy queries, group mean per KV head.
fn nacl_proxy_sums(
    layer: usize,
    config: &NaclConfig,
    outcome: &AttentionOutcome<'_>,
) -> model_zoo::Result<Vec<Vec<f32>>> {
    let n = outcome.positions.len();
    let p = config.proxy_count(n).clamp(1, n);
    let row = outcome.queries.len() / n;
    let mut opts = AttendOptions::new(outcome.scale);
    opts.causal = false;
    opts.prob_sums = Some(0..p);
    let out = outcome.kv.attend(
        layer,
        &outcome.queries[(n - p) * row..],
        &outcome.positions[n - p..],
        &opts,
    )?;
    out.prob_sums
        .ok_or_else(|| ModelError::Input("eviction: no NACL proxy scores".into()))
}

impl LayerHook for ScoredHook {
    fn begin_pass(&mut self, pass: Pass) {
        self.pass = pass;
    }

    fn min_final_chunk(&self, prompt_len: usize) -> usize {
        match &self.scorer {
            Scorer::SnapKv { window, .. } => *window,
            Scorer::Nacl { config, .. } => config.proxy_count(prompt_len),
            _ => 1,
        }
    }

    fn plan(
        &mut self,
        _layer: usize,
        _normed: &candle_core::Tensor,
        positions: &[u32],
        _kv: &SequenceKv,
    ) -> model_zoo::Result<LayerPlan> {
        Ok(LayerPlan {
            prob_rows: self.prob_rows(positions.len()),
            queries: matches!(self.scorer, Scorer::Nacl { .. }) && self.evicts_now(),
            ..LayerPlan::default()
        })
    }

    fn after_attention(
        &mut self,
        layer: usize,
        outcome: AttentionOutcome<'_>,
    ) -> model_zoo::Result<()> {
        if let (Scorer::H2o { acc, .. }, Some(sums)) = (&mut self.scorer, &outcome.prob_sums) {
            let queries = outcome.positions.len();
            for (head, head_sums) in sums.iter().enumerate() {
                acc.add(layer, head, head_sums, queries)
                    .map_err(gate_error)?;
            }
        }
        if !self.evicts_now() {
            return Ok(());
        }
        let tokens_seen = outcome.positions.last().map_or(0, |&p| p as usize + 1);
        let keep = self.keep_count(layer, tokens_seen)?;
        let heads = outcome.kv.n_kv_heads();
        if (0..heads).all(|h| outcome.kv.retained(layer, h) <= keep) {
            return Ok(());
        }
        let masks = self.layer_masks(layer, keep, tokens_seen, &outcome)?;
        for (head, mask) in masks.iter().enumerate() {
            if mask.iter().all(|&k| k) {
                continue;
            }
            if let Scorer::H2o { acc, .. } = &mut self.scorer {
                acc.retain(layer, head, mask).map_err(gate_error)?;
            }
            outcome.kv.evict(layer, head, mask)?;
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        match &self.scorer {
            Scorer::H2o { acc, .. } => acc.bytes(),
            _ => 0,
        }
    }
}
