//! The hook behind every score-based baseline (Random, StreamingLLM, H2O, TOVA, SnapKV,
//! PyramidKV, KNorm, NACL), and the statistics recorder of a [`crate::SharedContext`].
//!
//! When each policy evicts (the reference implementations' rules):
//! - one-shot policies (SnapKV, PyramidKV, KNorm, NACL) compress once, at the end of a *context*
//!   prefill ([`PrefillKind::Context`]); what is fed after it (a question, the rest of a chat
//!   turn, scored continuations, generated tokens) is never touched;
//! - continuous policies (Random, StreamingLLM, H2O, TOVA) evict once at the end of every
//!   prefill, with statistics over the whole prefill, then after every generated token.
//!
//! No policy evicts between the chunks of a prefill, so what is kept does not depend on the
//! prefill chunk size. Statistics: H2O accumulates the attention every query gives every
//! retained entry (all passes); SnapKV/PyramidKV (the last `w` queries), NACL (the last
//! `proxy_frac` of the prefill, non-causal) and TOVA (the last query) attend again, at the
//! prefill's end, from the prefill's last queries of the layer, which a rolling [`QueryTail`]
//! keeps across chunks.
//!
//! Invariants: after a triggered eviction every (layer, head) holds exactly
//! `min(retained, budget)` entries; H2O's sums are compacted in step with the store; the
//! end-of-prefill eviction of a layer depends only on that layer's store, the prefill's last
//! queries of that layer, H2O's sums and the prefill's length — so [`ScoredHook::after_shared_context`],
//! fed the same inputs recorded once by a [`ContextRecorder`] during a full-cache prefill, makes
//! exactly the eviction a fresh session would. A pass that fails before it commits leaves the
//! statistics as they were (the first chunk of a prefill keeps what it replaced until its pass
//! commits; `abort_pass` puts it back): a failed step does not change the policy's state.

use gate_core::score::{self, NaclConfig};
use gate_core::select::{self, Budget, Protection};
use kv_store::SequenceKv;
use model_zoo::{
    AttentionOutcome, LayerHook, LayerPlan, ModelConfig, ModelError, Pass, PrefillKind,
};

use super::prefill_stats::{PrefillStats, QueryTail};
use super::{Policy, Recent};

/// When a policy evicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    /// Once, at the end of every context prefill; everything fed after it is kept.
    ContextEnd,
    /// At the end of every prefill and after every generated token.
    EveryStep,
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

/// Where an eviction happens, with the statistics available there.
enum EvictAt<'a> {
    /// The end of a prefill: the prefill's last queries of the layer.
    PrefillEnd(&'a QueryTail),
    /// After a generated token: that token's attention, when the plan asked for it.
    Decode(Option<&'a [Vec<f32>]>),
}

pub(crate) struct ScoredHook {
    scorer: Scorer,
    trigger: Trigger,
    /// `None`: NACL's released defaults (fractions of the prompt).
    budget: Option<Budget>,
    n_layers: usize,
    head_dim: usize,
    pass: Pass,
    stats: PrefillStats,
}

/// How a scored policy evicts: its scorer, when, to what budget, and (H2O) whether its
/// accumulated scores are normalised.
type ScorerPlan = (Scorer, Trigger, Option<Budget>, Option<bool>);

/// The plan of a policy that evicts at every step (random, StreamingLLM, H2O, TOVA).
fn every_step_plan(policy: &Policy) -> Option<ScorerPlan> {
    let (scorer, budget, normalise) = match policy {
        Policy::Random {
            budget,
            protect,
            seed,
        } => (
            Scorer::Random {
                seed: *seed,
                protect: *protect,
            },
            budget,
            None,
        ),
        Policy::Streaming { budget, sinks } => (Scorer::Streaming { sinks: *sinks }, budget, None),
        Policy::H2o {
            budget,
            recent,
            sinks,
            normalise,
        } => (
            Scorer::H2o {
                recent: *recent,
                sinks: *sinks,
            },
            budget,
            Some(*normalise),
        ),
        Policy::Tova { budget, sinks } => (Scorer::Tova { sinks: *sinks }, budget, None),
        _ => return None,
    };
    Some((scorer, Trigger::EveryStep, Some(*budget), normalise))
}

/// The plan of a policy that evicts once, at the end of the context (SnapKV, PyramidKV,
/// K-norm, NACL).
fn context_end_plan(policy: &Policy) -> Option<ScorerPlan> {
    let (scorer, budget) = match policy {
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
            Some(*budget),
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
            Some(*budget),
        ),
        Policy::KNorm { budget, protect } => (Scorer::KNorm { protect: *protect }, Some(*budget)),
        Policy::Nacl {
            budget,
            config,
            seed,
        } => (
            Scorer::Nacl {
                config: *config,
                seed: *seed,
            },
            *budget,
        ),
        _ => return None,
    };
    Some((scorer, Trigger::ContextEnd, budget, None))
}

