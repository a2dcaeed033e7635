//! Budgets and memory: every head keeps exactly its budget and KV bytes follow the retained
//! count; protected tokens that do not fit a fixed budget are refused (and Attention-Gate keeps
//! them above a ratio budget too small for them); a long conversation and Attention-Gate's own
//! state stay bounded.

use std::collections::HashSet;

use engine::{Engine, EngineError, PolicyError, PolicySpec, Setting};
use gate_core::select::Budget;

use super::common::{self, tokens};
use super::{kept_positions, spec, tiny_engine};

#[test]
fn budgets_are_met_exactly_and_memory_follows() {
    let (dir, engine) = tiny_engine(engine::KvDtype::F16);
    let gates = dir.path().join("gates.safetensors");
    common::write_random_gates(&engine, &gates, 4, None);
    let prompt = tokens(333, 3);
    let t = prompt.len();
    let mut full = engine.new_session();
    full.prefill(&prompt).unwrap();
    let full_report = full.kv_report();
    assert_eq!(full_report.eviction_ratio, 0.0);
    assert_eq!(full_report.bytes_in_use, full_report.bytes_full);
    assert_eq!(full_report.policy_state_bytes, 0);
    let block_bytes = engine.pool().config().block_bytes();
    let heads = engine.model_config().n_layers * engine.model_config().n_kv_heads;
    for ratio in [0.25f32, 0.5, 0.75] {
        // Every evicting policy with one budget for all layers (PyramidKV's fall with depth:
        // `pyramid_budgets_average_to_the_request`).
        let uniform = engine::PolicyKind::names()
            .into_iter()
            .filter(|n| !matches!(*n, "full" | "pyramidkv"));
        for name in uniform {
            let mut s = spec(name, ratio, Some(&gates));
            s.ag_budget_mode = true;
            let mut session = engine.session_with(s.build(&engine).unwrap()).unwrap();
            session.prefill(&prompt).unwrap();
            let report = session.kv_report();
            let keep = Budget::EvictRatio(ratio).keep_count(t);
            assert!(
                ((1.0 - keep as f32 / t as f32) - ratio).abs() <= 1.0 / t as f32,
                "{name} {ratio}: keep {keep} of {t}"
            );
            for (l, layer) in report.retained_per_layer_head.iter().enumerate() {
                for (h, &n) in layer.iter().enumerate() {
                    assert_eq!(
                        n, keep,
                        "{name} at evict {ratio}: layer {l} head {h} kept {n}, budget {keep}"
                    );
                }
            }
            // KV bytes: the retained entries' blocks, within one block per head; every byte of
            // the session is the blocks plus the policy's own state, which only H2O (scores)
            // and Attention-Gate (its cache and per-entry probabilities) hold.
            let ideal = heads * keep * block_bytes / engine.pool().config().block_size;
            assert!(
                report.kv_block_bytes >= ideal
                    && report.kv_block_bytes <= ideal + heads * block_bytes,
                "{name} {ratio}"
            );
            assert_eq!(
                report.bytes_in_use,
                report.kv_block_bytes + report.policy_state_bytes
            );
            assert_eq!(
                report.policy_state_bytes > 0,
                matches!(name, "h2o" | "ag"),
                "{name}"
            );
            assert!(report.kv_block_bytes < full_report.kv_block_bytes);
        }
    }
}

#[test]
fn pyramid_budgets_average_to_the_request() {
    let (_dir, engine) = tiny_engine(engine::KvDtype::F16);
    let prompt = tokens(400, 5);
    let mut session = engine
        .session_with(spec("pyramidkv", 0.5, None).build(&engine).unwrap())
        .unwrap();
    session.prefill(&prompt).unwrap();
    let report = session.kv_report();
    let per_layer: Vec<usize> = report
        .retained_per_layer_head
        .iter()
        .map(|l| l[0])
        .collect();
    assert!(
        per_layer.windows(2).all(|w| w[0] >= w[1]),
        "budgets fall with depth: {per_layer:?}"
    );
    let mean = per_layer.iter().sum::<usize>() as f32 / per_layer.len() as f32;
    assert!((mean - 200.0).abs() <= 1.0, "mean budget {mean}");
}

/// The policy `name` keeping `keep` tokens per head with `sinks` and `window` (SnapKV's
/// observation window, every other policy's recent tokens).
fn protected(
    engine: &Engine,
    name: &str,
    keep: usize,
    sinks: Option<usize>,
    window: Option<usize>,
) -> engine::Result<engine::Policy> {
    let mut spec = PolicySpec {
        keep: Some(keep),
        sinks,
        ..PolicySpec::new(name.parse().unwrap())
    };
    if let Some(w) = window {
        spec.set_window(w);
    }
    spec.build(engine)
}

