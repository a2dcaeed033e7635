//! Running a chosen step: one batched forward pass over the chosen requests (a decode token or
//! a prefill chunk each), then sampling every decoding request and finishing the ones that are
//! done (result sent, chat sessions kept in the prompt cache).
//!
//! Invariants: a request whose pass or sampling failed leaves with its error and the others
//! carry on; a failure of the whole batched pass fails exactly the requests fed in it (each
//! with [`EngineError::StepFailed`], sharing its cause); a prefill request moves to decoding
//! once its plan's last chunk went through.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use model_zoo::{LogitsFor, Pass};

use super::{evicted_entries, Admitted, Exit, Phase, Request, Worker};
use crate::decoding::Progress;
use crate::error::{EngineError, Result};
use crate::scheduler::{Prompt, RequestEvent};
use crate::session::{PassInput, Session};

impl Worker {
    /// Runs one batched pass over the chosen requests and keeps each one's logits.
    pub(super) fn run_pass(&mut self, chosen: &[usize]) {
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
                let source = Arc::new(e);
                for request in self.take_where(&fed) {
                    let source = source.clone();
                    self.exit(request, Exit::Failed(EngineError::StepFailed { source }));
                }
                return;
            }
        };
        self.record_results(&fed, results);
    }

    /// Keeps the logits of each request fed in the pass (`fed`, aligned with `active`; one
    /// result per fed request, in order) and advances its phase; fails those whose pass failed.
    fn record_results(&mut self, fed: &[bool], results: Vec<Result<Tensor>>) {
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
    pub(super) fn sample(&mut self) {
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
}
