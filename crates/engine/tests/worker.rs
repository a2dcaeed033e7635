//! `SessionWorker` on a small random model: a stream yields text chunks then exactly one `Done`
//! whose text matches the chunks and an in-thread session's output; requests run in order on one
//! session (the cache grows across them); dropping a stream early cancels only that request;
//! dropping the worker joins its thread.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use engine::{Engine, GenerateRequest, Policy, SessionWorker, StreamEvent};

fn tiny_engine(dir: &std::path::Path) -> Engine {
    let cfg = model_zoo::random::tiny_config(2, 4, 2);
    engine::atomic::write_dir(dir, |s| model_zoo::random::write_random_model(s, &cfg, 11)).unwrap();
    Engine::builder().model(dir).build().unwrap()
}

#[test]
fn worker_streams_in_order_and_matches_a_plain_session() {
    let tmp = tempfile::tempdir().unwrap();
    let engine = tiny_engine(tmp.path());
    let request = GenerateRequest {
        max_tokens: 12,
        stop_at_eos: false,
        ..GenerateRequest::default()
    };
    let mut plain = engine.new_session();
    let want = plain.complete("hello", &request, &mut |_| true).unwrap();

    let worker = SessionWorker::spawn(&engine, Policy::Full).unwrap();
    let mut chunks = String::new();
    let mut done = 0;
    for event in worker.complete("hello", &request) {
        match event.unwrap() {
            StreamEvent::Text(t) => chunks.push_str(&t),
            StreamEvent::Done { generation, kv } => {
                done += 1;
                assert_eq!(generation.tokens, want.tokens);
                assert_eq!(generation.text, chunks);
                assert_eq!(kv.tokens_seen, plain.kv_report().tokens_seen);
            }
        }
    }
    assert_eq!(done, 1);

    // An abandoned stream cancels its request; the next one still runs on the same session.
    let mut first = worker.complete(" more", &request);
    assert!(first.next().is_some());
    drop(first);
    let (_, generation, kv) = worker.complete(" again", &request).collect_all().unwrap();
    assert_eq!(generation.tokens.len(), 12);
    assert!(kv.tokens_seen > want.tokens.len() + generation.tokens.len());
    drop(worker);
}
