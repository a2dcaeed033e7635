//! `Session`: one conversation — its KV cache, its eviction policy, every token it has seen, and
//! its chat transcript. Prefill, decode and chat turns all append to the same cache, so a second
//! chat turn feeds only its new tokens.
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
//! a prefill is fed in chunks of at most the engine's prefill chunk by [`run_prefill`], the one
//! chunking every path shares (so a [`crate::SharedContext`] prefills exactly like a session).

use std::time::Instant;

use candle_core::Tensor;
use kv_store::SequenceKv;
use model_zoo::{ChatMessage, LayerHook, LogitsFor, Pass, PrefillChunk, PrefillKind};

use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::policy::Policy;
use crate::report::KvReport;
use crate::sampling::{Sampler, SamplingParams};
use crate::text::{Detokenizer, StopMatcher};

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

/// One conversation over an [`Engine`].
pub struct Session {
    engine: Engine,
    kv: SequenceKv,
    policy: Policy,
    hook: Box<dyn LayerHook + Send>,
    seen: Vec<u32>,
    pending: Option<u32>,
    logits: Option<Vec<f32>>,
    messages: Vec<ChatMessage>,
    transcript: String,
    system: Option<String>,
}

impl Session {
    pub(crate) fn new(engine: Engine, policy: Policy) -> Result<Self> {
        let cfg = engine.model_config();
        let kv = SequenceKv::new(engine.pool(), cfg.n_layers, cfg.n_kv_heads);
        let hook = policy.hook(cfg)?;
        Ok(Self::resumed(engine, policy, hook, kv, Vec::new(), None))
    }

