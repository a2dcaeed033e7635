//! Who runs in the next step: admitting waiting requests (their prompt rendered and tokenized,
//! their session taken from the prompt cache or made), choosing the requests of the next batched
//! pass within the pool's free blocks, and preempting the newest when the pool is short.
//!
//! Invariants: a request is admitted only when a session slot is free and, beside other active
//! requests, the pool has room for its next pass; a pass is chosen only when the pool has the
//! blocks all its passes could take (cached sessions are dropped first, least recently used;
//! then the newest active request is preempted); a request that cannot fit even alone fails
//! with [`EngineError::KvCapacity`].

use std::sync::atomic::Ordering;
use std::time::Instant;

use model_zoo::PrefillKind;

use super::{evicted_entries, Admitted, Exit, Phase, Request, Worker};
use crate::decoding::Decoding;
use crate::error::{EngineError, Result};
use crate::scheduler::{Prompt, RequestEvent, Usage};
use crate::session::Session;

impl Worker {
    /// Admits waiting requests while there is a session slot and room in the pool.
    pub(super) fn admit(&mut self) {
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
    pub(super) fn choose(&mut self) -> Option<Vec<usize>> {
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
}
