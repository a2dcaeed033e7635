//! When the baselines evict, on tiny random models (defects found in review, each a test that
//! failed before its fix):
//! - PyramidKV's measured ratio equals the request at 0.25/0.5/0.75 on a 30-layer model with a
//!   1,009-token prompt, and every layer keeps between `w` and `T` tokens;
//! - H2O and TOVA evict once at the end of a prefill: the kept positions are the same for prefill
//!   chunks of 64, 256 and 4096 tokens (so are NACL's, whose proxies are the last 1% of the
//!   prompt, not of its last chunk);
//! - in the default (not query-aware) protocol the one-shot policies compress the context once
//!   and keep every question token, in every head;
//! - the design's [choice] defaults are settable (`PolicyOptions`) and change what is kept.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

mod common;

use common::tokens;
use engine::eval::{self, EvalOptions, Task};
use engine::{Engine, PolicySpec};
use gate_core::select::Budget;

fn tiny_engine(layers: usize, prefill_chunk: usize) -> (tempfile::TempDir, Engine) {
    common::tiny_engine(layers, 13, engine::KvDtype::F32, prefill_chunk)
}

/// Every head's retained positions after prefilling `prompt`.
fn kept_after_prefill(engine: &Engine, policy: &PolicySpec, prompt: &[u32]) -> Vec<Vec<Vec<u32>>> {
    let mut session = engine.session_with(policy.build(engine).unwrap()).unwrap();
    session.prefill(prompt).unwrap();
    let kv = session.kv();
    (0..kv.n_layers())
        .map(|l| (0..kv.n_kv_heads()).map(|h| kv.positions(l, h)).collect())
        .collect()
}

/// The first (layer, head) whose kept positions differ.
fn first_difference(a: &[Vec<Vec<u32>>], b: &[Vec<Vec<u32>>]) -> Option<(usize, usize)> {
    a.iter()
        .zip(b)
        .enumerate()
        .find_map(|(l, (x, y))| x.iter().zip(y).position(|(p, q)| p != q).map(|h| (l, h)))
}

#[test]
fn pyramidkv_meets_the_requested_ratio_on_30_layers() {
    let (_dir, engine) = tiny_engine(30, 512);
    let prompt = tokens(1009, 1);
    let t = prompt.len();
    for ratio in [0.25f32, 0.5, 0.75] {
        let mut session = engine
            .session_with(common::evicting("pyramidkv", ratio).build(&engine).unwrap())
            .unwrap();
        session.prefill(&prompt).unwrap();
        let report = session.kv_report();
        assert!(
            (report.eviction_ratio - f64::from(ratio)).abs() <= 1.0 / t as f64,
            "requested {ratio}, measured {}",
            report.eviction_ratio
        );
        for (l, layer) in report.retained_per_layer_head.iter().enumerate() {
            for &n in layer {
                assert!(
                    (32..=t).contains(&n),
                    "{ratio}: layer {l} keeps {n} (window 32, T {t})"
                );
            }
        }
    }
}

#[test]
fn h2o_tova_and_nacl_keep_the_same_tokens_for_any_prefill_chunk() {
    let prompt = tokens(1000, 2);
    for name in ["h2o", "tova", "nacl", "snapkv"] {
        for ratio in [0.3f32, 0.7] {
            let policy = common::evicting(name, ratio);
            let kept: Vec<_> = [64, 256, 4096]
                .iter()
                .map(|&chunk| {
                    let (_dir, engine) = tiny_engine(3, chunk);
                    kept_after_prefill(&engine, &policy, &prompt)
                })
                .collect();
            for (chunk, k) in [(64, &kept[0]), (256, &kept[1])] {
                if let Some((l, h)) = first_difference(k, &kept[2]) {
                    panic!(
                        "{name} at {ratio}: layer {l} head {h} keeps different positions with \
                         chunks of {chunk} and of 4096 ({} vs {} kept)",
                        k[l][h].len(),
                        kept[2][l][h].len()
                    );
                }
            }
        }
    }
}

#[test]
fn one_shot_policies_compress_the_context_once_and_keep_the_question() {
    let (_dir, engine) = tiny_engine(3, 64);
    let context = "The grass is green. The sky is blue. ".repeat(12);
    let question = "What colour is the sky? The sky is";
    let task = Task::Generate {
        context: context.clone(),
        question: question.into(),
        answer_prefix: String::new(),
        answer: "blue".into(),
        match_kind: eval::MatchKind::Contains,
        meta: Default::default(),
        chat: None,
    };
    let tok = engine.tokenizer();
    let c = tok.encode(&context, true).unwrap().len();
    let q = tok.encode(&format!("\n{question}"), false).unwrap().len();
    for name in ["snapkv", "pyramidkv", "knorm", "nacl"] {
        for ratio in [0.25f32, 0.75] {
            let policy = common::evicting(name, ratio).build(&engine).unwrap();
            let out = eval::run_tasks(
                &engine,
                &policy,
                std::slice::from_ref(&task),
                &EvalOptions::default(),
                &mut |_| true,
            )
            .unwrap();
            // Compressed once, on the context (to its budget), then every question token kept.
            let kept = Budget::EvictRatio(ratio).keep_count(c) + q;
            let want = 1.0 - kept as f64 / (c + q) as f64;
            let got = out[0].kv.eviction_ratio;
            assert!(
                (got - want).abs() < 1e-9,
                "{name} at {ratio}: evicted {got}, compressing only the context gives {want}"
            );
        }
    }
}

/// The [choice] knobs reach their policies: PyramidKV's beta reshapes the per-layer budgets,
/// SnapKV's kernel and H2O's normalisation change what is kept, and NACL without a budget runs
/// its released defaults (no eviction below `min_len` tokens, ~80% above).
#[test]
fn policy_options_change_what_is_kept() {
    let (_dir, engine) = tiny_engine(3, 512);
    let prompt = tokens(600, 9);
    let with = |name: &str, evict: Option<f32>, pairs: &[&str]| {
        let mut spec = PolicySpec {
            evict,
            ..PolicySpec::new(name.parse().unwrap())
        };
        for p in pairs {
            spec.options.set_pair(p).unwrap();
        }
        kept_after_prefill(&engine, &spec, &prompt)
    };
    let per_layer =
        |kept: &[Vec<Vec<u32>>]| -> Vec<usize> { kept.iter().map(|l| l[0].len()).collect() };
    let steep = per_layer(&with("pyramidkv", Some(0.6), &["beta=20"]));
    let flat = per_layer(&with("pyramidkv", Some(0.6), &["beta=1"]));
    assert!(
        steep[0] > flat[0] && steep[2] < flat[2],
        "{steep:?} vs {flat:?}"
    );
    assert_eq!(steep.iter().sum::<usize>(), flat.iter().sum::<usize>());
    assert_ne!(
        with("snapkv", Some(0.6), &["kernel=1"]),
        with("snapkv", Some(0.6), &["kernel=9"])
    );
    assert_ne!(
        with("h2o", Some(0.6), &["normalise=false"]),
        with("h2o", Some(0.6), &["normalise=true"])
    );
    let released = with("nacl", None, &[]);
    let kept: usize = released.iter().flatten().map(Vec::len).sum();
    let total = prompt.len() * 3 * 2;
    assert!(
        (kept as f64 / total as f64 - 0.2).abs() < 0.01,
        "NACL's released defaults keep ~20%, kept {kept} of {total}"
    );
    let short = with("nacl", None, &["min_len=1000"]);
    assert!(short.iter().flatten().all(|h| h.len() == prompt.len()));
}
