//! The scheduler's thread: the waiting queue, the active requests, the prompt cache, and the
//! loop that admits, reserves, runs one batched step and samples, at every step boundary (the
//! rules are in the parent module's header).
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
use model_zoo::{LogitsFor, Pass, PrefillKind};

use super::prompt_cache::PromptCache;
use super::{
    EventSink, Incoming, MetricsSnapshot, Prompt, RequestEvent, SchedulerConfig, Shared,
    Submission, Usage,
};
use crate::decoding::{Decoding, Progress};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::session::{PassInput, PrefillPlan, Session};

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

    /// Admits waiting requests while there is a session slot and room in the pool.
    fn admit(&mut self) {
        while self.active.len() < self.config.max_sessions {
            let Some(mut request) = self.waiting.pop_front() else {
                return;
            };
            if request.holds_queue_slot {
                request.holds_queue_slot = false;
                self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            }
            if request.state.is_none() {
                match self.prepare(&request) {
                    Ok(state) => request.state = Some(state),
                    Err(e) => {
                        self.exit(request, Exit::Failed(e));
                        continue;
                    }
                }
            }
            let need = request.next_pass_blocks() + self.active.len() * self.tables;
            if !self.active.is_empty() && !self.make_room(need) {
                self.waiting.push_front(request);
                return;
            }
            let state = request.state.as_mut().expect("prepared above");
            if !state.announced {
                state.announced = true;
                let started = RequestEvent::Started {
                    prompt_tokens: state.usage.prompt_tokens,
                    prompt_tokens_cached: state.usage.prompt_tokens_cached,
                };
                if !request.sink.send(started) {
                    self.exit(request, Exit::Cancelled);
                    continue;
                }
            }
            self.active.push(request);
        }
    }

    /// Renders and tokenizes a new request's prompt, picks its session (a cached one its prompt
    /// extends, or a fresh one) and checks it against the context and the pool.
    fn prepare(&mut self, request: &Request) -> Result<Admitted> {
        let sub = &request.submission;
        let engine = self.engine.clone();
        let tokenizer = engine.tokenizer();
        let (text, rendered) = match &sub.prompt {
            Prompt::Text(t) => (t.clone(), None),
            Prompt::Chat(messages) => {
                let r = tokenizer.apply_chat_template(messages, true)?;
                (r.clone(), Some(r))
            }
        };
        if text.is_empty() {
            return Err(EngineError::EmptyInput { what: "the prompt" });
        }
        let continued = match rendered {
            Some(_) => self.continue_cached(&sub.policy_key, &text)?,
            None => None,
        };
        let (mut session, tokens) = match continued {
            Some(found) => found,
            None => (
                self.engine.session_with(sub.policy.clone())?,
                tokenizer.encode(&text, true)?,
            ),
        };
        let cached = session.tokens_seen();
        let evicted_before = evicted_entries(&session);
        let plan = session.plan_prefill(&tokens, PrefillKind::Context)?;
        // The whole prompt must fit: the baselines evict at the end of a prefill, as their
        // references do, so every chunk's keys are held until then.
        let needed =
            session.kv().stats().blocks_in_use + session.kv().blocks_to_append(plan.unfed().len());
        let capacity = self.engine.pool().config().capacity_blocks;
        if needed > capacity {
            return Err(EngineError::KvCapacity { needed, capacity });
        }
        let usage = Usage {
            prompt_tokens: cached + plan.unfed().len(),
            prompt_tokens_cached: cached,
            completion_tokens: 0,
        };
        self.with_metrics(|m| {
            m.prompt_tokens_cached += cached as u64;
            m.prompt_cache_hits += u64::from(cached > 0);
        });
        Ok(Admitted {
            session,
            rendered,
            phase: Phase::Prefill(plan),
            decoding: Decoding::new(&sub.request),
            usage,
            announced: false,
            evicted_before,
            admitted_at: Instant::now(),
            prefilled_at: None,
            first_token_at: None,
            last_token_at: None,
        })
    }

    /// A cached session whose transcript `rendered` extends, with the tokens of the rest.
    fn continue_cached(
        &mut self,
        key: &str,
        rendered: &str,
    ) -> Result<Option<(Session, Vec<u32>)>> {
        let Some(session) = self.cache.take_longest_prefix(key, rendered) else {
            return Ok(None);
        };
        let delta = session.continuation(rendered).unwrap_or_default();
        let tokens = self.engine.tokenizer().encode(delta, false)?;
        if tokens.is_empty() {
            // Nothing new to feed: a fresh session gives the model's own answer again.
            self.cache.insert(key.to_string(), session);
            return Ok(None);
        }
        Ok(Some((session, tokens)))
    }

    /// Frees cached sessions (least recently used first) until `blocks` are free; false when
    /// even an empty cache leaves too few.
    fn make_room(&mut self, blocks: usize) -> bool {
        let pool = self.engine.pool();
        while pool.stats().blocks_free < blocks {
            if !self.cache.drop_lru() {
                return false;
            }
        }
        true
    }

    /// Picks the requests of the next pass (indices into `active`): every decoding request,
    /// and the oldest prefilling one when its chunk fits. Preempts or fails what cannot fit.
    fn choose(&mut self) -> Option<Vec<usize>> {
        let capacity = self.engine.pool().config().capacity_blocks;
        let decode_need = loop {
            let need: usize = self
                .active
                .iter()
                .filter(|r| r.is_decoding())
                .map(Request::next_pass_blocks)
                .sum();
            if self.make_room(need) {
                break need;
            }
            if self.active.len() == 1 {
                let request = self.active.pop().expect("one active request");
                self.exit(
                    request,
                    Exit::Failed(EngineError::KvCapacity {
                        needed: need,
                        capacity,
                    }),
                );
                return None;
            }
            self.preempt_newest(None);
        };
        let mut chosen: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].is_decoding())
            .collect();
        while let Some(p) = self.active.iter().position(Request::is_prefilling) {
            if self.make_room(decode_need + self.active[p].next_pass_blocks()) {
                chosen.push(p);
                break;
            }
            if !chosen.is_empty() {
                // Running streams free their blocks as they finish; the prefill waits.
                return Some(chosen);
            }
            if self.active.len() == 1 {
                let request = self.active.pop().expect("one active request");
                let needed = request.next_pass_blocks();
                self.exit(
                    request,
                    Exit::Failed(EngineError::KvCapacity { needed, capacity }),
                );
                return None;
            }
            self.preempt_newest(Some(p));
        }
        // More prefill chunks join while the step's prompt tokens stay within one chunk's worth
        // (short prompts of many new requests start together) and the pool has room.
        let budget = self.engine.config().prefill_chunk;
        let mut tokens: usize = chosen
            .iter()
            .map(|&i| self.active[i].next_pass_tokens())
            .sum();
        let mut need = decode_need
            + chosen
                .iter()
                .filter(|&&i| self.active[i].is_prefilling())
                .map(|&i| self.active[i].next_pass_blocks())
                .sum::<usize>();
        for i in 0..self.active.len() {
            let request = &self.active[i];
            if !request.is_prefilling() || chosen.contains(&i) {
                continue;
            }
            let (t, b) = (request.next_pass_tokens(), request.next_pass_blocks());
            if tokens + t > budget || !self.make_room(need + b) {
                break;
            }
            tokens += t;
            need += b;
            chosen.push(i);
        }
        (!chosen.is_empty()).then_some(chosen)
    }

    /// Gives the newest active request's blocks back (other than `keep`): its cache will be
    /// recomputed from its tokens when it is admitted again, at the head of the queue.
    fn preempt_newest(&mut self, keep: Option<usize>) {
        let Some(i) = (0..self.active.len()).rev().find(|&i| Some(i) != keep) else {
            return;
        };
        let mut request = self.active.remove(i);
        let state = request
            .state
            .as_mut()
            .expect("active requests are prepared");
        let unfed = match &state.phase {
            Phase::Prefill(plan) => plan.unfed().to_vec(),
            Phase::Decode => Vec::new(),
        };
        match state.session.reset_for_replay(&unfed) {
            Ok(plan) => {
                state.phase = Phase::Prefill(plan);
                self.with_metrics(|m| m.preemptions += 1);
                self.waiting.push_front(request);
            }
            Err(e) => self.exit(request, Exit::Failed(e)),
        }
    }

    /// Runs one batched pass over the chosen requests and keeps each one's logits.
    fn run_pass(&mut self, chosen: &[usize]) {
        let mut is_chosen = vec![false; self.active.len()];
        chosen.iter().for_each(|&i| is_chosen[i] = true);
        // The decode tokens live here for the length of the pass.
        let decode_tokens: Vec<Option<u32>> = self
            .active
            .iter_mut()
            .zip(&is_chosen)
            .map(|(r, &c)| {
                let state = r.state.as_mut().filter(|_| c)?;
                match state.phase {
                    Phase::Decode => state.session.pending.take(),
                    Phase::Prefill(_) => None,
                }
            })
            .collect();
        let mut prefilled = 0;
        let mut fed = vec![false; self.active.len()];
        let mut inputs = Vec::with_capacity(chosen.len());
        for (i, (request, token)) in self.active.iter_mut().zip(&decode_tokens).enumerate() {
            let Some(state) = request.state.as_mut().filter(|_| is_chosen[i]) else {
                continue;
            };
            let Admitted { session, phase, .. } = state;
            let (tokens, pass) = match (phase, token) {
                (Phase::Decode, Some(token)) => (std::slice::from_ref(token), Pass::Decode),
                (Phase::Prefill(plan), _) => match plan.next_chunk() {
                    Some(next) => next,
                    None => continue,
                },
                (Phase::Decode, None) => continue,
            };
            if matches!(pass, Pass::Prefill(_)) {
                prefilled += tokens.len();
            }
            fed[i] = true;
            inputs.push(PassInput {
                session,
                tokens,
                pass,
                logits_for: LogitsFor::Last,
            });
        }
        let sequences = inputs.len();
        let results = Session::forward_batch(&mut inputs);
        drop(inputs);
        self.with_metrics(|m| {
            m.steps += 1;
            m.step_sequences += sequences as u64;
            m.prompt_tokens += prefilled as u64;
        });
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                let message = e.to_string();
                for request in self.take_where(&fed) {
                    self.exit(
                        request,
                        Exit::Failed(EngineError::Scheduler(format!(
                            "a batched step failed: {message}"
                        ))),
                    );
                }
                return;
            }
        };
        let mut errors: Vec<Option<EngineError>> = (0..self.active.len()).map(|_| None).collect();
        let fed_requests = self.active.iter_mut().enumerate().filter(|(i, _)| fed[*i]);
        for ((i, request), result) in fed_requests.zip(results) {
            let state = request.state.as_mut().expect("fed requests are prepared");
            if let Err(e) = result.and_then(|logits| state.session.set_logits(&logits)) {
                errors[i] = Some(e);
                continue;
            }
            match &mut state.phase {
                Phase::Decode => state.decoding.record_pass(),
                Phase::Prefill(plan) => {
                    plan.advance();
                    if plan.next_chunk().is_none() {
                        state.phase = Phase::Decode;
                        state.prefilled_at = Some(Instant::now());
                    }
                }
            }
        }
        self.fail_where(errors);
    }

    /// Fails the active requests that have an error (aligned with `active`).
    fn fail_where(&mut self, errors: Vec<Option<EngineError>>) {
        let flags: Vec<bool> = errors.iter().map(Option::is_some).collect();
        for (request, e) in self
            .take_where(&flags)
            .into_iter()
            .zip(errors.into_iter().flatten())
        {
            self.exit(request, Exit::Failed(e));
        }
    }

    /// Removes and returns the active requests flagged in `flags` (aligned with `active`).
    fn take_where(&mut self, flags: &[bool]) -> Vec<Request> {
        let mut taken = Vec::new();
        let mut kept = Vec::with_capacity(self.active.len());
        for (request, &flag) in std::mem::take(&mut self.active).into_iter().zip(flags) {
            if flag {
                taken.push(request);
            } else {
                kept.push(request);
            }
        }
        self.active = kept;
        taken
    }

    /// Samples the next token of every decoding request that has logits; finishes the ones
    /// that are done.
    fn sample(&mut self) {
        // Per active request: Some(Ok) when it finished, Some(Err) when it failed.
        let mut outcomes: Vec<Option<Result<()>>> = (0..self.active.len()).map(|_| None).collect();
        let mut metrics = Vec::new();
        for (i, request) in self.active.iter_mut().enumerate() {
            let Some(state) = request.state.as_mut() else {
                continue;
            };
            if !matches!(state.phase, Phase::Decode) || state.session.logits.is_none() {
                continue;
            }
            let before = state.decoding.tokens().len();
            let sink = &mut request.sink;
            let progress = state.decoding.advance(&mut state.session, &mut |t| {
                sink.send(RequestEvent::Text(t.to_string()))
            });
            let now = Instant::now();
            match state.last_token_at.replace(now) {
                None => {
                    state.first_token_at = Some(now);
                    metrics.push((Some(now - request.submitted), None));
                }
                Some(last) => metrics.push((None, Some(now - last))),
            }
            let generated = state.decoding.tokens().len() - before;
            state.usage.completion_tokens += generated;
            self.shared.lock_metrics().generated_tokens += generated as u64;
            outcomes[i] = match progress {
                Ok(Progress::NeedsPass) => None,
                Ok(Progress::Finished) => Some(Ok(())),
                Err(e) => Some(Err(e)),
            };
        }
        self.with_metrics(|m| {
            for (ttft, latency) in metrics {
                if let Some(t) = ttft {
                    m.time_to_first_token.observe(t);
                }
                if let Some(l) = latency {
                    m.token_latency.observe(l);
                }
            }
        });
        let leaving: Vec<bool> = outcomes.iter().map(Option::is_some).collect();
        let taken = self.take_where(&leaving);
        for (request, outcome) in taken.into_iter().zip(outcomes.into_iter().flatten()) {
            match outcome {
                Ok(()) => self.finish(request),
                Err(e) => self.exit(request, Exit::Failed(e)),
            }
        }
    }

    /// Sends a finished request's result and keeps its session in the prompt cache (chat
    /// requests that ran to their end) or drops it.
    fn finish(&mut self, mut request: Request) {
        let Some(mut state) = request.state.take() else {
            return;
        };
        let sink = &mut request.sink;
        let finished = state.decoding.finish(&state.session, &mut |t| {
            sink.send(RequestEvent::Text(t.to_string()))
        });
        let mut generation = match finished {
            Ok(g) => g,
            Err(e) => return self.exit(request, Exit::Failed(e)),
        };
        if generation.finish_reason == crate::session::FinishReason::Cancelled
            || request.sink.is_closed()
        {
            return self.exit(request, Exit::Cancelled);
        }
        let secs =
            |from: Instant, to: Option<Instant>| to.map_or(0.0, |t| (t - from).as_secs_f64());
        generation.prompt_tokens = state.usage.prompt_tokens - state.usage.prompt_tokens_cached;
        generation.prefill_secs = secs(state.admitted_at, state.prefilled_at);
        generation.time_to_first_token_secs = secs(request.submitted, state.first_token_at);
        if let Some(prefilled) = state.prefilled_at {
            generation.decode_secs = prefilled.elapsed().as_secs_f64();
        }
        let kv = state.session.kv_report();
        let heads = self.tables.max(1) as f64;
        let evicted = (evicted_entries(&state.session) - state.evicted_before).max(0.0) / heads;
        self.with_metrics(|m| {
            m.requests_completed += 1;
            m.tokens_evicted += evicted;
        });
        let keep = match (&request.submission.prompt, state.rendered.take()) {
            (Prompt::Chat(messages), Some(rendered)) if self.config.prompt_cache > 0 => state
                .session
                .record_answer(rendered, &generation.tokens)
                .map(|answer| {
                    let mut history = messages.clone();
                    history.push(model_zoo::ChatMessage::new("assistant", &answer));
                    state.session.set_messages(history);
                })
                .is_ok(),
            _ => false,
        };
        let usage = state.usage;
        request.sink.send(RequestEvent::Done {
            generation,
            usage,
            kv,
        });
        if keep {
            self.cache
                .insert(request.submission.policy_key.clone(), state.session);
        }
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
