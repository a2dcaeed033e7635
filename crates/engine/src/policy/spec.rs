//! `PolicySpec`: a policy named as a user names it (`--policy h2o --evict 0.5 --sinks 4`), with
//! every knob optional, turned into a validated [`Policy`] with the spec's defaults
//! (defined in `docs/algorithms.md`; all listed in `docs/policies.md`), the **\[choice\]** knobs
//! without a flag of their own coming from [`PolicyOptions`].

use std::path::PathBuf;
use std::sync::Arc;

use gate_core::gate::AttentionGate;
use gate_core::score::NaclConfig;
use gate_core::select::{Budget, Protection};

use super::{AgMode, Policy, PolicyError, PolicyKind, PolicyOptions, Recent, Thresholds};
use crate::engine::Engine;
use crate::error::Result;

/// Default eviction ratio of budget policies when neither `--evict` nor `--keep` is given (NACL
/// then runs its released defaults instead).
pub const DEFAULT_EVICT: f32 = 0.5;
/// StreamingLLM's attention sinks.
pub const DEFAULT_SINKS: usize = 4;
/// SnapKV's and PyramidKV's observation window.
pub const DEFAULT_SNAPKV_WINDOW: usize = 32;
/// SnapKV pooling kernel.
pub const DEFAULT_SNAPKV_KERNEL: usize = 5;
/// PyramidKV's beta.
pub const DEFAULT_PYRAMID_BETA: f32 = 20.0;
/// H2O: share of the budget for the most recent tokens (10% heavy + 10% recent in the paper).
pub const DEFAULT_H2O_RECENT: f32 = 0.5;

/// A policy as a user names it; `None` means "the default".
#[derive(Clone, Debug)]
pub struct PolicySpec {
    /// Which policy.
    pub kind: PolicyKind,
    /// Fraction of each head's tokens to evict.
    pub evict: Option<f32>,
    /// Tokens each head keeps.
    pub keep: Option<usize>,
    /// Always-kept first tokens (the attention sinks).
    pub sinks: Option<usize>,
    /// Always-kept most recent tokens: StreamingLLM's window, H2O's recent tokens,
    /// Attention-Gate's local window (a flagged-out token stays visible to the next `recent`
    /// queries), Random's and KNorm's protected tail.
    pub recent: Option<usize>,
    /// SnapKV's and PyramidKV's observation window: the last prompt queries whose attention
    /// scores the prompt (also always kept).
    pub window: Option<usize>,
    /// Attention-Gate checkpoint.
    pub gates: Option<PathBuf>,
    /// Attention-Gate threshold, the same in every layer (default: the checkpoint's).
    pub threshold: Option<f32>,
    /// Attention-Gate threshold of each layer, one per model layer (instead of `threshold`).
    pub layer_thresholds: Option<Vec<f32>>,
    /// Attention-Gate in budget mode instead of threshold mode.
    pub ag_budget_mode: bool,
    /// Attention-Gate flags generated tokens too (default true).
    pub ag_decode: Option<bool>,
    /// Seed of Random and NACL.
    pub seed: Option<u64>,
    /// The \[choice\] knobs (`key=value`); each must apply to this policy.
    pub options: PolicyOptions,
}

/// A setting of a [`PolicySpec`], to say which ones a policy would ignore and to name them in
/// errors ([`super::PolicyError::describe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// `evict` (a ratio of each head's tokens).
    Evict,
    /// `keep` (tokens per head).
    Keep,
    /// `sinks`.
    Sinks,
    /// `recent`.
    Recent,
    /// `window` (SnapKV's observation window).
    Window,
    /// `gates`.
    Gates,
    /// `threshold`.
    Threshold,
    /// `layer_thresholds`.
    LayerThresholds,
    /// `ag_budget_mode`.
    AgBudgetMode,
    /// `ag_decode`.
    AgDecode,
    /// `seed`.
    Seed,
}

impl Setting {
    /// Every setting, in [`PolicySpec`] field order.
    pub const ALL: [Setting; 11] = [
        Setting::Evict,
        Setting::Keep,
        Setting::Sinks,
        Setting::Recent,
        Setting::Window,
        Setting::Gates,
        Setting::Threshold,
        Setting::LayerThresholds,
        Setting::AgBudgetMode,
        Setting::AgDecode,
        Setting::Seed,
    ];

    /// The [`PolicySpec`] field it is.
    pub fn field(self) -> &'static str {
        match self {
            Setting::Evict => "evict",
            Setting::Keep => "keep",
            Setting::Sinks => "sinks",
            Setting::Recent => "recent",
            Setting::Window => "window",
            Setting::Gates => "gates",
            Setting::Threshold => "threshold",
            Setting::LayerThresholds => "layer_thresholds",
            Setting::AgBudgetMode => "ag_budget_mode",
            Setting::AgDecode => "ag_decode",
            Setting::Seed => "seed",
        }
    }
}