/// TOVA's one mask for every KV head of `layer`: the current query's attention averaged over
/// the layer's heads (TOVA keeps the same tokens in every head, so the heads' entries are
/// aligned), its top `keep_n` kept after the first `sinks`.
fn tova_mask(
    at: EvictAt<'_>,
    kv: &SequenceKv,
    layer: usize,
    keep_n: usize,
    sinks: usize,
) -> model_zoo::Result<Vec<bool>> {
    let heads = kv.n_kv_heads();
    let sums = match at {
        EvictAt::PrefillEnd(tail) => tail.attention(kv, layer, 1, true)?,
        EvictAt::Decode(Some(sums)) => sums.to_vec(),
        EvictAt::Decode(None) => {
            return Err(ModelError::Input(
                "eviction: the decoder returned no attention statistics".into(),
            ))
        }
    };
    let n = sums[0].len();
    let mut mean = vec![0f32; n];
    for s in sums.iter().filter(|s| s.len() == n) {
        mean.iter_mut()
            .zip(s)
            .for_each(|(m, v)| *m += v / heads as f32);
    }
    let protect = Protection { sinks, recent: 0 };
    Ok(select::select_top_k(&mean, keep_n, &protect))
}

impl ScoredHook {
    pub(crate) fn new(policy: &Policy, cfg: &ModelConfig) -> model_zoo::Result<Self> {
        let Some((scorer, trigger, budget, normalise)) =
            every_step_plan(policy).or_else(|| context_end_plan(policy))
        else {
            return Err(ModelError::Input(format!(
                "policy {} has no scored hook",
                policy.name()
            )));
        };
        let mut stats = PrefillStats::new(cfg, normalise.is_some())?;
        stats.h2o = stats
            .h2o
            .map(|acc| acc.with_normalise(normalise.unwrap_or(false)));
        Ok(ScoredHook {
            scorer,
            trigger,
            budget,
            n_layers: cfg.n_layers,
            head_dim: cfg.head_dim,
            pass: Pass::Decode,
            stats,
        })
    }

    /// A hook for `policy` continuing from a shared context: it makes, on `kv` (a fork of the
    /// context's full cache), exactly the eviction a fresh session of the policy makes at the
    /// end of prefilling the same tokens as context, from the same statistics (`recorded`, by a
    /// [`ContextRecorder`] that was given this policy).
    pub(crate) fn after_shared_context(
        policy: &Policy,
        cfg: &ModelConfig,
        kv: &mut SequenceKv,
        recorded: &PrefillStats,
        tokens_seen: usize,
    ) -> model_zoo::Result<Self> {
        let mut hook = Self::new(policy, cfg)?;
        if let Some(acc) = &mut hook.stats.h2o {
            let sums = recorded.h2o.as_ref().ok_or_else(|| {
                ModelError::Input("the shared context recorded no H2O statistics".into())
            })?;
            *acc = sums.clone().with_normalise(acc.normalised());
        }
        hook.stats.prefill_len = recorded.prefill_len;
        hook.stats.tail_rows = hook.tail_rows(recorded.prefill_len);
        if hook.stats.tail_rows > recorded.tail_rows {
            return Err(ModelError::Input(format!(
                "the shared context recorded {} queries per layer; {} needs {}",
                recorded.tail_rows,
                policy.name(),
                hook.stats.tail_rows
            )));
        }
        if hook.evicts_at_prefill_end(PrefillKind::Context) {
            for (layer, tail) in recorded.tails.iter().enumerate() {
                hook.evict_layer(layer, kv, EvictAt::PrefillEnd(tail), tokens_seen)?;
            }
        }
        Ok(hook)
    }

    /// Query rows the scorer attends from at the end of a prefill of `len` tokens.
    fn tail_rows(&self, len: usize) -> usize {
        match &self.scorer {
            Scorer::SnapKv { window, .. } => *window,
            Scorer::Nacl { config, .. } => config.proxy_count(len),
            Scorer::Tova { .. } => 1,
            _ => 0,
        }
        .min(len)
    }

    /// Whether the policy evicts at the end of a prefill of this kind.
    fn evicts_at_prefill_end(&self, kind: PrefillKind) -> bool {
        self.trigger == Trigger::EveryStep || kind == PrefillKind::Context
    }

