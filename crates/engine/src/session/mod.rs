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

mod chat;
mod generation;
mod plan;

pub use generation::{FinishReason, GenerateRequest, Generation};
pub(crate) use plan::PrefillPlan;

use crate::decoding::{Decoding, Progress};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::policy::Policy;
use crate::report::KvReport;

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
