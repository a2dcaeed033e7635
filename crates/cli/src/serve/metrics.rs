//! `GET /metrics`: the scheduler's snapshot and the server's response counts in the Prometheus
//! text exposition format (version 0.0.4).
//!
//! Invariants: every metric is preceded by its `# HELP` and `# TYPE` lines and named
//! `agate_…`; counters end in `_total`; histograms have cumulative `le` buckets ending in
//! `+Inf`, then `_sum` and `_count`; label values are escaped.

use std::collections::BTreeMap;
use std::fmt::Write;

use engine::scheduler::Histogram;
use engine::MetricsSnapshot;

/// The text of `/metrics`: one family after another, each written by its own function.
pub fn render(m: &MetricsSnapshot, responses: &BTreeMap<(String, u16), u64>) -> String {
    let mut out = String::new();
    http_responses(&mut out, responses);
    request_outcomes(&mut out, m);
    counters(&mut out, m);
    gauges(&mut out, m);
    histogram(
        &mut out,
        "time_to_first_token_seconds",
        "Seconds from a request's arrival to its first generated token.",
        &m.time_to_first_token,
    );
    histogram(
        &mut out,
        "token_latency_seconds",
        "Seconds between consecutive generated tokens of one request.",
        &m.token_latency,
    );
    out
}

/// The `# HELP` and `# TYPE` lines of a metric.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(
        out,
        "# HELP agate_{name} {help}\n# TYPE agate_{name} {kind}"
    );
}

/// One metric: its header, then each `(labels, value)` sample.
fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
    header(out, name, kind, help);
    for (labels, value) in samples {
        let _ = writeln!(out, "agate_{name}{labels} {value}");
    }
}

/// One metric of one sample without labels.
fn plain(out: &mut String, name: &str, kind: &str, help: &str, value: String) {
    metric(out, name, kind, help, &[(String::new(), value)]);
}

/// `http_responses_total`, by route and status.
fn http_responses(out: &mut String, responses: &BTreeMap<(String, u16), u64>) {
    let samples: Vec<(String, String)> = responses
        .iter()
        .map(|((route, status), n)| {
            (
                format!("{{route=\"{}\",status=\"{status}\"}}", escape(route)),
                n.to_string(),
            )
        })
        .collect();
    metric(
        out,
        "http_responses_total",
        "counter",
        "HTTP responses by route and status code.",
        &samples,
    );
}

/// `requests_total`, by outcome.
fn request_outcomes(out: &mut String, m: &MetricsSnapshot) {
    let samples: Vec<(String, String)> = [
        ("submitted", m.requests_submitted),
        ("rejected", m.requests_rejected),
        ("completed", m.requests_completed),
        ("failed", m.requests_failed),
        ("cancelled", m.requests_cancelled),
    ]
    .iter()
    .map(|(o, n)| (format!("{{outcome=\"{o}\"}}"), n.to_string()))
    .collect();
    metric(
        out,
        "requests_total",
        "counter",
        "Generation requests by outcome (rejected: the queue was full).",
        &samples,
    );
}

/// The token, cache and step counters.
fn counters(out: &mut String, m: &MetricsSnapshot) {
    for (name, help, value) in [
        (
            "prompt_tokens_total",
            "Prompt tokens run through the model (prefill).",
            m.prompt_tokens,
        ),
        (
            "prompt_tokens_cached_total",
            "Prompt tokens served from the prompt cache instead of prefilled.",
            m.prompt_tokens_cached,
        ),
        (
            "prompt_cache_hits_total",
            "Requests that continued a cached conversation.",
            m.prompt_cache_hits,
        ),
        (
            "generated_tokens_total",
            "Tokens generated.",
            m.generated_tokens,
        ),
        (
            "preemptions_total",
            "Running requests that gave their KV blocks back to make room.",
            m.preemptions,
        ),
        ("batch_steps_total", "Batched forward steps.", m.steps),
        (
            "batch_sequences_total",
            "Sequences summed over every batched step.",
            m.step_sequences,
        ),
    ] {
        plain(out, name, "counter", help, value.to_string());
    }
    plain(
        out,
        "kv_tokens_evicted_total",
        "counter",
        "Tokens evicted by the sessions' policies (entries averaged over layers and KV heads).",
        format!("{}", m.tokens_evicted),
    );
}

/// The queue, session and KV block gauges.
fn gauges(out: &mut String, m: &MetricsSnapshot) {
    for (name, help, value) in [
        (
            "queue_length",
            "Requests waiting for admission.",
            m.queue_length,
        ),
        (
            "active_sessions",
            "Requests admitted and generating or prefilling.",
            m.active_sessions,
        ),
        (
            "cached_sessions",
            "Finished conversations kept in the prompt cache.",
            m.cached_sessions,
        ),
        (
            "kv_blocks_in_use",
            "KV blocks in use (prompt cache included).",
            m.kv_blocks_in_use,
        ),
        (
            "kv_blocks_cached",
            "KV blocks held by the prompt cache.",
            m.cached_blocks,
        ),
        ("kv_blocks_free", "KV blocks free.", m.kv_blocks_free),
        (
            "kv_blocks_peak",
            "Most KV blocks ever in use at once.",
            m.kv_blocks_peak,
        ),
        ("kv_block_bytes", "Bytes of one KV block.", m.kv_block_bytes),
    ] {
        plain(out, name, "gauge", help, value.to_string());
    }
}

/// One histogram: its header, cumulative buckets ending in `+Inf`, `_sum` and `_count`.
fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    header(out, name, "histogram", help);
    for (bound, n) in h.bounds.iter().zip(&h.cumulative) {
        let _ = writeln!(out, "agate_{name}_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "agate_{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "agate_{name}_sum {}", h.sum);
    let _ = writeln!(out, "agate_{name}_count {}", h.count);
}

/// Escapes a label value (backslash, quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_help_type_and_cumulative_buckets() {
        let mut m = MetricsSnapshot::default();
        m.time_to_first_token
            .observe(std::time::Duration::from_millis(300));
        m.kv_blocks_in_use = 7;
        let responses = BTreeMap::from([(("/v1/models".to_string(), 200), 3)]);
        let text = render(&m, &responses);
        assert!(text.contains("# TYPE agate_kv_blocks_in_use gauge\nagate_kv_blocks_in_use 7\n"));
        assert!(text.contains("agate_http_responses_total{route=\"/v1/models\",status=\"200\"} 3"));
        assert!(text.contains("agate_time_to_first_token_seconds_bucket{le=\"0.25\"} 0"));
        assert!(text.contains("agate_time_to_first_token_seconds_bucket{le=\"0.5\"} 1"));
        assert!(text.contains("agate_time_to_first_token_seconds_bucket{le=\"+Inf\"} 1"));
        assert!(text.contains("agate_time_to_first_token_seconds_count 1"));
    }
}
