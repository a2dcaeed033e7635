//! agate's `kv_*` request fields: the policy a request asks for ([`spec`]), built once per
//! distinct spec and cached (`App::policy`), and the 400 a policy that does not build becomes
//! ([`api_error`]), each naming the JSON field at fault (`kv_keep`), never a command-line flag.
//!
//! Invariants: an unknown `kv_*` field is an error (a typo must not silently run the default);
//! a field the policy does not read is an error, as its flag is on the command line.

use std::collections::HashMap;
use std::sync::Arc;

use engine::{EngineError, Policy, PolicyKind, PolicySpec, Setting};
use serde_json::Value;

use super::openai::{ApiError, Common};
use super::{App, POLICY_CACHE};
use crate::policy_args::AG_BUDGET_MODE;

impl App {
    /// The request's policy (`kv_*` fields over the server's default) and its cache key.
    pub(super) async fn policy(self: &Arc<Self>, c: &Common) -> Result<(Policy, String), ApiError> {
        let spec = spec(&self.defaults.policy, &c.extra)?;
        let key = format!("{spec:?}");
        if let Some(p) = self.lock_policies().get(&key) {
            return Ok((p.clone(), key));
        }
        // Gates files load from disk: off the async threads.
        let engine = self.scheduler.engine().clone();
        let build = spec.clone();
        let built = tokio::task::spawn_blocking(move || build.build(&engine))
            .await
            .map_err(|e| ApiError::from_engine(engine::EngineError::Scheduler(e.to_string())))?;
        let policy = built.map_err(api_error)?;
        let mut cache = self.lock_policies();
        if cache.len() >= POLICY_CACHE {
            cache.clear();
        }
        cache.insert(key.clone(), policy.clone());
        Ok((policy, key))
    }

    fn lock_policies(&self) -> std::sync::MutexGuard<'_, HashMap<String, Policy>> {
        self.policies.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// agate's request fields, with what they set.
const KV_FIELDS: [&str; 10] = [
    "kv_policy",
    "kv_evict",
    "kv_keep",
    "kv_sinks",
    "kv_window",
    "kv_threshold",
    "kv_layer_thresholds",
    "kv_ag_mode",
    "kv_ag_decode",
    "kv_seed",
];

/// The most characters of a bad value a 400 repeats.
const SHOWN_CHARS: usize = 80;

/// `value`, cut to [`SHOWN_CHARS`] characters (with its length) when longer.
fn shown(value: &str) -> String {
    match value.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}… ({} characters)", &value[..cut], value.chars().count()),
        None => value.to_string(),
    }
}

/// The request field that sets a policy setting (`kv_window` is SnapKV's observation window
/// and every other policy's recent tokens); the gates come from the server's command line.
fn field(setting: Setting) -> &'static str {
    match setting {
        Setting::Evict => "kv_evict",
        Setting::Keep => "kv_keep",
        Setting::Sinks => "kv_sinks",
        Setting::Recent | Setting::Window => "kv_window",
        Setting::Threshold => "kv_threshold",
        Setting::LayerThresholds => "kv_layer_thresholds",
        Setting::AgBudgetMode => "kv_ag_mode",
        Setting::AgDecode => "kv_ag_decode",
        Setting::Seed => "kv_seed",
        Setting::Gates => "the server's --gates",
    }
}

/// The 400 for a policy that does not build, naming the request field at fault.
pub fn api_error(e: EngineError) -> ApiError {
    let (param, message) = match &e {
        EngineError::Policy(p) => (
            p.setting()
                .filter(|s| *s != Setting::Gates)
                .map_or("kv_policy", field),
            p.describe(&field),
        ),
        _ => ("kv_policy", e.to_string()),
    };
    ApiError::invalid(Some(param), format!("policy: {message}")).with_code("invalid_policy")
}

/// The request's `kv_*` fields, read with their domain checks.
struct Fields<'a>(&'a serde_json::Map<String, Value>);