/// Protected tokens count toward the budget: with `keep K` a policy whose always-kept tokens
/// do not fit is refused by name, naming the setting that protects them.
#[test]
fn protections_that_do_not_fit_a_fixed_budget_are_refused() {
    let (_dir, engine) = tiny_engine(engine::KvDtype::F16);
    for (name, keep, sinks, window) in [
        ("streaming", 4, Some(4), None),
        ("streaming", 4, Some(9), None),
        ("h2o", 12, Some(4), Some(10)),
        ("h2o", 8, Some(9), None),
        ("tova", 10, Some(20), None),
        ("random", 4, Some(3), Some(2)),
        ("knorm", 4, None, Some(5)),
        ("snapkv", 4, None, Some(32)),
        ("pyramidkv", 4, None, Some(5)),
    ] {
        let e = protected(&engine, name, keep, sinks, window).unwrap_err();
        let EngineError::Policy(PolicyError::ProtectionExceedsBudget {
            policy,
            keep: k,
            by,
            ..
        }) = &e
        else {
            panic!("{name} keep {keep} sinks {sinks:?} window {window:?}: {e}");
        };
        assert_eq!((policy.name(), *k), (name, keep), "{e}");
        let named = if sinks.is_some() {
            Setting::Sinks
        } else if policy.observes_a_window() {
            Setting::Window
        } else {
            Setting::Recent
        };
        assert!(by.contains(&named), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("{name} keeps at most keep {keep}")),
            "{e}"
        );
    }
}

/// Protections that fit the budget are accepted and every protected token is kept;
/// StreamingLLM also needs room for a window of at least one token.
#[test]
fn protections_that_fit_are_kept_and_streaming_needs_a_window() {
    let (_dir, engine) = tiny_engine(engine::KvDtype::F16);
    for (name, keep, sinks, window) in [
        ("streaming", 4, Some(3), None),
        ("h2o", 12, Some(4), Some(8)),
        ("tova", 10, Some(10), None),
        ("random", 4, Some(2), Some(2)),
        ("snapkv", 8, None, Some(8)),
    ] {
        protected(&engine, name, keep, sinks, window).unwrap();
    }
    // StreamingLLM's window alone is the budget beside the sinks: it must hold a token.
    let e = PolicySpec {
        recent: Some(0),
        ..PolicySpec::new(engine::PolicyKind::Streaming)
    }
    .build(&engine)
    .unwrap_err();
    assert!(
        matches!(e, EngineError::Policy(PolicyError::EmptyStreamingWindow)),
        "{e}"
    );
    assert!(e.to_string().contains("recent must be at least 1"), "{e}");
    // Three sinks and one recent token: every head keeps positions 0, 1, 2 and the newest.
    let policy = protected(&engine, "streaming", 4, Some(3), None).unwrap();
    let mut session = engine.session_with(policy).unwrap();
    session.prefill(&tokens(20, 1)).unwrap();
    let want: HashSet<u32> = [0, 1, 2, 19].into_iter().collect();
    for layer in kept_positions(session.kv()) {
        for head in layer {
            assert_eq!(head, want);
        }
    }
}

/// 4,000 tokens of conversation with `keep 512`: bytes stay at the budget's blocks (one more per
/// head at most, plus the policy's own bounded state) while the tokens seen grow, for every
/// continuous policy.
#[test]
fn long_conversation_stays_within_its_budget() {
    let (dir, engine) = tiny_engine(engine::KvDtype::F16);
    let gates = dir.path().join("gates.safetensors");
    let gc = common::write_random_gates(&engine, &gates, 6, None)
        .config()
        .clone();
    let block_bytes = engine.pool().config().block_bytes();
    let heads = engine.model_config().n_layers * engine.model_config().n_kv_heads;
    // A head holds at most one block more than its entries fill: compaction may leave free
    // slots at the start of its first block (kv-store's sequence invariants).
    let cap = heads * (512usize.div_ceil(engine.pool().config().block_size) + 1) * block_bytes;
    // At most 16 bytes per retained entry (H2O's sum and count; the gate's probability takes
    // 4), plus the gate's own cache of its attention window (K', V' in f32 and a position).
    let gate_cache =
        engine.model_config().n_layers * gc.attention_window * (2 * gc.heads * gc.head_dim * 4 + 4);
    let state_cap = heads * 512 * 16 + gate_cache;
    for name in ["streaming", "h2o", "tova", "random", "ag"] {
        let mut s = PolicySpec {
            keep: Some(512),
            gates: Some(gates.clone()),
            ..PolicySpec::new(name.parse().unwrap())
        };
        s.ag_budget_mode = true;
        let mut session = engine.session_with(s.build(&engine).unwrap()).unwrap();
        let request = engine::GenerateRequest {
            max_tokens: 40,
            stop_at_eos: false,
            ..Default::default()
        };
        let mut turn = 0;
        while session.tokens_seen() < 4000 {
            session
                .generate_from_tokens(&tokens(200, turn), &request)
                .unwrap();
            let report = session.kv_report();
            assert!(
                report.kv_block_bytes <= cap && report.policy_state_bytes <= state_cap,
                "{name}: {} + {} bytes after {} tokens (caps {cap} + {state_cap})",
                report.kv_block_bytes,
                report.policy_state_bytes,
                report.tokens_seen
            );
            assert!(report
                .retained_per_layer_head
                .iter()
                .flatten()
                .all(|&n| n <= 512));
            turn += 1;
        }
        let report = session.kv_report();
        assert!(
            report.tokens_seen >= 4000 && report.bytes_full > 7 * report.kv_block_bytes,
            "{name}: {report:?}"
        );
    }
}

