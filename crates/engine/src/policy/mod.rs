//! Eviction policies by name: each builds the `LayerHook` that steers one session's decoder.

use model_zoo::{KeepAll, LayerHook, ModelConfig};

use crate::error::Result;

/// An eviction policy and its parameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum Policy {
    /// Keep everything.
    Full,
}

impl Policy {
    /// The policy's name as the CLI spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Full => "full",
        }
    }

    /// Checks the parameters against the model.
    pub fn validate(&self, _cfg: &ModelConfig) -> Result<()> {
        Ok(())
    }

    /// A fresh hook for one session.
    pub fn hook(&self, _cfg: &ModelConfig) -> Box<dyn LayerHook + Send> {
        match self {
            Policy::Full => Box::new(KeepAll),
        }
    }
}
