//! Attention-Gate's per-layer thresholds (`layer_thresholds`): a list of one value in every
//! layer runs exactly as that uniform threshold; each layer flags by its own threshold; a list
//! that does not fit the model, a value outside `[0, 1]`, and `threshold` beside it are
//! refused, naming the setting and the value.

use std::collections::HashSet;
use std::path::Path;

use engine::{Engine, EngineError, PolicyError, PolicySpec, Session, Setting};

use super::{common, kept_positions, tiny_engine};

/// Sinks and local window of every run here.
const SINKS: usize = 2;
const RECENT: usize = 3;

/// Attention-Gate in threshold mode with the gates at `gates`, the protections above and the
/// given thresholds.
fn ag(gates: &Path, threshold: Option<f32>, layer_thresholds: Option<Vec<f32>>) -> PolicySpec {
    PolicySpec {
        gates: Some(gates.to_path_buf()),
        sinks: Some(SINKS),
        recent: Some(RECENT),
        threshold,
        layer_thresholds,
        ..PolicySpec::new(engine::PolicyKind::Ag)
    }
}

/// A session under `spec` after a 150-token prompt.
fn prefilled(engine: &Engine, spec: &PolicySpec) -> Session {
    let mut session = engine.session_with(spec.build(engine).unwrap()).unwrap();
    session.prefill(&common::tokens(150, 4)).unwrap();
    session
}

/// The tiny model and random gates with keep bias 0, whose keep probabilities lie near 0.5 (a
/// threshold there flags tokens out; 0.3 keeps them all).
fn engine_and_gates() -> (tempfile::TempDir, Engine, std::path::PathBuf) {
    let (dir, engine) = tiny_engine(engine::KvDtype::F32);
    let path = dir.path().join("gates.safetensors");
    common::write_random_gates(&engine, &path, 8, Some(0.0));
    (dir, engine, path)
}

/// Kept positions, retained counts and the logits of the prompt's last token and of five more
/// fed one at a time (decode-sized passes), bit for bit.
#[test]
fn the_same_threshold_in_every_layer_is_the_uniform_threshold() {
    let (_dir, engine, gates) = engine_and_gates();
    let layers = engine.model_config().n_layers;
    let run = |spec: PolicySpec| {
        let mut session = prefilled(&engine, &spec);
        let mut logits = session.last_logits().unwrap().to_vec();
        for token in common::tokens(5, 9) {
            session.prefill(&[token]).unwrap();
            logits.extend_from_slice(session.last_logits().unwrap());
        }
        let report = session.kv_report();
        (
            kept_positions(session.kv()),
            report.retained_per_layer_head,
            logits,
        )
    };
    for t in [0.5, 0.52] {
        let uniform = run(ag(&gates, Some(t), None));
        let per_layer = run(ag(&gates, None, Some(vec![t; layers])));
        let tokens = 155;
        let retained: usize = uniform.1.iter().flatten().sum();
        assert!(
            retained < tokens * uniform.1.len() * uniform.1[0].len() * 9 / 10,
            "threshold {t}: too little evicted to compare ({retained} retained)"
        );
        assert_eq!(per_layer.0, uniform.0, "threshold {t}: kept positions");
        assert_eq!(per_layer.1, uniform.1, "threshold {t}: retained counts");
        assert_eq!(per_layer.2, uniform.2, "threshold {t}: logits");
    }
}

/// Layer 0 at threshold 0 keeps every token; the other layers at 1 flag every token out and
/// keep only the sinks and the local window.
#[test]
fn each_layer_flags_by_its_own_threshold() {
    let (_dir, engine, gates) = engine_and_gates();
    let layers = engine.model_config().n_layers;
    assert!(layers >= 3);
    let mut thresholds = vec![1.0; layers];
    thresholds[0] = 0.0;
    let session = prefilled(&engine, &ag(&gates, None, Some(thresholds)));
    let every: HashSet<u32> = (0..150).collect();
    let protected: HashSet<u32> = (0..SINKS as u32).chain(147..150).collect();
    assert_eq!(protected.len(), SINKS + RECENT);
    let kept = kept_positions(session.kv());
    let retained = session.kv_report().retained_per_layer_head;
    for (layer, (heads, counts)) in kept.iter().zip(&retained).enumerate() {
        let (want, count) = if layer == 0 {
            (&every, 150)
        } else {
            (&protected, SINKS + RECENT)
        };
        for (head, (positions, &n)) in heads.iter().zip(counts).enumerate() {
            assert_eq!(positions, want, "layer {layer} head {head}: kept positions");
            assert_eq!(n, count, "layer {layer} head {head}: retained count");
        }
    }
}

/// Each refusal names the setting at fault and the value.
#[test]
fn thresholds_that_do_not_fit_are_refused_naming_the_setting() {
    let (_dir, engine, gates) = engine_and_gates();
    let layers = engine.model_config().n_layers;
    let refused = |spec: PolicySpec| match spec.build(&engine) {
        Err(EngineError::Policy(e)) => e,
        Err(other) => panic!("not a policy error: {other}"),
        Ok(_) => panic!("accepted {spec:?}"),
    };
    let e = refused(ag(&gates, None, Some(vec![0.5; layers - 1])));
    assert!(matches!(e, PolicyError::LayerCount { .. }), "{e:?}");
    assert_eq!(e.setting(), Some(Setting::LayerThresholds));
    assert_eq!(
        e.to_string(),
        format!(
            "layer_thresholds gives {} thresholds, but the model has {layers} layers: give one \
             per layer",
            layers - 1
        )
    );
    for (bad, shown) in [(f32::NAN, "NaN"), (1.5, "1.5"), (-0.1, "-0.1")] {
        let mut list = vec![0.5; layers];
        list[1] = bad;
        let e = refused(ag(&gates, None, Some(list)));
        assert_eq!(e.setting(), Some(Setting::LayerThresholds));
        assert_eq!(
            e.to_string(),
            format!("layer_thresholds: gate threshold must be in [0, 1], got {shown} in layer 1")
        );
    }
    let e = refused(ag(&gates, Some(1.5), None));
    assert_eq!(
        e.to_string(),
        "threshold: gate threshold must be in [0, 1], got 1.5"
    );
    let e = refused(ag(&gates, Some(0.5), Some(vec![0.5; layers])));
    assert_eq!(e.setting(), Some(Setting::LayerThresholds));
    assert_eq!(
        e.to_string(),
        "give either threshold or layer_thresholds, not both"
    );
    // Another policy, or Attention-Gate in budget mode, does not use them.
    let h2o = PolicySpec {
        layer_thresholds: Some(vec![0.5; layers]),
        ..PolicySpec::new(engine::PolicyKind::H2o)
    };
    assert_eq!(h2o.ignored(), [Setting::LayerThresholds]);
    let budget = PolicySpec {
        ag_budget_mode: true,
        ..ag(&gates, None, Some(vec![0.5; layers]))
    };
    assert!(budget.ignored().contains(&Setting::LayerThresholds));
}
