//! A failed step leaves the session exactly as before it, under every policy: a chat turn that
//! the KV pool cannot hold is refused before it starts (cache, policy state, tokens seen,
//! pending token, transcript and logits unchanged, and later turns give exactly what a session
//! that never tried it gives), a pass whose logits are not finite is undone (the gate's own
//! cache included, after the pass overwrote its ring), and a forward pass that fails half-way is
//! undone by the decoder.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

mod common;

use engine::{Engine, GenerateRequest, PolicySpec, Session};
use kv_store::SequenceKv;
use model_zoo::{LayerHook, LayerPlan, LogitsFor};

/// A tiny random model (2 layers, 4 query / 2 KV heads, head dim 16) with a 1 MiB KV pool:
/// 1,024 blocks of 16 tokens of one head.
fn tiny_engine(dir: &std::path::Path) -> Engine {
    common::write_tiny_model(dir, 2, 4, 3, 8192);
    load(dir)
}

/// [`tiny_engine`] whose embedding of token `POISON` is NaN: a pass holding it fails with
/// non-finite logits after every layer ran (appends, plans, the gate's own cache).
fn poisoned_engine(dir: &std::path::Path) -> Engine {
    tiny_engine(dir);
    let weights = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let embedding = tensors.get_mut("model.embed_tokens.weight").unwrap();
    let mut rows = embedding.to_vec2::<f32>().unwrap();
    rows[POISON as usize].fill(f32::NAN);
    *embedding = candle_core::Tensor::new(rows, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    load(dir)
}

const POISON: u32 = 255;

fn load(dir: &std::path::Path) -> Engine {
    Engine::builder()
        .model(dir)
        .kv_memory_mb(1)
        .build()
        .unwrap()
}

/// Everything a user can observe of a session.
#[derive(Debug, PartialEq)]
struct Observed {
    kv: engine::KvReport,
    seen: Vec<u32>,
    pending: Option<u32>,
    logits: Option<Vec<f32>>,
    messages: Vec<engine::ChatMessage>,
    positions: Vec<Vec<Vec<u32>>>,
}

fn observe(s: &Session) -> Observed {
    let kv: &SequenceKv = s.kv();
    Observed {
        kv: s.kv_report(),
        seen: s.seen_tokens().to_vec(),
        pending: s.pending_token(),
        logits: s.last_logits().map(<[f32]>::to_vec),
        messages: s.messages().to_vec(),
        positions: (0..kv.n_layers())
            .map(|l| (0..kv.n_kv_heads()).map(|h| kv.positions(l, h)).collect())
            .collect(),
    }
}

fn request() -> GenerateRequest {
    GenerateRequest {
        max_tokens: 6,
        stop_at_eos: false,
        ..Default::default()
    }
}

/// Random gates near a coin flip (keep bias 0), written to `dir`.
fn coin_flip_gates(engine: &Engine, dir: &std::path::Path) -> std::path::PathBuf {
    let gates = dir.join("gates.safetensors");
    common::write_random_gates(engine, &gates, 5, Some(0.0));
    gates
}

fn spec(name: &str, gates: &std::path::Path) -> PolicySpec {
    match name {
        "full" => PolicySpec::new(engine::PolicyKind::Full),
        "ag" => PolicySpec {
            gates: Some(gates.to_path_buf()),
            ..PolicySpec::new(engine::PolicyKind::Ag)
        },
        other => PolicySpec {
            keep: Some(40), // at least SnapKV's default observation window (32)
            ..PolicySpec::new(other.parse().unwrap())
        },
    }
}

#[test]
fn a_turn_the_pool_cannot_hold_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    let gates = coin_flip_gates(&engine, dir.path());
    let long = "a long message that will not fit ".repeat(40);
    for name in engine::PolicyKind::names() {
        let policy = spec(name, &gates).build(&engine).unwrap();
        let mut session = engine.session_with(policy.clone()).unwrap();
        let mut twin = engine.session_with(policy).unwrap();
        for s in [&mut session, &mut twin] {
            s.chat("Hello there, how are you?", &request(), &mut |_| true)
                .unwrap();
        }
        // Another session takes all but a few blocks of the pool.
        let mut hog = engine.new_session();
        let free = engine.pool().stats().blocks_free;
        hog.prefill(&vec![65; (free - 6) * 16 / 4]).unwrap();
        let before = observe(&session);
        let err = session
            .chat(&long, &request(), &mut |_| true)
            .expect_err("the pool is nearly full");
        assert!(
            err.to_string().contains("out of KV blocks"),
            "{name}: {err}"
        );
        assert_eq!(
            observe(&session),
            before,
            "{name}: the failed turn changed the session"
        );
        // With the pool back, the session goes on exactly as one that never failed.
        drop(hog);
        let mut a = String::new();
        let mut b = String::new();
        session
            .chat("And now?", &request(), &mut |t| {
                a.push_str(t);
                true
            })
            .unwrap();
        twin.chat("And now?", &request(), &mut |t| {
            b.push_str(t);
            true
        })
        .unwrap();
        assert_eq!(a, b, "{name}: the answer after a failed turn differs");
        assert_eq!(observe(&session), observe(&twin), "{name}");
    }
}

