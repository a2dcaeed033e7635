//! `agate bench-serve`: N concurrent streaming clients against a running `agate serve` (or any
//! OpenAI-compatible server), each sending its requests one after another. Prints aggregate and
//! per-request tokens/s, time-to-first-token percentiles and the KV memory the requests held, as
//! a table or one JSON object (`--json`).
//!
//! Invariants: only the given URL is contacted (loopback by default); every client sends a
//! bounded number of requests with a bounded `max_tokens` and a per-request timeout; a failed
//! request is reported (a refusal with the server's status, field and message), never retried,
//! and when every request failed no table of zeros is printed; generated tokens are counted
//! from the server's `usage` (`stream_options.include_usage`), not from chunks. Aggregate
//! tokens/s is over the whole wall time; aggregate decode tokens/s counts each request's tokens
//! after its first over the span from the earliest first token to the latest end.

use std::time::{Duration, Instant};

use clap::Args;
use engine::PolicyKind;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// Flags of `agate bench-serve`.
#[derive(Args, Debug)]
pub struct BenchServeArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Concurrent clients (streams in flight at once).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub clients: u64,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10000))]
    pub requests: u64,
    /// Tokens generated per request (end-of-sequence is ignored so that every request generates
    /// exactly this many).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub max_tokens: u64,
    /// The user message of every request (client `i` appends ` (i)` so prompts differ); default:
    /// a short question.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Repeat the prompt this many times (long-context runs).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100000))]
    pub prompt_repeat: u64,
    /// Sampling temperature of the requests.
    #[arg(long, default_value_t = 0.0, value_parser = parse_finite, allow_negative_numbers = true)]
    pub temperature: f32,
    /// `kv_policy` of the requests (default: the server's).
    #[arg(long, value_name = "POLICY", value_parser = clap::value_parser!(PolicyKind))]
    pub kv_policy: Option<PolicyKind>,
    /// `kv_keep` of the requests (tokens each KV head keeps, at least 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "kv_evict")]
    pub kv_keep: Option<u64>,
    /// `kv_evict` of the requests (fraction of each head's tokens to evict, in [0, 1)).
    #[arg(long, value_parser = crate::policy_args::parse_ratio, allow_negative_numbers = true)]
    pub kv_evict: Option<f32>,
    /// Bearer token, when the server has --api-key.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Seconds before one request is abandoned (1 to 86400).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A finite number: JSON has no NaN or infinity (they would go out as `null`, and the server
/// would use its default instead of the value asked for). Ranges are the server's to check
/// (the `kv_*` values are checked here with the parsers of agate's own flags).
fn parse_finite(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(v) => Err(format!("must be a finite number, got {v}")),
        Err(_) => Err(format!("`{s}` is not a number")),
    }
}

/// What one request measured.
#[derive(Clone, Debug, serde::Serialize)]
struct RequestResult {
    client: u64,
    ok: bool,
    /// Seconds from the start of the benchmark to this request's start.
    start_s: f64,
    error: Option<String>,
    ttft_s: f64,
    total_s: f64,
    completion_tokens: u64,
    prompt_tokens: u64,
    /// Generated tokens after the first, per second of streaming after the first.
    decode_tokens_per_s: f64,
    kv_bytes_in_use: u64,
    kv_bytes_full: u64,
}

/// Runs `agate bench-serve`.
pub fn run(args: &BenchServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(bench(args))
}

