//! `PolicyOptions`: the baselines' **\[choice\]** knobs of `shared/design/ALGORITHMS.md` that have
//! no flag of their own, set as `key=value` (`agate … --policy-opt beta=10,kernel=7`; the keys and
//! defaults are listed in `docs/policies.md` and in [`PolicyOptions::KEYS`]).
//!
//! Invariants: a set option has passed its own domain check ([`PolicyOptions::set`]); an option
//! only ever reaches a policy it applies to ([`PolicyOptions::for_policy`]), and building a
//! policy with an option that does not apply to it is an error, never silently ignored.

use super::PolicyKind;
use crate::error::{EngineError, Result};

/// One settable key: its name, the policies it applies to, and what it means (with its default).
pub struct OptionKey {
    /// The key as written in `key=value`.
    pub name: &'static str,
    /// The policies it applies to.
    pub policies: &'static [PolicyKind],
    /// What it sets, and its default.
    pub help: &'static str,
}

/// Values given for the knobs; `None` means the policy's default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyOptions {
    /// H2O: score = accumulated attention divided by the number of queries that saw the entry.
    pub normalise: Option<bool>,
    /// SnapKV/PyramidKV: pooling kernel (odd).
    pub kernel: Option<usize>,
    /// PyramidKV: ratio of the top layer's to the bottom layer's share (>= 1).
    pub beta: Option<f32>,
    /// NACL: fraction of the prompt used as proxy queries.
    pub proxy_frac: Option<f32>,
    /// NACL: fraction of the prompt kept as leading sinks.
    pub sink_frac: Option<f32>,
    /// NACL: fraction of the prompt kept as most recent tokens.
    pub recent_frac: Option<f32>,
    /// NACL: fraction kept greedily by proxy score (`Kp`).
    pub kp_frac: Option<f32>,
    /// NACL: fraction sampled by `softmax(proxy)` (`Kr`).
    pub kr_frac: Option<f32>,
    /// NACL without a budget (released defaults): prompts shorter than this are not evicted.
    pub min_len: Option<usize>,
}

impl PolicyOptions {
    /// Every key, in documentation order.
    pub const KEYS: [OptionKey; 9] = [
        OptionKey {
            name: "normalise",
            policies: &[PolicyKind::H2o],
            help: "true: score = accumulated attention / number of queries that saw the token (default false: the plain sum)",
        },
        OptionKey {
            name: "kernel",
            policies: &[PolicyKind::SnapKv, PolicyKind::PyramidKv],
            help: "1-D average pooling kernel over the window's attention, odd (default 5)",
        },
        OptionKey {
            name: "beta",
            policies: &[PolicyKind::PyramidKv],
            help: "steepness of the pyramid, >= 1: min = (C-w)/beta (default 20)",
        },
        OptionKey {
            name: "proxy_frac",
            policies: &[PolicyKind::Nacl],
            help: "fraction of the prompt used as proxy queries, in [0, 1] (default 0.01; at least one)",
        },
        OptionKey {
            name: "sink_frac",
            policies: &[PolicyKind::Nacl],
            help: "fraction of the prompt kept as leading sinks (default 0.005)",
        },
        OptionKey {
            name: "recent_frac",
            policies: &[PolicyKind::Nacl],
            help: "fraction of the prompt kept as most recent tokens (default 0.005)",
        },
        OptionKey {
            name: "kp_frac",
            policies: &[PolicyKind::Nacl],
            help: "fraction kept greedily by proxy score, Kp (default 0.12; with a budget, Kp:Kr splits it)",
        },
        OptionKey {
            name: "kr_frac",
            policies: &[PolicyKind::Nacl],
            help: "fraction sampled without replacement by softmax(proxy score), Kr (default 0.07)",
        },
        OptionKey {
            name: "min_len",
            policies: &[PolicyKind::Nacl],
            help: "without --evict/--keep (released defaults): prompts shorter than this are not evicted (default 512)",
        },
    ];