impl PolicySpec {
    /// A spec of `kind` with every setting at its default.
    pub fn new(kind: PolicyKind) -> Self {
        PolicySpec {
            kind,
            evict: None,
            keep: None,
            sinks: None,
            recent: None,
            window: None,
            gates: None,
            threshold: None,
            layer_thresholds: None,
            ag_budget_mode: false,
            ag_decode: None,
            seed: None,
            options: PolicyOptions::default(),
        }
    }

    /// Sets what users call the window (`--window`, `kv_window`): the observation window of
    /// SnapKV and PyramidKV, the most recent tokens kept by every other policy.
    pub fn set_window(&mut self, tokens: usize) {
        if self.kind.observes_a_window() {
            self.window = Some(tokens);
        } else {
            self.recent = Some(tokens);
        }
    }

    /// The settings this spec gives (`Some`, or `true` for `ag_budget_mode`) that its policy
    /// does not use: `evict`/`keep` with `full` or Attention-Gate in threshold mode, `gates`
    /// with anything but `ag`, `recent` with StreamingLLM when a budget is given (the window is
    /// the budget minus the sinks), and so on.
    pub fn ignored(&self) -> Vec<Setting> {
        use Setting::*;
        let budget = self.evict.is_some() || self.keep.is_some();
        let used: &[Setting] = match self.kind {
            PolicyKind::Full => &[],
            PolicyKind::Random => &[Evict, Keep, Sinks, Recent, Seed],
            PolicyKind::Streaming if budget => &[Evict, Keep, Sinks],
            PolicyKind::Streaming | PolicyKind::H2o | PolicyKind::KNorm => {
                &[Evict, Keep, Sinks, Recent]
            }
            PolicyKind::Tova => &[Evict, Keep, Sinks],
            PolicyKind::SnapKv | PolicyKind::PyramidKv => &[Evict, Keep, Window],
            PolicyKind::Nacl => &[Evict, Keep, Seed],
            PolicyKind::Ag if self.ag_budget_mode => {
                &[Evict, Keep, Sinks, Recent, Gates, AgBudgetMode, AgDecode]
            }
            PolicyKind::Ag => &[Sinks, Recent, Gates, Threshold, LayerThresholds, AgDecode],
        };
        Setting::ALL
            .into_iter()
            .filter(|&s| self.gives(s) && !used.contains(&s))
            .collect()
    }

    /// Whether the spec gives `setting` (`Some`, or `true` for `ag_budget_mode`).
    fn gives(&self, setting: Setting) -> bool {
        match setting {
            Setting::Evict => self.evict.is_some(),
            Setting::Keep => self.keep.is_some(),
            Setting::Sinks => self.sinks.is_some(),
            Setting::Recent => self.recent.is_some(),
            Setting::Window => self.window.is_some(),
            Setting::Gates => self.gates.is_some(),
            Setting::Threshold => self.threshold.is_some(),
            Setting::LayerThresholds => self.layer_thresholds.is_some(),
            Setting::AgBudgetMode => self.ag_budget_mode,
            Setting::AgDecode => self.ag_decode.is_some(),
            Setting::Seed => self.seed.is_some(),
        }
    }

    /// Clears the given settings (back to "the default").
    pub fn drop_settings(&mut self, settings: &[Setting]) {
        for s in settings {
            match s {
                Setting::Evict => self.evict = None,
                Setting::Keep => self.keep = None,
                Setting::Sinks => self.sinks = None,
                Setting::Recent => self.recent = None,
                Setting::Window => self.window = None,
                Setting::Gates => self.gates = None,
                Setting::Threshold => self.threshold = None,
                Setting::LayerThresholds => self.layer_thresholds = None,
                Setting::AgBudgetMode => self.ag_budget_mode = false,
                Setting::AgDecode => self.ag_decode = None,
                Setting::Seed => self.seed = None,
            }
        }
    }

    /// The budget given by `evict`/`keep`, if any.
    fn given_budget(&self) -> Result<Option<Budget>> {
        match (self.evict, self.keep) {
            (None, None) => Ok(None),
            _ => self.budget().map(Some),
        }
    }

    fn budget(&self) -> Result<Budget> {
        let budget = match (self.evict, self.keep) {
            (Some(_), Some(_)) => {
                return Err(PolicyError::NotBoth(Setting::Evict, Setting::Keep).into())
            }
            (Some(r), None) => Budget::EvictRatio(r),
            (None, Some(k)) => Budget::Keep(k),
            (None, None) => match (self.kind, self.recent) {
                (PolicyKind::Streaming, Some(0)) => {
                    return Err(PolicyError::EmptyStreamingWindow.into())
                }
                (PolicyKind::Streaming, Some(recent)) => {
                    let sinks = self.sinks.unwrap_or(DEFAULT_SINKS);
                    Budget::Keep(
                        sinks
                            .checked_add(recent)
                            .ok_or(PolicyError::StreamingWindowTooLarge { sinks, recent })?,
                    )
                }
                _ => Budget::EvictRatio(DEFAULT_EVICT),
            },
        };
        budget.validate().map_err(PolicyError::from)?;
        Ok(budget)
    }