#[test]
fn a_pass_with_non_finite_logits_is_undone_under_every_policy() {
    let dir = tempfile::tempdir().unwrap();
    let engine = poisoned_engine(&dir.path().join("model"));
    let gates = coin_flip_gates(&engine, dir.path());
    // The failed pass is longer than the gate's window: it overwrites the whole ring.
    assert!(engine.gate_config().attention_window < 80);
    let text =
        |n: usize, seed: u32| -> Vec<u32> { (0..n as u32).map(|i| (i * 7 + seed) % 200).collect() };
    let mut bad = text(79, 1);
    bad.push(POISON);
    for positions in [engine::Positions::Original, engine::Positions::Cache] {
        for name in engine::PolicyKind::names() {
            let policy = spec(name, &gates).build(&engine).unwrap();
            let mut session = engine.session_with(policy.clone()).unwrap();
            let mut twin = engine.session_with(policy).unwrap();
            for s in [&mut session, &mut twin] {
                s.set_positions(positions).unwrap();
                s.prefill(&text(100, 3)).unwrap();
            }
            let before = observe(&session);
            let err = session.prefill(&bad).expect_err("a NaN embedding");
            assert!(
                err.to_string().contains("non-finite logits"),
                "{name}: {err}"
            );
            assert_eq!(
                observe(&session),
                before,
                "{name}: the failed pass changed the session"
            );
            // A prefill, then one-token passes (the gate's decode step): exactly as the twin.
            for s in [&mut session, &mut twin] {
                s.prefill(&text(70, 5)).unwrap();
                for t in text(5, 11) {
                    s.prefill(&[t]).unwrap();
                }
            }
            assert_eq!(observe(&session), observe(&twin), "{name} ({positions:?})");
        }
    }
}

/// Fails in layer 1's plan of its `fail_on`-th pass.
struct FailingHook {
    passes: usize,
    fail_on: usize,
    aborted: usize,
}

impl LayerHook for FailingHook {
    fn begin_pass(&mut self, _: model_zoo::Pass) {
        self.passes += 1;
    }

    fn plan(
        &mut self,
        layer: usize,
        _: &candle_core::Tensor,
        _: &[u32],
        _: &SequenceKv,
    ) -> model_zoo::Result<LayerPlan> {
        if layer == 1 && self.passes == self.fail_on {
            return Err(model_zoo::ModelError::Input("injected failure".into()));
        }
        Ok(LayerPlan::default())
    }

    fn abort_pass(&mut self) {
        self.aborted += 1;
    }
}

#[test]
fn a_pass_that_fails_half_way_is_undone() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    let cfg = engine.model_config();
    let model = engine.model();
    let mut kv = SequenceKv::new(engine.pool(), cfg.n_layers, cfg.n_kv_heads);
    let mut hook = FailingHook {
        passes: 0,
        fail_on: 2,
        aborted: 0,
    };
    hook.begin_pass(model_zoo::Pass::Decode);
    model
        .forward(&[1, 2, 3, 4, 5], 0, &mut kv, &mut hook, LogitsFor::Last)
        .unwrap();
    let stats = kv.stats();
    let pool = engine.pool().stats().blocks_in_use;
    let heads: Vec<_> = (0..4).map(|i| kv.read_head(i / 2, i % 2)).collect();
    hook.begin_pass(model_zoo::Pass::Decode);
    let err = model
        .forward(&[6; 40], 5, &mut kv, &mut hook, LogitsFor::Last)
        .unwrap_err();
    assert_eq!(err.to_string(), "injected failure");
    assert_eq!(hook.aborted, 1);
    assert_eq!(kv.stats(), stats, "layer 0's append was not undone");
    assert_eq!(engine.pool().stats().blocks_in_use, pool);
    for (i, head) in heads.iter().enumerate() {
        assert_eq!(&kv.read_head(i / 2, i % 2), head);
    }
}

/// A prefill interrupted after its first chunk leaves the policy's prefill statistics (the
/// query tails of the window scorers, H2O's sums) part-way; a later pass that fails in its first
/// chunk, which starts a new prefill, must leave them as they were (`abort_pass`).
#[test]
fn a_failed_first_chunk_keeps_the_prefill_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model");
    poisoned_engine(&path);
    let engine = Engine::builder()
        .model(&path)
        .kv_memory_mb(1)
        .prefill_chunk(32)
        .build()
        .unwrap();
    let text =
        |n: usize, seed: u32| -> Vec<u32> { (0..n as u32).map(|i| (i * 7 + seed) % 200).collect() };
    // Chunk 1 (32 tokens) goes through; chunk 2 holds the NaN embedding.
    let mut interrupted = text(40, 1);
    interrupted.push(POISON);
    let mut bad = vec![POISON];
    bad.extend(text(10, 2));
    for positions in [engine::Positions::Original, engine::Positions::Cache] {
        for name in engine::PolicyKind::names()
            .into_iter()
            .filter(|n| !matches!(*n, "full" | "ag"))
        {
            let policy = spec(name, std::path::Path::new("")).build(&engine).unwrap();
            let mut session = engine.session_with(policy).unwrap();
            session.set_positions(positions).unwrap();
            session.prefill(&text(100, 3)).unwrap();
            session
                .prefill(&interrupted)
                .expect_err("chunk 2 holds a NaN embedding");
            assert_eq!(session.tokens_seen(), 132, "{name}");
            let before = observe(&session);
            if matches!(name, "snapkv" | "h2o") {
                assert!(before.kv.policy_state_bytes > 0, "{name}: nothing recorded");
            }
            session.prefill(&bad).expect_err("a NaN embedding");
            assert_eq!(
                observe(&session),
                before,
                "{name} ({positions:?}): the failed pass changed the policy's statistics"
            );
        }
    }
}
