//! The OpenAI wire format of `agate serve`: request bodies of `/v1/chat/completions` and
//! `/v1/completions` (with agate's `kv_*` extensions), the response and stream-chunk objects
//! (the SSE events a scheduler event becomes), and OpenAI-style error bodies with their HTTP
//! status.
//!
//! Invariants: every request field is checked before the request reaches the scheduler, and a
//! bad one is a 400 naming it (`error.param`); unknown `kv_*` fields are errors (a typo must not
//! silently change the policy), other unknown fields are ignored as OpenAI clients send many;
//! responses carry exactly OpenAI's keys plus agate's, which are documented in docs/serve.md.

use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use engine::{ChatMessage, EngineError, FinishReason, KvReport, PolicyKind, RequestEvent, Usage};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// An OpenAI-style error with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A client error (`invalid_request_error`) with this status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// 400 for a bad request field.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            param: param.map(str::to_string),
            ..ApiError::new(StatusCode::BAD_REQUEST, message)
        }
    }

    /// Sets the machine-readable code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// A body axum could not read (too large, not UTF-8…).
    pub fn rejected(e: axum::extract::rejection::BytesRejection) -> Self {
        ApiError::new(e.status(), e.body_text())
    }

    /// The error of a request to `endpoint`: the prompt's field is the endpoint's own
    /// ([`ApiError::from_engine`] names it as a chat's, `messages`).
    pub fn for_endpoint(mut self, endpoint: Endpoint) -> Self {
        if self.param.as_deref() == Some(Endpoint::Chat.prompt_field()) {
            self.param = Some(endpoint.prompt_field().into());
        }
        self
    }

    /// The status and kind an engine error maps to.
    pub fn from_engine(e: EngineError) -> Self {
        let message = e.to_string();
        let (status, kind, param, code) = match &e {
            EngineError::ContextOverflow { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some(Endpoint::Chat.prompt_field()),
                Some("context_length_exceeded"),
            ),
            EngineError::EmptyInput { .. } | EngineError::NothingToContinue => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None, None)
            }
            EngineError::Sampling(s) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some(s.field),
                None,
            ),
            EngineError::KvCapacity { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                None,
                Some("kv_capacity_exceeded"),
            ),
            EngineError::QueueFull { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("server_overloaded"),
            ),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                None,
            ),
        };
        ApiError {
            status,
            message,
            kind,
            param: param.map(str::to_string),
            code,
        }
    }

    /// [`ApiError::from_engine`] for a request under `policy`: when an evicting policy's
    /// request cannot fit the pool, the message says why eviction did not help (the prompt is
    /// prefilled whole before the policy evicts).
    pub fn from_engine_under(e: EngineError, policy: PolicyKind) -> Self {
        let prefill = match &e {
            EngineError::KvCapacity { needed, capacity } if policy != PolicyKind::Full => {
                Some(format!(
                    "the prompt is prefilled whole before the policy ({policy}) evicts: it needs \
                     {needed} KV blocks, the whole pool has {capacity}; give the server more KV \
                     memory (--kv-memory-mb) or shorten the prompt"
                ))
            }
            _ => None,
        };
        let mut error = ApiError::from_engine(e);
        if let Some(message) = prefill {
            error.message = message;
        }
        error
    }

    /// The `{"error": {...}}` body.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields common to both endpoints: sampling, limits, streaming and agate's extensions.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<Value>,
    /// The whole body: agate's `kv_*` settings and `ignore_eos` are read from it.
    #[serde(skip)]
    pub extra: Map<String, Value>,
}

/// A chat message as clients send it: `content` is a string or a list of text parts.
#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    pub content: Option<Value>,
}

/// `POST /v1/chat/completions` (besides [`Common`]).
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<WireMessage>,
}

/// `POST /v1/completions` (besides [`Common`]).
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Value,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
}

/// Parses a JSON object body into the endpoint's own fields `T` and the [`Common`] ones; an
/// error names the field at fault.
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<(T, Common), ApiError> {
    let body: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid(None, format!("the request body is not valid JSON: {e}"))
            .with_code("invalid_json")
    })?;
    let Value::Object(fields) = &body else {
        return Err(ApiError::invalid(
            None,
            "the request body must be a JSON object",
        ));
    };
    let own = typed(&body)?;
    let mut common: Common = typed(&body)?;
    common.extra = fields.clone();
    Ok((own, common))
}

fn typed<T: serde::de::DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let param = (path != ".").then_some(path);
        let message = match &param {
            Some(p) => format!("invalid `{p}`: {}", e.inner()),
            None => format!("invalid request body: {}", e.inner()),
        };
        ApiError::invalid(param.as_deref(), message)
    })
}

impl ChatRequest {
    /// The conversation, checked: known roles, text content only, at least one message, no
    /// user message without text (OpenAI refuses a null one; the CLI refuses an empty prompt).
    pub fn conversation(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                Some("messages"),
                "messages must hold at least one message",
            ));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let param = format!("messages[{i}]");
                let role = match m.role.as_str() {
                    "system" | "developer" => "system",
                    "user" => "user",
                    "assistant" => "assistant",
                    other => {
                        return Err(ApiError::invalid(
                            Some(&param),
                            format!("messages[{i}].role `{other}` is not supported (expected system, developer, user or assistant)"),
                        ))
                    }
                };
                let content = text_content(m.content.as_ref())
                    .map_err(|why| ApiError::invalid(Some(&param), format!("messages[{i}].content {why}")))?;
                if role == "user" && content.is_empty() {
                    let what = if m.content.as_ref().is_none_or(Value::is_null) { "null" } else { "empty" };
                    return Err(ApiError::invalid(
                        Some(&param),
                        format!("messages[{i}].content is {what}: a user message needs text"),
                    ));
                }
                Ok(ChatMessage::new(role, &content))
            })
            .collect()
    }
}

