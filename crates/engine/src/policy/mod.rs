//! Eviction policies by name and parameters (`Policy`), validated against the model, each
//! building the `LayerHook` that steers one session's decoder.
//!
//! Budgets are per (layer, KV head): `--evict r` keeps `round((1 - r) * T)` of the `T` tokens a
//! head has seen, `--keep k` keeps `k`. One-shot policies (SnapKV, PyramidKV, KNorm, NACL)
//! compress once, at the end of a *context* prefill ([`model_zoo::PrefillKind::Context`]), and
//! keep everything fed after it (a question, generated tokens); continuous ones (Random,
//! StreamingLLM, H2O, TOVA) evict once at the end of every prefill, with statistics over the
//! whole prefill, then after every generated token, keeping each head within its budget;
//! Attention-Gate evicts by its flags inside the prefill too (threshold mode), or whenever a
//! head exceeds its budget (budget mode).

mod ag;
mod error;
mod gates;
mod kind;
mod options;
mod prefill_stats;
pub(crate) mod scored;
mod spec;

use std::sync::Arc;

use gate_core::gate::AttentionGate;
use gate_core::score::NaclConfig;
use gate_core::select::{Budget, Protection};
use model_zoo::{LayerHook, ModelConfig};

use crate::error::Result;

pub use ag::{AgMode, Thresholds};
pub use error::PolicyError;
pub use gates::{default_gates, write_gates};
pub use kind::{PolicyKind, UnknownPolicy};
pub use options::{OptionKey, PolicyOptions};
pub(crate) use prefill_stats::PrefillStats;
pub use spec::{PolicySpec, Setting};

/// H2O's share of the budget kept for the most recent tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Recent {
    /// This fraction of the budget.
    Fraction(f32),
    /// This many tokens (at most the budget).
    Tokens(usize),
}

impl Recent {
    /// Recent tokens protected within a budget of `keep`.
    pub fn count(self, keep: usize) -> usize {
        match self {
            Recent::Fraction(f) => (f * keep as f32).round() as usize,
            Recent::Tokens(n) => n.min(keep),
        }
    }
}

/// An eviction policy and its parameters.
#[derive(Clone, Debug)]
pub enum Policy {
    /// Keep everything.
    Full,
    /// Uniform random scores, top-k per head (the floor).
    Random {
        /// Per-head budget.
        budget: Budget,
        /// Always-kept first and last tokens.
        protect: Protection,
        /// Seed of the scores.
        seed: u64,
    },
    /// StreamingLLM: the first `sinks` tokens and a sliding window of the most recent.
    Streaming {
        /// Per-head budget (sinks included).
        budget: Budget,
        /// Attention sinks.
        sinks: usize,
    },
    /// H2O: accumulated attention (heavy hitters) plus the most recent tokens.
    H2o {
        /// Per-head budget.
        budget: Budget,
        /// How many of the budget's tokens are the most recent ones.
        recent: Recent,
        /// Protected first tokens.
        sinks: usize,
        /// Score by the mean attention per query that saw the token instead of the sum.
        normalise: bool,
    },
    /// TOVA: drop the token the current query attends least to (averaged over the layer's heads).
    Tova {
        /// Per-head budget.
        budget: Budget,
        /// Protected first tokens.
        sinks: usize,
    },
    /// SnapKV: attention of the last `window` prompt queries, pooled; once per prefill.
    SnapKv {
        /// Per-head budget (the window included).
        budget: Budget,
        /// Observation window (queries), also always kept.
        window: usize,
        /// Pooling kernel.
        kernel: usize,
    },
    /// PyramidKV: SnapKV scores with budgets falling linearly with depth.
    PyramidKv {
        /// Average per-head budget.
        budget: Budget,
        /// Observation window.
        window: usize,
        /// Pooling kernel.
        kernel: usize,
        /// Ratio of the largest to the smallest layer budget's share.
        beta: f32,
    },
    /// KNorm: keep the keys with the lowest L2 norm; once per prefill.
    KNorm {
        /// Per-head budget.
        budget: Budget,
        /// Always-kept first and last tokens.
        protect: Protection,
    },
    /// NACL: proxy-token attention (the last 1% of the prompt, non-causal) plus seeded random
    /// sampling; once per context prefill.
    Nacl {
        /// Per-head budget; `None`: the released defaults (fractions of the prompt, no eviction
        /// below `config.min_len` tokens).
        budget: Option<Budget>,
        /// Fractions of the prompt (proxy queries, sinks, recent, Kp:Kr).
        config: NaclConfig,
        /// Seed of the sampling.
        seed: u64,
    },
    /// Attention-Gate: learned per-token, per-head keep flags.
    Ag {
        /// The gates.
        gates: Arc<AttentionGate>,
        /// Threshold (in-context eviction by flags, with one threshold or one per layer) or
        /// budget (top-k by keep probability).
        mode: AgMode,
        /// Whether generated tokens are flagged too (else all kept).
        decode: bool,
        /// Always-kept sinks and local window.
        protect: Protection,
    },
}

