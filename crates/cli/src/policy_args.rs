//! Eviction-policy flags shared by generate, chat, eval and bench: `--policy NAME[,NAME…]`,
//! `--evict RATIO` or `--keep TOKENS`, the policy-specific knobs, `--policy-opt KEY=VALUE` for
//! the design's \[choice\] defaults without a flag of their own (engine::PolicyOptions), and
//! `--positions`. Values are range-checked by clap before the model loads; the engine checks the
//! rest against the model. Errors name the flag and the value.
//!
//! A flag that does nothing for the chosen policy is an error (`--evict` with `full`,
//! `--gates` with `h2o`, `--evict` with `ag` in threshold mode, a `--policy-opt` key of another
//! policy); when several policies are named, a flag is an error if none of them uses it and a
//! warning naming those that ignore it otherwise (they run without it).

use std::ops::RangeBounds;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use engine::{Engine, Policy, PolicyKind, PolicyOptions, PolicySpec, Positions, Setting};

/// Attention-Gate decision mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AgModeArg {
    /// Keep a token iff its keep probability exceeds the threshold (the paper's setting).
    Threshold,
    /// Keep each head's top-k tokens by keep probability (matches a budget exactly).
    Budget,
}

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// Flags selecting and configuring eviction.
#[derive(Args, Clone, Debug)]
pub struct PolicyArgs {
    /// Eviction policy: full, ag, random, streaming, h2o, tova, snapkv, pyramidkv, knorm, nacl.
    /// Comma-separate several for bench and eval sweeps: `all` is full and every baseline
    /// (add `,ag` for Attention-Gate, or give `--gates FILE`).
    #[arg(long = "policy", value_delimiter = ',', default_value = "full", value_parser = parse_policy)]
    pub names: Vec<PolicyName>,
    /// Fraction of each head's tokens to evict, in [0, 1) (default 0.5 for budget policies).
    #[arg(long, value_parser = parse_ratio, conflicts_with = "keep")]
    pub evict: Option<f32>,
    /// Tokens each KV head keeps.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub keep: Option<u64>,
    /// Always-kept first tokens (StreamingLLM default 4; Attention-Gate: the gates file's;
    /// 0 elsewhere).
    #[arg(long)]
    pub sinks: Option<usize>,
    /// SnapKV's and PyramidKV's observation window (default 32); for the other policies the
    /// most recent tokens always kept: StreamingLLM's window, H2O's recent tokens,
    /// Attention-Gate's local window (default: the gates file's).
    #[arg(long)]
    pub window: Option<usize>,
    /// Attention-Gate checkpoint (safetensors).
    #[arg(long, value_name = "PATH")]
    pub gates: Option<PathBuf>,
    /// Attention-Gate keep threshold in [0, 1] (default: the checkpoint's, usually 0.5; 1 flags
    /// every token out: only the sinks and the local window stay).
    #[arg(long, value_parser = parse_fraction)]
    pub threshold: Option<f32>,
    /// Attention-Gate keep threshold per layer, one value per model layer, comma-separated
    /// (instead of --threshold).
    #[arg(
        long,
        value_name = "T0,T1,...",
        value_delimiter = ',',
        value_parser = parse_fraction,
        conflicts_with = "threshold"
    )]
    pub layer_thresholds: Option<Vec<f32>>,
    /// Attention-Gate mode [default: threshold].
    #[arg(long, value_enum)]
    pub ag_mode: Option<AgModeArg>,
    /// Attention-Gate flags generated tokens too (off: generated tokens are all kept)
    /// [default: on].
    #[arg(long, value_enum)]
    pub ag_decode: Option<Switch>,
    /// Seed of the random and NACL policies [default: 0].
    #[arg(long)]
    pub policy_seed: Option<u64>,
    /// Where RoPE places keys: `original` (their position in the text, the papers' setting; a
    /// conversation ends at the model's context) or `cache` (their slot in each KV head's
    /// cache, StreamingLLM's positions: with a fixed --keep budget a chat never ends). Default:
    /// cache for chat, original elsewhere (docs/policies.md).
    #[arg(long, value_parser = parse_positions)]
    pub positions: Option<Positions>,
    /// A policy's [choice] default, KEY=VALUE (comma-separate or repeat): normalise (h2o),
    /// kernel (snapkv, pyramidkv), beta (pyramidkv), proxy_frac, sink_frac, recent_frac, kp_frac,
    /// kr_frac, min_len (nacl). Defaults and meaning: docs/policies.md.
    #[arg(long = "policy-opt", value_name = "KEY=VALUE", value_delimiter = ',')]
    pub options: Vec<String>,
}

