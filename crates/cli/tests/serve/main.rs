//! `agate serve` driven over HTTP on 127.0.0.1 (a free port the server picks and prints), each
//! test with its own server. `openai`: the OpenAI shapes of chat and text completions, streamed
//! and not; /v1/models, /health, /metrics; the error cases with their statuses and OpenAI error
//! bodies; a 3-turn conversation reuses the prompt cache; `max_tokens` beyond the context stops
//! where `agate generate` does. `load`: 16 concurrent streams that all finish and leave no block
//! in use beyond the prompt cache; a client that disconnects mid-stream frees its blocks, and
//! clients hanging up never stop the server; the key, queue and pool limits; and, on the default
//! model, greedy outputs of 8 concurrent requests equal `agate generate`'s. This file holds the
//! shared client helpers.
//!
//! Every request loop is bounded (counts and timeouts); the servers stop when a test ends.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

#[path = "../common/mod.rs"]
mod common;
mod load;
mod openai;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::tiny_model;

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

/// Runs `test` with a client against a fresh server of a tiny model with a 2,048-token
/// context (stopped when `test` ends).
fn on_tiny_server(test: impl AsyncFnOnce(&reqwest::Client, &Server)) {
    let dir = tempfile::tempdir().unwrap();
    let server = tiny_server(dir.path(), 2048);
    runtime().block_on(test(&client(), &server));
}

/// A server of a tiny model (2 layers, 2 KV heads, a context of `context` tokens, Q8_0 weights)
/// written to `dir`.
fn tiny_server(dir: &Path, context: usize) -> Server {
    let model = tiny_model(dir, 2, 2, context);
    Server::start(&["--model", model.to_str().unwrap(), "--weights", "q8_0"])
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

/// GET `url`: the status and the JSON body.
async fn get(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// POST `body` to `url`: the status and the JSON body.
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
