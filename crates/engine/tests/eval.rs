//! Evaluation contracts on a tiny random model (no download): multiple-choice log-likelihoods
//! equal a hand computation (log-softmax of the model's logits over the joined token sequence);
//! perplexity under the full cache equals the hand-computed one with zero KL, and a context
//! covering a whole text is refused; bad task files fail with `FILE:LINE` and the field;
//! synthetic tasks are deterministic by seed, fit their length and put the needle at the
//! requested depth (sweeps: `eval_sweep.rs`). One test uses the default model's tokenizer
//! (prompt lengths in real tokens).
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

mod common;

use engine::eval::synthetic::{self, Family, SyntheticSpec};
use engine::eval::{self, EvalOptions, EvalSummary, PplContext, Task};
use engine::{Engine, Policy};

fn tiny_engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(dir.path(), 2, 4, 7, 2048);
    let engine = Engine::builder()
        .model(dir.path())
        .weights(engine::WeightFormat::Dense(candle_core::DType::F32))
        .kv_dtype(engine::KvDtype::F32)
        .build()
        .unwrap();
    (dir, engine)
}

/// Every task's outcome under the full cache.
fn run_full(engine: &Engine, tasks: &[Task], opts: &EvalOptions) -> Vec<eval::TaskOutcome> {
    eval::run_tasks(engine, &Policy::Full, tasks, opts, &mut |_| true).unwrap()
}

/// log-softmax computed independently of the crate, in f64.
fn log_probs(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    row.iter().map(|&x| x as f64 - z).collect()
}

/// Log-likelihood of `cont` after `prefix`, from one forward pass over the joined sequence.
fn hand_loglik(engine: &Engine, prefix: &[u32], cont: &[u32]) -> f64 {
    let mut all = prefix.to_vec();
    all.extend_from_slice(cont);
    let mut s = engine.new_session();
    let logits = s.prefill_all_logits(&all[..all.len() - 1]).unwrap();
    let rows = logits.to_vec2::<f32>().unwrap();
    cont.iter()
        .enumerate()
        .map(|(i, &t)| log_probs(&rows[prefix.len() - 1 + i])[t as usize])
        .sum()
}

#[test]
fn choice_loglikelihoods_match_a_hand_computation() {
    let (_dir, engine) = tiny_engine();
    let (context, question) = ("The cat sat on the mat.", "Where did the cat sit?");
    let choices = ["on the mat", "x", "in a very long box"];
    let line = serde_json::json!({
        "type": "choice", "context": context, "question": question,
        "choices": choices, "answer": 2
    });
    let tasks = eval::parse_tasks(&line.to_string(), "t.jsonl").unwrap();
    let out = run_full(&engine, &tasks, &EvalOptions::default());
    let tok = engine.tokenizer();
    let mut prefix = tok.encode(context, true).unwrap();
    prefix.extend(tok.encode(&format!("\n{question}"), false).unwrap());
    let expected: Vec<f64> = choices
        .iter()
        .map(|c| {
            hand_loglik(
                &engine,
                &prefix,
                &tok.encode(&format!(" {c}"), false).unwrap(),
            )
        })
        .collect();
    let got = &out[0].loglikelihoods;
    for (g, e) in got.iter().zip(&expected) {
        assert!((g - e).abs() < 1e-3, "got {got:?}, expected {expected:?}");
    }
    let argmax = |v: &[f64]| (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b });
    assert_eq!(out[0].score, f64::from(u8::from(argmax(&expected) == 2)));
    let normed: Vec<f64> = expected
        .iter()
        .zip(choices)
        .map(|(l, c)| l / c.chars().count() as f64)
        .collect();
    assert_eq!(
        out[0].acc_norm,
        Some(f64::from(u8::from(argmax(&normed) == 2)))
    );
    let s = EvalSummary::from_outcomes(&out).unwrap();
    assert_eq!((s.n, s.eviction_ratio), (1, 0.0));
    assert!(s.kv_bytes_in_use > 0 && s.kv_bytes_in_use <= s.kv_bytes_full);
}

#[test]
fn a_task_longer_than_the_context_is_refused_before_any_task_runs() {
    let (_dir, engine) = common::tiny_engine_with_context(1, 3, engine::KvDtype::F32, 16, 64);
    // A short task first: it must not run (no outcome reaches the callback).
    let tasks = vec![
        Task::Perplexity {
            text: "short text to score".into(),
        },
        Task::Perplexity {
            text: "word ".repeat(100),
        },
    ];
    let mut ran = 0;
    let err = eval::run_tasks(
        &engine,
        &Policy::Full,
        &tasks,
        &EvalOptions::default(),
        &mut |_| {
            ran += 1;
            true
        },
    )
    .unwrap_err()
    .to_string();
    assert_eq!(ran, 0, "{err}");
    assert!(
        err.contains("task 2 (perplexity)") && err.contains("context is 64"),
        "{err}"
    );
}

