//! The OpenAI surface of the server, one test per route or error family: /health and
//! /v1/models, chat and text completions (streamed and not), agate's per-request policy
//! settings, malformed requests and knobs a policy ignores (400 naming the field; bench-serve
//! shows that answer), prompts
//! beyond the context, a conversation served from the prompt cache with the metrics counting
//! it, and `max_tokens` beyond the context.

use serde_json::json;

use crate::common::{agate, random_gates, s, stdout_json, tiny_model};
use crate::{
    assert_error, chat_body, client, get, idle_metrics, on_tiny_server, post, runtime, sample,
    stream, streamed_content, tiny_server, Server,
};

#[test]
fn health_models_and_unknown_routes() {
    on_tiny_server(async |c, server| {
        let (status, health) = get(c, &server.url("/health")).await;
        assert_eq!((status, health), (200, json!({"status": "ok"})));
        let (status, models) = get(c, &server.url("/v1/models")).await;
        assert_eq!(status, 200);
        assert_eq!(models["object"], "list");
        assert_eq!(models["data"][0]["id"], "tiny");
        assert_eq!(models["data"][0]["object"], "model");
        let (s, b) = get(c, &server.url("/v1/nothing")).await;
        assert_error(s, &b, 404, None);
        let (s, b) = get(c, &server.url("/v1/chat/completions")).await;
        assert_error(s, &b, 405, None);
    });
}

/// A chat completion, then the same request streamed: same text, OpenAI chunks, a usage
/// chunk, `[DONE]`.
#[test]
fn chat_completions_streamed_and_not() {
    on_tiny_server(async |c, server| {
        let (status, body) =
            post(c, &server.url("/v1/chat/completions"), &chat_body("Hi!", 8)).await;
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

        let mut streamed = chat_body("Hi!", 8);
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let (status, content_type, events) =
            stream(c, &server.url("/v1/chat/completions"), &streamed).await;
        assert_eq!(status, 200);
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        assert_eq!(events.last().unwrap(), "[DONE]");
        assert_eq!(events[0]["object"], "chat.completion.chunk");
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(streamed_content(&events), content);
        let finish = &events[events.len() - 3];
        assert_eq!(finish["choices"][0]["finish_reason"], "length");
        let usage_chunk = &events[events.len() - 2];
        assert_eq!(usage_chunk["choices"], json!([]));
        assert_eq!(usage_chunk["usage"]["completion_tokens"], 8);
    });
}

#[test]
fn text_completions_streamed_and_not() {
    on_tiny_server(async |c, server| {
        let body = json!({"model": "tiny", "prompt": "Once upon", "max_tokens": 5, "temperature": 0, "ignore_eos": true});
        let (status, full) = post(c, &server.url("/v1/completions"), &body).await;
        assert_eq!(status, 200, "{full}");
        assert_eq!(full["object"], "text_completion");
        let text = full["choices"][0]["text"].as_str().unwrap().to_string();
        let mut body = body;
        body["stream"] = json!(true);
        let (_, _, events) = stream(c, &server.url("/v1/completions"), &body).await;
        let joined: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(joined, text);
        assert_eq!(events[0]["object"], "text_completion");
        assert_eq!(events.last().unwrap(), "[DONE]");
    });
}

/// agate's policy settings per request: the KV report shows the eviction.
#[test]
fn per_request_policy_settings_show_in_the_kv_report() {
    on_tiny_server(async |c, server| {
        let mut body = chat_body(&"a long message ".repeat(20), 16);
        body["kv_policy"] = json!("streaming");
        body["kv_keep"] = json!(64);
        let (status, evicted) = post(c, &server.url("/v1/chat/completions"), &body).await;
        assert_eq!(status, 200, "{evicted}");
        assert!(evicted["usage"]["kv"]["eviction_ratio"].as_f64().unwrap() > 0.5);
        assert!(evicted["usage"]["kv"]["tokens_retained"].as_u64().unwrap() <= 64);
    });
}

/// A server whose default policy is not Attention-Gate still takes `--gates`: a request that
/// asks for ag runs with them (without them the tiny model has no gates, and the request is a
/// 400 naming the server's --gates).
#[test]
fn requests_for_ag_use_the_servers_gates_whatever_the_default_policy() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 2048);
    let gates = random_gates(dir.path(), &model);
    let mut body = chat_body(&"a long message ".repeat(20), 4);
    body["kv_policy"] = json!("ag");
    let rt = runtime();
    let plain = Server::start(&["--model", s(&model), "--weights", "q8_0"]);
    let (status, refused) = rt.block_on(post(&client(), &plain.url("/v1/chat/completions"), &body));
    assert_error(status, &refused, 400, Some("kv_policy"));
    let msg = refused["error"]["message"].as_str().unwrap();
    assert!(msg.contains("the server's --gates"), "{msg}");
    let gated = Server::start(&[
        "--model",
        s(&model),
        "--weights",
        "q8_0",
        "--policy",
        "full",
        "--gates",
        s(&gates),
    ]);
    let (status, answer) = rt.block_on(post(&client(), &gated.url("/v1/chat/completions"), &body));
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["usage"]["kv"]["policy_state_bytes"]
            .as_u64()
            .unwrap()
            > 0,
        "{answer}"
    );
}

