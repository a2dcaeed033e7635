//! `PolicySpec`: a policy named as a user names it (`--policy h2o --evict 0.5 --sinks 4`), with
//! every knob optional, turned into a validated [`Policy`] with the spec's defaults
//! (defined in `docs/algorithms.md`; all listed in `docs/policies.md`), the **\[choice\]** knobs
//! without a flag of their own coming from [`PolicyOptions`].

use std::path::PathBuf;
use std::sync::Arc;

use gate_core::gate::AttentionGate;
use gate_core::score::NaclConfig;
use gate_core::select::{Budget, Protection};

use super::{AgMode, Policy, PolicyOptions, Recent};
use crate::engine::Engine;
use crate::error::{EngineError, Result};

/// Default eviction ratio of budget policies when neither `--evict` nor `--keep` is given (NACL
/// then runs its released defaults instead).
pub const DEFAULT_EVICT: f32 = 0.5;
/// StreamingLLM's attention sinks.
pub const DEFAULT_SINKS: usize = 4;
/// SnapKV/PyramidKV observation window.
pub const DEFAULT_SNAPKV_WINDOW: usize = 32;
/// SnapKV pooling kernel.
pub const DEFAULT_SNAPKV_KERNEL: usize = 5;
/// PyramidKV's beta.
pub const DEFAULT_PYRAMID_BETA: f32 = 20.0;
/// H2O: share of the budget for the most recent tokens (10% heavy + 10% recent in the paper).
pub const DEFAULT_H2O_RECENT: f32 = 0.5;

/// A policy as a user names it; `None` means "the default".
#[derive(Clone, Debug, Default)]
pub struct PolicySpec {
    /// One of [`Policy::NAMES`].
    pub name: String,
    /// Fraction of each head's tokens to evict.
    pub evict: Option<f32>,
    /// Tokens each head keeps.
    pub keep: Option<usize>,
    /// Always-kept first tokens.
    pub sinks: Option<usize>,
    /// Recent-token window (StreamingLLM window, SnapKV observation window, H2O recent tokens,
    /// Attention-Gate local window, protected recent tokens elsewhere).
    pub window: Option<usize>,
    /// Attention-Gate checkpoint.
    pub gates: Option<PathBuf>,
    /// Attention-Gate threshold (default: the checkpoint's).
    pub threshold: Option<f32>,
    /// Attention-Gate in budget mode instead of threshold mode.
    pub ag_budget_mode: bool,
    /// Attention-Gate flags generated tokens too (default true).
    pub ag_decode: Option<bool>,
    /// Seed of Random and NACL.
    pub seed: Option<u64>,
    /// The \[choice\] knobs (`key=value`); each must apply to this policy.
    pub options: PolicyOptions,
}

/// A setting of a [`PolicySpec`], to say which ones a policy would ignore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// `evict` (a ratio of each head's tokens).
    Evict,
    /// `keep` (tokens per head).
    Keep,
    /// `sinks`.
    Sinks,
    /// `window`.
    Window,
    /// `gates`.
    Gates,
    /// `threshold`.
    Threshold,
    /// `ag_budget_mode`.
    AgBudgetMode,
    /// `ag_decode`.
    AgDecode,
    /// `seed`.
    Seed,
}

impl PolicySpec {
    /// The settings this spec gives (`Some`, or `true` for `ag_budget_mode`) that its policy
    /// does not use: `evict`/`keep` with `full` or Attention-Gate in threshold mode, `gates`
    /// with anything but `ag`, `window` with StreamingLLM when a budget is given (the window is
    /// the budget minus the sinks), and so on. Unknown policy names use nothing.
    pub fn ignored(&self) -> Vec<Setting> {
        use Setting::*;
        let ag_budget = self.ag_budget_mode;
        let used: &[Setting] = match self.name.as_str() {
            "random" => &[Evict, Keep, Sinks, Window, Seed],
            "streaming" if self.evict.is_some() || self.keep.is_some() => &[Evict, Keep, Sinks],
            "streaming" => &[Evict, Keep, Sinks, Window],
            "h2o" | "knorm" => &[Evict, Keep, Sinks, Window],
            "tova" => &[Evict, Keep, Sinks],
            "snapkv" | "pyramidkv" => &[Evict, Keep, Window],
            "nacl" => &[Evict, Keep, Seed],
            "ag" if ag_budget => &[Evict, Keep, Sinks, Window, Gates, AgBudgetMode, AgDecode],
            "ag" => &[Sinks, Window, Gates, Threshold, AgDecode],
            _ => &[],
        };
        let given = [
            (Evict, self.evict.is_some()),
            (Keep, self.keep.is_some()),
            (Sinks, self.sinks.is_some()),
            (Window, self.window.is_some()),
            (Gates, self.gates.is_some()),
            (Threshold, self.threshold.is_some()),
            (AgBudgetMode, self.ag_budget_mode),
            (AgDecode, self.ag_decode.is_some()),
            (Seed, self.seed.is_some()),
        ];
        given
            .into_iter()
            .filter(|&(s, g)| g && !used.contains(&s))
            .map(|(s, _)| s)
            .collect()
    }

    /// Clears the given settings (back to "the default").
    pub fn drop_settings(&mut self, settings: &[Setting]) {
        for s in settings {
            match s {
                Setting::Evict => self.evict = None,
                Setting::Keep => self.keep = None,
                Setting::Sinks => self.sinks = None,
                Setting::Window => self.window = None,
                Setting::Gates => self.gates = None,
                Setting::Threshold => self.threshold = None,
                Setting::AgBudgetMode => self.ag_budget_mode = false,
                Setting::AgDecode => self.ag_decode = None,
                Setting::Seed => self.seed = None,
            }
        }
    }

