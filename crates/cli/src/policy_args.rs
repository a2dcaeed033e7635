//! Eviction-policy flags shared by generate, chat, eval and bench: `--policy NAME[,NAME…]`,
//! `--evict RATIO` or `--keep TOKENS`, and the policy-specific knobs. Values are validated here,
//! before the model loads; errors name the flag and the value.

use clap::Args;
use engine::{Engine, Policy};

/// Flags selecting and configuring eviction.
#[derive(Args, Clone, Debug)]
pub struct PolicyArgs {
    /// Eviction policy: full (default). Comma-separate several for bench and eval sweeps.
    #[arg(long = "policy", value_delimiter = ',', default_value = "full")]
    pub names: Vec<String>,
}

/// One validated policy choice, resolved against an engine by [`PolicyChoice::resolve`].
#[derive(Clone, Debug)]
pub struct PolicyChoice {
    name: String,
}

impl PolicyChoice {
    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The engine policy (loads gate files where needed).
    pub fn resolve(&self, _engine: &Engine) -> anyhow::Result<Policy> {
        match self.name.as_str() {
            "full" => Ok(Policy::Full),
            other => anyhow::bail!("--policy: unknown policy `{other}`"),
        }
    }
}

impl PolicyArgs {
    /// Every policy named, validated.
    pub fn policies(&self) -> anyhow::Result<Vec<PolicyChoice>> {
        self.names
            .iter()
            .map(|n| match n.as_str() {
                "full" => Ok(PolicyChoice { name: n.clone() }),
                other => anyhow::bail!("--policy: unknown policy `{other}` (expected full)"),
            })
            .collect()
    }
}
