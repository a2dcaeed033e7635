//! `Decoding`: one generation between its tokens — the sampler, the detokenizer, the stop
//! strings, the tokens and text so far, the clock — advanced one sampled token at a time.
//! [`Session::generate`](crate::Session::generate) drives it with one forward pass per token; the
//! scheduler drives many at once with one batched pass per step. Both sample the same tokens from
//! the same logits.
//!
//! Invariants: a token is sampled only from the session's logits after its last fed token; a
//! sampled token becomes the session's pending token unless it ends the generation (EOS, whose
//! logits stay with the session); text handed to `on_text` never contains a stop string or
//! anything after one; after [`Progress::Finished`] nothing more is sampled.

use std::time::Instant;

use crate::error::{EngineError, Result};
use crate::sampling::Sampler;
use crate::session::{FinishReason, GenerateRequest, Generation, Session};
use crate::text::{Detokenizer, StopMatcher};

/// What a generation needs next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// The session's pending token must go through the model (a decode pass) before the next
    /// token can be sampled.
    NeedsPass,
    /// The generation is over; call [`Decoding::finish`].
    Finished,
}

/// The state of one generation.
pub(crate) struct Decoding {
    max_tokens: usize,
    stop_at_eos: bool,
    repeat_last_n: usize,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopMatcher,
    text: String,
    tokens: Vec<u32>,
    started: Instant,
    first_token_secs: Option<f64>,
    decode_steps: usize,
    finish: Option<FinishReason>,
}

impl Decoding {
    /// A generation of `request`, whose sampling parameters must have passed `validate`; its
    /// clock starts now.
    pub(crate) fn new(request: &GenerateRequest) -> Self {
        Decoding {
            max_tokens: request.max_tokens,
            stop_at_eos: request.stop_at_eos,
            repeat_last_n: request.sampling.repeat_last_n,
            sampler: Sampler::new(request.sampling.clone()),
            detok: Detokenizer::new(),
            stops: StopMatcher::new(&request.stop),
            text: String::new(),
            tokens: Vec::new(),
            started: Instant::now(),
            first_token_secs: None,
            decode_steps: 0,
            finish: None,
        }
    }

    /// Samples from the session's logits as long as it has them: each token is pushed as the
    /// session's pending token and its text (if complete, and not part of a stop string) goes to
    /// `on_text`, which returns false to cancel. Returns when a decode pass is needed or the
    /// generation ended.
    pub(crate) fn advance(
        &mut self,
        session: &mut Session,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Progress> {
        let engine = session.engine().clone();
        let tokenizer = engine.tokenizer();
        loop {
            if self.finish.is_some() {
                return Ok(Progress::Finished);
            }
            if self.tokens.len() >= self.max_tokens {
                self.finish = Some(FinishReason::Length);
                continue;
            }
            if session.room() == 0 {
                self.finish = Some(FinishReason::ContextFull);
                continue;
            }
            let logits = match (session.logits.take(), session.pending) {
                (Some(l), _) => l,
                (None, Some(_)) => return Ok(Progress::NeedsPass),
                (None, None) => return Err(EngineError::NothingToContinue),
            };
            let seen = session.seen_tokens();
            let recent_from = seen.len().saturating_sub(self.repeat_last_n);
            let token = self.sampler.sample(&logits, &seen[recent_from..]);
            self.first_token_secs
                .get_or_insert(self.started.elapsed().as_secs_f64());
            if self.stop_at_eos && tokenizer.eos_ids().contains(&token) {
                session.logits = Some(logits);
                self.finish = Some(FinishReason::Eos);
                continue;
            }
            self.tokens.push(token);
            session.pending = Some(token);
            if let Some(chunk) = self.detok.push(tokenizer, token)? {
                let (out, hit) = self.stops.push(&chunk);
                self.text.push_str(&out);
                let keep_going = out.is_empty() || on_text(&out);
                if hit {
                    self.finish = Some(FinishReason::Stop);
                } else if !keep_going {
                    self.finish = Some(FinishReason::Cancelled);
                }
            }
        }
    }

    /// Counts one decode pass (the pending token went through the model).
    pub(crate) fn record_pass(&mut self) {
        self.decode_steps += 1;
    }

    /// The tokens generated so far.
    pub(crate) fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Releases the text held back (an incomplete character, a possible stop string's start)
    /// unless a stop string ended the generation, and returns the result.
    pub(crate) fn finish(
        mut self,
        session: &Session,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let finish = self.finish.unwrap_or(FinishReason::Length);
        if finish != FinishReason::Stop {
            let tokenizer = session.engine().tokenizer();
            let mut tail = self
                .detok
                .finish(tokenizer)?
                .map(|c| self.stops.push(&c).0)
                .unwrap_or_default();
            tail.push_str(&self.stops.flush());
            if !tail.is_empty() {
                on_text(&tail);
                self.text.push_str(&tail);
            }
        }
        Ok(Generation {
            text: self.text,
            tokens: self.tokens,
            prompt_tokens: 0,
            finish_reason: finish,
            prefill_secs: 0.0,
            time_to_first_token_secs: self.first_token_secs.unwrap_or(0.0),
            decode_secs: self.started.elapsed().as_secs_f64(),
            decode_steps: self.decode_steps,
        })
    }
}