/// Attention-Gate's state is counted and bounded: the gate's own cache holds the last
/// `attention_window` tokens per layer whatever the length, and the per-entry state follows the
/// retained count (flags in threshold mode, probabilities in budget mode).
#[test]
fn attention_gate_state_is_counted_and_bounded() {
    let (dir, engine) = tiny_engine(engine::KvDtype::F16);
    let path = dir.path().join("gates.safetensors");
    let gates = common::write_random_gates(&engine, &path, 6, Some(0.0));
    let gc = gates.config().clone();
    let cfg = engine.model_config();
    let row = 2 * gc.heads * gc.head_dim * 4 + 4; // K', V' in f32 and a position
    let cache_bytes = cfg.n_layers * gc.attention_window * row;
    for budget_mode in [false, true] {
        let mut s = spec("ag", 0.5, Some(&path));
        s.ag_budget_mode = budget_mode;
        let mut session = engine.session_with(s.build(&engine).unwrap()).unwrap();
        let mut last = 0;
        for n in [200, 400, 800] {
            session.prefill(&tokens(n - last, n as u32)).unwrap();
            last = n;
            let r = session.kv_report();
            let retained: usize = r.retained_per_layer_head.iter().flatten().sum();
            let per_entry = if budget_mode { 4 } else { 1 };
            assert_eq!(
                r.policy_state_bytes,
                cache_bytes + retained * per_entry,
                "budget mode {budget_mode}, {n} tokens"
            );
            assert_eq!(r.bytes_in_use, r.kv_block_bytes + r.policy_state_bytes);
        }
    }
}

/// Attention-Gate in budget mode with a ratio keeps its protected tokens (sinks and local
/// window) while the budget is smaller than them, early in a sequence, and meets the budget
/// exactly once it is larger: every head holds `max(budget, min(seen, protected))`.
#[test]
fn ag_budget_ratio_keeps_its_protected_tokens_on_short_prompts() {
    let (dir, engine) = tiny_engine(engine::KvDtype::F32);
    let gates = dir.path().join("gates.safetensors");
    common::write_random_gates(&engine, &gates, 8, None);
    let (sinks, window) = (2, 6);
    let protected = sinks + window;
    for n in [3, protected, protected + 5, 2 * protected + 40] {
        let mut s = spec("ag", 0.5, Some(&gates));
        s.ag_budget_mode = true;
        s.sinks = Some(sinks);
        s.set_window(window);
        let mut session = engine.session_with(s.build(&engine).unwrap()).unwrap();
        session.prefill(&tokens(n, 9)).unwrap();
        let want = Budget::EvictRatio(0.5).keep_count(n).max(protected.min(n));
        let report = session.kv_report();
        assert!(
            report
                .retained_per_layer_head
                .iter()
                .flatten()
                .all(|&k| k == want),
            "{n} tokens: want {want} per head, got {:?}",
            report.retained_per_layer_head
        );
        // Short of the budget, the kept ones are exactly the sinks and the newest.
        if want == protected.min(n) {
            let first: HashSet<u32> = (0..sinks.min(n) as u32).collect();
            let newest: HashSet<u32> = (n.saturating_sub(window) as u32..n as u32).collect();
            let want_positions: HashSet<u32> = first.union(&newest).copied().collect();
            for layer in kept_positions(session.kv()) {
                for head in layer {
                    assert_eq!(head, want_positions, "{n} tokens");
                }
            }
        }
    }
}
