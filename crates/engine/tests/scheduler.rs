//! The continuous-batching scheduler on a small random model: batched greedy outputs equal lone
//! sessions', chunked prefill interleaves with decoding, the prompt cache continues
//! conversations (and gives the same tokens as one session chatting), pool pressure preempts
//! instead of failing and leaks no block, a dropped stream cancels and frees its blocks, and a
//! full queue, a prompt over the context or over the pool are refused cleanly.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use engine::{
    ChatMessage, Engine, EngineError, GenerateRequest, Policy, Prompt, RequestEvent, Scheduler,
    SchedulerConfig, Submission, WeightFormat,
};

/// The tiny model with Q8_0 weights (the quantized kernel, like the default model's) and
/// 64-token prefill chunks, so that prompts of a few hundred bytes take several steps.
fn tiny_engine(dir: &std::path::Path, kv_memory_mb: usize) -> Engine {
    let cfg = model_zoo::random::tiny_config(2, 4, 2);
    engine::atomic::write_dir(dir, |s| model_zoo::random::write_random_model(s, &cfg, 11)).unwrap();
    Engine::builder()
        .model(dir)
        .weights(WeightFormat::Quantize(GgmlDType::Q8_0))
        .prefill_chunk(64)
        .kv_memory_mb(kv_memory_mb)
        .build()
        .unwrap()
}

fn greedy(max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        max_tokens,
        stop_at_eos: false,
        ..GenerateRequest::default()
    }
}

fn submission(prompt: Prompt, max_tokens: usize) -> Submission {
    Submission {
        prompt,
        policy: Policy::Full,
        policy_key: "full".into(),
        request: greedy(max_tokens),
    }
}

fn prompts() -> Vec<String> {
    (0..6)
        .map(|i| format!("prompt {i}: {}", "the quick brown fox ".repeat(1 + i * 4)))
        .collect()
}

/// Waits (bounded) until the scheduler is idle: nothing active or queued.
fn wait_idle(scheduler: &Scheduler) -> engine::MetricsSnapshot {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = scheduler.metrics();
        if m.active_sessions == 0 && m.queue_length == 0 || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn concurrent_greedy_outputs_equal_lone_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path(), 64);
    let mut want = Vec::new();
    for (i, p) in prompts().iter().enumerate() {
        let mut session = engine.new_session();
        let g = if i % 2 == 0 {
            session.complete(p, &greedy(24), &mut |_| true).unwrap()
        } else {
            session.chat(p, &greedy(24), &mut |_| true).unwrap()
        };
        want.push((g.text, g.tokens));
    }
    let scheduler = Scheduler::spawn(&engine, SchedulerConfig::default()).unwrap();
    let streams: Vec<_> = prompts()
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let prompt = if i % 2 == 0 {
                Prompt::Text(p)
            } else {
                Prompt::Chat(vec![ChatMessage::new("user", &p)])
            };
            scheduler.submit(submission(prompt, 24)).unwrap()
        })
        .collect();
    for (stream, (text, tokens)) in streams.into_iter().zip(want) {
        let (streamed, generation, usage, kv) = stream.collect_all().unwrap();
        assert_eq!(generation.tokens, tokens);
        assert_eq!(streamed, text);
        assert_eq!(generation.text, text);
        assert_eq!(usage.completion_tokens, 24);
        assert_eq!(usage.prompt_tokens_cached, 0);
        assert_eq!(kv.tokens_seen, usage.prompt_tokens + 23);
    }
    let m = wait_idle(&scheduler);
    assert!(
        m.step_sequences > m.steps,
        "requests shared steps: {} sequences over {} steps",
        m.step_sequences,
        m.steps
    );
    assert_eq!(m.requests_completed, 6);
    // Chat sessions stay in the prompt cache; nothing else holds blocks.
    assert_eq!(m.cached_sessions, 3);
    assert_eq!(m.kv_blocks_in_use, m.cached_blocks);
}

#[test]
fn prompt_cache_continues_a_conversation_like_one_session() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path(), 64);
    let turns = ["Hello there.", "Tell me more.", "And then?"];
    let mut session = engine.new_session();
    let want: Vec<Vec<u32>> = turns
        .iter()
        .map(|t| session.chat(t, &greedy(16), &mut |_| true).unwrap().tokens)
        .collect();

    let scheduler = Scheduler::spawn(&engine, SchedulerConfig::default()).unwrap();
    let mut messages = Vec::new();
    let mut previous_total = 0;
    for (turn, tokens) in turns.iter().zip(&want) {
        messages.push(ChatMessage::new("user", turn));
        let stream = scheduler
            .submit(submission(Prompt::Chat(messages.clone()), 16))
            .unwrap();
        let (text, generation, usage, _) = stream.collect_all().unwrap();
        assert_eq!(&generation.tokens, tokens);
        // Turn 1 prefills everything; later turns only what follows the previous answer.
        assert_eq!(usage.prompt_tokens_cached, previous_total);
        assert!(usage.prompt_tokens > usage.prompt_tokens_cached);
        previous_total = usage.prompt_tokens + usage.completion_tokens - 1;
        messages.push(ChatMessage::new("assistant", &text));
    }
    let m = wait_idle(&scheduler);
    assert_eq!(m.prompt_cache_hits, 2);
    assert_eq!(m.cached_sessions, 1);
}