    /// The budget of one head of `layer` after `tokens_seen` tokens (`None`: NACL's released
    /// defaults, which size themselves).
    fn keep_count(&self, layer: usize, tokens_seen: usize) -> model_zoo::Result<Option<usize>> {
        let Some(budget) = self.budget else {
            return Ok(None);
        };
        let keep = budget.keep_count(tokens_seen).max(1);
        Ok(Some(match &self.scorer {
            Scorer::SnapKv {
                window,
                beta: Some(beta),
                ..
            } => select::pyramid_budgets(keep, *window, self.n_layers, *beta, tokens_seen)?[layer]
                .max(1),
            _ => keep,
        }))
    }

    /// Evicts `layer`'s heads down to their budget.
    fn evict_layer(
        &mut self,
        layer: usize,
        kv: &mut SequenceKv,
        at: EvictAt<'_>,
        tokens_seen: usize,
    ) -> model_zoo::Result<()> {
        let keep = self.keep_count(layer, tokens_seen)?;
        let heads = kv.n_kv_heads();
        if let Some(k) = keep {
            if (0..heads).all(|h| kv.retained(layer, h) <= k) {
                return Ok(());
            }
        }
        let masks = self.layer_masks(layer, keep, tokens_seen, kv, at)?;
        for (head, mask) in masks.iter().enumerate() {
            if mask.iter().all(|&k| k) {
                continue;
            }
            kv.evict(layer, head, mask)?;
            if let Some(acc) = &mut self.stats.h2o {
                acc.retain(layer, head, mask)?;
            }
        }
        Ok(())
    }

