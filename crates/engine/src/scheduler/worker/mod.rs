//! The scheduler's thread: the waiting queue, the active requests, the prompt cache, and the
//! loop that admits, reserves, runs one batched step and samples, at every step boundary (the
//! rules are in the parent module's header). Admission and the choice of a step's requests are
//! in `admit`; the pass, sampling and finishing in `pass`; here, the request states, the loop,
//! and how a request leaves.
//!
//! Invariants: `active` is in admission order (oldest first; preemption takes the newest); a
//! request in `active` owns its session exclusively; every request leaves through exactly one
//! of finish, fail, cancel or shutdown, and its session (so its blocks) is dropped or cached
//! there; the shared `waiting` count is the number of never-admitted requests queued.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, TryRecvError};

use super::prompt_cache::PromptCache;
use super::{
    EventSink, Incoming, MetricsSnapshot, RequestEvent, SchedulerConfig, Shared, Submission, Usage,
};
use crate::decoding::Decoding;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::session::{PrefillPlan, Session};

mod admit;
mod pass;

/// Where an admitted request is.
enum Phase {
    /// Feeding its prompt (or replaying its cache after a preemption), one chunk per step.
    Prefill(PrefillPlan),
    /// Generating: its session holds a pending token to feed, or logits to sample from.
    Decode,
}

/// A request's state once its prompt is tokenized and its session chosen.
struct Admitted {
    session: Session,
    /// The rendered conversation of a chat request (the transcript to record).
    rendered: Option<String>,
    phase: Phase,
    decoding: Decoding,
    usage: Usage,
    /// Whether `Started` was sent (at the first admission; a preempted request is admitted
    /// again silently).
    announced: bool,
    /// Entries the session had evicted before this request (for the evicted-tokens counter).
    evicted_before: f64,
    admitted_at: Instant,
    prefilled_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

/// One request.
struct Request {
    submission: Submission,
    sink: Box<dyn EventSink>,
    submitted: Instant,
    /// Set at its first admission; kept across preemptions.
    state: Option<Admitted>,
    /// Whether it still holds a slot of the shared queue count.
    holds_queue_slot: bool,
}

impl Request {
    /// Tokens of its next pass (0 when it has none to run).
    fn next_pass_tokens(&self) -> usize {
        match &self.state {
            None => 0,
            Some(state) => match &state.phase {
                Phase::Prefill(plan) => plan.next_chunk().map_or(0, |(c, _)| c.len()),
                Phase::Decode => usize::from(state.session.pending.is_some()),
            },
        }
    }

    /// KV blocks its next pass could take from the pool.
    fn next_pass_blocks(&self) -> usize {
        self.state.as_ref().map_or(0, |state| {
            state.session.kv().blocks_to_append(self.next_pass_tokens())
        })
    }

    fn is_decoding(&self) -> bool {
        matches!(
            self.state,
            Some(Admitted {
                phase: Phase::Decode,
                ..
            })
        )
    }

    fn is_prefilling(&self) -> bool {
        matches!(
            self.state,
            Some(Admitted {
                phase: Phase::Prefill(_),
                ..
            })
        )
    }
}

/// How a request leaves the scheduler.
enum Exit {
    Failed(EngineError),
    Cancelled,
}

pub(super) struct Worker {
    engine: Engine,
    config: SchedulerConfig,
    shared: Arc<Shared>,
    waiting: VecDeque<Request>,
    active: Vec<Request>,
    cache: PromptCache,
    /// KV tables of one session (layers × KV heads).
    tables: usize,
}

impl Worker {
    pub(super) fn new(engine: Engine, config: SchedulerConfig, shared: Arc<Shared>) -> Self {
        let cfg = engine.model_config();
        let tables = cfg.n_layers * cfg.n_kv_heads;
        let mut worker = Worker {
            cache: PromptCache::new(config.prompt_cache),
            engine,
            config,
            shared,
            waiting: VecDeque::new(),
            active: Vec::new(),
            tables,
        };
        worker.publish();
        worker
    }

