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
mod gates;
mod options;
pub(crate) mod scored;
mod spec;

use std::sync::Arc;

use gate_core::gate::AttentionGate;
use gate_core::score::NaclConfig;
use gate_core::select::{Budget, Protection};
use model_zoo::{LayerHook, ModelConfig};

use crate::error::{EngineError, Result};

pub use ag::AgMode;
pub use gates::{default_gates, write_gates};
pub use options::{OptionKey, PolicyOptions};
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
        /// Threshold (in-context eviction by flags) or budget (top-k by keep probability).
        mode: AgMode,
        /// Whether generated tokens are flagged too (else all kept).
        decode: bool,
        /// Always-kept sinks and local window.
        protect: Protection,
    },
}

impl Policy {
    /// Every policy name, as the CLI spells it.
    pub const NAMES: [&'static str; 10] = [
        "full",
        "ag",
        "random",
        "streaming",
        "h2o",
        "tova",
        "snapkv",
        "pyramidkv",
        "knorm",
        "nacl",
    ];

    /// The policy's name as the CLI spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Full => "full",
            Policy::Random { .. } => "random",
            Policy::Streaming { .. } => "streaming",
            Policy::H2o { .. } => "h2o",
            Policy::Tova { .. } => "tova",
            Policy::SnapKv { .. } => "snapkv",
            Policy::PyramidKv { .. } => "pyramidkv",
            Policy::KNorm { .. } => "knorm",
            Policy::Nacl { .. } => "nacl",
            Policy::Ag { .. } => "ag",
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
        let fraction = |name: &str, v: f32| -> Result<()> {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(EngineError::Invalid(format!(
                    "{name} must be in [0, 1], got {v}"
                )))
            }
        };
        if let Some(budget) = self.budget() {
            budget
                .validate()
                .map_err(|e| EngineError::Invalid(e.to_string()))?;
        }
        self.check_protection_fits()?;
        match self {
            Policy::H2o {
                recent: Recent::Fraction(f),
                ..
            } => fraction("H2O recent fraction", *f)?,
            Policy::SnapKv { window, kernel, .. } | Policy::PyramidKv { window, kernel, .. }
                if *window == 0 || kernel % 2 == 0 =>
            {
                return Err(EngineError::Invalid(format!(
                    "SnapKV window must be > 0 and the pooling kernel odd, got window {window}, kernel {kernel}"
                )));
            }
            Policy::Nacl { config, .. } => config
                .validate()
                .map_err(|e| EngineError::Invalid(e.to_string()))?,
            Policy::Ag { gates, mode, .. } => {
                if let Some(why) = cfg.gate_shape_mismatch(gates.config()) {
                    return Err(EngineError::Invalid(why));
                }
                if let AgMode::Threshold(t) = mode {
                    if !(0.0..=1.0).contains(t) {
                        return Err(EngineError::Invalid(format!(
                            "gate threshold must be in [0, 1], got {t}"
                        )));
                    }
                }
            }
            _ => {}
        }
        if let Policy::PyramidKv { beta, .. } = self {
            if beta.is_nan() || *beta < 1.0 {
                return Err(EngineError::Invalid(format!(
                    "PyramidKV beta must be >= 1, got {beta}"
                )));
            }
        }
        Ok(())
    }

    /// Protected tokens count toward the budget, and the budget is never exceeded; so with a
    /// fixed budget (`--keep K`) what a policy always keeps must fit in it, or "always kept"
    /// would silently not hold: StreamingLLM needs room for its window beside the sinks
    /// (`sinks < K`), the other policies at most `K` protected tokens (`sinks + recent`, or
    /// SnapKV's and PyramidKV's observation window). A ratio
    /// budget (`--evict`) follows the prompt's length; while it is below the protection (a short
    /// prompt), the budget wins and the oldest protected tokens are kept first
    /// (docs/policies.md).
    fn check_protection_fits(&self) -> Result<()> {
        let Some(Budget::Keep(keep)) = self.budget() else {
            return Ok(());
        };
        let protected = |sinks: usize, recent: usize| sinks.saturating_add(recent);
        let (needed, what) = match self {
            Policy::Streaming { sinks, .. } => (
                sinks.saturating_add(1),
                format!("its {sinks} --sinks leave no room for a window"),
            ),
            Policy::Random { protect, .. }
            | Policy::KNorm { protect, .. }
            | Policy::Ag { protect, .. } => {
                let n = protected(protect.sinks, protect.recent);
                (
                    n,
                    format!("its {n} always-kept tokens (--sinks + --window) do not fit"),
                )
            }
            Policy::H2o { recent, sinks, .. } => {
                let recent = match recent {
                    Recent::Tokens(w) => *w,
                    Recent::Fraction(_) => recent.count(keep),
                };
                let n = protected(*sinks, recent);
                (
                    n,
                    format!("its {n} always-kept tokens (--sinks + recent --window) do not fit"),
                )
            }
            Policy::Tova { sinks, .. } => (*sinks, format!("its {sinks} --sinks do not fit")),
            Policy::SnapKv { window, .. } | Policy::PyramidKv { window, .. } => (
                *window,
                format!("its observation window of {window} tokens (--window) does not fit"),
            ),
            _ => return Ok(()),
        };
        if needed <= keep {
            return Ok(());
        }
        Err(EngineError::Invalid(format!(
            "{} keeps at most --keep {keep} tokens per head, and {what}: protected tokens count \
             toward the budget (lower them or raise --keep)",
            self.name()
        )))
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
                *mode,
                *decode,
                *protect,
                cfg,
            )),
            other => Box::new(scored::ScoredHook::new(other, cfg)?),
        })
    }
}
