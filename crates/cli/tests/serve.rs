//! `agate serve` driven over HTTP on 127.0.0.1 (a free port the server picks and prints): the
//! OpenAI shapes of chat and text completions, streamed and not; /v1/models, /health, /metrics;
//! the error cases with their statuses and OpenAI error bodies; 16 concurrent streams that all
//! finish and leave no block in use beyond the prompt cache; a client that disconnects
//! mid-stream frees its blocks, and clients hanging up never stop the server; a 3-turn conversation reuses the prompt cache; and, on the
//! default model, greedy outputs of 8 concurrent requests equal `agate generate`'s.
//!
//! Every request loop is bounded (counts and timeouts); the servers stop when a test ends.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::tiny_model;

use futures_util::StreamExt;
use serde_json::{json, Value};

/// A running `agate serve`; killed on drop.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_agate"))
            .args([
                "--threads",
                "2",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start agate serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("agate serve did not start: {line:?}"))
            .to_string();
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        Server { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

async fn post(c: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = c.post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// The `data:` payloads of a streamed response, in order (`[DONE]` included as a string).
async fn stream(c: &reqwest::Client, url: &str, body: &Value) -> (u16, String, Vec<Value>) {
    let r = c.post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = r.text().await.unwrap();
    let events = text
        .split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.to_string())))
        .collect();
    (status, content_type, events)
}