    /// Runs until the handle is dropped.
    pub(super) fn run(mut self, incoming: Receiver<Incoming>) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                match incoming.recv() {
                    Ok(request) => self.enqueue(request),
                    Err(_) => break,
                }
            }
            let mut closed = false;
            loop {
                match incoming.try_recv() {
                    Ok(request) => self.enqueue(request),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            if closed {
                break;
            }
            self.drop_abandoned();
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| self.step())) {
                let message = panic_message(&panic);
                for request in std::mem::take(&mut self.active) {
                    self.exit(
                        request,
                        Exit::Failed(EngineError::Scheduler(format!(
                            "a step failed unexpectedly ({message}); the requests in it were stopped"
                        ))),
                    );
                }
            }
            self.publish();
        }
        let stopping = || EngineError::Scheduler("the scheduler is shutting down".into());
        for request in std::mem::take(&mut self.active) {
            self.exit(request, Exit::Failed(stopping()));
        }
        while let Some(request) = self.waiting.pop_front() {
            self.exit(request, Exit::Failed(stopping()));
        }
        self.publish();
    }

    fn enqueue(&mut self, incoming: Incoming) {
        self.waiting.push_back(Request {
            submission: incoming.submission,
            sink: incoming.sink,
            submitted: incoming.submitted,
            state: None,
            holds_queue_slot: true,
        });
    }

    /// Cancels the requests whose callers went away.
    fn drop_abandoned(&mut self) {
        let (gone, waiting): (Vec<Request>, Vec<Request>) =
            self.waiting.drain(..).partition(|r| r.sink.is_closed());
        self.waiting = waiting.into();
        let (gone_active, active): (Vec<Request>, Vec<Request>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|r| r.sink.is_closed());
        self.active = active;
        for request in gone.into_iter().chain(gone_active) {
            self.exit(request, Exit::Cancelled);
        }
    }

    /// One step boundary: admit, reserve, run one batched pass, sample.
    fn step(&mut self) {
        self.admit();
        let Some(chosen) = self.choose() else { return };
        self.run_pass(&chosen);
        self.sample();
    }

    /// A request leaves without a result: its session is dropped (blocks back to the pool) and
    /// its caller told why, if it is still there.
    fn exit(&mut self, mut request: Request, how: Exit) {
        if request.holds_queue_slot {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        request.state = None;
        match how {
            Exit::Failed(e) => {
                self.with_metrics(|m| m.requests_failed += 1);
                request.sink.send(RequestEvent::Failed(e));
            }
            Exit::Cancelled => self.with_metrics(|m| m.requests_cancelled += 1),
        }
    }

    /// Writes the gauges of this step boundary.
    fn publish(&mut self) {
        let (queue, active) = (self.waiting.len(), self.active.len());
        let (cached, cached_blocks) = (self.cache.len(), self.cache.blocks());
        let pool = self.engine.pool().stats();
        self.with_metrics(|m| {
            m.queue_length = queue;
            m.active_sessions = active;
            m.cached_sessions = cached;
            m.cached_blocks = cached_blocks;
            m.kv_blocks_in_use = pool.blocks_in_use;
            m.kv_blocks_free = pool.blocks_free;
            m.kv_blocks_peak = pool.peak_blocks_in_use;
            m.kv_block_bytes = pool.block_bytes;
        });
    }

    fn with_metrics(&self, update: impl FnOnce(&mut MetricsSnapshot)) {
        update(&mut self.shared.lock_metrics());
    }
}

/// (token, layer, KV head) entries a session has evicted so far.
fn evicted_entries(session: &Session) -> f64 {
    let stats = session.kv().stats();
    let seen = session.tokens_seen() * stats.retained.iter().map(Vec::len).sum::<usize>();
    seen.saturating_sub(stats.retained_total()) as f64
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}
