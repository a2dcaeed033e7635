//! The server under load: concurrent streams share batched steps and give every block back;
//! clients that hang up free their blocks and never stop the server; the API key, the queue and
//! the KV pool limit requests with OpenAI errors; and, on the default model, greedy outputs of
//! concurrent requests equal `agate generate`'s.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::{self, agate, stdout_json, tiny_model};
use crate::{
    assert_error, chat_body, client, idle_metrics, metrics, metrics_text, post, runtime, sample,
    stream, Server,
};

#[test]
fn sixteen_streams_finish_and_a_disconnect_frees_its_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 2048);
    let server = Server::start(&["--model", model.to_str().unwrap(), "--weights", "q8_0"]);
    runtime().block_on(async {
        let c = client();
        let url = server.url("/v1/chat/completions");
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (c, url) = (c.clone(), url.clone());
                tokio::spawn(async move {
                    let mut body = chat_body(&format!("Request number {i}."), 24);
                    body["stream"] = json!(true);
                    stream(&c, &url, &body).await
                })
            })
            .collect();
        for t in tasks {
            let (status, _, events) = t.await.unwrap();
            assert_eq!(status, 200);
            assert_eq!(events.last().unwrap(), "[DONE]");
            assert_eq!(
                events[events.len() - 2]["choices"][0]["finish_reason"],
                "length"
            );
        }
        let m = idle_metrics(&c, &server).await;
        assert_eq!(
            sample(&m, "agate_kv_blocks_in_use"),
            sample(&m, "agate_kv_blocks_cached")
        );
        assert!(
            sample(&m, "agate_batch_sequences_total") > sample(&m, "agate_batch_steps_total"),
            "the streams shared steps"
        );

        // A client reads a few chunks of a long stream, then hangs up.
        let mut body = chat_body("Tell me everything.", 1500);
        body["stream"] = json!(true);
        let response = c.post(&url).json(&body).send().await.unwrap();
        let mut chunks = response.bytes_stream();
        for _ in 0..3 {
            chunks.next().await.unwrap().unwrap();
        }
        let busy = metrics(&c, &server).await;
        assert!(sample(&busy, "agate_kv_blocks_in_use") > sample(&busy, "agate_kv_blocks_cached"));
        drop(chunks);
        let m = idle_metrics(&c, &server).await;
        assert_eq!(
            sample(&m, "agate_kv_blocks_in_use"),
            sample(&m, "agate_kv_blocks_cached")
        );
        let text = metrics_text(&c, &server).await;
        assert!(
            text.contains("agate_requests_total{outcome=\"cancelled\"} 1"),
            "{text}"
        );
    });
}

/// Clients that hang up in the middle of a stream cost the server only those connections: its
/// writes into the closed sockets fail (EPIPE) instead of raising SIGPIPE, which would end the
/// whole process and every other client's request with it.
#[test]
fn clients_hanging_up_mid_stream_never_stop_the_server() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 2048);
    let mut server = Server::start(&["--model", model.to_str().unwrap(), "--weights", "q8_0"]);
    #[cfg(target_os = "linux")]
    {
        // The cause itself, which the race below only sometimes reaches: SIGPIPE (13) must be
        // in the server's ignored set (bit 12 of /proc/PID/status's SigIgn mask).
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
        let ignored = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
            .unwrap();
        assert_ne!(ignored & (1 << 12), 0, "SIGPIPE is not ignored: {status}");
    }
    let address = server.base.trim_start_matches("http://").to_string();
    let mut body = chat_body("Tell me everything.", 1500);
    body["stream"] = json!(true);
    let body = body.to_string();
    for _ in 0..20 {
        let mut socket = std::net::TcpStream::connect(&address).unwrap();
        write!(
            socket,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut first = [0u8; 256];
        socket.read_exact(&mut first).unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200"), "{first:?}");
        drop(socket);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            server.child.try_wait().unwrap().is_none(),
            "the server ended when a client hung up"
        );
    }
    runtime().block_on(async {
        let c = client();
        let r = c.get(server.url("/health")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let m = idle_metrics(&c, &server).await;
        assert_eq!(
            sample(&m, "agate_kv_blocks_in_use"),
            sample(&m, "agate_kv_blocks_cached"),
            "{m:?}"
        );
    });
}