/// The text of a chat stream's chunks.
fn streamed_content(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// The text of `/metrics`.
async fn metrics_text(c: &reqwest::Client, server: &Server) -> String {
    let r = c.get(server.url("/metrics")).send().await.unwrap();
    r.text().await.unwrap()
}

/// `/metrics` samples without labels.
async fn metrics(c: &reqwest::Client, server: &Server) -> Vec<(String, f64)> {
    metrics_text(c, server)
        .await
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| {
            let (n, v) = l.split_once(' ')?;
            Some((n.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn sample(m: &[(String, f64)], name: &str) -> f64 {
    m.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .1
}

/// Polls /metrics (bounded) until nothing is active or queued; returns the last sample.
async fn idle_metrics(c: &reqwest::Client, server: &Server) -> Vec<(String, f64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = metrics(c, server).await;
        let busy = sample(&m, "agate_active_sessions") + sample(&m, "agate_queue_length");
        if busy == 0.0 || Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn chat_body(content: &str, max_tokens: u64) -> Value {
    json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
}

fn assert_error(status: u16, body: &Value, want_status: u16, param: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("code").is_some() && e.get("param").is_some(),
        "{body}"
    );
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}");
    }
}

#[test]
fn openai_shapes_routes_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 2048);
    let server = Server::start(&["--model", model.to_str().unwrap(), "--weights", "q8_0"]);
    runtime().block_on(async {
        let c = client();
        let health: Value = c.get(server.url("/health")).send().await.unwrap().json().await.unwrap();
        assert_eq!(health, json!({"status": "ok"}));
        let models: Value = c.get(server.url("/v1/models")).send().await.unwrap().json().await.unwrap();
        assert_eq!(models["object"], "list");
        assert_eq!(models["data"][0]["id"], "tiny");
        assert_eq!(models["data"][0]["object"], "model");

        // Non-streaming chat.
        let (status, body) = post(&c, &server.url("/v1/chat/completions"), &chat_body("Hi!", 8)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["object"], "chat.completion");
        assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(body["model"], "tiny");
        let choice = &body["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["finish_reason"], "length");
        let content = choice["message"]["content"].as_str().unwrap().to_string();
        let usage = &body["usage"];
        assert_eq!(usage["completion_tokens"], 8);
        let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
        assert!(prompt_tokens > 3);
        assert_eq!(usage["total_tokens"], prompt_tokens + 8);
        assert_eq!(usage["kv"]["tokens_seen"], prompt_tokens + 7);
        assert_eq!(usage["kv"]["eviction_ratio"], 0.0);
        assert!(usage["kv"]["bytes_in_use"].as_u64().unwrap() > 0);

        // The same request streamed: same text, OpenAI chunks, usage chunk, [DONE].
        let mut streamed = chat_body("Hi!", 8);
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let (status, content_type, events) =
            stream(&c, &server.url("/v1/chat/completions"), &streamed).await;
        assert_eq!(status, 200);
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        assert_eq!(events.last().unwrap(), "[DONE]");
        assert_eq!(events[0]["object"], "chat.completion.chunk");
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(streamed_content(&events), content);
        let finish = &events[events.len() - 3];
        assert_eq!(finish["choices"][0]["finish_reason"], "length");
        let usage_chunk = &events[events.len() - 2];
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(usage_chunk["usage"]["completion_tokens"], 8);

        // Text completions, both ways.
        let body = json!({"model": "tiny", "prompt": "Once upon", "max_tokens": 5, "temperature": 0, "ignore_eos": true});
        let (status, full) = post(&c, &server.url("/v1/completions"), &body).await;
        assert_eq!(status, 200, "{full}");
        assert_eq!(full["object"], "text_completion");
        let text = full["choices"][0]["text"].as_str().unwrap().to_string();
        let mut body = body;
        body["stream"] = json!(true);
        let (_, _, events) = stream(&c, &server.url("/v1/completions"), &body).await;
        let joined: String = events.iter().filter_map(|e| e["choices"][0]["text"].as_str()).collect();
        assert_eq!(joined, text);
        assert_eq!(events[0]["object"], "text_completion");
        assert_eq!(events.last().unwrap(), "[DONE]");

        // agate's policy settings per request: the KV report shows the eviction.
        let mut body = chat_body(&"a long message ".repeat(20), 16);
        body["kv_policy"] = json!("streaming");
        body["kv_keep"] = json!(64);
        let (status, evicted) = post(&c, &server.url("/v1/chat/completions"), &body).await;
        assert_eq!(status, 200, "{evicted}");
        assert!(evicted["usage"]["kv"]["eviction_ratio"].as_f64().unwrap() > 0.5);
        assert!(evicted["usage"]["kv"]["tokens_retained"].as_u64().unwrap() <= 64);

        // Errors: OpenAI bodies, the right status, the field named.
        let url = server.url("/v1/chat/completions");
        let raw = c.post(&url).body("{not json").header("content-type", "application/json").send().await.unwrap();
        let status = raw.status().as_u16();
        assert_error(status, &raw.json().await.unwrap(), 400, None);
        let mut bad = chat_body("x", 4);
        bad["temperature"] = json!("hot");
        let (s, b) = post(&c, &url, &bad).await;
        assert_error(s, &b, 400, Some("temperature"));
        // Values out of their domain name their field too.
        for (field, value) in [
            ("temperature", json!(-1)),
            ("temperature", json!(1e39)),
            ("top_p", json!(0)),
            ("min_p", json!(1)),
            ("repetition_penalty", json!(0)),
        ] {
            let mut bad = chat_body("x", 4);
            bad[field] = value;
            let (s, b) = post(&c, &url, &bad).await;
            assert_error(s, &b, 400, Some(field));
        }
        let mut bad = chat_body("x", 4);
        bad["kv_policy"] = json!("nope");
        let (s, b) = post(&c, &url, &bad).await;
        assert_error(s, &b, 400, Some("kv_policy"));
        assert!(b["error"]["message"].as_str().unwrap().contains("unknown policy `nope`"));
        let mut bad = chat_body("x", 4);
        bad["kv_kep"] = json!(5);
        let (s, b) = post(&c, &url, &bad).await;
        assert_error(s, &b, 400, Some("kv_kep"));
        let mut bad = chat_body("x", 4);
        bad["kv_evict"] = json!(1.5);
        let (s, b) = post(&c, &url, &bad).await;
        assert_error(s, &b, 400, Some("kv_evict"));
        let mut bad = chat_body("x", 4);
        bad["n"] = json!(2);
        let (s, b) = post(&c, &url, &bad).await;
        assert_error(s, &b, 400, Some("n"));
        let mut bad = chat_body("x", 4);
        bad["max_tokens"] = json!(0);
        let (s, b) = post(&c, &url, &bad).await;
        assert_error(s, &b, 400, Some("max_tokens"));
        // A knob the policy does not read is refused, naming it (the CLI refuses its flag).
        for (policy, knob, value) in [
            (None, "kv_evict", json!(0.9)),
            (Some("full"), "kv_keep", json!(3)),
            (Some("ag"), "kv_keep", json!(8)),
            (Some("nacl"), "kv_sinks", json!(8)),
            (Some("h2o"), "kv_threshold", json!(0.5)),
            (Some("h2o"), "kv_ag_mode", json!("budget")),
        ] {
            let mut bad = chat_body("x", 4);
            if let Some(p) = policy {
                bad["kv_policy"] = json!(p);
            }
            bad[knob] = value;
            let (s, b) = post(&c, &url, &bad).await;
            assert_error(s, &b, 400, Some(knob));
            assert!(b["error"]["message"].as_str().unwrap().contains("does nothing"));
        }
        let mut bad = chat_body("x", 4);
        bad["stop"] = json!(7);
        let (s, b) = post(&c, &url, &bad).await;
        assert_error(s, &b, 400, Some("stop"));
        let message = b["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("a string or a list of strings") && !message.contains("untagged"),
            "{message}"
        );
        let (s, b) = post(&c, &url, &json!({"messages": []})).await;
        assert_error(s, &b, 400, Some("messages"));
        let (s, b) = post(&c, &url, &json!({"messages": [{"role": "tool", "content": "x"}]})).await;
        assert_error(s, &b, 400, Some("messages[0]"));
        // Longer than the model's context (2048 tokens): 400 before any streaming starts.
        let mut long = chat_body(&"x".repeat(3000), 4);
        long["stream"] = json!(true);
        let (s, b) = post(&c, &url, &long).await;
        assert_error(s, &b, 400, None);
        assert_eq!(b["error"]["code"], "context_length_exceeded");
        let r = c.get(server.url("/v1/nothing")).send().await.unwrap();
        let s = r.status().as_u16();
        assert_error(s, &r.json().await.unwrap(), 404, None);
        let r = c.get(server.url("/v1/chat/completions")).send().await.unwrap();
        let s = r.status().as_u16();
        assert_error(s, &r.json().await.unwrap(), 405, None);

        // A 3-turn conversation prefills only the new turn on turns 2 and 3.
        let mut messages = vec![json!({"role": "system", "content": "Be brief."})];
        let mut cached = Vec::new();
        for turn in ["First question?", "Second question?", "Third question?"] {
            messages.push(json!({"role": "user", "content": turn}));
            let body = json!({"messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": true});
            let (s, b) = post(&c, &url, &body).await;
            assert_eq!(s, 200, "{b}");
            let usage = &b["usage"];
            assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens_cached"]);
            cached.push((usage["prompt_tokens_cached"].as_u64().unwrap(), usage["prompt_tokens"].as_u64().unwrap()));
            messages.push(json!({"role": "assistant", "content": b["choices"][0]["message"]["content"]}));
        }
        assert_eq!(cached[0].0, 0);
        for turn in 1..3 {
            // Everything up to the previous answer's last token was cached.
            assert_eq!(cached[turn].0, cached[turn - 1].1 + 5, "{cached:?}");
        }

        let m = idle_metrics(&c, &server).await;
        assert_eq!(sample(&m, "agate_kv_blocks_in_use"), sample(&m, "agate_kv_blocks_cached"));
        assert!(sample(&m, "agate_prompt_cache_hits_total") >= 2.0);
        assert!(sample(&m, "agate_generated_tokens_total") >= 8.0);
        let text = c.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
        for name in [
            "agate_http_responses_total{route=\"/v1/chat/completions\",status=\"200\"}",
            "agate_http_responses_total{route=\"/v1/chat/completions\",status=\"400\"}",
            "agate_time_to_first_token_seconds_bucket{le=\"+Inf\"}",
            "agate_token_latency_seconds_count",
            "agate_kv_tokens_evicted_total",
            "agate_queue_length",
        ] {
            assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
        }
    });
}

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

        // A prompt whose full cache is larger than the whole pool: 413.
        let r = authed(&chat_body(&"y".repeat(1000), 2)).await.unwrap();
        let s = r.status().as_u16();
        let b: Value = r.json().await.unwrap();
        assert_error(s, &b, 413, None);
        assert_eq!(b["error"]["code"], "kv_capacity_exceeded");

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
        let out = Command::new(env!("CARGO_BIN_EXE_agate"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["text"].as_str().unwrap().to_string()
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