    /// The keep masks of every head of `layer`, each keeping `keep` entries (NACL's released
    /// defaults: its own counts).
    fn layer_masks(
        &self,
        layer: usize,
        keep: Option<usize>,
        tokens_seen: usize,
        kv: &SequenceKv,
        at: EvictAt<'_>,
    ) -> model_zoo::Result<Vec<Vec<bool>>> {
        let heads = kv.n_kv_heads();
        let keep_n = keep.unwrap_or(usize::MAX);
        let per_head =
            |f: &mut dyn FnMut(usize) -> model_zoo::Result<Vec<bool>>| (0..heads).map(f).collect();
        let needs_tail = || match at {
            EvictAt::PrefillEnd(tail) => Ok(tail),
            EvictAt::Decode(_) => Err(ModelError::Input(
                "eviction: this policy evicts only at a prefill's end".into(),
            )),
        };
        match &self.scorer {
            Scorer::Random { seed, protect } => {
                let seed = seed.wrapping_add(tokens_seen as u64);
                per_head(&mut |h| {
                    let scores = score::random_scores(
                        kv.retained(layer, h),
                        score::seed_for(seed, layer, h),
                    );
                    Ok(select::select_top_k(&scores, keep_n, protect))
                })
            }
            Scorer::Streaming { sinks } => {
                per_head(&mut |h| Ok(score::streaming_keep(kv.retained(layer, h), *sinks, keep_n)))
            }
            Scorer::H2o { recent, sinks } => {
                let acc = self.stats.h2o.as_ref().ok_or_else(|| {
                    ModelError::Input("eviction: H2O has no accumulated attention".into())
                })?;
                let protect = Protection {
                    sinks: *sinks,
                    recent: recent.count(keep_n),
                };
                per_head(&mut |h| {
                    Ok(select::select_top_k(
                        &acc.scores(layer, h)?,
                        keep_n,
                        &protect,
                    ))
                })
            }
            Scorer::Tova { sinks } => {
                let mask = tova_mask(at, kv, layer, keep_n, *sinks)?;
                per_head(&mut |_| Ok(mask.clone()))
            }
            Scorer::SnapKv { window, kernel, .. } => {
                let rows = self.tail_rows(self.stats.prefill_len);
                let sums = needs_tail()?.attention(kv, layer, rows, true)?;
                per_head(&mut |h| Ok(score::snapkv_keep(&sums[h], *window, keep_n, *kernel)?))
            }
            Scorer::KNorm { protect } => {
                let head_dim = self.head_dim;
                per_head(&mut |h| {
                    let keys = kv.read_head(layer, h).keys;
                    let scores = score::key_norm_scores(&keys, head_dim)?;
                    Ok(select::select_top_k(&scores, keep_n, protect))
                })
            }
            Scorer::Nacl { config, seed } => {
                // Proxy queries: the last `proxy_frac` of the prefill, attending non-causally.
                let rows = self.tail_rows(self.stats.prefill_len);
                let proxy = needs_tail()?.attention(kv, layer, rows, false)?;
                per_head(&mut |h| {
                    let plan = config.plan(kv.retained(layer, h), keep)?;
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

impl LayerHook for ScoredHook {
    fn begin_pass(&mut self, pass: Pass) {
        self.pass = pass;
        let rows = match pass {
            Pass::Prefill(chunk) if self.evicts_at_prefill_end(chunk.kind) => {
                self.tail_rows(chunk.len)
            }
            _ => 0,
        };
        self.stats.begin(pass, rows);
    }

    fn plan(
        &mut self,
        _layer: usize,
        _normed: &candle_core::Tensor,
        positions: &[u32],
        _kv: &SequenceKv,
    ) -> model_zoo::Result<LayerPlan> {
        let n = positions.len();
        let prob_rows = match (&self.scorer, self.pass) {
            (Scorer::Tova { .. }, Pass::Decode) => Some(n - 1..n),
            _ => self.stats.prob_rows(n),
        };
        Ok(LayerPlan {
            prob_rows,
            queries: self.stats.wants_queries(self.pass),
            ..LayerPlan::default()
        })
    }

    fn after_attention(
        &mut self,
        layer: usize,
        outcome: AttentionOutcome<'_>,
    ) -> model_zoo::Result<()> {
        self.stats.commit();
        let chunk = match self.pass {
            Pass::Prefill(chunk) => Some(chunk),
            Pass::Decode => None,
        };
        self.stats.record(layer, &outcome, chunk.is_some())?;
        let tokens_seen = outcome.positions.last().map_or(0, |&p| p as usize + 1);
        match chunk {
            Some(c) if c.is_last() && self.evicts_at_prefill_end(c.kind) => {
                // The tail has served its one eviction: its memory goes now, not at the next prefill.
                let tail = std::mem::take(&mut self.stats.tails[layer]);
                self.evict_layer(layer, outcome.kv, EvictAt::PrefillEnd(&tail), tokens_seen)
            }
            None if self.trigger == Trigger::EveryStep => self.evict_layer(
                layer,
                outcome.kv,
                EvictAt::Decode(outcome.prob_sums.as_deref()),
                tokens_seen,
            ),
            _ => Ok(()),
        }
    }

    fn abort_pass(&mut self) {
        self.stats.abort();
    }

    fn state_bytes(&self) -> usize {
        self.stats.bytes()
    }
}

/// Records, during a shared context's full-cache prefill, what the given policies need for their
/// eviction at its end: the most query rows any of them attends from, and H2O's sums if one of
/// them is H2O. Evicts nothing.
pub(crate) struct ContextRecorder {
    hooks: Vec<ScoredHook>,
    stats: PrefillStats,
    /// The pass running.
    pass: Pass,
}

impl ContextRecorder {
    /// A recorder for `policies` (full and Attention-Gate need nothing and are skipped).
    pub(crate) fn new(policies: &[Policy], cfg: &ModelConfig) -> model_zoo::Result<Self> {
        let hooks = policies
            .iter()
            .filter(|p| !matches!(p, Policy::Full | Policy::Ag { .. }))
            .map(|p| ScoredHook::new(p, cfg))
            .collect::<model_zoo::Result<Vec<_>>>()?;
        let h2o = hooks.iter().any(|h| h.stats.h2o.is_some());
        Ok(ContextRecorder {
            stats: PrefillStats::new(cfg, h2o)?,
            hooks,
            pass: Pass::Decode,
        })
    }

    /// What was recorded.
    pub(crate) fn into_stats(self) -> PrefillStats {
        self.stats
    }
}

impl LayerHook for ContextRecorder {
    fn begin_pass(&mut self, pass: Pass) {
        self.pass = pass;
        let rows = match pass {
            Pass::Prefill(chunk) => self
                .hooks
                .iter()
                .map(|h| h.tail_rows(chunk.len))
                .max()
                .unwrap_or(0),
            Pass::Decode => 0,
        };
        self.stats.begin(pass, rows);
    }

    fn plan(
        &mut self,
        _layer: usize,
        _normed: &candle_core::Tensor,
        positions: &[u32],
        _kv: &SequenceKv,
    ) -> model_zoo::Result<LayerPlan> {
        Ok(LayerPlan {
            prob_rows: self.stats.prob_rows(positions.len()),
            queries: self.stats.wants_queries(self.pass),
            ..LayerPlan::default()
        })
    }

    fn after_attention(
        &mut self,
        layer: usize,
        outcome: AttentionOutcome<'_>,
    ) -> model_zoo::Result<()> {
        self.stats.commit();
        self.stats.record(layer, &outcome, true)
    }

    fn abort_pass(&mut self) {
        self.stats.abort();
    }
}
