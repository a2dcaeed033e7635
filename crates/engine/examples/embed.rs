//! Embedding agate in a Rust program: load the default model once, run two sessions from two
//! threads with different eviction policies (the full cache, and StreamingLLM keeping 4 sinks plus
//! a recent window, 32 tokens per KV head), stream their text through iterators, and print each
//! session's eviction statistics.
//!
//! ```text
//! cargo run --release -p engine --example embed
//! ```

use engine::policy::PolicySpec;
use engine::{Engine, GenerateRequest, Policy, SessionWorker, StreamEvent};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The default model (SmolLM2-135M-Instruct), fetched into $AGATE_HOME on first use.
    let engine = Engine::builder()
        .on_progress(|line| eprintln!("agate: {line}"))
        .build()?;
    let streaming = PolicySpec {
        keep: Some(32),
        sinks: Some(4),
        ..PolicySpec::new(engine::PolicyKind::Streaming)
    }
    .build(&engine)?;
    let request = GenerateRequest {
        max_tokens: 48,
        ..GenerateRequest::default()
    };
    let prompt = "Write three sentences about the history of the bicycle.";

    // Each worker owns one session on its own thread; the two run concurrently.
    let workers = [
        ("full", SessionWorker::spawn(&engine, Policy::Full)?),
        ("streaming", SessionWorker::spawn(&engine, streaming)?),
    ];
    let streams: Vec<_> = workers
        .iter()
        .map(|(name, w)| (*name, w.chat(prompt, &request)))
        .collect();
    for (name, stream) in streams {
        let mut text = String::new();
        for event in stream {
            match event? {
                StreamEvent::Text(t) => text.push_str(&t),
                StreamEvent::Done { generation, kv } => {
                    println!("[{name}] {}", text.trim());
                    println!(
                        "[{name}] {} prompt + {} generated tokens ({:.1} tok/s); KV: {} seen, {} retained per head, \
                         eviction ratio {:.2}, {} of {} bytes",
                        generation.prompt_tokens,
                        generation.tokens.len(),
                        generation.decode_tokens_per_s(),
                        kv.tokens_seen,
                        kv.tokens_retained,
                        kv.eviction_ratio,
                        kv.bytes_in_use,
                        kv.bytes_full,
                    );
                }
            }
        }
    }
    Ok(())
}