/// The server under test: its base URL, the HTTP client (with the request timeout) and the
/// bearer token, shared by every simulated client.
#[derive(Clone)]
struct Target {
    client: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

async fn bench(args: &BenchServeArgs) -> anyhow::Result<()> {
    let url = reqwest::Url::parse(&args.url).map_err(|e| {
        anyhow::anyhow!(
            "--url {}: not a valid URL ({e}); give the server's base URL, e.g. http://127.0.0.1:8080",
            args.url
        )
    })?;
    anyhow::ensure!(
        matches!(url.scheme(), "http" | "https"),
        "--url {}: the scheme must be http or https, got `{}`",
        args.url,
        url.scheme()
    );
    let target = Target {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(args.timeout))
            .build()?,
        base: args.url.trim_end_matches('/').to_string(),
        api_key: args.api_key.clone(),
    };
    // A server that is not there is one error, before any client starts.
    let health = format!("{}/health", target.base);
    match target.client.get(&health).send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => anyhow::bail!("--url {}: {health} answered {}", args.url, r.status()),
        Err(e) => anyhow::bail!(
            "--url {}: cannot reach the server: {:#}",
            args.url,
            anyhow::Error::new(e)
        ),
    }
    let before = scrape(&target).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let target = target.clone();
        let bodies: Vec<Value> = (0..args.requests)
            .map(|r| request_body(args, c, r))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for body in bodies {
                out.push(one_request(&target, c, body, started).await);
            }
            out
        }));
    }
    let mut results: Vec<RequestResult> = Vec::new();
    for t in tasks {
        results.extend(t.await?);
    }
    let wall = started.elapsed().as_secs_f64();
    let after = scrape(&target).await;
    let failed: Vec<&RequestResult> = results.iter().filter(|r| !r.ok).collect();
    let first_error = || failed[0].error.as_deref().unwrap_or("?");
    // Nothing was measured: a table of zeros would only hide the server's answer.
    anyhow::ensure!(
        failed.len() < results.len(),
        "all {} requests failed; the first: {}",
        results.len(),
        first_error()
    );
    let report = summarize(args, &results, wall, before.as_ref(), after.as_ref());
    if args.json {
        outln!("{report}")?;
    } else {
        print_table(&report, &results)?;
    }
    anyhow::ensure!(
        failed.is_empty(),
        "{} of {} requests failed; the first: {}",
        failed.len(),
        results.len(),
        first_error()
    );
    Ok(())
}

fn request_body(args: &BenchServeArgs, client: u64, request: u64) -> Value {
    let base = args
        .prompt
        .clone()
        .unwrap_or_else(|| "Write a short story about a lighthouse keeper.".into());
    let prompt = format!(
        "{} ({client}.{request})",
        base.repeat(args.prompt_repeat as usize)
    );
    let mut body = json!({
        "model": "agate",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": client * 1000 + request,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
    });
    if let Some(p) = args.kv_policy {
        body["kv_policy"] = json!(p.name());
    }
    if let Some(k) = args.kv_keep {
        body["kv_keep"] = json!(k);
    }
    if let Some(e) = args.kv_evict {
        body["kv_evict"] = json!(e);
    }
    body
}

async fn one_request(
    target: &Target,
    client_id: u64,
    body: Value,
    bench_started: Instant,
) -> RequestResult {
    let started = Instant::now();
    let mut result = RequestResult {
        client: client_id,
        ok: false,
        start_s: (started - bench_started).as_secs_f64(),
        error: None,
        ttft_s: 0.0,
        total_s: 0.0,
        completion_tokens: 0,
        prompt_tokens: 0,
        decode_tokens_per_s: 0.0,
        kv_bytes_in_use: 0,
        kv_bytes_full: 0,
    };
    match stream_request(target, body, started, &mut result).await {
        Ok(()) => result.ok = true,
        Err(e) => result.error = Some(format!("{e:#}")),
    }
    result.total_s = started.elapsed().as_secs_f64();
    let streaming = result.total_s - result.ttft_s;
    if result.completion_tokens > 1 && streaming > 0.0 {
        result.decode_tokens_per_s = (result.completion_tokens - 1) as f64 / streaming;
    }
    result
}

