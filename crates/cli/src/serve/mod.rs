//! `agate serve`: an OpenAI-compatible HTTP server (axum on tokio) over the engine's
//! continuous-batching [`Scheduler`]. Routes: `POST /v1/chat/completions`,
//! `POST /v1/completions` (JSON or server-sent events with `stream: true`), `GET /v1/models`,
//! `GET /health`, `GET /metrics` (Prometheus text). Requests may carry agate's `kv_*` policy
//! settings; the server's policy flags are the defaults, and its `--gates` serve every request
//! that asks for Attention-Gate, whatever the default policy.
//!
//! Invariants: a handler never blocks the async runtime (the model runs on the scheduler's
//! thread; events come back through an async channel); the HTTP status is decided when the
//! scheduler admits or refuses the request, before any byte of the body is sent; a client that
//! goes away (closed connection, dropped stream) closes its channel, which cancels its request
//! and frees its blocks at the next step boundary; every error body is OpenAI's
//! `{"error": {"message", "type", "param", "code"}}`.

mod metrics;
mod openai;
mod policy;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use engine::{
    EventSink, GenerateRequest, Policy, PolicyKind, PolicySpec, Prompt, RequestEvent,
    SamplingParams, Scheduler, SchedulerConfig, Submission,
};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::args::{ModelArgs, SamplingArgs};
use crate::policy_args::PolicyArgs;
use openai::{
    data, parse_body, sse_events, unix_now, usage_json, Answer, ApiError, ChatRequest, Common,
    CompletionRequest, Endpoint, ResponseMeta, Stop,
};

/// Flags of `agate serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on. The default answers only this machine; 0.0.0.0 exposes the server
    /// to the network (set --api-key then).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port; 0 picks a free one (the address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Tokens generated when a request sets no max_tokens.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_tokens: u64,
    /// Requests generating at once (one batched forward step serves them all).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_sessions: u64,
    /// Requests waiting for admission; beyond that the server answers 503.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queue: u64,
    /// Finished conversations kept so that the next turn prefills only its new text (0: off).
    #[arg(long, default_value_t = 32)]
    pub prompt_cache: usize,
    /// Prompt tokens per prefill step (long prompts are prefilled in chunks between decode
    /// steps).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub prefill_chunk: u64,
    /// Require `Authorization: Bearer KEY` on the /v1/ routes.
    #[arg(long, value_name = "KEY", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub api_key: Option<String>,
    /// Model id shown by /v1/models and in responses (default: the model file's name).
    #[arg(long, value_name = "ID", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub model_name: Option<String>,
}

/// Request defaults taken from the server's flags.
struct Defaults {
    /// The policy of requests that name none (`kv_policy`).
    policy: PolicySpec,
    sampling: SamplingParams,
    /// Whether `--seed` was given (else unseeded requests get a fresh seed each).
    seeded: bool,
    max_tokens: usize,
}

/// Resolved policies kept by spec (gates load once), at most this many.
const POLICY_CACHE: usize = 64;

/// Everything the handlers share.
struct App {
    scheduler: Scheduler,
    model_id: String,
    created: u64,
    api_key: Option<String>,
    defaults: Defaults,
    policies: Mutex<HashMap<String, Policy>>,
    /// HTTP responses by (route, status).
    responses: Mutex<BTreeMap<(String, u16), u64>>,
    serial: AtomicU64,
}

/// Runs `agate serve` until Ctrl-C or SIGTERM.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    // --gates are the server's for every request that asks for ag, whatever the default policy.
    let mut policy_args = args.policy.clone();
    let gates = policy_args.gates.take();
    let mut policy = policy_args.single()?.spec().clone();
    policy.gates = gates;
    let openai_defaults = SamplingParams {
        temperature: 1.0,
        ..SamplingParams::default()
    };
    let sampling = args.sampling.params(openai_defaults)?;
    let mut engine_cfg = args.model.engine_config();
    engine_cfg.prefill_chunk = args.prefill_chunk as usize;
    let engine = engine::Engine::builder()
        .config(engine_cfg)
        .on_progress(|line| say!("agate: {line}"))
        .build()?;
    // The default policy must build (a bad --policy is a startup error, not a 400 per request),
    // and so must the gates, even when only a request's ag reads them: that policy is built
    // once here, into the cache a `"kv_policy": "ag"` request looks it up in.
    let mut policies = HashMap::from([(format!("{policy:?}"), policy.build(&engine)?)]);
    if policy.kind != PolicyKind::Ag && policy.gates.is_some() {
        let ag = PolicySpec {
            gates: policy.gates.clone(),
            ..PolicySpec::new(PolicyKind::Ag)
        };
        policies.insert(format!("{ag:?}"), ag.build(&engine)?);
    }
    let model_id = args.model_name.clone().unwrap_or_else(|| {
        engine
            .model_path()
            .file_stem()
            .map_or_else(|| "agate".into(), |s| s.to_string_lossy().into_owned())
    });
    let scheduler = Scheduler::spawn(
        &engine,
        SchedulerConfig {
            max_sessions: args.max_sessions as usize,
            max_queue: args.max_queue as usize,
            prompt_cache: args.prompt_cache,
        },
    )?;
    let app = Arc::new(App {
        scheduler,
        model_id,
        created: unix_now(),
        api_key: args.api_key.clone(),
        policies: Mutex::new(policies),
        defaults: Defaults {
            policy,
            seeded: args.sampling.seed.is_some(),
            sampling,
            max_tokens: args.max_tokens as usize,
        },
        responses: Mutex::new(BTreeMap::new()),
        serial: AtomicU64::new(0),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve(app, &args.host, args.port))
}

