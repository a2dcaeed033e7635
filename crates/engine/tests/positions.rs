//! Cache positions (StreamingLLM's): keys are rotated for their position in each KV head's
//! cache, whose gaps are closed by re-rotating keys, so a chat whose policy keeps a fixed budget
//! runs past the model's context, for every policy that keeps one; the default original
//! positions still stop at the context; with nothing evicted both modes are the same
//! computation; keys stay rotated for their cache position through every repack.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use engine::{Engine, GenerateRequest, PolicySpec, Positions, Session};

/// A tiny random model (2 layers, 4 query / 2 KV heads, head dim 16) with a `context`-token
/// context and an f32 KV cache.
fn tiny_engine(dir: &std::path::Path, context: usize) -> Engine {
    let mut cfg = model_zoo::random::tiny_config(2, 4, 2);
    cfg.max_position = context;
    engine::atomic::write_dir(dir, |s| model_zoo::random::write_random_model(s, &cfg, 9)).unwrap();
    Engine::builder()
        .model(dir)
        .kv_dtype(engine::KvDtype::F32)
        .build()
        .unwrap()
}

fn session(engine: &Engine, spec: PolicySpec, positions: Positions) -> Session {
    let mut s = engine.session_with(spec.build(engine).unwrap()).unwrap();
    s.set_positions(positions).unwrap();
    s
}

fn keep(name: &str, tokens: usize) -> PolicySpec {
    PolicySpec {
        keep: Some(tokens),
        ..PolicySpec::new(name.parse().unwrap())
    }
}

/// Chat turns of a few words until the session has seen `tokens` tokens.
fn converse(s: &mut Session, tokens: usize) -> engine::Result<usize> {
    let request = GenerateRequest {
        max_tokens: 8,
        stop_at_eos: false,
        ..Default::default()
    };
    let mut turns = 0;
    while s.tokens_seen() < tokens {
        // Short turns: a turn must fit beside the 32 kept tokens in a 64-token context.
        s.chat(&format!("go {turns}"), &request, &mut |_| true)?;
        turns += 1;
    }
    Ok(turns)
}

#[test]
fn a_bounded_chat_runs_past_the_context_under_every_fixed_budget() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path(), 64);
    let gates = dir.path().join("gates.safetensors");
    let g = engine.random_gates(&engine.gate_config(), 1).unwrap();
    engine::train::write_gates(&g, &gates, engine::GateFileDtype::F32).unwrap();
    let ag_budget = PolicySpec {
        keep: Some(32),
        gates: Some(gates),
        ag_budget_mode: true,
        ..PolicySpec::new(engine::PolicyKind::Ag)
    };
    for spec in [
        keep("streaming", 32),
        keep("h2o", 32),
        keep("tova", 32),
        keep("random", 32),
        ag_budget,
    ] {
        let name = spec.kind;
        let mut s = session(&engine, spec, Positions::Cache);
        let turns = converse(&mut s, 1000).unwrap_or_else(|e| panic!("{name}: {e}"));
        let kv = s.kv_report();
        assert!(kv.tokens_seen >= 1000, "{name}");
        assert!(
            kv.retained_per_layer_head
                .iter()
                .flatten()
                .all(|&r| r <= 32),
            "{name}: {kv:?}"
        );
        // Bounded memory, whatever was seen: 32 entries per head in blocks of 16, the first and
        // the last partly filled after compaction, so at most three blocks per head.
        assert!(
            kv.blocks_in_use <= 2 * 2 * 3,
            "{name}: {} blocks",
            kv.blocks_in_use
        );
        assert!(turns > 20, "{name}");
    }
}

#[test]
fn original_positions_end_at_the_context_and_unbounded_caches_end_in_cache_positions_too() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path(), 64);
    let mut s = session(&engine, keep("streaming", 32), Positions::Original);
    let err = converse(&mut s, 1000).unwrap_err().to_string();
    assert!(
        err.contains("does not fit") && err.contains("context is 64"),
        "{err}"
    );
    // A cache that keeps everything fills the context in cache positions too.
    let mut s = session(
        &engine,
        PolicySpec::new(engine::PolicyKind::Full),
        Positions::Cache,
    );
    let err = converse(&mut s, 1000).unwrap_err().to_string();
    assert!(err.contains("widest KV head"), "{err}");
}

#[test]
fn with_nothing_evicted_both_modes_are_the_same_computation() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path(), 256);
    let mut logits = Vec::new();
    for positions in [Positions::Original, Positions::Cache] {
        let mut s = session(
            &engine,
            PolicySpec::new(engine::PolicyKind::Full),
            positions,
        );
        converse(&mut s, 100).unwrap();
        logits.push(s.last_logits().map(<[f32]>::to_vec));
    }
    assert_eq!(logits[0], logits[1]);
}

#[test]
fn moved_keys_stay_rotated_for_their_cache_position() {
    // Layer 0's keys depend only on the tokens, so each key of a cache-positions session, turned
    // back by its cache position, equals the original-positions key turned back by its token
    // position: through every repack. Streaming evicts one contiguous run, random scattered
    // entries (seeded by position, the same in both modes). A 96-token context repacks often.
    let (small, large) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The same weights (same seed), contexts of 96 and 4,096 tokens.
    let (engine, reference) = (
        tiny_engine(small.path(), 96),
        tiny_engine(large.path(), 4096),
    );
    let shift = engine.model().key_shift();
    let d = engine.model_config().head_dim;
    for spec in [keep("streaming", 24), keep("random", 24)] {
        let name = spec.kind;
        let mut cache = session(&engine, spec.clone(), Positions::Cache);
        let mut original = session(&reference, spec, Positions::Original);
        for chunk in 0..30u32 {
            let ids: Vec<u32> = (0..10).map(|t| (chunk * 31 + t * 7) % 256).collect();
            cache.prefill(&ids).unwrap();
            original.prefill(&ids).unwrap();
        }
        for h in 0..2 {
            let (c, o) = (cache.kv().read_head(0, h), original.kv().read_head(0, h));
            assert_eq!(c.positions, o.positions, "{name}: different evictions");
            let at = cache.kv().cache_positions(0, h);
            assert_eq!(at.len(), c.positions.len());
            assert_ne!(at, c.positions, "{name}: no key was ever moved");
            for (i, (kc, ko)) in c.keys.chunks(d).zip(o.keys.chunks(d)).enumerate() {
                let (mut kc, mut ko) = (kc.to_vec(), ko.to_vec());
                shift(&mut kc, -i64::from(at[i]));
                shift(&mut ko, -i64::from(o.positions[i]));
                let diff = kc
                    .iter()
                    .zip(&ko)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(diff < 1e-3, "{name} head {h} entry {i}: {diff}");
            }
        }
    }
}
