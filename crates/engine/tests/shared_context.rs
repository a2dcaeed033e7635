//! A context prefilled once and shared copy-on-write ([`SharedContext`]) gives, for every
//! baseline policy, exactly the session a fresh prefill gives — same kept entries, bit-identical
//! logits, the same continuation — while the pool holds the context once; and what follows a
//! compressed context (a question) is kept whole by the one-shot policies, while a new context
//! (the next chat turn) is compressed again to the budget of everything seen. The same holds in
//! cache positions, where a fork carries the context's cache positions and closes the gaps its
//! eviction left as a fresh session does after its last prefill pass.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

mod common;

use common::tokens;
use engine::{Engine, Policy, PolicyKind, PolicySpec, Positions, PrefillKind, SharedContext};
use gate_core::select::Budget;

fn tiny_engine(prefill_chunk: usize) -> (tempfile::TempDir, Engine) {
    common::tiny_engine(3, 23, engine::KvDtype::F16, prefill_chunk)
}

fn baselines(engine: &Engine, ratio: f32) -> Vec<Policy> {
    let mut out = vec![Policy::Full];
    for kind in PolicyKind::ALL
        .into_iter()
        .filter(|k| ![PolicyKind::Full, PolicyKind::Ag].contains(k))
    {
        let spec = PolicySpec {
            evict: Some(ratio),
            ..PolicySpec::new(kind)
        };
        out.push(spec.build(engine).unwrap());
    }
    out
}

fn kept(session: &engine::Session) -> Vec<Vec<Vec<u32>>> {
    let kv = session.kv();
    (0..kv.n_layers())
        .map(|l| (0..kv.n_kv_heads()).map(|h| kv.positions(l, h)).collect())
        .collect()
}

#[test]
fn forked_sessions_equal_separate_prefills() {
    let (_dir, engine) = tiny_engine(128);
    let context = tokens(700, 3);
    let question = tokens(20, 4);
    let request = engine::GenerateRequest {
        max_tokens: 6,
        stop_at_eos: false,
        ..Default::default()
    };
    for ratio in [0.3f32, 0.75] {
        let policies = baselines(&engine, ratio);
        let shared = SharedContext::prefill(&engine, &context, &policies).unwrap();
        let pool_after_context = engine.pool().stats().blocks_in_use;
        for policy in &policies {
            let name = policy.name();
            let mut fork = shared.session(policy).unwrap();
            let mut fresh = engine.session_with(policy.clone()).unwrap();
            fresh.prefill(&context).unwrap();
            assert_eq!(kept(&fork), kept(&fresh), "{name} at {ratio}: kept entries");
            assert_eq!(fork.last_logits(), fresh.last_logits(), "{name} at {ratio}");
            let (a, b) = (fork.kv_report(), fresh.kv_report());
            assert_eq!(
                (a.bytes_in_use, a.eviction_ratio, a.tokens_seen),
                (b.bytes_in_use, b.eviction_ratio, b.tokens_seen),
                "{name} at {ratio}: a fork counts what it would hold alone"
            );
            assert_eq!(b.bytes_shared, 0);
            // The pool holds the context once: only the fork's own (copied) blocks are new.
            let own = a.kv_block_bytes - a.bytes_shared;
            let block = engine.pool().config().block_bytes();
            let fresh_blocks = b.kv_block_bytes / block;
            assert_eq!(
                engine.pool().stats().blocks_in_use,
                pool_after_context + own / block + fresh_blocks,
                "{name} at {ratio}: pool accounting"
            );
            if name == "full" {
                assert_eq!(
                    a.bytes_shared, a.kv_block_bytes,
                    "a full fork copies nothing"
                );
            }
            // Both continue identically: a question kept after the context, then greedy tokens.
            for s in [&mut fork, &mut fresh] {
                s.prefill_as(&question, PrefillKind::Continuation).unwrap();
            }
            assert_eq!(
                kept(&fork),
                kept(&fresh),
                "{name} at {ratio}: after the question"
            );
            let (ga, gb) = (
                fork.generate_from_tokens(&[], &request).unwrap(),
                fresh.generate_from_tokens(&[], &request).unwrap(),
            );
            assert_eq!(ga.tokens, gb.tokens, "{name} at {ratio}: generated tokens");
            assert_eq!(fork.last_logits(), fresh.last_logits());
        }
        drop(shared);
        assert_eq!(
            engine.pool().stats().blocks_in_use,
            0,
            "everything returned"
        );
    }
}

