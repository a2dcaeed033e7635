//! `Session`: one conversation — its KV cache, its eviction policy, every token it has seen, and
//! its chat transcript. Prefill, decode and chat turns all append to the same cache, so a second
//! chat turn feeds only its new tokens. Every forward pass goes through
//! `Session::forward_batch`, the same path the scheduler uses to run many sessions in one step.
//!
//! What a prefill is to the policy is said by the caller ([`PrefillKind`]): [`Session::prefill`]
//! feeds *context*, which one-shot policies (SnapKV, PyramidKV, KNorm, NACL) compress once at its
//! end; [`Session::prefill_as`] with [`PrefillKind::Continuation`] feeds tokens that follow a
//! compressed context (a question, the rest of a chat turn), which they keep, like every token
//! generated. Every chat turn ([`Session::chat`]) and every [`Session::complete`] prompt is
//! context: in a conversation, one-shot policies compress the whole retained cache again at the
//! end of each user turn (to the budget of all tokens seen), so memory stays within the budget
//! plus one answer. Continuous policies keep each head within budget at every step either way.
//!
//! Invariants: `seen` holds exactly the tokens whose keys went through the model (the store's
//! positions are their indices); `pending` is at most one sampled token not yet fed; `logits`
//! holds the next-token logits after the last fed token and is `None` while a token is pending;
//! a prefill is fed in chunks of at most the engine's prefill chunk as a [`PrefillPlan`] cuts it,
//! the one chunking every path shares (sessions, the scheduler, and [`run_prefill`], so that a
//! [`crate::SharedContext`] prefills exactly like a session); a step is planned (context, KV
//! blocks reserved) before anything changes, and every forward pass is all-or-nothing, so a
//! failed step leaves all of these as they were.

use std::time::Instant;

use candle_core::Tensor;
use kv_store::SequenceKv;
use model_zoo::{
    ChatMessage, LayerHook, LogitsFor, Pass, PrefillChunk, PrefillKind, SequenceInput,
};

use crate::decoding::{Decoding, Progress};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::policy::Policy;
use crate::report::KvReport;
use crate::sampling::SamplingParams;

/// What to generate.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct GenerateRequest {
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Stop strings (the text ends before the first one found).
    pub stop: Vec<String>,
    /// Stop at the model's end-of-sequence tokens.
    pub stop_at_eos: bool,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_at_eos: true,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop string was produced.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The model's context is full.
    ContextFull,
    /// The caller's callback asked to stop.
    Cancelled,
}

impl FinishReason {
    /// In words, for people (the JSON name is its snake_case serialisation).
    pub fn describe(self) -> &'static str {
        match self {
            FinishReason::Eos => "end of text",
            FinishReason::Stop => "stop string",
            FinishReason::Length => "max tokens reached",
            FinishReason::ContextFull => "the model's context is full",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// The result of one generation.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    /// The generated text (stop string excluded).
    pub text: String,
    /// The generated token ids (EOS excluded).
    pub tokens: Vec<u32>,
    /// Tokens prefilled for this request.
    pub prompt_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Seconds spent in prefill.
    pub prefill_secs: f64,
    /// Seconds from the request to the first generated token.
    pub time_to_first_token_secs: f64,
    /// Seconds spent decoding (forward passes of generated tokens and sampling).
    pub decode_secs: f64,
    /// Forward passes during decoding.
    pub decode_steps: usize,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_secs)
    }

    /// Generated tokens per second over the decode forward passes.
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Where RoPE places a session's keys and queries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// At their token's position in the text (tokens seen before it, evicted or not): the
    /// papers' setting; a session ends when the text reaches the model's context.
    #[default]
    Original,
    /// At their position in each KV head's cache (StreamingLLM's positions): evicted gaps
    /// close, so query-key distances stay within the context, and a session whose policy bounds
    /// its cache can run past the model's context, endlessly.
    Cache,
}

