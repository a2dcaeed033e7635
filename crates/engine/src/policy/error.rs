//! [`PolicyError`]: why a [`super::PolicySpec`] does not make a policy, in terms of its
//! [`Setting`]s, so that each front end names them its own way: [`PolicyError::describe`] takes
//! the name of each setting (the CLI passes its flags, `--keep`; the server its JSON fields,
//! `kv_keep`); `Display` uses the spec's field names (`keep`).
//!
//! Invariant: a variant that wraps another error keeps it as its [`std::error::Error::source`].

use std::fmt;

use gate_core::GateError;

use super::{PolicyKind, Setting};

/// A policy that cannot be built or does not fit the model.
#[derive(Debug)]
pub enum PolicyError {
    /// Two settings that exclude each other were both given (`evict` and `keep`, `threshold`
    /// and `layer_thresholds`); the second is the one at fault.
    NotBoth(Setting, Setting),
    /// StreamingLLM with a window (`recent`) of 0 and no budget: it would keep only the sinks.
    EmptyStreamingWindow,
    /// StreamingLLM's budget `sinks + recent` overflows.
    StreamingWindowTooLarge {
        /// Sinks.
        sinks: usize,
        /// Most recent tokens.
        recent: usize,
    },
    /// Attention-Gate without a gates file for a model that has no default gates.
    NeedsGates,
    /// A parameter outside its domain that no setting names directly (a budget, the NACL
    /// fractions, a gates file that does not load, …); boxed, so that the error stays small.
    Gate(Box<GateError>),
    /// The gates were made for another model shape (the message says which field).
    GatesDoNotFit(String),
    /// `layer_thresholds` does not give one threshold per model layer.
    LayerCount {
        /// Thresholds given.
        given: usize,
        /// The model's layers.
        layers: usize,
    },
    /// A parameter outside its domain.
    OutOfRange {
        /// The setting that gives it, if one does.
        setting: Option<Setting>,
        /// What it is, in words (`PyramidKV beta`).
        what: &'static str,
        /// The value.
        value: String,
        /// What it must be (`>= 1`).
        expected: &'static str,
    },
    /// With a fixed budget (`keep`), the tokens the policy always keeps do not fit in it.
    ProtectionExceedsBudget {
        /// The policy.
        policy: PolicyKind,
        /// Tokens each head keeps.
        keep: usize,
        /// Tokens the policy always keeps (StreamingLLM: its sinks, which must leave room for
        /// one recent token).
        protected: usize,
        /// The settings that make them up (`sinks`, `recent`, `window`).
        by: &'static [Setting],
    },
}

impl PolicyError {
    /// The setting at fault, when one is (the one to change).
    pub fn setting(&self) -> Option<Setting> {
        match self {
            PolicyError::NotBoth(_, second) => Some(*second),
            PolicyError::ProtectionExceedsBudget { .. } => Some(Setting::Keep),
            PolicyError::EmptyStreamingWindow | PolicyError::StreamingWindowTooLarge { .. } => {
                Some(Setting::Recent)
            }
            PolicyError::NeedsGates | PolicyError::GatesDoNotFit(_) => Some(Setting::Gates),
            PolicyError::LayerCount { .. } => Some(Setting::LayerThresholds),
            PolicyError::OutOfRange { setting, .. } => *setting,
            PolicyError::Gate(_) => None,
        }
    }

    /// The message, naming each setting as `name` does (a flag, a JSON field).
    pub fn describe(&self, name: &dyn Fn(Setting) -> &'static str) -> String {
        use Setting::*;
        match self {
            PolicyError::NotBoth(first, second) => {
                format!("give either {} or {}, not both", name(*first), name(*second))
            }
            PolicyError::EmptyStreamingWindow => format!(
                "StreamingLLM's {} must be at least 1: it keeps the sinks and the newest W tokens",
                name(Recent)
            ),
            PolicyError::StreamingWindowTooLarge { sinks, recent } => format!(
                "StreamingLLM keeps {} + {} tokens: {sinks} + {recent} is too large",
                name(Sinks),
                name(Recent)
            ),
            PolicyError::NeedsGates => format!(
                "Attention-Gate needs {} for this model (trained gates ship only for the default model, embedded with the engine's `default-gates` feature)",
                name(Gates)
            ),
            PolicyError::Gate(e) => e.to_string(),
            PolicyError::GatesDoNotFit(why) => why.clone(),
            PolicyError::LayerCount { given, layers } => format!(
                "{} gives {given} threshold{}, but the model has {layers} layers: give one per \
                 layer",
                name(LayerThresholds),
                if *given == 1 { "" } else { "s" }
            ),
            PolicyError::OutOfRange {
                setting,
                what,
                value,
                expected,
            } => {
                let by = setting.map_or_else(String::new, |s| format!("{}: ", name(s)));
                format!("{by}{what} must be {expected}, got {value}")
            }
            PolicyError::ProtectionExceedsBudget {
                policy,
                keep,
                protected,
                by,
            } => {
                let names: Vec<&str> = by.iter().map(|s| name(*s)).collect();
                let what = match by {
                    [Sinks] if *policy == PolicyKind::Streaming => {
                        format!("its {protected} {} leave no room for a window", names[0])
                    }
                    [Window] => format!(
                        "its observation window of {protected} tokens ({}) does not fit",
                        names[0]
                    ),
                    _ => format!(
                        "its {protected} always-kept tokens ({}) do not fit",
                        names.join(" + ")
                    ),
                };
                format!(
                    "{policy} keeps at most {keep_name} {keep} tokens per head, and {what}: \
                     protected tokens count toward the budget (lower them or raise {keep_name})",
                    keep_name = name(Keep)
                )
            }
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(&Setting::field))
    }
}

impl std::error::Error for PolicyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PolicyError::Gate(e) => Some(e.as_ref()),
            _ => None,
        }
    }
}

impl From<GateError> for PolicyError {
    fn from(e: GateError) -> Self {
        PolicyError::Gate(Box::new(e))
    }
}