    /// A session in a given state: `kv` holds exactly `seen`, `hook` is the policy's hook in the
    /// state it reached feeding them, `logits` follow the last of them.
    pub(crate) fn resumed(
        engine: Engine,
        policy: Policy,
        hook: Box<dyn LayerHook + Send>,
        kv: SequenceKv,
        seen: Vec<u32>,
        logits: Option<Vec<f32>>,
    ) -> Self {
        Session {
            engine,
            kv,
            policy,
            hook,
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
    /// policy compresses the cache at its end. Returns seconds spent.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<f64> {
        self.prefill_as(tokens, PrefillKind::Context)
    }

    /// Runs `tokens` through the model after everything seen so far, as `kind`: context (one-shot
    /// policies compress the cache at its end) or a continuation of a compressed context (they
    /// keep it). A sampled token not yet fed goes first. Returns seconds spent.
    pub fn prefill_as(&mut self, tokens: &[u32], kind: PrefillKind) -> Result<f64> {
        let started = Instant::now();
        let mut run: Vec<u32> = self.pending.take().into_iter().collect();
        run.extend_from_slice(tokens);
        if run.is_empty() {
            return Ok(0.0);
        }
        if let Err(e) = self.check_context(run.len()) {
            // Put a pending token back: it is still part of the conversation.
            if run.len() > tokens.len() {
                self.pending = Some(run[0]);
            }
            return Err(e);
        }
        let logits = run_prefill(
            &self.engine,
            &mut self.kv,
            self.hook.as_mut(),
            &mut self.seen,
            &run,
            kind,
        )?;
        self.logits = Some(logits);
        Ok(started.elapsed().as_secs_f64())
    }

    /// Logits of every token of `tokens` fed after the session's history (`[n, vocab]`), for
    /// scoring (perplexity, multiple choice). The tokens join the session in one forward pass,
    /// as a continuation ([`PrefillKind::Continuation`]): one-shot policies keep them.
    pub fn prefill_all_logits(&mut self, tokens: &[u32]) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(EngineError::Invalid(
                "nothing to score: empty token list".into(),
            ));
        }
        self.feed_pending()?;
        self.check_context(tokens.len())?;
        let chunk = PrefillChunk {
            start: 0,
            end: tokens.len(),
            len: tokens.len(),
            kind: PrefillKind::Continuation,
        };
        let logits = self.pass(tokens, Pass::Prefill(chunk), LogitsFor::All)?;
        let last = logits
            .get(tokens.len() - 1)
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(model_zoo::ModelError::from)?;
        self.logits = Some(last);
        Ok(logits)
    }

    /// Feeds a sampled token not yet fed, as a continuation (generated tokens are never context).
    fn feed_pending(&mut self) -> Result<()> {
        if self.pending.is_some() {
            self.prefill_as(&[], PrefillKind::Continuation)?;
        }
        Ok(())
    }

    /// Fails if `new` more tokens would not fit in the model's context.
    fn check_context(&self, new: usize) -> Result<()> {
        let context = self.engine.model_config().max_position;
        if self.seen.len() + new > context {
            return Err(EngineError::ContextOverflow {
                new,
                seen: self.seen.len(),
                context,
            });
        }
        Ok(())
    }

    /// One forward pass of `tokens` after the history, announced to the policy as `pass`.
    fn pass(&mut self, tokens: &[u32], pass: Pass, logits_for: LogitsFor) -> Result<Tensor> {
        self.hook.begin_pass(pass);
        let logits = self.engine.model().forward(
            tokens,
            self.seen.len() as u32,
            &mut self.kv,
            self.hook.as_mut(),
            logits_for,
        )?;
        self.seen.extend_from_slice(tokens);
        Ok(logits)
    }

    /// Tokenizes and prefills raw text (no chat template), then generates.
    pub fn complete(
        &mut self,
        prompt: &str,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        let tokens = self
            .engine
            .tokenizer()
            .encode(prompt, self.seen.is_empty())?;
        self.generate_after(&tokens, request, on_text)
    }

    /// One chat turn: the user's message is rendered with the model's chat template and only
    /// the part not yet in the cache is prefilled; the answer is generated and recorded.
    pub fn chat(
        &mut self,
        user_message: &str,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        if user_message.trim().is_empty() {
            return Err(EngineError::Invalid("the message is empty".into()));
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
        let delta = match rendered.strip_prefix(self.transcript.as_str()) {
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
        let generation = self.generate_after(&tokens, request, on_text)?;
        let answer = self.engine.tokenizer().decode(&generation.tokens)?;
        self.transcript = rendered + &answer;
        self.messages.push(ChatMessage::new("user", user_message));
        self.messages.push(ChatMessage::new("assistant", &answer));
        Ok(generation)
    }

    /// Prefills token ids (no text involved), then generates: the benchmark's entry point.
    pub fn generate_from_tokens(
        &mut self,
        prompt: &[u32],
        request: &GenerateRequest,
    ) -> Result<Generation> {
        self.generate_after(prompt, request, &mut |_| true)
    }

    fn generate_after(
        &mut self,
        prompt: &[u32],
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        request.sampling.validate().map_err(EngineError::Invalid)?;
        let prefill_secs = self.prefill(prompt)?;
        let mut generation = self.generate(request, on_text)?;
        generation.prompt_tokens = prompt.len();
        generation.prefill_secs = prefill_secs;
        generation.time_to_first_token_secs += prefill_secs;
        Ok(generation)
    }

    /// Generates from the current state (after a prefill). `on_text` receives text as it is
    /// produced and returns false to stop.
    pub fn generate(
        &mut self,
        request: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        request.sampling.validate().map_err(EngineError::Invalid)?;
        self.feed_pending()?;
        let engine = self.engine.clone();
        let tokenizer = engine.tokenizer();
        let eos = tokenizer.eos_ids();
        let context = engine.model_config().max_position;
        let mut sampler = Sampler::new(request.sampling.clone());
        let mut detok = Detokenizer::new(tokenizer);
        let mut stops = StopMatcher::new(&request.stop);
        let (mut text, mut tokens) = (String::new(), Vec::new());
        let started = Instant::now();
        let mut first_token_secs = None;
        let mut decode_steps = 0;
        let mut finish = FinishReason::Length;
        while tokens.len() < request.max_tokens {
            if self.seen.len() >= context {
                finish = FinishReason::ContextFull;
                break;
            }
            let logits = match (self.logits.take(), self.pending.take()) {
                (Some(l), _) => l,
                (None, None) => {
                    return Err(EngineError::Invalid(
                        "nothing to continue from: prefill a prompt first".into(),
                    ))
                }
                (None, Some(next)) => {
                    decode_steps += 1;
                    let logits = self.pass(&[next], Pass::Decode, LogitsFor::Last)?;
                    logits
                        .to_vec1::<f32>()
                        .map_err(model_zoo::ModelError::from)?
                }
            };
            let recent_from = self
                .seen
                .len()
                .saturating_sub(request.sampling.repeat_last_n);
            let token = sampler.sample(&logits, &self.seen[recent_from..]);
            first_token_secs.get_or_insert(started.elapsed().as_secs_f64());
            if request.stop_at_eos && eos.contains(&token) {
                self.logits = Some(logits);
                finish = FinishReason::Eos;
                break;
            }
            tokens.push(token);
            self.pending = Some(token);
            if let Some(chunk) = detok.push(token)? {
                let (out, hit) = stops.push(&chunk);
                text.push_str(&out);
                let keep_going = out.is_empty() || on_text(&out);
                if hit {
                    finish = FinishReason::Stop;
                    break;
                }
                if !keep_going {
                    finish = FinishReason::Cancelled;
                    break;
                }
            }
        }
        if finish != FinishReason::Stop {
            let mut tail = detok
                .finish()?
                .map(|c| stops.push(&c).0)
                .unwrap_or_default();
            tail.push_str(&stops.flush());
            if !tail.is_empty() {
                on_text(&tail);
                text.push_str(&tail);
            }
        }
        Ok(Generation {
            text,
            tokens,
            prompt_tokens: 0,
            finish_reason: finish,
            prefill_secs: 0.0,
            time_to_first_token_secs: first_token_secs.unwrap_or(0.0),
            decode_secs: started.elapsed().as_secs_f64(),
            decode_steps,
        })
    }

    /// Tokens seen vs. retained per layer and head, and KV memory in use.
    pub fn kv_report(&self) -> KvReport {
        KvReport::new(&self.kv, self.seen.len())
    }

    /// Next-token logits after the last fed token (`None` before any prefill, or while a
    /// sampled token waits to be fed).
    pub fn last_logits(&self) -> Option<&[f32]> {
        self.logits.as_deref()
    }

    /// The session's KV store (read-only).
    pub fn kv(&self) -> &SequenceKv {
        &self.kv
    }
}

/// Feeds `tokens` (at least one) after the `seen` tokens through the model in chunks of at most
/// the engine's prefill chunk, announcing each chunk to `hook` as part of one prefill of `kind`;
/// each chunk joins `seen` once it went through. Returns the last token's logits. The one
/// chunking of every prefill path.
pub(crate) fn run_prefill(
    engine: &Engine,
    kv: &mut SequenceKv,
    hook: &mut dyn LayerHook,
    seen: &mut Vec<u32>,
    tokens: &[u32],
    kind: PrefillKind,
) -> Result<Vec<f32>> {
    let len = tokens.len();
    let step = engine.config().prefill_chunk.max(1);
    let mut logits = Vec::new();
    for start in (0..len).step_by(step) {
        let end = (start + step).min(len);
        hook.begin_pass(Pass::Prefill(PrefillChunk {
            start,
            end,
            len,
            kind,
        }));
        logits = engine
            .model()
            .forward(
                &tokens[start..end],
                seen.len() as u32,
                kv,
                hook,
                LogitsFor::Last,
            )?
            .to_vec1::<f32>()
            .map_err(model_zoo::ModelError::from)?;
        seen.extend_from_slice(&tokens[start..end]);
    }
    Ok(logits)
}