#[test]
fn full_cache_perplexity_matches_a_hand_computation_with_zero_kl() {
    let (_dir, engine) = tiny_engine();
    let text = "one two three four five six seven eight nine ten";
    let tasks = vec![Task::Perplexity { text: text.into() }];
    let opts = EvalOptions {
        ppl_context: PplContext::Tokens(10),
        ppl_chunk: 7,
        ..EvalOptions::default()
    };
    let out = run_full(&engine, &tasks, &opts);
    let ids = engine.tokenizer().encode(text, true).unwrap();
    let nll = -hand_loglik(&engine, &ids[..10], &ids[10..]);
    assert_eq!(out[0].scored_tokens, ids.len() - 10);
    assert!(
        (out[0].nll.unwrap() - nll).abs() < 1e-3,
        "{:?} vs {nll}",
        out[0].nll
    );
    assert_eq!(out[0].kl, Some(0.0));
    let s = EvalSummary::from_outcomes(&out).unwrap();
    let ppl = s.per_type["perplexity"].perplexity.unwrap();
    let mean_nll = out[0].nll.unwrap() / (ids.len() - 10) as f64;
    assert!(
        (ppl.ln() - mean_nll).abs() < 1e-9,
        "{ppl} vs exp({mean_nll})"
    );
}

#[test]
fn a_token_context_as_long_as_the_text_is_refused_naming_the_task() {
    let (_dir, engine) = tiny_engine();
    let text = "one two three four five six seven eight nine ten";
    let n = engine.tokenizer().encode(text, true).unwrap().len();
    let tasks = vec![Task::Perplexity { text: text.into() }];
    for context in [n, n + 100] {
        let opts = EvalOptions {
            ppl_context: PplContext::Tokens(context),
            ..EvalOptions::default()
        };
        let err = eval::run_tasks(&engine, &Policy::Full, &tasks, &opts, &mut |_| true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("task 1 (perplexity)")
                && err.contains(&format!(
                    "a context of {context} tokens leaves nothing to score"
                ))
                && err.contains(&format!("the text has {n} tokens")),
            "{err}"
        );
    }
    // One token short of the text: the last token is scored.
    let opts = EvalOptions {
        ppl_context: PplContext::Tokens(n - 1),
        ..EvalOptions::default()
    };
    assert_eq!(run_full(&engine, &tasks, &opts)[0].scored_tokens, 1);
}

#[test]
fn generate_tasks_run_greedy_and_report_the_output() {
    let (_dir, engine) = tiny_engine();
    let tasks = eval::parse_tasks(
        r#"{"type":"generate","context":"abc abc abc","question":"abc","answer":"zzzz","match":"exact"}"#,
        "g.jsonl",
    )
    .unwrap();
    let out = run_full(&engine, &tasks, &EvalOptions::default());
    assert!(out[0].output.is_some());
    let again = run_full(&engine, &tasks, &EvalOptions::default());
    assert_eq!(out[0].output, again[0].output);
}

#[test]
fn bad_task_files_name_the_line_and_the_field() {
    let good = r#"{"type":"choice","context":"c","question":"q","choices":["a","b"],"answer":1}"#;
    let cases = [
        ("{not json", "invalid JSON"),
        (
            r#"{"type":"choice","context":"c","question":"q","choices":["a","b"]}"#,
            "field `answer` is missing",
        ),
        (
            r#"{"type":"choice","context":"c","question":"q","choices":["a","b"],"answer":2}"#,
            "field `answer`: index 2 is out of range (2 choices)",
        ),
        (
            r#"{"type":"essay","text":"t"}"#,
            "field `type`: unknown task type `essay`",
        ),
        (
            r#"{"type":"generate","context":"c","question":"q"}"#,
            "field `answer` is missing",
        ),
        (
            r#"{"type":"generate","context":"c","question":"q","answer":"a","match":"fuzzy"}"#,
            "field `match`: unknown `fuzzy`",
        ),
        (
            r#"{"type":"perplexity","text":"t","extra":1}"#,
            "unknown field `extra`",
        ),
        (
            r#"{"type":"choice","context":"c","question":"q","choices":["a",3],"answer":0}"#,
            "field `choices`: element 1 is not a string",
        ),
        ("[1,2]", "expected a JSON object"),
        (
            r#"{"type":"choice","context":"","question":"","choices":["a","b"],"answer":0}"#,
            "fields `context` and `question` are both empty",
        ),
    ];
    for (bad, message) in cases {
        // Two good lines, a blank line, the bad one on line 4, then a good one after it.
        let text = format!("{good}\n{good}\n\n{bad}\n{good}\n");
        let err = eval::parse_tasks(&text, "tasks.jsonl")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("tasks.jsonl:4: "), "{err}");
        assert!(err.contains(message), "{err} (expected {message})");
    }
    assert_eq!(
        eval::parse_tasks(&format!("{good}\n\n{good}"), "x")
            .unwrap()
            .len(),
        2
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.jsonl");
    std::fs::write(&path, format!("{good}\n{{\"type\":\"choice\"}}\n")).unwrap();
    let err = eval::load_tasks(&path).unwrap_err().to_string();
    assert!(err.contains("t.jsonl:2: "), "{err}");
    // A byte-order mark at the start is skipped; each task keeps its line.
    std::fs::write(&path, format!("\u{feff}{good}\n\n{good}\n")).unwrap();
    let lines: Vec<usize> = eval::load_task_lines(&path)
        .unwrap()
        .iter()
        .map(|(line, _)| *line)
        .collect();
    assert_eq!(lines, [1, 3]);
}