impl Policy {
    /// Which policy this is.
    pub fn kind(&self) -> PolicyKind {
        match self {
            Policy::Full => PolicyKind::Full,
            Policy::Random { .. } => PolicyKind::Random,
            Policy::Streaming { .. } => PolicyKind::Streaming,
            Policy::H2o { .. } => PolicyKind::H2o,
            Policy::Tova { .. } => PolicyKind::Tova,
            Policy::SnapKv { .. } => PolicyKind::SnapKv,
            Policy::PyramidKv { .. } => PolicyKind::PyramidKv,
            Policy::KNorm { .. } => PolicyKind::KNorm,
            Policy::Nacl { .. } => PolicyKind::Nacl,
            Policy::Ag { .. } => PolicyKind::Ag,
        }
    }

    /// The policy's name as users write it.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// Bytes of the policy's own parameters one decode step reads: Attention-Gate's gates
    /// (every layer's projections as held, and read-outs; the gate runs at every step, decode
    /// flags on or off); none for the others.
    pub fn decode_weight_bytes(&self) -> crate::Result<usize> {
        match self {
            Policy::Ag { gates, .. } => Ok(gates.decode_weight_bytes()?),
            _ => Ok(0),
        }
    }

    /// The per-head budget, if the policy has one.
    pub fn budget(&self) -> Option<Budget> {
        match self {
            Policy::Full => None,
            Policy::Ag {
                mode: AgMode::Threshold(_),
                ..
            } => None,
            Policy::Ag {
                mode: AgMode::Budget(b),
                ..
            } => Some(*b),
            Policy::Random { budget, .. }
            | Policy::Streaming { budget, .. }
            | Policy::H2o { budget, .. }
            | Policy::Tova { budget, .. }
            | Policy::SnapKv { budget, .. }
            | Policy::PyramidKv { budget, .. }
            | Policy::KNorm { budget, .. } => Some(*budget),
            Policy::Nacl { budget, .. } => *budget,
        }
    }

    /// The most entries a KV head holds after any forward pass of a session that has seen
    /// `tokens_seen` tokens, for policies that evict after every pass (`None`: one-shot
    /// policies, Attention-Gate in threshold mode and the full cache, whose heads may grow).
    pub fn retained_cap(&self, tokens_seen: usize) -> Option<usize> {
        match self {
            Policy::Random { budget, .. }
            | Policy::Streaming { budget, .. }
            | Policy::H2o { budget, .. }
            | Policy::Tova { budget, .. }
            | Policy::Ag {
                mode: AgMode::Budget(budget),
                ..
            } => Some(budget.keep_count(tokens_seen).max(1)),
            _ => None,
        }
    }

    /// Whether a session under this policy can start from a [`crate::SharedContext`]: every
    /// policy whose prefill is a full-cache prefill followed by one eviction at its end (all but
    /// Attention-Gate, whose flags act inside the prefill).
    pub fn shares_context(&self) -> bool {
        !matches!(self, Policy::Ag { .. })
    }