/// A message's text: a string, or the concatenated `text` parts of a list.
fn text_content(content: Option<&Value>) -> Result<String, String> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(
                |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                    (kind, _) => Err(format!(
                        "holds a part of type {} (only text parts are supported)",
                        kind.unwrap_or("<none>")
                    )),
                },
            )
            .collect::<Result<Vec<_>, _>>()
            .map(|t| t.concat()),
        Some(_) => Err("must be a string or a list of text parts".into()),
    }
}

impl CompletionRequest {
    /// The prompt text: a string, or a list of exactly one string.
    pub fn prompt_text(&self) -> Result<String, ApiError> {
        if self.echo == Some(true) {
            return Err(ApiError::invalid(Some("echo"), "echo is not supported"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(Some("suffix"), "suffix is not supported"));
        }
        let bad = || {
            ApiError::invalid(
                Some("prompt"),
                "prompt must be a string (or a list of one string)",
            )
        };
        let text = match &self.prompt {
            Value::String(s) => s.clone(),
            Value::Array(items) if items.len() == 1 => {
                items[0].as_str().map(str::to_string).ok_or_else(bad)?
            }
            _ => return Err(bad()),
        };
        if text.is_empty() {
            // As the CLI and chat's user messages: nothing to continue from.
            return Err(ApiError::invalid(Some("prompt"), "prompt is empty"));
        }
        Ok(text)
    }
}

/// OpenAI's `finish_reason`.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos | FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
    }
}

/// The `usage` object: OpenAI's counts, the cached prompt tokens (OpenAI's
/// `prompt_tokens_details.cached_tokens` and agate's `prompt_tokens_cached`), and `kv`, the
/// session's KV report.
pub fn usage_json(usage: &Usage, kv: &KvReport) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": usage.prompt_tokens_cached },
        "prompt_tokens_cached": usage.prompt_tokens_cached,
        "kv": kv.to_json(),
    })
}

/// Which endpoint a response belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    /// The request field that holds the prompt.
    pub fn prompt_field(self) -> &'static str {
        match self {
            Endpoint::Chat => "messages",
            Endpoint::Completion => "prompt",
        }
    }
}

/// Identity of one response: its id, creation time and model.
#[derive(Clone, Debug)]
pub struct ResponseMeta {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ResponseMeta {
    /// A new response id (`chatcmpl-…` or `cmpl-…`).
    pub fn new(endpoint: Endpoint, model: &str, serial: u64) -> Self {
        let created = unix_now();
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        ResponseMeta {
            endpoint,
            id: format!("{prefix}-{created:x}{serial:06x}"),
            created,
            model: model.to_string(),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("object".into(), json!(self.object(chunk)));
        m.insert("created".into(), json!(self.created));
        m.insert("model".into(), json!(self.model));
        m.insert("system_fingerprint".into(), Value::Null);
        m.insert("choices".into(), choices);
        m
    }

    /// The whole (non-streamed) response.
    pub fn response(&self, text: &str, reason: FinishReason, usage: Value) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": { "role": "assistant", "content": text, "refusal": null },
                "logprobs": null,
                "finish_reason": finish_reason(reason),
            }),
            Endpoint::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason(reason),
            }),
        };
        let mut m = self.envelope(false, json!([choice]));
        m.insert("usage".into(), usage);
        Value::Object(m)
    }

    /// One stream chunk: `text` as a delta (the first chat chunk also carries the role), or the
    /// closing chunk when `finish` is set.
    pub fn chunk(&self, text: Option<&str>, first: bool, finish: Option<FinishReason>) -> Value {
        let reason = finish.map(finish_reason);
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": reason })
            }
            Endpoint::Completion => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": reason,
            }),
        };
        Value::Object(self.envelope(true, json!([choice])))
    }

    /// The usage chunk of a stream (`stream_options.include_usage`): no choices.
    pub fn usage_chunk(&self, usage: Value) -> Value {
        let mut m = self.envelope(true, json!([]));
        m.insert("usage".into(), usage);
        Value::Object(m)
    }
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How a request is to be answered.
pub struct Answer {
    pub stream: bool,
    pub include_usage: bool,
}

/// The SSE events one scheduler event becomes.
pub fn sse_events(meta: &ResponseMeta, answer: &Answer, event: RequestEvent) -> Vec<Event> {
    match event {
        RequestEvent::Started { .. } => Vec::new(),
        RequestEvent::Text(t) => vec![data(&meta.chunk(Some(&t), false, None))],
        RequestEvent::Done {
            generation,
            usage,
            kv,
        } => {
            let mut out = vec![data(&meta.chunk(
                None,
                false,
                Some(generation.finish_reason),
            ))];
            if answer.include_usage {
                out.push(data(&meta.usage_chunk(usage_json(&usage, &kv))));
            }
            out.push(Event::default().data("[DONE]"));
            out
        }
        RequestEvent::Failed(e) => vec![
            data(&ApiError::from_engine(e).body()),
            Event::default().data("[DONE]"),
        ],
    }
}

/// One SSE event of `value`'s JSON.
pub fn data(value: &Value) -> Event {
    Event::default().data(value.to_string())
}