impl Fields<'_> {
    /// The field's value, unless absent or null.
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    /// A 400 naming the field, what it must be and what it is (cut to `SHOWN_CHARS`: a huge
    /// value is not echoed back whole).
    fn bad(&self, name: &str, what: &str) -> ApiError {
        let got = self.get(name).map_or(Value::Null, Clone::clone).to_string();
        ApiError::invalid(
            Some(name),
            format!("{name} must be {what}, got {}", shown(&got)),
        )
    }

    /// A 400 naming `second` (given) when the request gives `first` too, which it excludes.
    fn not_both(&self, first: &str, second: &str) -> Result<(), ApiError> {
        if self.get(first).is_some() {
            return Err(ApiError::invalid(
                Some(second),
                format!("give either {first} or {second}, not both"),
            ));
        }
        Ok(())
    }

    /// An integer of at least `min`.
    fn count(&self, name: &str, min: u64) -> Result<Option<usize>, ApiError> {
        self.get(name)
            .map(|v| match v.as_u64() {
                Some(n) if n >= min => Ok(n as usize),
                _ => Err(self.bad(name, &format!("an integer >= {min}"))),
            })
            .transpose()
    }

    /// An array of numbers (their domain is the policy's to check).
    fn numbers(&self, name: &str) -> Result<Option<Vec<f32>>, ApiError> {
        self.get(name)
            .map(|v| {
                v.as_array()
                    .and_then(|items| {
                        items
                            .iter()
                            .map(|x| x.as_f64().map(|x| x as f32))
                            .collect::<Option<Vec<f32>>>()
                    })
                    .ok_or_else(|| self.bad(name, "an array of numbers"))
            })
            .transpose()
    }

    /// A number in `[0, 1)`.
    fn ratio(&self, name: &str) -> Result<Option<f32>, ApiError> {
        self.number_in(name, 0.0..1.0, "a number in [0, 1)")
    }

    /// A number in `[0, 1]`.
    fn fraction(&self, name: &str) -> Result<Option<f32>, ApiError> {
        self.number_in(name, 0.0..=1.0, "a number in [0, 1]")
    }

    /// A number in `range`, which `expected` describes, checked as the f32 it becomes (0.999999999
    /// rounds to 1).
    fn number_in(
        &self,
        name: &str,
        range: impl std::ops::RangeBounds<f64>,
        expected: &str,
    ) -> Result<Option<f32>, ApiError> {
        self.get(name)
            .map(|v| match v.as_f64().map(|r| r as f32) {
                Some(r) if range.contains(&f64::from(r)) => Ok(r),
                _ => Err(self.bad(name, expected)),
            })
            .transpose()
    }
}

/// The policy a request asks for: with `kv_policy`, that policy with the request's knobs only;
/// without, the server's default with the request's knobs on top. A knob the policy does not
/// read is an error, as its flag is on the command line: it must not be silently ignored.
pub fn spec(
    default: &PolicySpec,
    extra: &serde_json::Map<String, Value>,
) -> Result<PolicySpec, ApiError> {
    if let Some(unknown) = extra
        .keys()
        .find(|k| k.starts_with("kv_") && !KV_FIELDS.contains(&k.as_str()))
    {
        return Err(ApiError::invalid(
            Some(unknown),
            format!(
                "unknown field `{unknown}` (agate's fields: {})",
                KV_FIELDS.join(", ")
            ),
        ));
    }
    let fields = Fields(extra);
    let mut spec = match fields.get("kv_policy") {
        None => default.clone(),
        // The gates are the server's (its --gates), whichever policy the request names.
        Some(Value::String(name)) => PolicySpec {
            gates: default.gates.clone(),
            ..PolicySpec::new(name.parse::<PolicyKind>().map_err(|e| {
                let message = e.to_string().replacen(name.as_str(), &shown(name), 1);
                ApiError::invalid(Some("kv_policy"), format!("policy: {message}"))
                    .with_code("invalid_policy")
            })?)
        },
        Some(_) => return Err(fields.bad("kv_policy", "a policy name")),
    };
    set_knobs(&mut spec, &fields)?;
    let mut ignored = spec.ignored();
    if spec.kind != PolicyKind::Ag {
        ignored.push(Setting::AgBudgetMode);
    }
    let mut unused = ignored
        .iter()
        .filter(|s| **s != Setting::Gates)
        .map(|s| field(*s));
    if let Some(name) = unused.find(|name| fields.get(name).is_some()) {
        return Err(ApiError::invalid(
            Some(name),
            format!(
                "{name} does nothing with the policy `{}`{}",
                spec.kind,
                if spec.kind == PolicyKind::Ag && spec.ag_budget_mode {
                    AG_BUDGET_MODE
                } else {
                    ""
                }
            ),
        )
        .with_code("invalid_policy"));
    }
    Ok(spec)
}