#[test]
fn pool_pressure_preempts_and_every_request_finishes() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB: 1024 blocks of 16 tokens for 4 (layer, KV head) tables, about 4096 tokens in all;
    // eight requests of ~600 tokens each need more at once.
    let engine = tiny_engine(dir.path(), 1);
    let scheduler = Scheduler::spawn(
        &engine,
        SchedulerConfig {
            max_sessions: 8,
            ..SchedulerConfig::default()
        },
    )
    .unwrap();
    let streams: Vec<_> = (0..8)
        .map(|i| {
            let p = format!("{i} {}", "pressure ".repeat(33));
            scheduler.submit(submission(Prompt::Text(p), 300)).unwrap()
        })
        .collect();
    for stream in streams {
        let (_, generation, usage, _) = stream.collect_all().unwrap();
        assert_eq!(generation.tokens.len(), 300);
        assert_eq!(usage.completion_tokens, 300);
    }
    let m = wait_idle(&scheduler);
    assert!(m.preemptions > 0, "the pool was meant to run short");
    assert_eq!(m.requests_completed, 8);
    assert_eq!(m.kv_blocks_in_use, 0);
    assert!(m.kv_blocks_peak <= engine.pool().config().capacity_blocks);
}

#[test]
fn a_dropped_stream_cancels_and_frees_its_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path(), 64);
    let scheduler = Scheduler::spawn(&engine, SchedulerConfig::default()).unwrap();
    let mut stream = scheduler
        .submit(submission(Prompt::Text("a long story".into()), 1500))
        .unwrap();
    let mut texts = 0;
    while texts < 3 {
        match stream.next().unwrap() {
            RequestEvent::Text(_) => texts += 1,
            RequestEvent::Started { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(engine.pool().stats().blocks_in_use > 0);
    drop(stream);
    let m = wait_idle(&scheduler);
    assert_eq!(m.requests_cancelled, 1);
    assert_eq!(m.kv_blocks_in_use, 0);
}

#[test]
fn refusals_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path(), 1);
    let scheduler = Scheduler::spawn(
        &engine,
        SchedulerConfig {
            max_sessions: 1,
            max_queue: 1,
            prompt_cache: 0,
        },
    )
    .unwrap();
    // Longer than the model's context (2048 tokens).
    let long = scheduler
        .submit(submission(Prompt::Text("x".repeat(3000)), 4))
        .unwrap();
    assert!(matches!(
        long.collect_all(),
        Err(EngineError::ContextOverflow { .. })
    ));
    // One request runs, one waits, the third is refused at once.
    let mut running = scheduler
        .submit(submission(Prompt::Text("busy".into()), 1000))
        .unwrap();
    assert!(matches!(running.next(), Some(RequestEvent::Started { .. })));
    let waiting = scheduler
        .submit(submission(Prompt::Text("waits".into()), 4))
        .unwrap();
    let refused = scheduler.submit(submission(Prompt::Text("refused".into()), 4));
    assert!(matches!(
        refused,
        Err(EngineError::QueueFull { capacity: 1 })
    ));
    drop(running);
    let (_, generation, _, _) = waiting.collect_all().unwrap();
    assert_eq!(generation.tokens.len(), 4);
    let m = wait_idle(&scheduler);
    assert_eq!(
        (m.requests_rejected, m.requests_failed, m.requests_cancelled),
        (1, 1, 1)
    );
    assert_eq!(m.kv_blocks_in_use, 0);
}

#[test]
fn what_cannot_fit_the_pool_fails_alone_and_evicting_policies_fit() {
    let dir = tempfile::tempdir().unwrap();
    // 8 layers × 4 KV heads = 32 tables; 1 MiB = 1024 blocks of 16 tokens: 512 tokens of full
    // cache per session.
    let cfg = model_zoo::random::tiny_config(8, 4, 4);
    engine::atomic::write_dir(dir.path(), |s| {
        model_zoo::random::write_random_model(s, &cfg, 3)
    })
    .unwrap();
    let engine = Engine::builder()
        .model(dir.path())
        .weights(WeightFormat::Quantize(GgmlDType::Q8_0))
        .prefill_chunk(64)
        .kv_memory_mb(1)
        .build()
        .unwrap();
    let scheduler = Scheduler::spawn(&engine, SchedulerConfig::default()).unwrap();
    // A 1000-token prompt with a full cache can never fit: refused before it starts.
    let prompt = "y".repeat(1000);
    let refused = scheduler
        .submit(submission(Prompt::Text(prompt.clone()), 4))
        .unwrap();
    assert!(matches!(
        refused.collect_all(),
        Err(EngineError::KvCapacity { .. })
    ));
    // StreamingLLM at 64 tokens per head holds a prompt that fits the pool until the prefill's
    // end, then generates past what a full cache could hold, in bounded memory.
    let streaming = engine::PolicySpec {
        keep: Some(64),
        ..engine::PolicySpec::new(engine::PolicyKind::Streaming)
    }
    .build(&engine)
    .unwrap();
    let bounded = scheduler
        .submit(Submission {
            policy: streaming,
            policy_key: "streaming 64".into(),
            ..submission(Prompt::Text("y".repeat(300)), 400)
        })
        .unwrap();
    // A full cache that outgrows the pool while decoding fails alone; a small request beside
    // it finishes.
    let grows = scheduler
        .submit(submission(Prompt::Text("z".repeat(400)), 300))
        .unwrap();
    let small = scheduler
        .submit(submission(Prompt::Text("small".into()), 8))
        .unwrap();
    let (_, g, _, kv) = bounded.collect_all().unwrap();
    assert_eq!(g.tokens.len(), 400);
    assert!(kv.tokens_retained <= 64 + 64, "{kv:?}");
    assert!(matches!(
        grows.collect_all(),
        Err(EngineError::KvCapacity { .. })
    ));
    assert_eq!(small.collect_all().unwrap().1.tokens.len(), 8);
    let m = wait_idle(&scheduler);
    assert_eq!(m.kv_blocks_in_use, 0);
    assert_eq!(m.requests_failed, 2);
}