/// A `--policy` value: one policy, or `all`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyName {
    /// Full and every baseline (and Attention-Gate when `--gates` is given).
    All,
    /// One policy.
    One(PolicyKind),
}

fn parse_policy(s: &str) -> Result<PolicyName, String> {
    match s.trim() {
        "all" => Ok(PolicyName::All),
        one => one
            .parse()
            .map(PolicyName::One)
            .map_err(|e| format!("{e} or all")),
    }
}

fn parse_positions(s: &str) -> Result<Positions, String> {
    Positions::parse(s).map_err(|e| e.to_string())
}

/// The flag a user gives for a policy setting (`--window` is SnapKV's observation window and
/// every other policy's recent tokens).
pub fn flag(setting: Setting) -> &'static str {
    match setting {
        Setting::Evict => "--evict",
        Setting::Keep => "--keep",
        Setting::Sinks => "--sinks",
        Setting::Recent | Setting::Window => "--window",
        Setting::Gates => "--gates",
        Setting::Threshold => "--threshold",
        Setting::LayerThresholds => "--layer-thresholds",
        Setting::AgBudgetMode => "--ag-mode",
        Setting::AgDecode => "--ag-decode",
        Setting::Seed => "--policy-seed",
    }
}

/// Why Attention-Gate in budget mode does without a threshold (flags and request fields alike).
pub(crate) const AG_BUDGET_MODE: &str =
    " in budget mode (each head keeps its budget of the most likely tokens)";

/// Why a policy does without a setting, for the message.
fn why(policy: PolicyKind, setting: Setting) -> &'static str {
    match (policy, setting) {
        (PolicyKind::Full, Setting::Evict | Setting::Keep) => " (it keeps every token)",
        (PolicyKind::Ag, Setting::Evict | Setting::Keep) => {
            " in threshold mode (the gates decide; --ag-mode budget keeps a budget)"
        }
        (PolicyKind::Ag, Setting::Threshold | Setting::LayerThresholds) => AG_BUDGET_MODE,
        (PolicyKind::Streaming, Setting::Recent) => {
            " with a budget (its window is --keep or the evicted share minus --sinks)"
        }
        (
            _,
            Setting::Gates
            | Setting::Threshold
            | Setting::LayerThresholds
            | Setting::AgDecode
            | Setting::AgBudgetMode,
        ) => " (Attention-Gate only)",
        _ => "",
    }
}

/// A fraction in `[0, 1)` (`--evict`, bench-serve's `--kv-evict`).
pub(crate) fn parse_ratio(s: &str) -> Result<f32, String> {
    parse_in(s, 0.0..1.0, "[0, 1)")
}

/// A fraction in `[0, 1]` (`--threshold` and each of `--layer-thresholds`: 1 flags every token
/// out).
fn parse_fraction(s: &str) -> Result<f32, String> {
    parse_in(s, 0.0..=1.0, "[0, 1]")
}

/// A number in `range`, which the message writes as `shown`.
fn parse_in(s: &str, range: impl RangeBounds<f32>, shown: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if range.contains(&v) {
        Ok(v + 0.0) // -0 is 0
    } else {
        Err(format!("must be in {shown}, got {v}"))
    }
}

/// One validated policy choice, resolved against an engine by [`PolicyChoice::resolve`].
#[derive(Clone, Debug)]
pub struct PolicyChoice {
    spec: PolicySpec,
}