impl Positions {
    /// `original` or `cache`.
    pub fn name(self) -> &'static str {
        match self {
            Positions::Original => "original",
            Positions::Cache => "cache",
        }
    }

    /// Parses `original` or `cache`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "original" => Ok(Positions::Original),
            "cache" => Ok(Positions::Cache),
            other => Err(EngineError::UnknownPositions { name: other.into() }),
        }
    }
}

/// One conversation over an [`Engine`].
///
/// Every step of the session's own API (a prefill, a generation, a chat turn) is planned before
/// it starts: the tokens must fit the model's context (in [`Positions::Cache`], the widest KV
/// head plus the new tokens must), and the KV blocks the step may need, at most, are reserved in
/// the pool, so it cannot run out of memory half-way. A step that fails before it changes
/// anything leaves the session exactly as it was (cache, policy state, tokens seen, pending
/// token, transcript); each forward pass is all-or-nothing. A generation that fails after some
/// tokens were produced (only non-finite logits from a broken model can do that once memory is
/// reserved) keeps what it produced, as a cancelled one does, so that cache and transcript
/// agree. (The scheduler plans its own steps: it admits a pass only when the pool has room.)
pub struct Session {
    engine: Engine,
    kv: SequenceKv,
    policy: Policy,
    hook: Box<dyn LayerHook + Send>,
    positions: Positions,
    seen: Vec<u32>,
    pub(crate) pending: Option<u32>,
    pub(crate) logits: Option<Vec<f32>>,
    messages: Vec<ChatMessage>,
    transcript: String,
    system: Option<String>,
}

impl Session {
    pub(crate) fn new(engine: Engine, policy: Policy) -> Result<Self> {
        let kv = empty_store(&engine, Positions::Original);
        let hook = policy.hook(engine.model_config())?;
        Ok(Self::resumed(engine, policy, hook, kv, Vec::new(), None))
    }

    /// A session in a given state: `kv` holds exactly `seen`, `hook` is the policy's hook in the
    /// state it reached feeding them, `logits` follow the last of them. Its positions are the
    /// store's (cache positions if it has them).
    pub(crate) fn resumed(
        engine: Engine,
        policy: Policy,
        hook: Box<dyn LayerHook + Send>,
        kv: SequenceKv,
        seen: Vec<u32>,
        logits: Option<Vec<f32>>,
    ) -> Self {
        let positions = if kv.has_cache_positions() {
            Positions::Cache
        } else {
            Positions::Original
        };
        Session {
            engine,
            kv,
            policy,
            hook,
            positions,
            seen,
            pending: None,
            logits,
            messages: Vec::new(),
            transcript: String::new(),
            system: None,
        }
    }

    /// The engine this session runs on.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The eviction policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Where RoPE places keys and queries.
    pub fn positions(&self) -> Positions {
        self.positions
    }

    /// Sets where RoPE places keys and queries; the conversation restarts (the system prompt
    /// stays).
    pub fn set_positions(&mut self, positions: Positions) -> Result<()> {
        self.kv = empty_store(&self.engine, positions);
        self.positions = positions;
        self.clear()
    }

    /// Tokens seen so far (fed through the model, retained or not).
    pub fn tokens_seen(&self) -> usize {
        self.seen.len()
    }

    /// Every token fed through the model so far, in order.
    pub fn seen_tokens(&self) -> &[u32] {
        &self.seen
    }

    /// Forgets everything: cache, tokens and transcript (the system prompt stays).
    pub fn clear(&mut self) -> Result<()> {
        self.kv.clear();
        self.hook = self.policy.hook(self.engine.model_config())?;
        self.seen.clear();
        self.pending = None;
        self.logits = None;
        self.messages.clear();
        self.transcript.clear();
        Ok(())
    }

    /// Sets (or removes) the chat system prompt; the conversation restarts.
    pub fn set_system_prompt(&mut self, system: Option<String>) -> Result<()> {
        self.system = system;
        self.clear()
    }