/// Whitespace-separated words as tokens: a stand-in tokenizer for the generators.
fn words(text: &str) -> engine::Result<usize> {
    Ok(text.split_whitespace().count())
}

#[test]
fn synthetic_tasks_are_deterministic_and_fit_their_length() {
    for family in Family::ALL {
        let mut spec = SyntheticSpec::new(family, 600);
        spec.n = 3;
        spec.depths = vec![0.0, 0.5, 1.0];
        let a = synthetic::generate(&spec, &words).unwrap();
        let b = synthetic::generate(&spec, &words).unwrap();
        assert_eq!(a, b, "{family:?}");
        spec.seed = 2;
        assert_ne!(a, synthetic::generate(&spec, &words).unwrap(), "{family:?}");
        let expected = if family.uses_depth() { 9 } else { 3 };
        assert_eq!(a.len(), expected, "{family:?}");
        for t in &a {
            let Task::Generate {
                context,
                question,
                answer,
                ..
            } = t
            else {
                panic!("{family:?}: not a generate task")
            };
            let n = 1 + words(context).unwrap() + words(&format!("\n{question}")).unwrap();
            assert!(n <= 600 && n > 500, "{family:?}: {n} tokens");
            for item in answer.split(", ") {
                assert!(
                    context.contains(item),
                    "{family:?}: `{item}` not in the context"
                );
            }
        }
    }
}

#[test]
fn needles_sit_at_the_requested_depth() {
    for family in [Family::Passkey, Family::Niah, Family::NiahMulti, Family::Kv] {
        let mut spec = SyntheticSpec::new(family, 2000);
        spec.depths = vec![0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0];
        spec.n = 2;
        for task in synthetic::generate(&spec, &words).unwrap() {
            let Task::Generate {
                context,
                answer,
                meta,
                ..
            } = &task
            else {
                panic!()
            };
            let depth = meta["depth"].as_f64().unwrap();
            let placed = meta["placed_depth"].as_f64().unwrap();
            assert!(
                (placed - depth).abs() < 0.02,
                "{family:?}: {placed} vs {depth}"
            );
            // The answer's position in the text, as a fraction, agrees too (the instructions
            // before the haystack shift it a little).
            let at = context.find(answer.as_str()).unwrap() as f64 / context.len() as f64;
            assert!(
                (at - depth).abs() < 0.1,
                "{family:?}: needle at {at}, depth {depth}"
            );
        }
    }
}

/// RULER's noise haystack (the default): whole blocks, one per line after the instructions'
/// line, the needle on its own line between two blocks, never after the last (as RULER and
/// llama.cpp's passkey place it), at any depth.
#[test]
fn the_noise_haystack_keeps_its_blocks_whole() {
    let mut spec = SyntheticSpec::new(Family::Passkey, 600);
    spec.depths = vec![0.0, 0.3, 1.0];
    spec.n = 3;
    for task in synthetic::generate(&spec, &words).unwrap() {
        let Task::Generate { context, meta, .. } = &task else {
            panic!()
        };
        let lines: Vec<&str> = context.lines().collect();
        assert!(
            lines[0].starts_with("There is an important info"),
            "{context}"
        );
        let needle = lines
            .iter()
            .position(|l| l.starts_with("The pass key is"))
            .unwrap();
        assert!(
            needle >= 1 && needle + 1 < lines.len(),
            "needle on line {needle} of {} at depth {}",
            lines.len(),
            meta["depth"]
        );
        for (i, line) in lines.iter().enumerate().skip(1) {
            if i != needle {
                assert_eq!(*line, synthetic::NOISE_BLOCK);
            }
        }
    }
}