impl PolicyChoice {
    /// The policy's name.
    pub fn name(&self) -> &'static str {
        self.spec.kind.name()
    }

    /// The policy.
    pub fn kind(&self) -> PolicyKind {
        self.spec.kind
    }

    /// The policy as named, before it is resolved.
    pub fn spec(&self) -> &PolicySpec {
        &self.spec
    }

    /// The spec with an explicit eviction ratio (sweeps).
    pub fn with_evict(&self, ratio: f32) -> Self {
        let mut spec = self.spec.clone();
        spec.evict = Some(ratio);
        spec.keep = None;
        PolicyChoice { spec }
    }

    /// The engine policy (loads gate files where needed), checked against the model.
    pub fn resolve(&self, engine: &Engine) -> anyhow::Result<Policy> {
        Ok(self.spec.build(engine)?)
    }
}

impl PolicyArgs {
    /// Every policy named (`all` expands to every policy but ag, unless `--gates` is given;
    /// a policy named twice runs once, with a note), with the shared knobs; each gets the `--policy-opt`
    /// options that apply to it. Flags and options that none of them uses are an error, and a
    /// warning names the policies that ignore one the others use (see the module header).
    pub fn policies(&self) -> anyhow::Result<Vec<PolicyChoice>> {
        // Notes are printed once every check passed: never just before an error.
        let mut notes = Vec::new();
        let kinds = self.kinds(&mut notes);
        let options = self.options(&kinds, &mut notes)?;
        let mut choices: Vec<PolicyChoice> = kinds
            .into_iter()
            .map(|kind| PolicyChoice {
                spec: self.spec(kind, &options),
            })
            .collect();
        let ignored: Vec<Vec<Setting>> = choices
            .iter()
            .map(|c| {
                let mut ignored = c.spec.ignored();
                // `--ag-mode threshold` leaves the spec as it is; only ag reads the flag.
                if self.ag_mode.is_some()
                    && c.kind() != PolicyKind::Ag
                    && !ignored.contains(&Setting::AgBudgetMode)
                {
                    ignored.push(Setting::AgBudgetMode);
                }
                ignored
            })
            .collect();
        for setting in Setting::ALL {
            let ignoring: Vec<PolicyKind> = choices
                .iter()
                .zip(&ignored)
                .filter(|(_, i)| i.contains(&setting))
                .map(|(c, _)| c.kind())
                .collect();
            if ignoring.is_empty() {
                continue;
            }
            if ignoring.len() == choices.len() {
                anyhow::bail!(
                    "{} does nothing with --policy {}; remove it",
                    flag(setting),
                    with_reasons(&ignoring, setting)
                );
            }
            notes.push(format!(
                "{} does nothing with {}; they run without it",
                flag(setting),
                join(&ignoring)
            ));
        }
        for (choice, ignored) in choices.iter_mut().zip(ignored) {
            choice.spec.drop_settings(&ignored);
        }
        for note in notes {
            say!("agate: note: {note}");
        }
        Ok(choices)
    }

    /// The policies `--policy` names, in order, each once (`all` expanded); a note names
    /// those named more than once.
    fn kinds(&self, notes: &mut Vec<String>) -> Vec<PolicyKind> {
        let (kinds, repeated) = self.named();
        if !repeated.is_empty() {
            let all = if self.names.contains(&PolicyName::All) {
                " (counting the policies `all` stands for)"
            } else {
                ""
            };
            notes.push(format!(
                "--policy names {} more than once{all}; each policy runs once",
                join(&repeated)
            ));
        }
        kinds
    }

    /// How many policies `--policy` names (each once, `all` expanded), saying nothing: a
    /// command that takes one checks it before any note about the flags is printed.
    pub fn count(&self) -> usize {
        self.named().0.len()
    }