async fn stream_request(
    target: &Target,
    body: Value,
    started: Instant,
    result: &mut RequestResult,
) -> anyhow::Result<()> {
    let mut request = target
        .client
        .post(format!("{}/v1/chat/completions", target.base))
        .json(&body);
    if let Some(k) = &target.api_key {
        request = request.bearer_auth(k);
    }
    let response = request.send().await?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        anyhow::bail!("{}", server_error(status, &text));
    }
    let mut bytes = response.bytes_stream();
    let mut buffer = String::new();
    let mut done = false;
    while let Some(chunk) = bytes.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(data)?;
                if let Some(e) = v.get("error") {
                    anyhow::bail!("stream error: {e}");
                }
                let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
                if !content.is_empty() && result.ttft_s == 0.0 {
                    result.ttft_s = started.elapsed().as_secs_f64();
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    result.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
                    result.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                    result.kv_bytes_in_use = u["kv"]["bytes_in_use"].as_u64().unwrap_or(0);
                    result.kv_bytes_full = u["kv"]["bytes_full"].as_u64().unwrap_or(0);
                }
            }
        }
    }
    anyhow::ensure!(done, "the stream ended without `data: [DONE]`");
    Ok(())
}

/// A refused request as the user needs it: the status, and from an OpenAI error body
/// (`{"error": {"message", "param", "code"}}`) the field at fault and the message; any other
/// body as it came (its first 300 characters: an HTML error page is long).
fn server_error(status: reqwest::StatusCode, body: &str) -> String {
    let error = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").cloned());
    let Some(message) = error
        .as_ref()
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
    else {
        let body: String = body.trim().chars().take(300).collect();
        return format!("the server answered {status}: {body}");
    };
    let mut at = String::new();
    if let Some(param) = error.as_ref().and_then(|e| e["param"].as_str()) {
        at = format!(" ({param})");
    }
    format!("the server answered {status}{at}: {message}")
}

/// The server's `/metrics` as name → value (samples without labels only); `None` when the
/// server has no such endpoint.
async fn scrape(target: &Target) -> Option<Vec<(String, f64)>> {
    let text = target
        .client
        .get(format!("{}/metrics", target.base))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.contains('{'))
            .filter_map(|l| {
                let (name, value) = l.split_once(' ')?;
                Some((name.to_string(), value.trim().parse().ok()?))
            })
            .collect(),
    )
}