    /// Checks the parameters against the model; errors name the parameter and value.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let out_of_range = |setting, what, value: &dyn std::fmt::Display, expected| {
            Err(PolicyError::OutOfRange {
                setting,
                what,
                value: value.to_string(),
                expected,
            }
            .into())
        };
        if let Some(budget) = self.budget() {
            budget.validate().map_err(PolicyError::from)?;
        }
        self.check_protection_fits()?;
        match self {
            Policy::H2o {
                recent: Recent::Fraction(f),
                ..
            } if !(0.0..=1.0).contains(f) => {
                out_of_range(None, "H2O recent fraction", f, "in [0, 1]")
            }
            Policy::SnapKv { window: 0, .. } | Policy::PyramidKv { window: 0, .. } => out_of_range(
                Some(Setting::Window),
                "SnapKV observation window",
                &0,
                "> 0",
            ),
            Policy::SnapKv { kernel, .. } | Policy::PyramidKv { kernel, .. } if kernel % 2 == 0 => {
                out_of_range(None, "SnapKV pooling kernel", kernel, "odd")
            }
            Policy::PyramidKv { beta, .. } if beta.is_nan() || *beta < 1.0 => {
                out_of_range(None, "PyramidKV beta", beta, ">= 1")
            }
            Policy::Nacl { config, .. } => Ok(config.validate().map_err(PolicyError::from)?),
            Policy::Ag { gates, mode, .. } => {
                if let Some(why) = cfg.gate_shape_mismatch(gates.config()) {
                    return Err(PolicyError::GatesDoNotFit(why).into());
                }
                match mode {
                    AgMode::Threshold(thresholds) => check_thresholds(thresholds, cfg),
                    AgMode::Budget(_) => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// Protected tokens count toward the budget, and the budget is never exceeded; so with a
    /// fixed budget (`keep`) what a policy always keeps must fit in it, or "always kept"
    /// would silently not hold: StreamingLLM needs room for its window beside the sinks
    /// (`sinks < keep`), the other policies at most `keep` protected tokens (`sinks + recent`,
    /// or SnapKV's and PyramidKV's observation window). A ratio budget (`evict`) follows the
    /// prompt's length; while it is below the protection (a short prompt), the budget wins and
    /// the oldest protected tokens are kept first (docs/policies.md).
    fn check_protection_fits(&self) -> Result<()> {
        use Setting::{Recent as R, Sinks, Window};
        let Some(Budget::Keep(keep)) = self.budget() else {
            return Ok(());
        };
        let (protected, needed, by): (usize, usize, &'static [Setting]) = match self {
            Policy::Streaming { sinks, .. } => (*sinks, sinks.saturating_add(1), &[Sinks]),
            Policy::Random { protect, .. }
            | Policy::KNorm { protect, .. }
            | Policy::Ag { protect, .. } => {
                let n = protect.sinks.saturating_add(protect.recent);
                (n, n, &[Sinks, R])
            }
            Policy::H2o { recent, sinks, .. } => {
                let recent = match recent {
                    Recent::Tokens(w) => *w,
                    Recent::Fraction(_) => recent.count(keep),
                };
                let n = sinks.saturating_add(recent);
                (n, n, &[Sinks, R])
            }
            Policy::Tova { sinks, .. } => (*sinks, *sinks, &[Sinks]),
            Policy::SnapKv { window, .. } | Policy::PyramidKv { window, .. } => {
                (*window, *window, &[Window])
            }
            _ => return Ok(()),
        };
        if needed <= keep {
            return Ok(());
        }
        Err(PolicyError::ProtectionExceedsBudget {
            policy: self.kind(),
            keep,
            protected,
            by,
        }
        .into())
    }

    /// A fresh hook for one session (the policy must have passed [`Policy::validate`]).
    pub fn hook(&self, cfg: &ModelConfig) -> Result<Box<dyn LayerHook + Send>> {
        Ok(match self {
            Policy::Full => Box::new(model_zoo::KeepAll),
            Policy::Ag {
                gates,
                mode,
                decode,
                protect,
            } => Box::new(ag::AgHook::new(
                gates.clone(),
                mode.clone(),
                *decode,
                *protect,
                cfg,
            )),
            other => Box::new(scored::ScoredHook::new(other, cfg)?),
        })
    }
}

/// Threshold mode's thresholds: a list holds one per model layer, each threshold is in
/// `[0, 1]`; errors name the setting that gave them (`threshold` or `layer_thresholds`).
fn check_thresholds(thresholds: &Thresholds, cfg: &ModelConfig) -> Result<()> {
    if let Thresholds::PerLayer(list) = thresholds {
        if list.len() != cfg.n_layers {
            return Err(PolicyError::LayerCount {
                given: list.len(),
                layers: cfg.n_layers,
            }
            .into());
        }
    }
    let values = thresholds.values();
    let Some(layer) = values.iter().position(|t| !(0.0..=1.0).contains(t)) else {
        return Ok(());
    };
    let value = match thresholds {
        Thresholds::Uniform(t) => t.to_string(),
        Thresholds::PerLayer(_) => format!("{} in layer {layer}", values[layer]),
    };
    Err(PolicyError::OutOfRange {
        setting: Some(thresholds.setting()),
        what: "gate threshold",
        value,
        expected: "in [0, 1]",
    }
    .into())
}