/// Errors: OpenAI bodies, the right status, the field named.
#[test]
fn malformed_requests_name_their_field() {
    on_tiny_server(async |c, server| {
        let url = server.url("/v1/chat/completions");
        let raw = c
            .post(&url)
            .body("{not json")
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        let status = raw.status().as_u16();
        assert_error(status, &raw.json().await.unwrap(), 400, None);
        let mut bad = chat_body("x", 4);
        bad["temperature"] = json!("hot");
        let (s, b) = post(c, &url, &bad).await;
        assert_error(s, &b, 400, Some("temperature"));
        // Values out of their domain name their field too.
        for (field, value) in [
            ("temperature", json!(-1)),
            ("temperature", json!(1e39)),
            ("top_p", json!(0)),
            ("min_p", json!(1)),
            ("repetition_penalty", json!(0)),
            ("kv_evict", json!(1.5)),
            // Below 1 as a JSON number, 1 as the f32 the policy holds.
            ("kv_evict", json!(0.999999999)),
            ("kv_layer_thresholds", json!("0.5,0.5")),
            ("kv_layer_thresholds", json!([0.5, "x"])),
            ("n", json!(2)),
            ("max_tokens", json!(0)),
            ("kv_kep", json!(5)),
        ] {
            let mut bad = chat_body("x", 4);
            bad[field] = value;
            let (s, b) = post(c, &url, &bad).await;
            assert_error(s, &b, 400, Some(field));
        }
        let mut bad = chat_body("x", 4);
        bad["kv_policy"] = json!("nope");
        let (s, b) = post(c, &url, &bad).await;
        assert_error(s, &b, 400, Some("kv_policy"));
        assert!(b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown policy `nope`"));
        let mut bad = chat_body("x", 4);
        bad["stop"] = json!(7);
        let (s, b) = post(c, &url, &bad).await;
        assert_error(s, &b, 400, Some("stop"));
        let message = b["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("a string or a list of strings") && !message.contains("untagged"),
            "{message}"
        );
        let (s, b) = post(c, &url, &json!({"messages": []})).await;
        assert_error(s, &b, 400, Some("messages"));
        let (s, b) = post(
            c,
            &url,
            &json!({"messages": [{"role": "tool", "content": "x"}]}),
        )
        .await;
        assert_error(s, &b, 400, Some("messages[0]"));
        // A user message needs text (OpenAI refuses a null one; the CLI an empty prompt), and
        // so does a text completion.
        for (content, what) in [(json!(null), "null"), (json!(""), "empty")] {
            let body = json!({"messages": [{"role": "user", "content": content}]});
            let (s, b) = post(c, &url, &body).await;
            assert_error(s, &b, 400, Some("messages[0]"));
            let message = b["error"]["message"].as_str().unwrap();
            assert!(message.contains(&format!("content is {what}")), "{message}");
        }
        let (s, b) = post(c, &server.url("/v1/completions"), &json!({"prompt": ""})).await;
        assert_error(s, &b, 400, Some("prompt"));
    });
}

/// A knob the policy does not read is refused, naming it (the CLI refuses its flag).
#[test]
fn knobs_the_policy_does_not_read_are_refused() {
    on_tiny_server(async |c, server| {
        let url = server.url("/v1/chat/completions");
        for (policy, knob, value) in [
            (None, "kv_evict", json!(0.9)),
            (Some("full"), "kv_keep", json!(3)),
            (Some("ag"), "kv_keep", json!(8)),
            (Some("nacl"), "kv_sinks", json!(8)),
            (Some("h2o"), "kv_threshold", json!(0.5)),
            (Some("h2o"), "kv_layer_thresholds", json!([0.5, 0.5])),
            (Some("h2o"), "kv_ag_mode", json!("budget")),
        ] {
            let mut bad = chat_body("x", 4);
            if let Some(p) = policy {
                bad["kv_policy"] = json!(p);
            }
            bad[knob] = value;
            let (s, b) = post(c, &url, &bad).await;
            assert_error(s, &b, 400, Some(knob));
            assert!(b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("does nothing"));
        }
        // bench-serve shows the server's answer (status, field, message), no table of zeros.
        let out = agate(&[
            "bench-serve",
            "--url",
            &server.base,
            "--clients",
            "2",
            "--max-tokens",
            "2",
            "--kv-policy",
            "full",
            "--kv-keep",
            "3",
        ]);
        crate::common::fails_with(
            &out,
            &[
                "all 2 requests failed; the first: the server answered 400 Bad Request (kv_keep)",
                "kv_keep does nothing with the policy `full`",
            ],
        );
        assert!(
            out.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    });
}

/// Longer than the model's context (2048 tokens): 400 before any streaming starts, naming the
/// endpoint's own field (`messages`, `prompt`).
#[test]
fn a_prompt_longer_than_the_context_is_refused_before_streaming() {
    on_tiny_server(async |c, server| {
        let mut long = chat_body(&"x".repeat(3000), 4);
        long["stream"] = json!(true);
        let (s, b) = post(c, &server.url("/v1/chat/completions"), &long).await;
        assert_error(s, &b, 400, Some("messages"));
        assert_eq!(b["error"]["code"], "context_length_exceeded");
        let long = json!({"prompt": "x".repeat(3000), "max_tokens": 4, "stream": true});
        let (s, b) = post(c, &server.url("/v1/completions"), &long).await;
        assert_error(s, &b, 400, Some("prompt"));
        assert_eq!(b["error"]["code"], "context_length_exceeded");
    });
}

/// A 3-turn conversation prefills only the new turn on turns 2 and 3; /metrics counts the
/// cache hits, the tokens and the responses by status.
#[test]
fn a_conversation_reuses_the_prompt_cache_and_metrics_count_it() {
    on_tiny_server(async |c, server| {
        let url = server.url("/v1/chat/completions");
        let mut messages = vec![json!({"role": "system", "content": "Be brief."})];
        let mut cached = Vec::new();
        for turn in ["First question?", "Second question?", "Third question?"] {
            messages.push(json!({"role": "user", "content": turn}));
            let body = json!({"messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": true});
            let (s, b) = post(c, &url, &body).await;
            assert_eq!(s, 200, "{b}");
            let usage = &b["usage"];
            assert_eq!(
                usage["prompt_tokens_details"]["cached_tokens"],
                usage["prompt_tokens_cached"]
            );
            cached.push((
                usage["prompt_tokens_cached"].as_u64().unwrap(),
                usage["prompt_tokens"].as_u64().unwrap(),
            ));
            messages.push(
                json!({"role": "assistant", "content": b["choices"][0]["message"]["content"]}),
            );
        }
        assert_eq!(cached[0].0, 0);
        for turn in 1..3 {
            // Everything up to the previous answer's last token was cached.
            assert_eq!(cached[turn].0, cached[turn - 1].1 + 5, "{cached:?}");
        }
        // A refused request is counted under its status.
        let (s, b) = post(c, &url, &chat_body("x", 0)).await;
        assert_error(s, &b, 400, Some("max_tokens"));

        let m = idle_metrics(c, server).await;
        assert_eq!(
            sample(&m, "agate_kv_blocks_in_use"),
            sample(&m, "agate_kv_blocks_cached")
        );
        assert!(sample(&m, "agate_prompt_cache_hits_total") >= 2.0);
        assert!(sample(&m, "agate_generated_tokens_total") >= 8.0);
        let text = c
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
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

/// `max_tokens` beyond the context is not an error: the answer ends when the context is full,
/// as `agate generate`'s does (`finish_reason` "length", OpenAI's name for it), with the same
/// text. (The prompt is one on which this tiny model reaches the context before its EOS.)
#[test]
fn max_tokens_beyond_the_context_stops_where_generate_does() {
    let dir = tempfile::tempdir().unwrap();
    let server = tiny_server(dir.path(), 64);
    let generated = stdout_json(&agate(&[
        "--threads",
        "2",
        "generate",
        "Tell me a story.",
        "--chat",
        "--temp",
        "0",
        "--max-tokens",
        "1000",
        "--json",
        "--weights",
        "q8_0",
        "--model",
        s(&dir.path().join("tiny")),
    ]));
    assert_eq!(generated["finish_reason"], "context_full", "{generated}");
    runtime().block_on(async {
        let c = client();
        let body = json!({"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 1000, "temperature": 0});
        let (s, b) = post(&c, &server.url("/v1/chat/completions"), &body).await;
        assert_eq!(s, 200, "{b}");
        assert_eq!(b["choices"][0]["finish_reason"], "length");
        assert_eq!(b["choices"][0]["message"]["content"], generated["text"]);
        assert_eq!(b["usage"]["completion_tokens"], generated["generated_tokens"]);
        assert_eq!(b["usage"]["total_tokens"], 64);
    });
}