#[test]
fn any_filler_text_works_and_short_lengths_are_refused() {
    let mut spec = SyntheticSpec::new(Family::Passkey, 300);
    spec.filler = Some("Alpha beta gamma! Delta epsilon?\nZeta eta theta".into());
    let tasks = synthetic::generate(&spec, &words).unwrap();
    let Task::Generate { context, .. } = &tasks[0] else {
        panic!()
    };
    assert!(context.contains("Delta epsilon?"));
    let err = synthetic::generate(&SyntheticSpec::new(Family::Niah, 20), &words).unwrap_err();
    assert!(
        matches!(
            &err,
            engine::EngineError::Setting { setting: "SyntheticSpec.length", problem }
                if problem.contains("20 tokens is too short for a niah task")
        ),
        "{err}"
    );
    assert!("nope"
        .parse::<Family>()
        .unwrap_err()
        .to_string()
        .contains("passkey"));
}

#[test]
fn eviction_shows_in_kl_and_kv_figures_and_query_awareness_is_neutral_on_a_full_cache() {
    let (_dir, engine) = tiny_engine();
    let text = "the quick brown fox jumps over the lazy dog ".repeat(4);
    let tasks = vec![Task::Perplexity { text }];
    let spec = engine::PolicySpec {
        keep: Some(16),
        ..engine::PolicySpec::new(engine::PolicyKind::Streaming)
    };
    let policy = spec.build(&engine).unwrap();
    let opts = EvalOptions::default();
    let evicted = eval::run_tasks(&engine, &policy, &tasks, &opts, &mut |_| true).unwrap();
    let full = run_full(&engine, &tasks, &opts);
    assert!(evicted[0].kl.unwrap() > 0.0);
    assert!(evicted[0].kv.eviction_ratio > 0.5, "{:?}", evicted[0].kv);
    assert!(evicted[0].kv.bytes_in_use < full[0].kv.bytes_in_use);
    assert_eq!(full[0].kv.bytes_in_use, full[0].kv.bytes_full);
    let choice = eval::parse_tasks(
        r#"{"type":"choice","context":"a b c d","question":"e f?","choices":["g","h i"],"answer":1}"#,
        "c.jsonl",
    )
    .unwrap();
    let aware = EvalOptions {
        query_aware: true,
        ..EvalOptions::default()
    };
    let a = run_full(&engine, &choice, &aware);
    let b = run_full(&engine, &choice, &opts);
    // One run of context + question or two runs: the same tokens, the same log-likelihoods
    // (up to batching order) on a full cache.
    for (x, y) in a[0].loglikelihoods.iter().zip(&b[0].loglikelihoods) {
        assert!((x - y).abs() < 1e-3, "{x} vs {y}");
    }
}

#[test]
fn synthetic_prompts_fit_their_length_in_the_default_models_tokens() {
    let Some(engine) = common::default_engine(engine::WeightFormat::Auto) else {
        return;
    };
    let tok = engine.tokenizer();
    let count = |t: &str| -> engine::Result<usize> { Ok(tok.encode(t, false)?.len()) };
    let overhead = eval::chat_template_overhead(&engine).unwrap();
    assert!(
        overhead > 10,
        "SmolLM2's template: markers and a default system prompt"
    );
    for family in Family::ALL {
        for (length, chat) in [(512, false), (2048, false), (1024, true)] {
            let mut spec = SyntheticSpec::new(family, length);
            spec.n = 2;
            spec.depths = vec![0.0, 1.0];
            spec.overhead = if chat { overhead } else { 0 };
            for t in synthetic::generate(&spec, &count).unwrap() {
                let Task::Generate {
                    context,
                    question,
                    answer_prefix,
                    ..
                } = &t
                else {
                    panic!("{family:?}: not a generate task")
                };
                let n = if chat {
                    let user = engine::ChatMessage::new("user", &format!("{context}\n{question}"));
                    let rendered = tok.apply_chat_template(&[user], true).unwrap();
                    tok.encode(&format!("{rendered}{}", answer_prefix.trim_start()), true)
                        .unwrap()
                        .len()
                } else {
                    tok.encode(context, true).unwrap().len()
                        + tok
                            .encode(&format!("\n{question}{answer_prefix}"), false)
                            .unwrap()
                            .len()
                };
                // Within one noise block (< 40 tokens), one JSON pair of two UUIDs (< 100
                // tokens) or one rare word's three numbered items (< 60 tokens) of the length.
                let slack = match family {
                    Family::Kv => 100,
                    Family::Cwe => 60,
                    _ => 40,
                };
                assert!(
                    n <= length && n + slack > length,
                    "{family:?} at {length} (chat {chat}): {n} tokens"
                );
            }
        }
    }
}