    /// The chat transcript so far.
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// Runs `tokens` through the model after everything seen so far, as context: a one-shot
    /// policy compresses the cache at its end. Returns seconds spent. Fails, changing nothing,
    /// when they do not fit the context or the KV pool.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<f64> {
        self.prefill_as(tokens, PrefillKind::Context)
    }

    /// Runs `tokens` through the model after everything seen so far, as `kind`: context (one-shot
    /// policies compress the cache at its end) or a continuation of a compressed context (they
    /// keep it). A sampled token not yet fed goes first. Returns seconds spent. Fails, changing
    /// nothing, when they do not fit the context or the KV pool.
    pub fn prefill_as(&mut self, tokens: &[u32], kind: PrefillKind) -> Result<f64> {
        self.step(tokens.len(), 0, |s| s.prefill_reserved(tokens, kind))
    }

    /// The prefill of a planned step. If its first pass fails the session is unchanged (the
    /// pending token included).
    fn prefill_reserved(&mut self, tokens: &[u32], kind: PrefillKind) -> Result<f64> {
        let started = Instant::now();
        let pending = self.pending;
        let mut plan = self.plan_prefill(tokens, kind)?;
        let mut first = true;
        while let Some((chunk, pass)) = plan.next_chunk() {
            let logits = self.pass(chunk, pass, LogitsFor::Last).inspect_err(|_| {
                if first {
                    self.pending = pending;
                }
            })?;
            self.set_logits(&logits)?;
            plan.advance();
            first = false;
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// Cuts the pending token (if any) and `tokens` into the passes of one prefill of `kind`,
    /// checking that they fit in the model's context (on error the session is unchanged).
    pub(crate) fn plan_prefill(
        &mut self,
        tokens: &[u32],
        kind: PrefillKind,
    ) -> Result<PrefillPlan> {
        let mut run: Vec<u32> = self.pending.into_iter().collect();
        run.extend_from_slice(tokens);
        self.check_fits(&[run.len()])?;
        self.pending = None;
        Ok(PrefillPlan::new(
            run,
            kind,
            self.engine.config().prefill_chunk,
        ))
    }

    /// Empties the cache and returns the passes that rebuild it: every token seen, the pending
    /// one (so that afterwards the session holds the logits after it, as after a decode pass),
    /// then `unfed` (the rest of an interrupted prefill). The transcript is kept. This is the
    /// scheduler's preemption: the blocks go back to the pool now, and the conversation resumes
    /// later by recomputing its cache, as one context prefill.
    pub(crate) fn reset_for_replay(&mut self, unfed: &[u32]) -> Result<PrefillPlan> {
        let mut run = std::mem::take(&mut self.seen);
        run.extend(self.pending.take());
        run.extend_from_slice(unfed);
        self.kv.clear();
        self.hook = self.policy.hook(self.engine.model_config())?;
        self.logits = None;
        Ok(PrefillPlan::new(
            run,
            PrefillKind::Context,
            self.engine.config().prefill_chunk,
        ))
    }

    /// Keeps the logits of a pass's last token as the next-token logits.
    pub(crate) fn set_logits(&mut self, logits: &Tensor) -> Result<()> {
        self.logits = Some(
            logits
                .to_vec1::<f32>()
                .map_err(model_zoo::ModelError::from)?,
        );
        Ok(())
    }

    /// Logits of every token of `tokens` fed after the session's history (`[n, vocab]`), for
    /// scoring (perplexity, multiple choice). The tokens join the session in one forward pass,
    /// as a continuation ([`PrefillKind::Continuation`]): one-shot policies keep them.
    pub fn prefill_all_logits(&mut self, tokens: &[u32]) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput {
                what: "the token list to score",
            });
        }
        let passes: Vec<usize> = self
            .pending
            .map(|_| 1)
            .into_iter()
            .chain([tokens.len()])
            .collect();
        self.step_with(&passes, 0, |s| {
            s.feed_pending()?;
            let chunk = PrefillChunk {
                start: 0,
                end: tokens.len(),
                len: tokens.len(),
                kind: PrefillKind::Continuation,
            };
            let logits = s.pass(tokens, Pass::Prefill(chunk), LogitsFor::All)?;
            let last = logits
                .get(tokens.len() - 1)
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(model_zoo::ModelError::from)?;
            s.logits = Some(last);
            Ok(logits)
        })
    }

    /// Plans a step of a `prompt`-token prefill (after a pending token) and up to `decode`
    /// generated tokens, then runs `body` with its KV blocks reserved. The prefill counts as one
    /// pass however it is chunked: no policy evicts between its chunks.
    fn step<T>(
        &mut self,
        prompt: usize,
        decode: usize,
        body: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let run = prompt + usize::from(self.pending.is_some());
        let passes: Vec<usize> = if run == 0 { Vec::new() } else { vec![run] };
        self.step_with(&passes, decode, body)
    }

    /// [`Session::step`] with the prefill passes given by length.
    fn step_with<T>(
        &mut self,
        passes: &[usize],
        decode: usize,
        body: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        self.check_fits(passes)?;
        let ceiling = self.blocks_needed(passes, decode);
        self.kv.reserve_blocks(ceiling)?;
        let out = body(self);
        self.kv.release_reservation();
        out
    }

    /// Fails with a context error, before anything changes, when the prefill passes would take
    /// positions beyond the model's context.
    fn check_fits(&self, passes: &[usize]) -> Result<()> {
        let context = self.engine.model_config().max_position;
        let new: usize = passes.iter().sum();
        let seen = self.seen.len();
        // Stored positions are u32 in both modes.
        if seen.saturating_add(new) > u32::MAX as usize {
            return Err(EngineError::ContextOverflow {
                new,
                seen,
                context: u32::MAX as usize,
            });
        }
        match self.positions {
            Positions::Original if seen + new > context => {
                Err(EngineError::ContextOverflow { new, seen, context })
            }
            Positions::Cache => {
                let cap = self.policy.retained_cap(seen + new);
                let span = self.kv.widest_cache_span() as usize;
                if peak_span(span, passes, cap, self.repack_span()) > context {
                    return Err(EngineError::CacheOverflow { new, span, context });
                }
                Ok(())
            }
            Positions::Original => Ok(()),
        }
    }

    /// In cache positions, closes the gaps of every head whose span exceeds
    /// [`Session::repack_span`] (after every pass, and after a shared context's eviction).
    pub(crate) fn close_cache_gaps(&mut self) -> Result<()> {
        let span = self.repack_span() as u32;
        Ok(self.kv.repack_cache_positions(span)?)
    }

    /// In cache positions, the span of cache positions beyond which a head's gaps are closed
    /// after a pass: the model's context less room for one prefill chunk (at most half the
    /// context), so that rotations are rare and by whole gaps at once.
    fn repack_span(&self) -> usize {
        let context = self.engine.model_config().max_position;
        context - self.engine.config().prefill_chunk.min(context / 2)
    }

    /// The most KV blocks this session can hold during the prefill `passes` and `decode`
    /// one-token passes: per head, its peak entry count under the policy's cap (at most the
    /// model's context), in whole blocks.
    fn blocks_needed(&self, passes: &[usize], decode: usize) -> usize {
        let cfg = self.engine.model_config();
        let block = self.kv.pool().config().block_size;
        let total = self.seen.len() + passes.iter().sum::<usize>();
        let cap = self.policy.retained_cap(total.saturating_add(decode));
        let mut blocks = 0usize;
        for l in 0..cfg.n_layers {
            for h in 0..cfg.n_kv_heads {
                let peak = peak_entries(self.kv.retained(l, h), passes, decode, cap);
                blocks = blocks.saturating_add(peak.min(cfg.max_position).div_ceil(block));
            }
        }
        blocks
    }

    /// How many more tokens one pass may add before positions leave the model's context.
    pub(crate) fn room(&self) -> usize {
        let context = self.engine.model_config().max_position;
        let room = match self.positions {
            Positions::Original => context.saturating_sub(self.seen.len()),
            Positions::Cache => context.saturating_sub(self.kv.widest_cache_span() as usize),
        };
        room.min((u32::MAX as usize).saturating_sub(self.seen.len()))
    }

    /// One forward pass of `tokens` after the history, announced to the policy as `pass`.
    fn pass(&mut self, tokens: &[u32], pass: Pass, logits_for: LogitsFor) -> Result<Tensor> {
        let mut out = Session::forward_batch(&mut [PassInput {
            session: self,
            tokens,
            pass,
            logits_for,
        }])?;
        out.pop().expect("one result per session")
    }

    /// One forward pass over several sessions of the same engine (each with its own tokens,
    /// policy and cache; the model's projections see all of them at once). Returns one result
    /// per session, in order. A session whose result is an error is as it was before the pass
    /// (the decoder rolls a failed sequence back; only an internal error while evicting leaves
    /// one part-way, and a repack of cache positions that finds no block to copy a block shared
    /// with a fork into — impossible within a step, whose reservation covers those copies —
    /// reports its error after the pass took effect); so is every session when the outer error
    /// is returned.
    pub(crate) fn forward_batch(batch: &mut [PassInput<'_, '_>]) -> Result<Vec<Result<Tensor>>> {
        let Some(first) = batch.first() else {
            return Ok(Vec::new());
        };
        let engine = first.session.engine.clone();
        if batch
            .iter()
            .any(|item| !item.session.engine.same_engine(&engine))
        {
            return Err(EngineError::MixedEngines);
        }
        let mut inputs = Vec::with_capacity(batch.len());
        for item in batch.iter_mut() {
            let session = &mut *item.session;
            session.hook.begin_pass(item.pass);
            inputs.push(SequenceInput {
                tokens: item.tokens,
                start: session.seen.len() as u32,
                kv: &mut session.kv,
                hook: session.hook.as_mut(),
                logits_for: item.logits_for,
            });
        }
        let results = engine.model().forward_batch(&mut inputs)?;
        drop(inputs);
        Ok(results
            .into_iter()
            .zip(batch.iter_mut())
            .map(|(result, item)| {
                let session = &mut *item.session;
                let logits = result.map_err(|e| match e {
                    model_zoo::ModelError::NonFinite { position } => EngineError::NonFiniteLogits {
                        model: session.engine.model_path().to_path_buf(),
                        position,
                    },
                    other => other.into(),
                })?;
                session.seen.extend_from_slice(item.tokens);
                session.close_cache_gaps()?;
                Ok(logits)
            })
            .collect())
    }

    /// Tokenizes and prefills raw text (no chat template), then generates.
    pub fn complete(
        &mut self,
        prompt: &str,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyInput { what: "the prompt" });
        }
        let tokens = self
            .engine
            .tokenizer()
            .encode(prompt, self.seen.is_empty())?;
        let (generation, error) = self.generate_after(&tokens, request, on_text)?;
        error.map_or(Ok(generation), Err)
    }

    /// One chat turn: the user's message is rendered with the model's chat template and only
    /// the part not yet in the cache is prefilled; the answer is generated and recorded. A
    /// turn that fails before its answer starts leaves the conversation as it was; one that
    /// fails during its answer keeps the answer so far, as a cancelled one does.
    pub fn chat(
        &mut self,
        user_message: &str,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        if user_message.trim().is_empty() {
            return Err(EngineError::EmptyInput {
                what: "the message",
            });
        }
        let mut messages: Vec<ChatMessage> = self
            .system
            .iter()
            .map(|s| ChatMessage::new("system", s))
            .collect();
        messages.extend(self.messages.iter().cloned());
        messages.push(ChatMessage::new("user", user_message));
        let rendered = self
            .engine
            .tokenizer()
            .apply_chat_template(&messages, true)?;
        let delta = match self.continuation(&rendered) {
            Some(delta) => delta.to_string(),
            None => {
                // The template re-rendered history differently (e.g. it trims answers): start over.
                let (system, history) = (self.system.clone(), self.messages.clone());
                self.clear()?;
                self.system = system;
                self.messages = history;
                rendered.clone()
            }
        };
        let tokens = self
            .engine
            .tokenizer()
            .encode(&delta, self.seen.is_empty())?;
        let (generation, error) = self.generate_after(&tokens, request, on_text)?;
        let answer = self.record_answer(rendered, &generation.tokens)?;
        self.messages.push(ChatMessage::new("user", user_message));
        self.messages.push(ChatMessage::new("assistant", &answer));
        error.map_or(Ok(generation), Err)
    }

    /// The part of `rendered` (a whole conversation rendered with the chat template) that is
    /// not in the cache yet: `None` unless the session's transcript is a prefix of it.
    pub(crate) fn continuation<'r>(&self, rendered: &'r str) -> Option<&'r str> {
        rendered.strip_prefix(self.transcript.as_str())
    }

    /// Records a finished turn: the transcript becomes `rendered` followed by the answer's
    /// text, which is returned.
    pub(crate) fn record_answer(&mut self, rendered: String, answer: &[u32]) -> Result<String> {
        let answer = self.engine.tokenizer().decode(answer)?;
        self.transcript = rendered + &answer;
        Ok(answer)
    }

    /// Replaces the recorded conversation (the scheduler's sessions keep what the client sent).
    pub(crate) fn set_messages(&mut self, messages: Vec<ChatMessage>) {
        self.system = None;
        self.messages = messages;
    }

    /// Prefills token ids (no text involved), then generates: the benchmark's entry point.
    pub fn generate_from_tokens(
        &mut self,
        prompt: &[u32],
        request: &GenerateRequest,
    ) -> Result<Generation> {
        let (generation, error) = self.generate_after(prompt, request, &mut |_| true)?;
        error.map_or(Ok(generation), Err)
    }

    /// Prefills `prompt` and generates, as one planned step. `Err`: nothing changed.
    fn generate_after(
        &mut self,
        prompt: &[u32],
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Outcome> {
        request.sampling.validate()?;
        self.step(prompt.len(), request.max_tokens, |s| {
            let prefill_secs = s.prefill_reserved(prompt, PrefillKind::Context)?;
            let (mut generation, error) = s.generate_reserved(request, on_text);
            generation.prompt_tokens = prompt.len();
            generation.prefill_secs = prefill_secs;
            generation.time_to_first_token_secs += prefill_secs;
            Ok((generation, error))
        })
    }

    /// Generates from the current state (after a prefill). `on_text` receives text as it is
    /// produced and returns false to stop.
    pub fn generate(
        &mut self,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        request.sampling.validate()?;
        if self.pending.is_none() && self.logits.is_none() {
            return Err(EngineError::NothingToContinue);
        }
        let (generation, error) = self.step(0, request.max_tokens, |s| {
            Ok(s.generate_reserved(request, on_text))
        })?;
        error.map_or(Ok(generation), Err)
    }

    /// The generation of a planned step: the tokens produced, and the error that ended it, if
    /// one did (what was produced before it stays in the session).
    fn generate_reserved(
        &mut self,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Outcome {
        let mut decoding = Decoding::new(request);
        let mut error = None;
        if self.pending.is_some() {
            error = self.feed_pending().err();
        }
        while error.is_none() {
            match decoding.advance(self, on_text) {
                Ok(Progress::NeedsPass) => match self.feed_pending() {
                    Ok(()) => decoding.record_pass(),
                    Err(e) => error = Some(e),
                },
                Ok(Progress::Finished) => break,
                Err(e) => error = Some(e),
            }
        }
        let tokens = decoding.tokens().to_vec();
        match decoding.finish(self, on_text) {
            Ok(generation) => (generation, error),
            Err(e) => {
                let generation = Generation {
                    text: String::new(),
                    tokens,
                    prompt_tokens: 0,
                    finish_reason: FinishReason::Cancelled,
                    prefill_secs: 0.0,
                    time_to_first_token_secs: 0.0,
                    decode_secs: 0.0,
                    decode_steps: 0,
                };
                (generation, Some(error.unwrap_or(e)))
            }
        }
    }

    /// The decode pass: runs the pending token through the model (it stays pending if the
    /// pass fails).
    fn feed_pending(&mut self) -> Result<()> {
        let Some(next) = self.pending else {
            return Ok(());
        };
        let logits = self.pass(&[next], Pass::Decode, LogitsFor::Last)?;
        self.pending = None;
        self.set_logits(&logits)
    }

    /// Tokens seen vs. retained per layer and head, and KV memory in use.
    pub fn kv_report(&self) -> KvReport {
        KvReport::new(&self.kv, self.seen.len(), self.hook.state_bytes())
    }

    /// Next-token logits after the last fed token (`None` before any prefill, or while a
    /// sampled token waits to be fed).
    pub fn last_logits(&self) -> Option<&[f32]> {
        self.logits.as_deref()
    }

    /// The sampled token not yet fed through the model, if any.
    pub fn pending_token(&self) -> Option<u32> {
        self.pending
    }

    /// The session's KV store (read-only).
    pub fn kv(&self) -> &SequenceKv {
        &self.kv
    }
}

/// An empty store for a session of `engine` with `positions`: in cache positions, keys are
/// rotated for their cache positions and shifted by the model's key shift when gaps close.
pub(crate) fn empty_store(engine: &Engine, positions: Positions) -> SequenceKv {
    let cfg = engine.model_config();
    let pool = engine.pool();
    match positions {
        Positions::Original => SequenceKv::new(pool, cfg.n_layers, cfg.n_kv_heads),
        Positions::Cache => SequenceKv::with_cache_positions(
            pool,
            cfg.n_layers,
            cfg.n_kv_heads,
            engine.model().key_shift(),
        ),
    }
}

/// A generation's result and, when it ended on an error, that error (the tokens produced
/// before it are part of the session).
type Outcome = (Generation, Option<EngineError>);

/// One session's share of a batched forward pass ([`Session::forward_batch`]).
pub(crate) struct PassInput<'s, 't> {
    /// The session.
    pub(crate) session: &'s mut Session,
    /// Its new tokens.
    pub(crate) tokens: &'t [u32],
    /// The kind of pass, announced to its policy.
    pub(crate) pass: Pass,
    /// Which logits it needs.
    pub(crate) logits_for: LogitsFor,
}

/// The forward passes of one prefill of `kind`, run one by one (by `Session::prefill_as`, by
/// the scheduler between decode steps, or by [`run_prefill`]): chunks of at most the engine's
/// prefill chunk, each announced with where it sits in the prefill.
#[derive(Debug)]
pub(crate) struct PrefillPlan {
    run: Vec<u32>,
    kind: PrefillKind,
    chunk: usize,
    next_start: usize,
}

impl PrefillPlan {
    /// The passes of `run` in chunks of at most `chunk` tokens.
    pub(crate) fn new(run: Vec<u32>, kind: PrefillKind, chunk: usize) -> Self {
        PrefillPlan {
            run,
            kind,
            chunk: chunk.max(1),
            next_start: 0,
        }
    }

    /// The next chunk and how to announce it, or `None` when the prefill is done.
    pub(crate) fn next_chunk(&self) -> Option<(&[u32], Pass)> {
        let start = self.next_start;
        let len = self.run.len();
        if start >= len {
            return None;
        }
        let end = (start + self.chunk).min(len);
        let chunk = PrefillChunk {
            start,
            end,
            len,
            kind: self.kind,
        };
        Some((&self.run[start..end], Pass::Prefill(chunk)))
    }

    /// Marks the next chunk as done.
    pub(crate) fn advance(&mut self) {
        self.next_start = (self.next_start + self.chunk).min(self.run.len());
    }

    /// The tokens not fed yet, in order.
    pub(crate) fn unfed(&self) -> &[u32] {
        &self.run[self.next_start..]
    }
}

/// The widest span of cache positions (the largest query-key distance) a head reaches over
/// prefill passes of lengths `passes`, starting from `span`: after a pass its span is closed
/// down to what it retains (at most `cap`) once it exceeds `repack`.
fn peak_span(span: usize, passes: &[usize], cap: Option<usize>, repack: usize) -> usize {
    let (mut span, mut peak) = (span, span);
    for &n in passes {
        let after = span.saturating_add(n);
        peak = peak.max(after);
        span = match cap {
            Some(k) if after > repack => after.min(k),
            _ => after,
        };
    }
    peak
}

/// The most entries a KV head holding `held` reaches over prefill passes of lengths `passes`
/// then `decode` one-token passes, when the policy caps every head at `cap` after each pass
/// (`None`: no cap). Saturates instead of overflowing.
fn peak_entries(held: usize, passes: &[usize], decode: usize, cap: Option<usize>) -> usize {
    let (mut held, mut peak) = (held, held);
    for &n in passes {
        let after = held.saturating_add(n);
        peak = peak.max(after);
        held = cap.map_or(after, |k| after.min(k));
    }
    if decode > 0 {
        let after = held.saturating_add(decode);
        peak = peak.max(match cap {
            // Grows to the cap, then every pass holds one entry above it until evicting.
            Some(k) if after > k => held.max(k).saturating_add(1),
            _ => after,
        });
    }
    peak
}

/// Feeds `tokens` (at least one) after the `seen` tokens through the model of `engine`, chunked
/// and announced to `hook` exactly as a session's prefill of `kind` is; each chunk joins `seen`
/// once it went through. Returns the last token's logits. For a store and hook that are not a
/// session's ([`crate::SharedContext`]).
pub(crate) fn run_prefill(
    engine: &Engine,
    kv: &mut SequenceKv,
    hook: &mut dyn LayerHook,
    seen: &mut Vec<u32>,
    tokens: &[u32],
    kind: PrefillKind,
) -> Result<Vec<f32>> {
    let mut plan = PrefillPlan::new(tokens.to_vec(), kind, engine.config().prefill_chunk);
    let mut logits = Vec::new();
    while let Some((chunk, pass)) = plan.next_chunk() {
        hook.begin_pass(pass);
        logits = engine
            .model()
            .forward(chunk, seen.len() as u32, kv, hook, LogitsFor::Last)?
            .to_vec1::<f32>()
            .map_err(model_zoo::ModelError::from)?;
        seen.extend_from_slice(chunk);
        plan.advance();
    }
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use super::PrefillPlan;
    use model_zoo::{Pass, PrefillKind};

    #[test]
    fn a_plan_covers_everything_in_order_in_announced_chunks() {
        for n in 0..70usize {
            for chunk in [1, 4, 16] {
                let run: Vec<u32> = (0..n as u32).collect();
                let mut plan = PrefillPlan::new(run.clone(), PrefillKind::Continuation, chunk);
                let mut fed = Vec::new();
                while let Some((tokens, pass)) = plan.next_chunk() {
                    let Pass::Prefill(c) = pass else {
                        panic!("a prefill announced {pass:?}")
                    };
                    assert_eq!(
                        (c.start, c.len, c.kind),
                        (fed.len(), n, PrefillKind::Continuation)
                    );
                    assert_eq!(c.end - c.start, tokens.len());
                    assert!(!tokens.is_empty() && tokens.len() <= chunk);
                    fed.extend_from_slice(tokens);
                    plan.advance();
                    assert_eq!(plan.unfed(), &run[fed.len()..]);
                }
                assert_eq!(fed, run);
                assert!(plan.unfed().is_empty());
            }
        }
    }
}
