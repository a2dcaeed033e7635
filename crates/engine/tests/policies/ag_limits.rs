//! Attention-Gate at the edges of its inputs: protections wider than the positions' range
//! (sizes above `u32::MAX`, which a flag, a request or a gates file can give) protect every
//! position, in threshold and budget mode, as a window wider than the sequence does; gates whose
//! finite weights overflow f32 make the pass fail with an error naming the layer and position,
//! leaving the session as it was, instead of evicting on NaN keep probabilities.

use std::collections::HashMap;

use engine::{Engine, PolicySpec};

use super::{common, tiny_engine};

/// The eviction ratio after a 150-token prompt under `spec`, and the last token's logits.
fn evicted(engine: &Engine, spec: PolicySpec) -> (f64, Vec<f32>) {
    let mut session = engine.session_with(spec.build(engine).unwrap()).unwrap();
    session.prefill(&common::tokens(150, 4)).unwrap();
    let logits = session.last_logits().unwrap().to_vec();
    (session.kv_report().eviction_ratio, logits)
}

#[test]
fn protections_beyond_the_positions_range_protect_every_position() {
    let (dir, engine) = tiny_engine(engine::KvDtype::F32);
    let gates = dir.path().join("gates.safetensors");
    common::write_random_gates(&engine, &gates, 8, Some(0.0));
    // 2^32 + 1 (cut to 32 bits it would be 1) where usize holds it, and usize::MAX (where
    // `sinks + recent` would wrap).
    let huge = usize::try_from((1u64 << 32) + 1).unwrap_or(usize::MAX);
    for budget_mode in [false, true] {
        let ag = |sinks: usize, recent: usize| PolicySpec {
            gates: Some(gates.clone()),
            sinks: Some(sinks),
            recent: Some(recent),
            evict: budget_mode.then_some(0.5),
            ag_budget_mode: budget_mode,
            threshold: (!budget_mode).then_some(0.5),
            ..PolicySpec::new(engine::PolicyKind::Ag)
        };
        let (some, _) = evicted(&engine, ag(2, 3));
        assert!(some > 0.2, "budget mode {budget_mode}: evicted {some}");
        // A window wider than the prompt: nothing evicted, nothing hidden from any query.
        let (none, all_seen) = evicted(&engine, ag(2, 1000));
        assert_eq!(none, 0.0);
        for (sinks, recent) in [(huge, 3), (2, huge), (usize::MAX, 3), (2, usize::MAX)] {
            let got = evicted(&engine, ag(sinks, recent));
            assert!(
                got == (0.0, all_seen.clone()),
                "sinks {sinks}, recent {recent}: evicted {}, the same logits: {}",
                got.0,
                got.1 == all_seen
            );
        }
    }
}

#[test]
fn gates_that_overflow_f32_fail_the_pass_naming_layer_and_position() {
    let (dir, engine) = tiny_engine(engine::KvDtype::F32);
    let random = engine.random_gates(&engine.gate_config(), 3).unwrap();
    // Every query weight 1e38: the gate's scores overflow to infinity, its softmax to NaN.
    let tensors: HashMap<String, candle_core::Tensor> = random
        .named_tensors()
        .into_iter()
        .map(|(name, t)| match name.ends_with(".wq") {
            true => (name, t.ones_like().unwrap().affine(1e38, 0.0).unwrap()),
            false => (name, t),
        })
        .collect();
    let mut broken = engine::AttentionGate::from_tensors(random.config(), tensors).unwrap();
    broken.set_identity(random.identity().clone());
    let path = dir.path().join("broken.safetensors");
    engine::policy::write_gates(&broken, &path, engine::GateFileDtype::F32).unwrap();
    let spec = PolicySpec {
        gates: Some(path),
        ..PolicySpec::new(engine::PolicyKind::Ag)
    };
    let mut session = engine.session_with(spec.build(&engine).unwrap()).unwrap();
    let err = session
        .prefill(&common::tokens(20, 4))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gate of layer 0")
            && err.contains("not a number (NaN) at position 0")
            && err.contains("gates file"),
        "{err}"
    );
    assert_eq!(session.kv_report().tokens_seen, 0);
}