    /// A spec with only a name.
    pub fn named(name: &str) -> Self {
        PolicySpec {
            name: name.to_string(),
            ..Default::default()
        }
    }

    /// The budget given by `--evict`/`--keep`, if any.
    fn given_budget(&self) -> Result<Option<Budget>> {
        match (self.evict, self.keep) {
            (None, None) => Ok(None),
            _ => self.budget().map(Some),
        }
    }

    fn budget(&self) -> Result<Budget> {
        let budget = match (self.evict, self.keep) {
            (Some(_), Some(_)) => {
                return Err(EngineError::Invalid(
                    "give either --evict or --keep, not both".into(),
                ))
            }
            (Some(r), None) => Budget::EvictRatio(r),
            (None, Some(k)) => Budget::Keep(k),
            (None, None) => match (self.name.as_str(), self.window) {
                ("streaming", Some(0)) => {
                    return Err(EngineError::Invalid(
                        "StreamingLLM's --window must be at least 1: it keeps the sinks and the newest W tokens".into(),
                    ))
                }
                ("streaming", Some(w)) => {
                    let sinks = self.sinks.unwrap_or(DEFAULT_SINKS);
                    Budget::Keep(sinks.checked_add(w).ok_or_else(|| {
                        EngineError::Invalid(format!(
                            "StreamingLLM keeps sinks + window tokens: {sinks} + {w} is too large"
                        ))
                    })?)
                }
                _ => Budget::EvictRatio(DEFAULT_EVICT),
            },
        };
        budget
            .validate()
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        Ok(budget)
    }

    /// The policy, with defaults filled in and every value checked against the engine's model
    /// (gates must have been made for it).
    pub fn build(&self, engine: &Engine) -> Result<Policy> {
        let cfg = engine.model_config();
        let seed = self.seed.unwrap_or(0);
        self.options.check_applies(&self.name)?;
        let opts = &self.options;
        let kernel = opts.kernel.unwrap_or(DEFAULT_SNAPKV_KERNEL);
        let recent = self.window.unwrap_or(0);
        let protect = Protection {
            sinks: self.sinks.unwrap_or(0),
            recent,
        };
        let policy = match self.name.as_str() {
            "full" => Policy::Full,
            "random" => Policy::Random {
                budget: self.budget()?,
                protect,
                seed,
            },
            "streaming" => Policy::Streaming {
                budget: self.budget()?,
                sinks: self.sinks.unwrap_or(DEFAULT_SINKS),
            },
            "h2o" => Policy::H2o {
                budget: self.budget()?,
                recent: self
                    .window
                    .map_or(Recent::Fraction(DEFAULT_H2O_RECENT), Recent::Tokens),
                sinks: self.sinks.unwrap_or(0),
                normalise: opts.normalise.unwrap_or(false),
            },
            "tova" => Policy::Tova {
                budget: self.budget()?,
                sinks: self.sinks.unwrap_or(0),
            },
            "snapkv" => Policy::SnapKv {
                budget: self.budget()?,
                window: self.window.unwrap_or(DEFAULT_SNAPKV_WINDOW),
                kernel,
            },
            "pyramidkv" => Policy::PyramidKv {
                budget: self.budget()?,
                window: self.window.unwrap_or(DEFAULT_SNAPKV_WINDOW),
                kernel,
                beta: opts.beta.unwrap_or(DEFAULT_PYRAMID_BETA),
            },
            "knorm" => Policy::KNorm {
                budget: self.budget()?,
                protect,
            },
            "nacl" => {
                let d = NaclConfig::default();
                Policy::Nacl {
                    budget: self.given_budget()?,
                    config: NaclConfig {
                        proxy_frac: opts.proxy_frac.unwrap_or(d.proxy_frac),
                        sink_frac: opts.sink_frac.unwrap_or(d.sink_frac),
                        recent_frac: opts.recent_frac.unwrap_or(d.recent_frac),
                        kp_frac: opts.kp_frac.unwrap_or(d.kp_frac),
                        kr_frac: opts.kr_frac.unwrap_or(d.kr_frac),
                        min_len: opts.min_len.unwrap_or(d.min_len),
                    },
                    seed,
                }
            }
            "ag" => {
                let gates = match &self.gates {
                    Some(path) => AttentionGate::load(
                        path,
                        &engine.model_identity()?,
                        &candle_core::Device::Cpu,
                    )
                    .map_err(|e| EngineError::Invalid(e.to_string()))?,
                    // The committed gates of the default model (docs/training.md).
                    None => super::default_gates(engine)?.ok_or_else(|| {
                        EngineError::Invalid(
                            "--policy ag needs --gates FILE for this model (trained gates ship only for the default model, embedded with the engine's `default-gates` feature; random gates for testing: `agate init-gates --out FILE`)".into(),
                        )
                    })?,
                };
                let mode = if self.ag_budget_mode {
                    AgMode::Budget(self.budget()?)
                } else {
                    AgMode::Threshold(self.threshold.unwrap_or(gates.config().threshold))
                };
                // Unless given, the protections the gates were trained with.
                let trained = gates.config().protection();
                Policy::Ag {
                    protect: Protection {
                        sinks: self.sinks.unwrap_or(trained.sinks),
                        recent: self.window.unwrap_or(trained.recent),
                    },
                    gates: Arc::new(gates),
                    mode,
                    decode: self.ag_decode.unwrap_or(true),
                }
            }
            other => {
                return Err(EngineError::Invalid(format!(
                    "unknown policy `{other}` (expected one of {})",
                    Policy::NAMES.join(", ")
                )))
            }
        };
        policy.validate(cfg)?;
        Ok(policy)
    }
}
