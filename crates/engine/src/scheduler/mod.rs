//! `Scheduler`: continuous batching of many requests over one engine, on one thread driven
//! through crossbeam channels. Every step is one batched forward pass
//! ([`LlamaModel::forward_batch`](model_zoo::LlamaModel::forward_batch)): the next token of
//! every decoding request plus at most one prefill chunk of a request being admitted; the
//! projections see all of their rows at once, attention and eviction run per session with its
//! own policy. A request's events (admission, text, the result) go to its [`EventSink`].
//!
//! The rules (also in `docs/serve.md`):
//! - **Admission.** Requests wait in FIFO order (at most `max_queue`; beyond that
//!   [`Scheduler::submit`] refuses with [`EngineError::QueueFull`]). The head is admitted at a
//!   step boundary when fewer than `max_sessions` are active and the pool has room for its first
//!   prefill chunk plus one block per KV table for every active request (idle cached sessions
//!   are dropped, least recently used first, to make that room); with nothing active it is
//!   admitted regardless. Admission renders and tokenizes the prompt, takes a cached session
//!   whose transcript the prompt extends (chat requests, same policy key) or starts a fresh one,
//!   and checks the prompt against the context and the pool's capacity.
//! - **Steps.** Every step runs the next token of every decoding request and prompt chunks
//!   (the engine's prefill size at most) of prefilling requests, oldest first, up to one chunk's
//!   worth of prompt tokens in all (always at least one chunk): long prompts are prefilled over
//!   several steps and running streams get a token every step. Before a step runs, the
//!   pool must hold the blocks every sequence of it could take (an append to every table,
//!   before the policy evicts): cached sessions are dropped LRU-first, then the newest active
//!   requests are preempted (their blocks freed; they go back to the head of the queue and
//!   resume later by recomputing their cache from their tokens). A request that cannot fit even
//!   alone fails with [`EngineError::KvCapacity`]; so does, at admission, a prompt whose whole
//!   cache cannot fit (the baselines evict at a prefill's end, as their references do). Sessions
//!   with an evicting policy then stay within their budget while they decode and over later
//!   turns, so they fit where full caches do not.
//! - **Isolation.** A step that fails for one session (its store, its policy) fails only that
//!   request; its session is discarded, never reused. A panic inside a step fails the requests
//!   of that step only. A caller that goes away (its sink closes) cancels its request at the
//!   next step boundary and its blocks return to the pool.
//! - **Prompt cache.** A finished chat request's session is kept (up to `prompt_cache`
//!   sessions) with its transcript; kept sessions give up their blocks LRU-first whenever a
//!   step or an admission needs room.
//!
//! Greedy outputs do not depend on batching: each session's logits are bit for bit those of a
//! lone [`Session`](crate::Session) over the same chunks (a preempted request recomputes its
//! cache in different chunks, so its later tokens may differ in the last bits).

mod metrics;
mod prompt_cache;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{unbounded, Receiver, Sender};
use model_zoo::ChatMessage;

pub use metrics::{Histogram, MetricsSnapshot, TOKEN_LATENCY_BUCKETS, TTFT_BUCKETS};

use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::policy::Policy;
use crate::report::KvReport;
use crate::session::{GenerateRequest, Generation};

/// Limits of a [`Scheduler`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Requests decoded (or prefilled) at once.
    pub max_sessions: usize,
    /// Requests waiting for admission; more are refused.
    pub max_queue: usize,
    /// Finished chat sessions kept for reuse (0: no prompt cache).
    pub prompt_cache: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_sessions: 16,
            max_queue: 64,
            prompt_cache: 32,
        }
    }
}

/// What a request asks the model to continue.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Raw text, no template (a completion).
    Text(String),
    /// A whole conversation, rendered with the model's chat template and an assistant turn
    /// opened (a chat completion). Eligible for the prompt cache.
    Chat(Vec<ChatMessage>),
}