/// A prompt whose full cache is larger than the whole pool: 413 under any policy, since the
/// prompt is prefilled whole before the policy evicts; for an evicting policy the message says
/// so instead of suggesting one.
async fn prompts_larger_than_the_pool_get_413(c: &reqwest::Client, url: &str) {
    let mut streaming = chat_body(&"y".repeat(1000), 2);
    streaming["kv_policy"] = json!("streaming");
    streaming["kv_keep"] = json!(16);
    for (body, why) in [
        (chat_body(&"y".repeat(1000), 2), "use an evicting policy"),
        (
            streaming,
            "prefilled whole before the policy (streaming) evicts",
        ),
    ] {
        let r = c.post(url).bearer_auth("sesame").json(&body).send().await;
        let r = r.unwrap();
        let s = r.status().as_u16();
        let b: Value = r.json().await.unwrap();
        assert_error(s, &b, 413, None);
        assert_eq!(b["error"]["code"], "kv_capacity_exceeded");
        let message = b["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{message}");
    }
}

#[test]
fn api_key_queue_and_pool_limits() {
    let dir = tempfile::tempdir().unwrap();
    // 8 layers × 4 KV heads in a 1 MiB pool: a full cache holds 512 tokens.
    let model = tiny_model(dir.path(), 8, 4, 2048);
    let server = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--weights",
        "q8_0",
        "--kv-memory-mb",
        "1",
        "--max-sessions",
        "1",
        "--max-queue",
        "1",
        "--api-key",
        "sesame",
    ]);
    runtime().block_on(async {
        let c = client();
        let url = server.url("/v1/chat/completions");
        let r = c.post(&url).json(&chat_body("hi", 2)).send().await.unwrap();
        let s = r.status().as_u16();
        assert_error(s, &r.json().await.unwrap(), 401, None);
        let r = c
            .get(server.url("/v1/models"))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
        assert_eq!(
            c.get(server.url("/health"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            200
        );
        let authed = |body: &Value| c.post(&url).bearer_auth("sesame").json(body).send();

        prompts_larger_than_the_pool_get_413(&c, &url).await;

        // One request runs, one waits, the third gets 503.
        let mut long = chat_body("busy", 400);
        long["stream"] = json!(true);
        let running = authed(&long).await.unwrap();
        assert_eq!(running.status().as_u16(), 200);
        let waiting = tokio::spawn(authed(&chat_body("waits", 2)));
        let deadline = Instant::now() + Duration::from_secs(30);
        while sample(&metrics(&c, &server).await, "agate_queue_length") < 1.0 {
            assert!(Instant::now() < deadline, "the second request never queued");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r = authed(&chat_body("refused", 2)).await.unwrap();
        let s = r.status().as_u16();
        let b: Value = r.json().await.unwrap();
        assert_error(s, &b, 503, None);
        assert_eq!(b["error"]["code"], "server_overloaded");
        drop(running);
        let waited = waiting.await.unwrap().unwrap();
        assert_eq!(waited.status().as_u16(), 200);
        let m = idle_metrics(&c, &server).await;
        assert_eq!(
            sample(&m, "agate_kv_blocks_in_use"),
            sample(&m, "agate_kv_blocks_cached")
        );
    });
}

/// The default model, greedy: 8 concurrent requests (chat and text completions) through the
/// server give exactly `agate generate`'s text.
#[test]
fn greedy_outputs_of_8_concurrent_requests_equal_agate_generate() {
    let Some(_) = common::default_model() else {
        return;
    };
    let prompts = [
        "What is the capital of France?",
        "Name three colours.",
        "Write one sentence about the sea.",
        "What is 2 + 2?",
        "The capital of Italy is",
        "Once upon a time",
        "The largest planet in the solar system is",
        "def fibonacci(n):",
    ];
    let generate = |i: usize, prompt: &str| -> String {
        let mut args = vec![
            "--threads",
            "2",
            "generate",
            prompt,
            "--max-tokens",
            "24",
            "--json",
        ];
        if i < 4 {
            args.push("--chat");
        }
        stdout_json(&agate(&args))["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let want: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| generate(i, p))
        .collect();
    let server = Server::start(&[]);
    let got: Vec<String> = runtime().block_on(async {
        let c = client();
        let tasks: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let c = c.clone();
                let (url, body) = if i < 4 {
                    (
                        server.url("/v1/chat/completions"),
                        json!({"messages": [{"role": "user", "content": p}], "max_tokens": 24, "temperature": 0}),
                    )
                } else {
                    (
                        server.url("/v1/completions"),
                        json!({"prompt": p, "max_tokens": 24, "temperature": 0}),
                    )
                };
                tokio::spawn(async move { post(&c, &url, &body).await })
            })
            .collect();
        let mut out = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            let (status, body) = t.await.unwrap();
            assert_eq!(status, 200, "{body}");
            let choice = &body["choices"][0];
            let text = if i < 4 { &choice["message"]["content"] } else { &choice["text"] };
            out.push(text.as_str().unwrap().to_string());
        }
        out
    });
    assert_eq!(got, want);
}