    /// The policy, with defaults filled in and every value checked against the engine's model
    /// (gates must have been made for it).
    pub fn build(&self, engine: &Engine) -> Result<Policy> {
        self.options.check_applies(self.kind)?;
        let seed = self.seed.unwrap_or(0);
        let opts = &self.options;
        let kernel = opts.kernel.unwrap_or(DEFAULT_SNAPKV_KERNEL);
        let window = self.window.unwrap_or(DEFAULT_SNAPKV_WINDOW);
        let protect = Protection {
            sinks: self.sinks.unwrap_or(0),
            recent: self.recent.unwrap_or(0),
        };
        let policy = match self.kind {
            PolicyKind::Full => Policy::Full,
            PolicyKind::Random => Policy::Random {
                budget: self.budget()?,
                protect,
                seed,
            },
            PolicyKind::Streaming => Policy::Streaming {
                budget: self.budget()?,
                sinks: self.sinks.unwrap_or(DEFAULT_SINKS),
            },
            PolicyKind::H2o => Policy::H2o {
                budget: self.budget()?,
                recent: self
                    .recent
                    .map_or(Recent::Fraction(DEFAULT_H2O_RECENT), Recent::Tokens),
                sinks: protect.sinks,
                normalise: opts.normalise.unwrap_or(false),
            },
            PolicyKind::Tova => Policy::Tova {
                budget: self.budget()?,
                sinks: protect.sinks,
            },
            PolicyKind::SnapKv => Policy::SnapKv {
                budget: self.budget()?,
                window,
                kernel,
            },
            PolicyKind::PyramidKv => Policy::PyramidKv {
                budget: self.budget()?,
                window,
                kernel,
                beta: opts.beta.unwrap_or(DEFAULT_PYRAMID_BETA),
            },
            PolicyKind::KNorm => Policy::KNorm {
                budget: self.budget()?,
                protect,
            },
            PolicyKind::Nacl => Policy::Nacl {
                budget: self.given_budget()?,
                config: self.nacl_config(),
                seed,
            },
            PolicyKind::Ag => self.attention_gate(engine)?,
        };
        policy.validate(engine.model_config())?;
        Ok(policy)
    }

    /// Threshold mode's thresholds: `layer_thresholds`, or `threshold` (default: the gates
    /// file's, `trained`) in every layer; both given is an error.
    fn thresholds(&self, trained: f32) -> Result<Thresholds> {
        match (self.threshold, &self.layer_thresholds) {
            (Some(_), Some(_)) => {
                Err(PolicyError::NotBoth(Setting::Threshold, Setting::LayerThresholds).into())
            }
            (None, Some(list)) => Ok(Thresholds::PerLayer(list.clone())),
            (uniform, None) => Ok(Thresholds::Uniform(uniform.unwrap_or(trained))),
        }
    }

    /// NACL's fractions: the released defaults under the options given.
    fn nacl_config(&self) -> NaclConfig {
        let (d, o) = (NaclConfig::default(), &self.options);
        NaclConfig {
            proxy_frac: o.proxy_frac.unwrap_or(d.proxy_frac),
            sink_frac: o.sink_frac.unwrap_or(d.sink_frac),
            recent_frac: o.recent_frac.unwrap_or(d.recent_frac),
            kp_frac: o.kp_frac.unwrap_or(d.kp_frac),
            kr_frac: o.kr_frac.unwrap_or(d.kr_frac),
            min_len: o.min_len.unwrap_or(d.min_len),
        }
    }

    /// Attention-Gate: the gates file given, or the committed gates of the default model
    /// (docs/training.md), their projections rounded to 4 bits (the decode step reads under a
    /// third of the bytes of f16; docs/policies.md); unless given, the threshold (in every
    /// layer) and protections the gates were trained with.
    fn attention_gate(&self, engine: &Engine) -> Result<Policy> {
        let mut gates = match &self.gates {
            Some(path) => {
                AttentionGate::load(path, &engine.model_identity()?, &candle_core::Device::Cpu)
                    .map_err(PolicyError::from)?
            }
            None => super::default_gates(engine)?.ok_or(PolicyError::NeedsGates)?,
        };
        gates
            .round_projections_to_int4()
            .map_err(PolicyError::from)?;
        let mode = if self.ag_budget_mode {
            AgMode::Budget(self.budget()?)
        } else {
            AgMode::Threshold(self.thresholds(gates.config().threshold)?)
        };
        let trained = gates.config().protection();
        Ok(Policy::Ag {
            protect: Protection {
                sinks: self.sinks.unwrap_or(trained.sinks),
                recent: self.recent.unwrap_or(trained.recent),
            },
            gates: Arc::new(gates),
            mode,
            decode: self.ag_decode.unwrap_or(true),
        })
    }
}