    /// Parses and sets one `key=value` (checks the value's domain, not the policy).
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let bad = |expected: &str| EngineError::PolicyOption {
            key: key.to_string(),
            value: value.to_string(),
            expected: expected.to_string(),
        };
        let fraction = || -> Result<f32> {
            match value.trim().parse::<f32>() {
                Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
                _ => Err(bad("a fraction in [0, 1]")),
            }
        };
        match key {
            "normalise" => {
                self.normalise = Some(match value.trim() {
                    "true" | "on" | "1" => true,
                    "false" | "off" | "0" => false,
                    _ => return Err(bad("true or false")),
                })
            }
            "kernel" => match value.trim().parse::<usize>() {
                Ok(k) if k % 2 == 1 => self.kernel = Some(k),
                _ => return Err(bad("an odd pooling kernel size (1, 3, 5, …)")),
            },
            "beta" => match value.trim().parse::<f32>() {
                Ok(b) if b.is_finite() && b >= 1.0 => self.beta = Some(b),
                _ => return Err(bad("a finite beta >= 1")),
            },
            "proxy_frac" => self.proxy_frac = Some(fraction()?),
            "sink_frac" => self.sink_frac = Some(fraction()?),
            "recent_frac" => self.recent_frac = Some(fraction()?),
            "kp_frac" => self.kp_frac = Some(fraction()?),
            "kr_frac" => self.kr_frac = Some(fraction()?),
            "min_len" => match value.trim().parse::<usize>() {
                Ok(n) => self.min_len = Some(n),
                Err(_) => return Err(bad("a token count")),
            },
            _ => {
                let names: Vec<&str> = Self::KEYS.iter().map(|k| k.name).collect();
                return Err(bad(&format!("a known key: {}", names.join(", "))));
            }
        }
        Ok(())
    }

    /// Parses `key=value` (as given on the command line) and sets it.
    pub fn set_pair(&mut self, pair: &str) -> Result<()> {
        match pair.split_once('=') {
            Some((key, value)) => self.set(key.trim(), value),
            None => Err(EngineError::PolicyOption {
                key: pair.to_string(),
                value: String::new(),
                expected: "the form key=value (e.g. beta=10)".into(),
            }),
        }
    }

    /// The keys that are set, in [`PolicyOptions::KEYS`] order.
    pub fn keys_set(&self) -> Vec<&'static str> {
        let set = [
            self.normalise.is_some(),
            self.kernel.is_some(),
            self.beta.is_some(),
            self.proxy_frac.is_some(),
            self.sink_frac.is_some(),
            self.recent_frac.is_some(),
            self.kp_frac.is_some(),
            self.kr_frac.is_some(),
            self.min_len.is_some(),
        ];
        Self::KEYS
            .iter()
            .zip(set)
            .filter(|(_, s)| *s)
            .map(|(k, _)| k.name)
            .collect()
    }

    /// Whether `key` applies to the policy `kind`.
    pub fn applies_to(key: &str, kind: PolicyKind) -> bool {
        Self::KEYS
            .iter()
            .any(|k| k.name == key && k.policies.contains(&kind))
    }

    /// The policies `key` applies to, comma-separated (empty for an unknown key).
    pub fn policies_of(key: &str) -> String {
        Self::KEYS
            .iter()
            .find(|k| k.name == key)
            .map_or_else(String::new, |k| {
                let names: Vec<&str> = k.policies.iter().map(|p| p.name()).collect();
                names.join(", ")
            })
    }

    /// The options that apply to the policy `kind` (the others unset), for sweeps that pass
    /// one option list to several policies.
    pub fn for_policy(&self, kind: PolicyKind) -> PolicyOptions {
        let keep = |key: &str| Self::applies_to(key, kind);
        PolicyOptions {
            normalise: self.normalise.filter(|_| keep("normalise")),
            kernel: self.kernel.filter(|_| keep("kernel")),
            beta: self.beta.filter(|_| keep("beta")),
            proxy_frac: self.proxy_frac.filter(|_| keep("proxy_frac")),
            sink_frac: self.sink_frac.filter(|_| keep("sink_frac")),
            recent_frac: self.recent_frac.filter(|_| keep("recent_frac")),
            kp_frac: self.kp_frac.filter(|_| keep("kp_frac")),
            kr_frac: self.kr_frac.filter(|_| keep("kr_frac")),
            min_len: self.min_len.filter(|_| keep("min_len")),
        }
    }

    /// Fails if a set key does not apply to the policy `kind`.
    pub fn check_applies(&self, kind: PolicyKind) -> Result<()> {
        match self
            .keys_set()
            .into_iter()
            .find(|k| !Self::applies_to(k, kind))
        {
            None => Ok(()),
            Some(key) => Err(EngineError::PolicyOptionNotApplicable {
                key: key.to_string(),
                policy: kind,
                applies_to: Self::policies_of(key),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_check_their_domain_and_apply_to_their_policies() {
        let mut o = PolicyOptions::default();
        o.set_pair("beta=10").unwrap();
        o.set_pair("kernel = 3").unwrap();
        o.set("normalise", "on").unwrap();
        assert_eq!(
            (o.beta, o.kernel, o.normalise),
            (Some(10.0), Some(3), Some(true))
        );
        assert_eq!(o.keys_set(), ["normalise", "kernel", "beta"]);
        for (key, value, needle) in [
            ("beta", "0.5", "beta >= 1"),
            ("beta", "NaN", "beta >= 1"),
            ("kernel", "4", "odd"),
            ("kernel", "-1", "odd"),
            ("proxy_frac", "1.5", "[0, 1]"),
            ("min_len", "x", "token count"),
            ("normalise", "maybe", "true or false"),
            ("nonsense", "1", "normalise, kernel, beta"),
        ] {
            let e = PolicyOptions::default()
                .set(key, value)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle) && e.contains(key), "{e}");
        }
        let e = PolicyOptions::default()
            .set_pair("beta")
            .unwrap_err()
            .to_string();
        assert!(e.contains("key=value"), "{e}");
        // Each policy gets only its keys; a key given to a policy it does not fit is an error.
        let pyramid = o.for_policy(PolicyKind::PyramidKv);
        assert_eq!(pyramid.keys_set(), ["kernel", "beta"]);
        assert!(pyramid.check_applies(PolicyKind::PyramidKv).is_ok());
        let e = o.check_applies(PolicyKind::H2o).unwrap_err().to_string();
        assert!(e.contains("`kernel` does not apply to h2o"), "{e}");
        assert_eq!(
            o.for_policy(PolicyKind::Streaming),
            PolicyOptions::default()
        );
    }
}