#[test]
fn forked_sessions_in_cache_positions_equal_separate_prefills() {
    // A 1,024-token context and 512-token chunks: gaps close once a head spans 512 positions,
    // so the eviction of a 700-token context is followed by a repack.
    let (_dir, engine) = common::tiny_engine_with_context(2, 29, engine::KvDtype::F16, 512, 1024);
    let context = tokens(700, 5);
    let question = tokens(20, 6);
    let request = engine::GenerateRequest {
        max_tokens: 5,
        stop_at_eos: false,
        ..Default::default()
    };
    let policies = baselines(&engine, 0.5);
    let shared = SharedContext::prefill_in(&engine, &context, &policies, Positions::Cache).unwrap();
    let cache_positions = |s: &engine::Session| -> Vec<Vec<u32>> {
        let kv = s.kv();
        (0..kv.n_layers() * kv.n_kv_heads())
            .map(|i| kv.cache_positions(i / kv.n_kv_heads(), i % kv.n_kv_heads()))
            .collect()
    };
    let mut repacked = 0;
    for policy in &policies {
        let name = policy.name();
        let mut fork = shared.session(policy).unwrap();
        let mut fresh = engine.session_with(policy.clone()).unwrap();
        fresh.set_positions(Positions::Cache).unwrap();
        fresh.prefill(&context).unwrap();
        assert_eq!(fork.positions(), Positions::Cache, "{name}");
        assert_eq!(kept(&fork), kept(&fresh), "{name}: kept entries");
        assert_eq!(cache_positions(&fork), cache_positions(&fresh), "{name}");
        let token_positions: Vec<Vec<u32>> = kept(&fork).concat();
        repacked += usize::from(cache_positions(&fork) != token_positions);
        for s in [&mut fork, &mut fresh] {
            s.prefill_as(&question, PrefillKind::Continuation).unwrap();
        }
        let (ga, gb) = (
            fork.generate_from_tokens(&[], &request).unwrap(),
            fresh.generate_from_tokens(&[], &request).unwrap(),
        );
        assert_eq!(ga.tokens, gb.tokens, "{name}: generated tokens");
        assert_eq!(fork.last_logits(), fresh.last_logits(), "{name}");
        assert_eq!(cache_positions(&fork), cache_positions(&fresh), "{name}");
    }
    assert!(repacked > 0, "no fork closed the gaps of its eviction");
}

#[test]
fn attention_gate_cannot_share_a_context() {
    let (dir, engine) = tiny_engine(128);
    let gates = dir.path().join("gates.safetensors");
    engine
        .random_gates(&engine.gate_config(), 1)
        .and_then(|g| engine::train::write_gates(&g, &gates, engine::GateFileDtype::F32))
        .unwrap();
    let ag = PolicySpec {
        gates: Some(gates),
        ..PolicySpec::new(engine::PolicyKind::Ag)
    }
    .build(&engine)
    .unwrap();
    let err = SharedContext::prefill(&engine, &tokens(10, 1), &[ag])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("inside the prefill"), "{err}");
    let err = SharedContext::prefill(&engine, &[], &[])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("empty"), "{err}");
}

/// kvpress' protocol through the session API: a question fed as a continuation is kept whole
/// by every one-shot policy, in every head; the next context prefill (a chat turn) compresses
/// the whole cache again, to the budget of every token seen.
#[test]
fn one_shot_policies_keep_continuations_and_recompress_at_the_next_context() {
    let (_dir, engine) = tiny_engine(64);
    let context = tokens(400, 5);
    let question = tokens(30, 6);
    let turn = tokens(100, 7);
    for name in ["snapkv", "pyramidkv", "knorm", "nacl"] {
        let spec = PolicySpec {
            evict: Some(0.5),
            ..PolicySpec::new(name.parse().unwrap())
        };
        let mut s = engine.session_with(spec.build(&engine).unwrap()).unwrap();
        s.prefill(&context).unwrap();
        s.prefill_as(&question, PrefillKind::Continuation).unwrap();
        let seen = (context.len() + question.len()) as u32;
        for (l, layer) in kept(&s).iter().enumerate() {
            for (h, positions) in layer.iter().enumerate() {
                let q: Vec<u32> = positions
                    .iter()
                    .copied()
                    .filter(|&p| p >= context.len() as u32)
                    .collect();
                assert_eq!(
                    q,
                    (context.len() as u32..seen).collect::<Vec<_>>(),
                    "{name}: layer {l} head {h} lost question tokens"
                );
            }
        }
        s.prefill(&turn).unwrap();
        let total = context.len() + question.len() + turn.len();
        let budget = Budget::EvictRatio(0.5).keep_count(total);
        let report = s.kv_report();
        let mean = report
            .retained_per_layer_head
            .iter()
            .flatten()
            .sum::<usize>() as f64
            / (report.retained_per_layer_head.len() * 2) as f64;
        assert!(
            (mean - budget as f64).abs() < 1.0,
            "{name}: {mean} retained on average after the second context, budget {budget}"
        );
    }
}