/// One request to a [`Scheduler`].
#[derive(Clone, Debug)]
pub struct Submission {
    /// The prompt.
    pub prompt: Prompt,
    /// The session's eviction policy (validated against the engine's model).
    pub policy: Policy,
    /// What makes two requests' sessions interchangeable for the prompt cache: the policy and
    /// every setting of it (e.g. the policy spec as text). Requests with different keys never
    /// share a session.
    pub policy_key: String,
    /// Generation limits, sampling and stops.
    pub request: GenerateRequest,
}

/// Token counts of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Tokens of the whole prompt (cached ones included).
    pub prompt_tokens: usize,
    /// Prompt tokens that were already in a cached session's KV cache (not prefilled again).
    pub prompt_tokens_cached: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// What a request's sink receives: `Started`, then `Text` chunks, then `Done` — or `Failed` at
/// any point (the last event either way).
#[derive(Debug)]
pub enum RequestEvent {
    /// The request was admitted; its prompt is being prefilled.
    Started {
        /// Tokens of the whole prompt.
        prompt_tokens: usize,
        /// Of which already cached.
        prompt_tokens_cached: usize,
    },
    /// Newly generated text.
    Text(String),
    /// The request finished.
    Done {
        /// The generation (its timings count from the submission).
        generation: Generation,
        /// Token counts.
        usage: Usage,
        /// The session's cache at the end.
        kv: KvReport,
    },
    /// The request failed.
    Failed(EngineError),
}

impl RequestEvent {
    /// Folds this event into its request's result, for a caller that reads the events itself
    /// (an async channel): text is appended to `text`; the last event gives the generation,
    /// usage and final KV report ([`RequestEvent::Done`]) or the error
    /// ([`RequestEvent::Failed`]); `None` while the request runs.
    pub fn collect_into(self, text: &mut String) -> Option<Result<(Generation, Usage, KvReport)>> {
        match self {
            RequestEvent::Started { .. } => None,
            RequestEvent::Text(t) => {
                text.push_str(&t);
                None
            }
            RequestEvent::Done {
                generation,
                usage,
                kv,
            } => Some(Ok((generation, usage, kv))),
            RequestEvent::Failed(e) => Some(Err(e)),
        }
    }
}

/// Where a request's events go. Implemented for whatever the caller reads from (a crossbeam
/// channel here, an async channel in the HTTP server).
pub trait EventSink: Send {
    /// Delivers an event; false when the receiver is gone (the request is then cancelled).
    fn send(&mut self, event: RequestEvent) -> bool;
    /// True once the receiver is gone; polled at step boundaries while a request waits or
    /// prefills, so that an abandoned request stops without waiting for its next token.
    fn is_closed(&self) -> bool;
}

/// The sink behind [`RequestStream`]: a crossbeam channel and the stream's drop flag.
struct ChannelSink {
    events: Sender<RequestEvent>,
    dropped: Arc<AtomicBool>,
}

