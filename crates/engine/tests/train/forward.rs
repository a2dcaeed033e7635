//! The training forward against the inference decoder (full cache, and the gates' hard flags
//! against the Attention-Gate policy in threshold mode), and the committed default gates.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use engine::train::open_trainable;
use engine::{Engine, EngineError, GateFileDtype, PolicySpec};
use gate_core::Protection;
use model_zoo::train::{GateMode, Gating};
use model_zoo::{KeepAll, LogitsFor, WeightFormat};

use super::common::{self, tokens};
use super::{max_abs_diff, tiny_engine};

/// Inference logits `[T, V]` of `toks` with a full cache (dense f32 weights).
fn inference_logits(path: &Path, toks: &[u32]) -> Tensor {
    let loaded = model_zoo::load(path, WeightFormat::Dense(DType::F32)).unwrap();
    let cfg = loaded.model.config().clone();
    let pool = kv_store::BlockPool::new(kv_store::PoolConfig::from_memory_budget(
        16,
        cfg.head_dim,
        kv_store::KvDtype::F32,
        256 << 20,
    ));
    let mut kv = kv_store::SequenceKv::new(&pool, cfg.n_layers, cfg.n_kv_heads);
    loaded
        .model
        .forward(toks, 0, &mut kv, &mut KeepAll, LogitsFor::All)
        .unwrap()
}

fn training_logits(engine: &Engine, toks: &[u32], gating: Option<Gating<'_>>) -> Tensor {
    let dec = open_trainable(engine.model_path(), engine.model_config()).unwrap();
    let inp = Tensor::from_vec(toks.to_vec(), (1, toks.len()), &Device::Cpu).unwrap();
    dec.forward(&inp, gating, None)
        .unwrap()
        .logits
        .squeeze(0)
        .unwrap()
}

#[test]
fn training_forward_equals_inference_on_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path());
    let toks = tokens(40, 3);
    let d = max_abs_diff(
        &training_logits(&engine, &toks, None),
        &inference_logits(dir.path(), &toks),
    );
    assert!(
        d < 1e-3,
        "full cache: training vs inference logits differ by {d}"
    );
}

#[test]
fn hard_flags_equal_the_ag_policy_in_threshold_mode() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path());
    let gates_path = dir.path().join("gates.safetensors");
    engine
        .random_gates(
            &engine::GateConfig {
                bias_init: 0.0,
                ..engine.gate_config()
            },
            7,
        )
        .and_then(|g| engine::policy::write_gates(&g, &gates_path, GateFileDtype::F32))
        .unwrap();
    let mut gates = gate_core::AttentionGate::load(
        &gates_path,
        &engine.model_identity().unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    // As the policy runs them.
    gates.round_projections_to_int4().unwrap();
    let toks = tokens(48, 9);
    let full = training_logits(&engine, &toks, None);
    let mut previous: Option<Tensor> = None;
    // No protection (the paper's setting), then sinks and a local window that straddles the
    // prefill's 16-token chunks.
    for protect in [
        Protection::NONE,
        Protection {
            sinks: 2,
            recent: 5,
        },
    ] {
        let policy = PolicySpec {
            gates: Some(gates_path.clone()),
            sinks: Some(protect.sinks),
            recent: Some(protect.recent),
            ..PolicySpec::new(engine::PolicyKind::Ag)
        }
        .build(&engine)
        .unwrap();
        let mut session = engine.session_with(policy).unwrap();
        let inference = session.prefill_all_logits(&toks).unwrap();
        let ratio = session.kv_report().eviction_ratio;
        assert!(ratio > 0.2, "random gates evicted too little ({ratio})");
        let gating = Gating {
            gates: &gates,
            mode: GateMode::Hard,
            protect,
        };
        let trained = training_logits(&engine, &toks, Some(gating));
        let d = max_abs_diff(&trained, &inference.to_dtype(DType::F32).unwrap());
        assert!(
            d < 1e-3,
            "hard flags, {protect:?}: training vs AG policy logits differ by {d}"
        );
        // Eviction changes the logits, and so do the protections (the comparisons are not
        // vacuous).
        assert!(max_abs_diff(&full, &trained) > 1e-3);
        if let Some(p) = &previous {
            assert!(max_abs_diff(p, &trained) > 1e-3);
        }
        previous = Some(trained);
    }
}

#[test]
fn training_forward_equals_inference_on_the_default_model() {
    let Some(path) = common::default_model() else {
        return;
    };
    let engine = Engine::builder()
        .model(&path)
        .weights(WeightFormat::Dense(DType::F32))
        .build()
        .unwrap();
    let toks = engine
        .tokenizer()
        .encode("The history of the city begins in the Roman era, when a small settlement grew on the river bank.", true)
        .unwrap();
    let d = max_abs_diff(
        &training_logits(&engine, &toks, None),
        &inference_logits(&path, &toks),
    );
    assert!(
        d < 1e-3,
        "default model: training vs inference logits differ by {d}"
    );
}

#[cfg(feature = "default-gates")]
#[test]
fn policy_ag_defaults_to_the_committed_gates_only_for_the_default_model() {
    let Some(path) = common::default_model() else {
        return;
    };
    let engine = Engine::builder().model(&path).build().unwrap();
    match PolicySpec::new(engine::PolicyKind::Ag)
        .build(&engine)
        .unwrap()
    {
        engine::Policy::Ag { gates, .. } => {
            assert_eq!(gates.identity(), &engine.model_identity().unwrap());
            // Projections rounded to 4 bits (two codes a byte, an f32 scale per 32), the
            // read-out in f32, in each of 30 layers.
            let (inner, hidden, heads) = (128, 576, 3);
            let projection = 3 * inner * hidden;
            let per_layer = projection / 2 + 4 * projection / 32 + 4 * (heads * inner + heads);
            assert_eq!(gates.decode_weight_bytes().unwrap(), 30 * per_layer);
        }
        other => panic!("expected the ag policy, got {}", other.name()),
    }
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_engine(dir.path());
    let err = PolicySpec::new(engine::PolicyKind::Ag)
        .build(&tiny)
        .unwrap_err();
    assert!(
        matches!(err, EngineError::Policy(engine::PolicyError::NeedsGates)),
        "{err}"
    );
    assert!(err.to_string().contains("needs gates"), "{err}");
}