fn metric(samples: Option<&Vec<(String, f64)>>, name: &str) -> Option<f64> {
    samples?.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summarize(
    args: &BenchServeArgs,
    results: &[RequestResult],
    wall: f64,
    before: Option<&Vec<(String, f64)>>,
    after: Option<&Vec<(String, f64)>>,
) -> Value {
    let ok: Vec<&RequestResult> = results.iter().filter(|r| r.ok).collect();
    let tokens: u64 = ok.iter().map(|r| r.completion_tokens).sum();
    let mut ttft: Vec<f64> = ok.iter().map(|r| r.ttft_s).collect();
    ttft.sort_by(f64::total_cmp);
    let mut per: Vec<f64> = ok.iter().map(|r| r.decode_tokens_per_s).collect();
    per.sort_by(f64::total_cmp);
    // Decoding proper: from the first token of any request to the end of the last one.
    let decode_window = ok.iter().map(|r| r.start_s + r.total_s).fold(0.0, f64::max)
        - ok.iter()
            .map(|r| r.start_s + r.ttft_s)
            .fold(f64::INFINITY, f64::min);
    let decoded: u64 = ok
        .iter()
        .map(|r| r.completion_tokens.saturating_sub(1))
        .sum();
    let delta = |name: &str| Some(metric(after, name)? - metric(before, name).unwrap_or(0.0));
    let block_bytes = metric(after, "agate_kv_block_bytes");
    json!({
        "url": args.url,
        "clients": args.clients,
        "requests": results.len(),
        "failed": results.len() - ok.len(),
        "max_tokens": args.max_tokens,
        "wall_s": wall,
        "completion_tokens": tokens,
        "aggregate_tokens_per_s": if wall > 0.0 { tokens as f64 / wall } else { 0.0 },
        "aggregate_decode_tokens_per_s": if decode_window > 0.0 { decoded as f64 / decode_window } else { 0.0 },
        "per_request_decode_tokens_per_s": {
            "median": percentile(&per, 50.0),
            "min": per.first().copied().unwrap_or(0.0),
            "max": per.last().copied().unwrap_or(0.0),
        },
        "ttft_s": {
            "p50": percentile(&ttft, 50.0),
            "p90": percentile(&ttft, 90.0),
            "p99": percentile(&ttft, 99.0),
            "max": ttft.last().copied().unwrap_or(0.0),
        },
        "kv": {
            "bytes_in_use_per_request_max": ok.iter().map(|r| r.kv_bytes_in_use).max().unwrap_or(0),
            "bytes_full_per_request_max": ok.iter().map(|r| r.kv_bytes_full).max().unwrap_or(0),
            "server_peak_bytes": metric(after, "agate_kv_blocks_peak").zip(block_bytes).map(|(b, s)| b * s),
            "server_capacity_bytes": metric(after, "agate_kv_blocks_free")
                .zip(metric(after, "agate_kv_blocks_in_use"))
                .zip(block_bytes)
                .map(|((f, u), s)| (f + u) * s),
        },
        "server": {
            "preemptions": delta("agate_preemptions_total"),
            "batch_steps": delta("agate_batch_steps_total"),
            "mean_batch": delta("agate_batch_sequences_total").zip(delta("agate_batch_steps_total"))
                .map(|(s, n)| if n > 0.0 { s / n } else { 0.0 }),
        },
        "per_request": results,
    })
}

fn print_table(report: &Value, results: &[RequestResult]) -> anyhow::Result<()> {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    outln!(
        "{} clients × {} requests, {} tokens each: {} tokens in {:.2} s = {:.1} tokens/s aggregate",
        report["clients"],
        results.len() as u64 / report["clients"].as_u64().unwrap_or(1).max(1),
        report["max_tokens"],
        report["completion_tokens"],
        f(&report["wall_s"]),
        f(&report["aggregate_tokens_per_s"]),
    )?;
    let per = &report["per_request_decode_tokens_per_s"];
    outln!(
        "aggregate decode: {:.1} tokens/s (from the first token of any request to the last end)",
        f(&report["aggregate_decode_tokens_per_s"])
    )?;
    outln!(
        "per request: {:.1} tokens/s median ({:.1}–{:.1})",
        f(&per["median"]),
        f(&per["min"]),
        f(&per["max"])
    )?;
    let t = &report["ttft_s"];
    outln!(
        "time to first token: p50 {:.3} s, p90 {:.3} s, p99 {:.3} s, max {:.3} s",
        f(&t["p50"]),
        f(&t["p90"]),
        f(&t["p99"]),
        f(&t["max"])
    )?;
    let kv = &report["kv"];
    let mib = |v: &Value| {
        v.as_f64()
            .map_or("?".to_string(), |b| format!("{:.1}", b / 1048576.0))
    };
    outln!(
        "KV per request (max): {} MiB in use of {} MiB full; server peak {} MiB of {} MiB",
        mib(&kv["bytes_in_use_per_request_max"]),
        mib(&kv["bytes_full_per_request_max"]),
        mib(&kv["server_peak_bytes"]),
        mib(&kv["server_capacity_bytes"]),
    )?;
    let s = &report["server"];
    outln!(
        "server: {} preemptions, mean batch {:.2} sequences",
        s["preemptions"],
        f(&s["mean_batch"])
    )?;
    for r in results.iter().filter(|r| !r.ok) {
        outln!(
            "client {} failed: {}",
            r.client,
            r.error.as_deref().unwrap_or("?")
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_show_status_field_and_message() {
        let body = r#"{"error":{"message":"policy: unknown policy `nope`","type":"invalid_request_error","param":"kv_policy","code":"invalid_policy"}}"#;
        assert_eq!(
            server_error(reqwest::StatusCode::BAD_REQUEST, body),
            "the server answered 400 Bad Request (kv_policy): policy: unknown policy `nope`"
        );
        let body = r#"{"error":{"message":"too big","param":null}}"#;
        assert_eq!(
            server_error(reqwest::StatusCode::PAYLOAD_TOO_LARGE, body),
            "the server answered 413 Payload Too Large: too big"
        );
        assert_eq!(
            server_error(reqwest::StatusCode::BAD_GATEWAY, "upstream down\n"),
            "the server answered 502 Bad Gateway: upstream down"
        );
    }
}