    /// The policies named, each once and in order, and those named more than once.
    fn named(&self) -> (Vec<PolicyKind>, Vec<PolicyKind>) {
        let (mut kinds, mut repeated) = (Vec::new(), Vec::new());
        for name in &self.names {
            let add = match name {
                PolicyName::All => PolicyKind::ALL
                    .into_iter()
                    .filter(|&p| p != PolicyKind::Ag || self.gates.is_some())
                    .collect(),
                PolicyName::One(kind) => vec![*kind],
            };
            for kind in add {
                if !kinds.contains(&kind) {
                    kinds.push(kind);
                } else if !repeated.contains(&kind) {
                    repeated.push(kind);
                }
            }
        }
        (kinds, repeated)
    }

    /// The `--policy-opt` options: an error if none of `kinds` uses one, a note naming those
    /// that ignore one the others use.
    fn options(
        &self,
        kinds: &[PolicyKind],
        notes: &mut Vec<String>,
    ) -> anyhow::Result<PolicyOptions> {
        let mut options = PolicyOptions::default();
        let mut keys: Vec<&str> = Vec::new();
        for pair in &self.options {
            // The last value would silently win: a repeated key is a mistake to point at.
            let key = pair
                .split_once('=')
                .map_or(pair.as_str(), |(k, _)| k.trim());
            anyhow::ensure!(
                !keys.contains(&key),
                "--policy-opt: `{key}` is given more than once (`{pair}` after an earlier \
                 value); give each key once"
            );
            keys.push(key);
            options
                .set_pair(pair)
                .map_err(|e| anyhow::anyhow!("--policy-opt: {e}"))?;
        }
        for key in options.keys_set() {
            let ignoring: Vec<PolicyKind> = kinds
                .iter()
                .copied()
                .filter(|&k| !PolicyOptions::applies_to(key, k))
                .collect();
            if ignoring.len() == kinds.len() {
                anyhow::bail!(
                    "--policy-opt: `{key}` does not apply to {} (it applies to {})",
                    join(kinds),
                    PolicyOptions::policies_of(key)
                );
            }
            if !ignoring.is_empty() {
                notes.push(format!(
                    "--policy-opt {key} does nothing with {}; they run without it",
                    join(&ignoring)
                ));
            }
        }
        Ok(options)
    }

    /// The spec of one policy from the shared flags (`--window` as that policy reads it).
    fn spec(&self, kind: PolicyKind, options: &PolicyOptions) -> PolicySpec {
        let mut spec = PolicySpec {
            evict: self.evict,
            keep: self.keep.map(|k| k as usize),
            sinks: self.sinks,
            gates: self.gates.clone(),
            threshold: self.threshold,
            layer_thresholds: self.layer_thresholds.clone(),
            ag_budget_mode: self.ag_mode == Some(AgModeArg::Budget),
            ag_decode: self.ag_decode.map(|d| d == Switch::On),
            seed: self.policy_seed,
            options: options.for_policy(kind),
            ..PolicySpec::new(kind)
        };
        if let Some(w) = self.window {
            spec.set_window(w);
        }
        spec
    }

    /// The single policy of generate/chat (an error if several are named).
    pub fn single(&self) -> anyhow::Result<PolicyChoice> {
        let (named, _) = self.named();
        anyhow::ensure!(
            named.len() == 1,
            "--policy: name one policy here, got {}",
            join(&named).replace(", ", ",")
        );
        let mut all = self.policies()?;
        Ok(all.remove(0))
    }

    /// `--positions`, or `default`.
    pub fn positions_or(&self, default: Positions) -> Positions {
        self.positions.unwrap_or(default)
    }
}

/// The policies that do without `setting`, those with the same reason grouped before it
/// (`full, h2o (Attention-Gate only), ag in budget mode (…)`).
fn with_reasons(kinds: &[PolicyKind], setting: Setting) -> String {
    let mut groups: Vec<(&str, Vec<PolicyKind>)> = Vec::new();
    for &kind in kinds {
        let reason = why(kind, setting);
        match groups.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, group)) => group.push(kind),
            None => groups.push((reason, vec![kind])),
        }
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(reason, group)| format!("{}{reason}", join(group)))
        .collect();
    parts.join(", ")
}

/// Policy names, comma-separated.
fn join(kinds: &[PolicyKind]) -> String {
    let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
    names.join(", ")
}