async fn serve(app: Arc<App>, host: &str, port: u16) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {host}:{port}: {e}"))?;
    let addr = listener.local_addr()?;
    let engine = app.scheduler.engine();
    say!(
        "agate serve: {} ({} layers), default policy {}, KV pool {} MiB, up to {} sessions at once",
        engine.model_path().display(),
        engine.model_config().n_layers,
        app.defaults.policy.kind,
        engine.pool().config().capacity_bytes() >> 20,
        app.scheduler.config().max_sessions,
    );
    say!("agate serve: listening on http://{addr}");
    outln!("listening on http://{addr}")?;
    use std::io::Write;
    std::io::stdout().flush()?;
    axum::serve(listener, router(app.clone()))
        .with_graceful_shutdown(shutdown_signal(app))
        .await?;
    say!("agate serve: stopped");
    Ok(())
}

fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            require_key,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            count_responses,
        ))
        .with_state(app)
}

/// Resolves on the first Ctrl-C or SIGTERM, which starts a graceful stop: no new connections,
/// running requests finish. A second signal ends the process at once (exit status 130).
async fn shutdown_signal(app: Arc<App>) {
    next_signal().await;
    let m = app.scheduler.metrics();
    let busy = m.active_sessions + m.queue_length;
    if busy > 0 {
        say!(
            "agate serve: stopping once {busy} running or queued request(s) finish; Ctrl-C again stops now"
        );
    } else {
        say!("agate serve: stopping once open requests finish; Ctrl-C again stops now");
    }
    tokio::spawn(async {
        next_signal().await;
        say!("agate serve: stopped with requests unfinished");
        std::process::exit(130);
    });
}

/// The next Ctrl-C or SIGTERM.
async fn next_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

/// Counts every response by route and status (for `/metrics`).
async fn count_responses(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    let mut counts = app.responses.lock().unwrap_or_else(|e| e.into_inner());
    *counts
        .entry((route, response.status().as_u16()))
        .or_default() += 1;
    response
}

/// With `--api-key`, the /v1/ routes need `Authorization: Bearer KEY`.
async fn require_key(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &app.api_key {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or incorrect API key: send `Authorization: Bearer KEY`",
            )
            .with_code("invalid_api_key")
            .into_response();
        }
    }
    next.run(request).await
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {} (agate serves /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)",
            uri.path()
        ),
    )
    .with_code("unknown_url")
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
    .with_code("method_not_allowed")
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": app.model_id,
            "object": "model",
            "created": app.created,
            "owned_by": "agate",
        }],
    }))
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let responses = app
        .responses
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let text = metrics::render(&app.scheduler.metrics(), &responses);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn chat_completions(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let handled = async {
        let (request, common) = parse_body::<ChatRequest>(&body.map_err(ApiError::rejected)?)?;
        let prompt = Prompt::Chat(request.conversation()?);
        app.generate(Endpoint::Chat, prompt, &common).await
    };
    handled.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let handled = async {
        let (request, common) =
            parse_body::<CompletionRequest>(&body.map_err(ApiError::rejected)?)?;
        let prompt = Prompt::Text(request.prompt_text()?);
        app.generate(Endpoint::Completion, prompt, &common).await
    };
    handled.await.unwrap_or_else(IntoResponse::into_response)
}

/// A request's events, delivered into the async world; closed when the handler or the
/// response stream is dropped (the client went away).
struct ChannelSink(UnboundedSender<RequestEvent>);