impl EventSink for ChannelSink {
    fn send(&mut self, event: RequestEvent) -> bool {
        !self.is_closed() && self.events.send(event).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The events of one request, as an iterator; dropping it cancels the request.
pub struct RequestStream {
    events: Receiver<RequestEvent>,
    dropped: Arc<AtomicBool>,
    finished: bool,
}

impl Iterator for RequestStream {
    type Item = RequestEvent;

    fn next(&mut self) -> Option<RequestEvent> {
        if self.finished {
            return None;
        }
        let event = self.events.recv().unwrap_or_else(|_| {
            RequestEvent::Failed(EngineError::Scheduler("the scheduler stopped".into()))
        });
        self.finished = matches!(event, RequestEvent::Done { .. } | RequestEvent::Failed(_));
        Some(event)
    }
}

impl RequestStream {
    /// Waits for the end: the whole text, the generation, its usage and the final KV report.
    pub fn collect_all(self) -> Result<(String, Generation, Usage, KvReport)> {
        let mut text = String::new();
        for event in self {
            if let Some(end) = event.collect_into(&mut text) {
                return end.map(|(generation, usage, kv)| (text, generation, usage, kv));
            }
        }
        Err(EngineError::Scheduler(
            "the request ended without a result".into(),
        ))
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::Relaxed);
    }
}

/// A request on its way to the scheduler's thread.
struct Incoming {
    submission: Submission,
    sink: Box<dyn EventSink>,
    submitted: Instant,
}

/// State shared by the scheduler's handle and its thread.
struct Shared {
    waiting: AtomicUsize,
    metrics: Mutex<MetricsSnapshot>,
}

/// Continuous batching over one engine, on its own thread. Dropping it fails the requests
/// still running and joins the thread.
pub struct Scheduler {
    engine: Engine,
    config: SchedulerConfig,
    incoming: Option<Sender<Incoming>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the scheduler's thread over `engine`.
    pub fn spawn(engine: &Engine, config: SchedulerConfig) -> Result<Self> {
        if config.max_sessions == 0 {
            return Err(EngineError::Setting {
                setting: "SchedulerConfig.max_sessions",
                problem: "must be at least 1, got 0".into(),
            });
        }
        let shared = Arc::new(Shared {
            waiting: AtomicUsize::new(0),
            metrics: Mutex::new(MetricsSnapshot::default()),
        });
        let (incoming, queue) = unbounded();
        let worker = worker::Worker::new(engine.clone(), config.clone(), shared.clone());
        let thread = std::thread::Builder::new()
            .name("agate-scheduler".into())
            .spawn(move || worker.run(queue))
            .map_err(|source| EngineError::ThreadSpawn {
                thread: "scheduler",
                source,
            })?;
        Ok(Scheduler {
            engine: engine.clone(),
            config,
            incoming: Some(incoming),
            shared,
            thread: Some(thread),
        })
    }

    /// The engine it schedules.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Its limits.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queues a request whose events go to `sink`. Refused at once with
    /// [`EngineError::QueueFull`] when `max_queue` requests are already waiting, or
    /// [`EngineError::Sampling`] for bad sampling parameters.
    pub fn submit_to(&self, submission: Submission, sink: Box<dyn EventSink>) -> Result<()> {
        submission.request.sampling.validate()?;
        let capacity = self.config.max_queue;
        let reserved = self
            .shared
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < capacity).then_some(n + 1)
            });
        if reserved.is_err() {
            self.shared.lock_metrics().requests_rejected += 1;
            return Err(EngineError::QueueFull { capacity });
        }
        let sent = self.incoming.as_ref().is_some_and(|tx| {
            tx.send(Incoming {
                submission,
                sink,
                submitted: Instant::now(),
            })
            .is_ok()
        });
        if !sent {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Scheduler("the scheduler stopped".into()));
        }
        self.shared.lock_metrics().requests_submitted += 1;
        Ok(())
    }

    /// Queues a request and returns its events as an iterator (dropping it cancels).
    pub fn submit(&self, submission: Submission) -> Result<RequestStream> {
        let (events, rx) = unbounded();
        let dropped = Arc::new(AtomicBool::new(false));
        let sink = ChannelSink {
            events,
            dropped: dropped.clone(),
        };
        self.submit_to(submission, Box::new(sink))?;
        Ok(RequestStream {
            events: rx,
            dropped,
            finished: false,
        })
    }

    /// Counters, gauges and histograms as of the last step boundary: the pool's block counts
    /// are sampled there too, so they always agree with the session gauges (a request being
    /// prefilled holds blocks before it is counted active).
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.lock_metrics().clone()
    }
}

impl Shared {
    /// Locks the metrics; a poisoned lock still holds consistent counters.
    fn lock_metrics(&self) -> std::sync::MutexGuard<'_, MetricsSnapshot> {
        self.metrics.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.incoming.take();
        if let Some(thread) = self.thread.take() {
            // The thread catches panics of its steps; a panic elsewhere has already failed its
            // requests (their sinks were dropped).
            let _ = thread.join();
        }
    }
}