/// Sets every knob the request gives (`kv_evict` … `kv_seed`) on `spec`.
fn set_knobs(spec: &mut PolicySpec, fields: &Fields) -> Result<(), ApiError> {
    if let Some(r) = fields.ratio("kv_evict")? {
        spec.evict = Some(r);
        spec.keep = None;
    }
    if let Some(k) = fields.count("kv_keep", 1)? {
        fields.not_both("kv_evict", "kv_keep")?;
        spec.keep = Some(k);
        spec.evict = None;
    }
    if let Some(s) = fields.count("kv_sinks", 0)? {
        spec.sinks = Some(s);
    }
    if let Some(w) = fields.count("kv_window", 0)? {
        spec.set_window(w);
    }
    // A request's threshold replaces the server's, uniform or per layer.
    if let Some(t) = fields.fraction("kv_threshold")? {
        spec.threshold = Some(t);
        spec.layer_thresholds = None;
    }
    if let Some(list) = fields.numbers("kv_layer_thresholds")? {
        fields.not_both("kv_threshold", "kv_layer_thresholds")?;
        spec.layer_thresholds = Some(list);
        spec.threshold = None;
    }
    match fields.get("kv_ag_mode") {
        None => {}
        Some(Value::String(m)) if m == "threshold" || m == "budget" => {
            spec.ag_budget_mode = m == "budget";
        }
        Some(_) => return Err(fields.bad("kv_ag_mode", "\"threshold\" or \"budget\"")),
    }
    match fields.get("kv_ag_decode") {
        None => {}
        Some(Value::Bool(b)) => spec.ag_decode = Some(*b),
        Some(_) => return Err(fields.bad("kv_ag_decode", "a boolean")),
    }
    if let Some(s) = fields.count("kv_seed", 0)? {
        spec.seed = Some(s as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::PolicyError;
    use serde_json::json;

    fn extra(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn a_named_policy_keeps_the_servers_gates() {
        let default = PolicySpec {
            gates: Some("server.ag.safetensors".into()),
            ..PolicySpec::new(PolicyKind::Full)
        };
        for policy in ["ag", "h2o"] {
            let s = spec(&default, &extra(json!({ "kv_policy": policy }))).unwrap();
            assert_eq!(s.gates, default.gates, "{policy}");
        }
    }

    #[test]
    fn a_threshold_in_budget_mode_is_refused_as_such() {
        let default = PolicySpec::new(PolicyKind::Ag);
        let request = json!({"kv_policy": "ag", "kv_ag_mode": "budget", "kv_threshold": 0.5});
        let e = spec(&default, &extra(request)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("kv_threshold"));
        assert_eq!(
            e.message,
            "kv_threshold does nothing with the policy `ag` in budget mode (each head keeps its \
             budget of the most likely tokens)"
        );
    }

    #[test]
    fn a_huge_unknown_policy_is_not_echoed_whole() {
        let default = PolicySpec::new(PolicyKind::Full);
        let name = "x".repeat(10_000);
        let e = spec(&default, &extra(json!({ "kv_policy": name }))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("kv_policy"));
        assert!(e.message.len() < 400, "{} bytes", e.message.len());
        assert!(
            e.message
                .contains(&format!("`{}… (10000 characters)`", &name[..SHOWN_CHARS])),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_huge_bad_value_is_not_echoed_whole() {
        let default = PolicySpec::new(PolicyKind::Ag);
        let huge = vec!["x"; 10_000];
        let e = spec(&default, &extra(json!({ "kv_layer_thresholds": huge }))).unwrap_err();
        let shown = format!("{}", json!(huge));
        assert!(e.message.len() < 200, "{} bytes", e.message.len());
        assert!(e.message.contains(&shown[..SHOWN_CHARS]), "{}", e.message);
        assert!(
            e.message
                .ends_with(&format!("… ({} characters)", shown.len())),
            "{}",
            e.message
        );
    }

    #[test]
    fn kv_window_sets_the_window_the_policy_reads() {
        let default = PolicySpec::new(PolicyKind::Full);
        let s = spec(
            &default,
            &extra(json!({"kv_policy": "snapkv", "kv_window": 8})),
        )
        .unwrap();
        assert_eq!((s.window, s.recent), (Some(8), None));
        let s = spec(
            &default,
            &extra(json!({"kv_policy": "h2o", "kv_window": 8})),
        )
        .unwrap();
        assert_eq!((s.window, s.recent), (None, Some(8)));
        let e = spec(
            &default,
            &extra(json!({"kv_policy": "tova", "kv_window": 8})),
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("kv_window"));
        let e = spec(&default, &extra(json!({"kv_policy": "nope"}))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("kv_policy"));
        assert!(e.message.contains("unknown policy `nope`"), "{}", e.message);
    }

    #[test]
    fn policy_errors_name_the_request_fields_never_a_flag() {
        let e = api_error(EngineError::from(PolicyError::ProtectionExceedsBudget {
            policy: PolicyKind::Streaming,
            keep: 4,
            protected: 4,
            by: &[Setting::Sinks],
        }));
        assert_eq!(e.param.as_deref(), Some("kv_keep"));
        assert!(
            e.message.contains("at most kv_keep 4 tokens")
                && e.message.contains("its 4 kv_sinks leave no room")
                && !e.message.contains("--"),
            "{}",
            e.message
        );
        let e = api_error(EngineError::from(PolicyError::EmptyStreamingWindow));
        assert_eq!(e.param.as_deref(), Some("kv_window"));
        assert!(
            e.message.contains("kv_window must be at least 1"),
            "{}",
            e.message
        );
        let e = api_error(EngineError::from(PolicyError::NeedsGates));
        assert_eq!(e.param.as_deref(), Some("kv_policy"));
        assert!(e.message.contains("the server's --gates"), "{}", e.message);
    }

    #[test]
    fn kv_threshold_is_a_number_in_zero_one_inclusive() {
        let default = PolicySpec::new(PolicyKind::Ag);
        for t in [0.0, 0.5, 1.0] {
            let s = spec(&default, &extra(json!({ "kv_threshold": t }))).unwrap();
            assert_eq!(s.threshold, Some(t as f32));
        }
        for bad in [json!(1.5), json!(-0.1), json!("0.5")] {
            let e = spec(&default, &extra(json!({ "kv_threshold": bad }))).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("kv_threshold"));
            assert_eq!(
                e.message,
                format!("kv_threshold must be a number in [0, 1], got {bad}")
            );
        }
    }

    #[test]
    fn kv_layer_thresholds_is_an_array_of_numbers_in_place_of_the_threshold() {
        let default = PolicySpec {
            threshold: Some(0.4),
            ..PolicySpec::new(PolicyKind::Ag)
        };
        let s = spec(&default, &extra(json!({"kv_layer_thresholds": [0.1, 1]}))).unwrap();
        assert_eq!(
            (s.threshold, s.layer_thresholds),
            (None, Some(vec![0.1, 1.0]))
        );
        for bad in [
            json!(0.5),
            json!("0.5,0.5"),
            json!([0.5, "x"]),
            json!([[0.5]]),
        ] {
            let e = spec(&default, &extra(json!({ "kv_layer_thresholds": bad }))).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("kv_layer_thresholds"));
            assert_eq!(
                e.message,
                format!("kv_layer_thresholds must be an array of numbers, got {bad}")
            );
        }
        let both = json!({"kv_threshold": 0.5, "kv_layer_thresholds": [0.5, 0.5]});
        let e = spec(&default, &extra(both)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("kv_layer_thresholds"));
        assert_eq!(
            e.message,
            "give either kv_threshold or kv_layer_thresholds, not both"
        );
        let h2o = json!({"kv_policy": "h2o", "kv_layer_thresholds": [0.5, 0.5]});
        let e = spec(&default, &extra(h2o)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("kv_layer_thresholds"));
        assert_eq!(
            e.message,
            "kv_layer_thresholds does nothing with the policy `h2o`"
        );
        // The policy's own checks name the field too.
        let e = api_error(EngineError::from(PolicyError::LayerCount {
            given: 3,
            layers: 2,
        }));
        assert_eq!(e.param.as_deref(), Some("kv_layer_thresholds"));
        assert_eq!(
            e.message,
            "policy: kv_layer_thresholds gives 3 thresholds, but the model has 2 layers: give one \
             per layer"
        );
        let e = api_error(EngineError::from(PolicyError::NotBoth(
            Setting::Threshold,
            Setting::LayerThresholds,
        )));
        assert_eq!(e.param.as_deref(), Some("kv_layer_thresholds"));
        assert!(e.message.contains("kv_threshold or kv_layer_thresholds"));
    }
}
