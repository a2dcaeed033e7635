//! [`PolicyKind`]: which eviction policy, as one enum from the command line (`--policy h2o`), the
//! server (`"kv_policy": "h2o"`) and the evaluation sweeps down to [`super::Policy`].
//!
//! Invariant: [`PolicyKind::ALL`] lists every kind once, in documentation order, and
//! [`PolicyKind::name`] and [`std::str::FromStr`] are inverse: every name parses back to its kind,
//! and nothing else parses.

use std::fmt;
use std::str::FromStr;

/// An eviction policy's identity, without its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// Keep everything.
    Full,
    /// Attention-Gate: learned keep flags.
    Ag,
    /// Uniform random scores (the floor).
    Random,
    /// StreamingLLM: sinks and the most recent tokens.
    Streaming,
    /// H2O: heavy hitters and the most recent tokens.
    H2o,
    /// TOVA: drop what the current query attends to least.
    Tova,
    /// SnapKV: pooled attention of an observation window.
    SnapKv,
    /// PyramidKV: SnapKV scores, budgets falling with depth.
    PyramidKv,
    /// KNorm: keep the lowest key norms.
    KNorm,
    /// NACL: proxy-token attention plus random sampling.
    Nacl,
}

/// A name that is no [`PolicyKind`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy `{name}` (expected one of {})", PolicyKind::names().join(", "))]
pub struct UnknownPolicy {
    /// The name as given.
    pub name: String,
}

impl PolicyKind {
    /// Every kind, in documentation order.
    pub const ALL: [PolicyKind; 10] = [
        PolicyKind::Full,
        PolicyKind::Ag,
        PolicyKind::Random,
        PolicyKind::Streaming,
        PolicyKind::H2o,
        PolicyKind::Tova,
        PolicyKind::SnapKv,
        PolicyKind::PyramidKv,
        PolicyKind::KNorm,
        PolicyKind::Nacl,
    ];

    /// The name users write (`--policy`, `kv_policy`, reports).
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Full => "full",
            PolicyKind::Ag => "ag",
            PolicyKind::Random => "random",
            PolicyKind::Streaming => "streaming",
            PolicyKind::H2o => "h2o",
            PolicyKind::Tova => "tova",
            PolicyKind::SnapKv => "snapkv",
            PolicyKind::PyramidKv => "pyramidkv",
            PolicyKind::KNorm => "knorm",
            PolicyKind::Nacl => "nacl",
        }
    }

    /// Every name, in [`PolicyKind::ALL`] order.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|k| k.name()).collect()
    }

    /// Whether the policy's window is an observation window of queries (SnapKV, PyramidKV)
    /// rather than a count of most recent tokens kept (see [`super::PolicySpec::window`]).
    pub fn observes_a_window(self) -> bool {
        matches!(self, PolicyKind::SnapKv | PolicyKind::PyramidKv)
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for PolicyKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl FromStr for PolicyKind {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, UnknownPolicy> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownPolicy {
                name: s.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_its_kind_and_nothing_else_parses() {
        for kind in PolicyKind::ALL {
            assert_eq!(kind.name().parse::<PolicyKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.name());
        }
        let e = "H2O".parse::<PolicyKind>().unwrap_err().to_string();
        assert!(
            e.contains("unknown policy `H2O`") && e.contains("snapkv, pyramidkv"),
            "{e}"
        );
        assert!("".parse::<PolicyKind>().is_err());
    }
}