impl EventSink for ChannelSink {
    fn send(&mut self, event: RequestEvent) -> bool {
        self.0.send(event).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

impl App {
    /// [`App::submit_and_answer`], its errors naming the endpoint's own fields.
    async fn generate(
        self: &Arc<Self>,
        endpoint: Endpoint,
        prompt: Prompt,
        common: &Common,
    ) -> Result<Response, ApiError> {
        self.submit_and_answer(endpoint, prompt, common)
            .await
            .map_err(|e| e.for_endpoint(endpoint))
    }

    /// Submits one request and answers it, as JSON or as a stream of chunks.
    async fn submit_and_answer(
        self: &Arc<Self>,
        endpoint: Endpoint,
        prompt: Prompt,
        common: &Common,
    ) -> Result<Response, ApiError> {
        let request = self.generate_request(common)?;
        let (policy, policy_key) = self.policy(common).await?;
        let policy_kind = policy.kind();
        let answer = Answer {
            stream: common.stream,
            include_usage: common
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        };
        let (tx, mut events) = unbounded_channel();
        let submission = Submission {
            prompt,
            policy,
            policy_key,
            request,
        };
        self.scheduler
            .submit_to(submission, Box::new(ChannelSink(tx)))
            .map_err(ApiError::from_engine)?;
        match events.recv().await {
            Some(RequestEvent::Started { .. }) => {}
            Some(RequestEvent::Failed(e)) => {
                return Err(ApiError::from_engine_under(e, policy_kind))
            }
            _ => {
                return Err(ApiError::from_engine(engine::EngineError::Scheduler(
                    "the request ended before it started".into(),
                )))
            }
        }
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let meta = ResponseMeta::new(endpoint, &self.model_id, serial);
        if !answer.stream {
            let mut text = String::new();
            while let Some(event) = events.recv().await {
                if let Some(end) = event.collect_into(&mut text) {
                    let (generation, usage, kv) = end.map_err(ApiError::from_engine)?;
                    let body =
                        meta.response(&text, generation.finish_reason, usage_json(&usage, &kv));
                    return Ok(Json(body).into_response());
                }
            }
            return Err(ApiError::from_engine(engine::EngineError::Scheduler(
                "the request ended without a result".into(),
            )));
        }
        let first = (endpoint == Endpoint::Chat).then(|| data(&meta.chunk(Some(""), true, None)));
        let events = stream::poll_fn(move |cx| events.poll_recv(cx));
        let chunks = events.flat_map(move |event| stream::iter(sse_events(&meta, &answer, event)));
        let body = stream::iter(first)
            .chain(chunks)
            .map(Ok::<Event, Infallible>);
        Ok(Sse::new(body)
            .keep_alive(KeepAlive::default())
            .into_response())
    }

    /// The generation settings of a request over the server's defaults.
    fn generate_request(&self, c: &Common) -> Result<GenerateRequest, ApiError> {
        if let Some(n) = c.n {
            if n != 1 {
                return Err(ApiError::invalid(
                    Some("n"),
                    format!("only n = 1 is supported, got {n}"),
                ));
            }
        }
        if matches!(&c.logprobs, Some(v) if !v.is_null() && *v != Value::Bool(false)) {
            return Err(ApiError::invalid(
                Some("logprobs"),
                "logprobs are not supported",
            ));
        }
        let (max_param, max_tokens) = match (c.max_completion_tokens, c.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let max_tokens = match max_tokens {
            None => self.defaults.max_tokens,
            Some(m) if m >= 1 => m as usize,
            Some(m) => {
                return Err(ApiError::invalid(
                    Some(max_param),
                    format!("{max_param} must be >= 1, got {m}"),
                ))
            }
        };
        let d = &self.defaults.sampling;
        let top_k = match c.top_k {
            None => d.top_k,
            Some(k) if k >= 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    Some("top_k"),
                    format!("top_k must be >= 0, got {k}"),
                ))
            }
        };
        let sampling = SamplingParams {
            temperature: c.temperature.unwrap_or(d.temperature),
            top_k,
            top_p: c.top_p.unwrap_or(d.top_p),
            min_p: c.min_p.unwrap_or(d.min_p),
            repetition_penalty: c.repetition_penalty.unwrap_or(d.repetition_penalty),
            repeat_last_n: d.repeat_last_n,
            seed: c.seed.unwrap_or_else(|| self.default_seed()),
        };
        if let Some((field, why)) = sampling.invalid_field() {
            return Err(ApiError::invalid(Some(field), why));
        }
        let stop = match &c.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        let ignore_eos = match c.extra.get("ignore_eos") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::invalid(
                    Some("ignore_eos"),
                    "ignore_eos must be a boolean",
                ))
            }
        };
        Ok(GenerateRequest {
            max_tokens,
            sampling,
            stop,
            stop_at_eos: !ignore_eos,
        })
    }

    /// `--seed` when given, else a fresh seed per request (as OpenAI does without `seed`).
    fn default_seed(&self) -> u64 {
        if self.defaults.seeded {
            return self.defaults.sampling.seed;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos
            ^ self
                .serial
                .load(Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}
