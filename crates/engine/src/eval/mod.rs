//! Evaluation: scoring [`Task`]s (from JSONL task files or the [`synthetic`] generators) on
//! sessions under eviction policies, with the kvpress protocol, with or without the model's chat
//! template, with 95% intervals ([`stats`]), and sweeping policies × eviction ratios
//! ([`sweep`]).
//!
//! Protocol (documented in `docs/eval.md`, kept in step with this code):
//! - A task's prompt is split in two: the *context*, prefilled first (with BOS) as
//!   [`PrefillKind::Context`] — what the policy compresses, once, at its end — and the
//!   *continuation*, prefilled after it as [`PrefillKind::Continuation`], which one-shot policies
//!   (SnapKV, PyramidKV, KNorm, NACL) keep whole (kvpress: compress the context, then feed the
//!   question). Continuous policies (random, streaming, H2O, TOVA) keep every head within its
//!   budget at every step, continuation included. With `query_aware` the two are prefilled as
//!   one context, so the policy sees the question before it evicts.
//! - Raw text: context = the task's context; continuation = `"\n" + question + answer_prefix`.
//!   With the chat template (`chat`, per task or per run), the user's message is
//!   `context + "\n" + question`, rendered with the generation prompt; the context part is the
//!   template's head plus the context, the continuation is `"\n" + question`, the end of the
//!   user turn, the assistant header and `answer_prefix` (leading whitespace dropped). A task
//!   without a context is all context (its question is what there is to compress).
//! - choice: each choice is scored after the prompt: the sum of its tokens' log-probabilities
//!   (log-softmax in f64) of `" " + choice` in raw text, of `choice` as the assistant's answer
//!   with the template (lm-eval-harness drops the space there). `acc` picks the largest sum,
//!   `acc_norm` the largest sum divided by the choice's length in characters (Unicode scalar
//!   values, the leading space not counted), as lm-eval-harness' `acc_norm` does. Ties go to the
//!   lowest index.
//! - generate: greedy, at most `tokens(answer) + answer_margin` tokens, stop at EOS; scored by
//!   [`MatchKind`] after [`task::normalize`].
//! - perplexity (raw text only): the text (with BOS) is split at `ppl_context`; the head is the
//!   context, the tail is scored teacher-forced in chunks of `ppl_chunk` tokens (continuations),
//!   both under the policy and under a full cache in lockstep: PPL = exp(mean NLL of the tail
//!   tokens), KL = mean over tail tokens of KL(full ‖ policy), accuracy = next-token top-1
//!   accuracy.
//! - KV figures (eviction ratio, bytes in use, bytes full) are read once the continuation is in
//!   the cache, before any answer token (perplexity: after the last chunk), and averaged over
//!   tasks.
//! - Speed without changing a result: with `shared_prefill` (the default) each task's context is
//!   prefilled once for every policy of the run that can share it ([`SharedContext`]: a
//!   full-cache prefill recording what the policies need, then a copy-on-write fork per policy
//!   and per choice); otherwise every policy (and every choice) prefills it again. Both give the
//!   same outcomes (tested).
//!
//! Invariants: a task either scores or the whole run fails with an error naming the task's
//! index and the policy; no task is skipped; every policy's session starts from a fresh
//! context.

mod score;
pub mod stats;
pub mod sweep;
pub mod synthetic;
pub mod task;

use std::collections::BTreeMap;

use model_zoo::{ChatMessage, PrefillKind};

use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::policy::Policy;
use crate::session::Session;
use crate::shared_context::SharedContext;

use score::score_task;
pub use score::{log_softmax, KvSnapshot};
pub use task::{load_task_lines, load_tasks, parse_tasks, MatchKind, Task};

/// Where a perplexity text's evicted head ends.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PplContext {
    /// This fraction of the text's tokens (rounded), in `(0, 1)`.
    Fraction(f64),
    /// This many tokens.
    Tokens(usize),
}

/// How tasks are run.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Where RoPE places the sessions' keys (shared contexts included; a full cache's cache
    /// positions are its token positions, so the full-cache reference is the same either way).
    pub positions: crate::Positions,
    /// Prefill the question with the context, before eviction.
    pub query_aware: bool,
    /// Render choice and generate tasks through the model's chat template (a task's own `chat`
    /// field overrides it).
    pub chat: bool,
    /// Generate tasks: tokens allowed beyond the reference answer's length.
    pub answer_margin: usize,
    /// Perplexity tasks: the evicted head.
    pub ppl_context: PplContext,
    /// Perplexity tasks: tokens scored per forward pass.
    pub ppl_chunk: usize,
    /// Prefill each task's context once for all the policies that can share it, forking the
    /// cache per policy and choice (same results as separate prefills, faster).
    pub shared_prefill: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            positions: crate::Positions::Original,
            query_aware: false,
            chat: false,
            answer_margin: 8,
            ppl_context: PplContext::Fraction(0.5),
            ppl_chunk: 256,
            shared_prefill: true,
        }
    }
}

/// The result of one task.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TaskOutcome {
    /// Position of the task in its list.
    pub index: usize,
    /// `choice`, `generate` or `perplexity`.
    pub kind: &'static str,
    /// Accuracy in `[0, 1]`: choice correct, match score, or next-token accuracy.
    pub score: f64,
    /// Choice tasks: correct under character-length normalisation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<f64>,
    /// Choice tasks: the log-likelihood of each choice.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loglikelihoods: Vec<f64>,
    /// Generate tasks: the generated text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Perplexity tasks: summed negative log-likelihood of the scored tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nll: Option<f64>,
    /// Perplexity tasks: summed KL(full ‖ policy) over the scored tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    /// Perplexity tasks: tokens scored.
    pub scored_tokens: usize,
    /// Prompt tokens (context + continuation, or the whole text).
    pub prompt_tokens: usize,
    /// Whether the task was rendered through the chat template.
    pub chat: bool,
    /// The cache when the answer was produced.
    pub kv: KvSnapshot,
    /// The task's `meta` labels (synthetic tasks: family, depth, …).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub meta: serde_json::Map<String, serde_json::Value>,
}

/// Figures for one task type; every interval is a 95% one ([`stats`]).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TypeSummary {
    /// Tasks of this type.
    pub n: usize,
    /// Mean score (see [`TaskOutcome::score`]; perplexity tasks: token-weighted).
    pub accuracy: f64,
    /// Interval of `accuracy`: Wilson for 0/1 scores, bootstrap over tasks (texts) otherwise.
    pub accuracy_ci95: [f64; 2],
    /// Choice: mean character-length-normalised accuracy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<f64>,
    /// Choice: Wilson interval of `acc_norm`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm_ci95: Option<[f64; 2]>,
    /// Perplexity: exp(total NLL / total scored tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    /// Perplexity: bootstrap interval over texts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity_ci95: Option<[f64; 2]>,
    /// Perplexity: mean KL(full ‖ policy) per scored token, in nats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
}

/// Aggregate figures of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalSummary {
    /// Tasks scored.
    pub n: usize,
    /// Mean score over choice and generate tasks; over perplexity tasks (next-token accuracy)
    /// when the run has no other kind.
    pub accuracy: f64,
    /// 95% interval of `accuracy` (Wilson for 0/1 scores, bootstrap over tasks otherwise).
    pub accuracy_ci95: [f64; 2],
    /// Mean eviction ratio over tasks.
    pub eviction_ratio: f64,
    /// Mean KV bytes in use over tasks (rounded).
    pub kv_bytes_in_use: usize,
    /// Mean full-cache KV bytes over tasks (rounded).
    pub kv_bytes_full: usize,
    /// Per task type.
    pub per_type: BTreeMap<String, TypeSummary>,
    /// Mean score per needle depth, for tasks whose `meta` has a numeric `depth` (synthetic
    /// tasks); keys are the depths as written (`"0.5"`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub by_depth: BTreeMap<String, f64>,
}

impl EvalSummary {
    /// Aggregates outcomes (at least one).
    pub fn from_outcomes(outcomes: &[TaskOutcome]) -> Result<Self> {
        if outcomes.is_empty() {
            return Err(EngineError::Unscored("no tasks were scored".into()));
        }
        let mean = |f: &dyn Fn(&TaskOutcome) -> f64, of: &[&TaskOutcome]| {
            of.iter().map(|o| f(o)).sum::<f64>() / of.len().max(1) as f64
        };
        let column = |f: &dyn Fn(&TaskOutcome) -> f64, of: &[&TaskOutcome]| -> Vec<f64> {
            of.iter().map(|o| f(o)).collect()
        };
        let mut per_type = BTreeMap::new();
        for kind in ["choice", "generate", "perplexity"] {
            let of: Vec<&TaskOutcome> = outcomes.iter().filter(|o| o.kind == kind).collect();
            if of.is_empty() {
                continue;
            }
            let tokens = column(&|o| o.scored_tokens as f64, &of);
            let total: f64 = tokens.iter().sum();
            let summary = if kind == "perplexity" {
                let correct = column(&|o| o.score * o.scored_tokens as f64, &of);
                let nll = column(&|o| o.nll.unwrap_or(0.0), &of);
                TypeSummary {
                    n: of.len(),
                    accuracy: correct.iter().sum::<f64>() / total.max(1.0),
                    accuracy_ci95: stats::ratio_interval(&correct, &tokens, |x| x),
                    perplexity: Some((nll.iter().sum::<f64>() / total.max(1.0)).exp()),
                    perplexity_ci95: Some(stats::ratio_interval(&nll, &tokens, f64::exp)),
                    kl: Some(of.iter().filter_map(|o| o.kl).sum::<f64>() / total.max(1.0)),
                    ..TypeSummary::default()
                }
            } else {
                let scores = column(&|o| o.score, &of);
                let choice = kind == "choice";
                let norm = column(&|o| o.acc_norm.unwrap_or(0.0), &of);
                TypeSummary {
                    n: of.len(),
                    accuracy: mean(&|o| o.score, &of),
                    accuracy_ci95: stats::mean_interval(&scores),
                    acc_norm: choice.then(|| mean(&|o| o.acc_norm.unwrap_or(0.0), &of)),
                    acc_norm_ci95: choice.then(|| stats::mean_interval(&norm)),
                    ..TypeSummary::default()
                }
            };
            per_type.insert(kind.to_string(), summary);
        }
        let graded: Vec<&TaskOutcome> =
            outcomes.iter().filter(|o| o.kind != "perplexity").collect();
        let (accuracy, accuracy_ci95) = if graded.is_empty() {
            per_type
                .get("perplexity")
                .map_or((0.0, [0.0, 0.0]), |t| (t.accuracy, t.accuracy_ci95))
        } else {
            (
                mean(&|o| o.score, &graded),
                stats::mean_interval(&column(&|o| o.score, &graded)),
            )
        };
        let all: Vec<&TaskOutcome> = outcomes.iter().collect();
        let mut depths: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for o in outcomes {
            if let Some(d) = o.meta.get("depth").and_then(serde_json::Value::as_f64) {
                let e = depths.entry(d.to_string()).or_default();
                e.0 += o.score;
                e.1 += 1;
            }
        }
        Ok(EvalSummary {
            by_depth: depths
                .into_iter()
                .map(|(d, (sum, n))| (d, sum / n as f64))
                .collect(),
            n: outcomes.len(),
            accuracy,
            accuracy_ci95,
            eviction_ratio: mean(&|o| o.kv.eviction_ratio, &all),
            kv_bytes_in_use: mean(&|o| o.kv.bytes_in_use as f64, &all).round() as usize,
            kv_bytes_full: mean(&|o| o.kv.bytes_full as f64, &all).round() as usize,
            per_type,
        })
    }
}

/// Runs every task under `policy`; `on_task` sees each outcome as it is produced and returns
/// false to stop early (the outcomes so far are returned).
pub fn run_tasks(
    engine: &Engine,
    policy: &Policy,
    tasks: &[Task],
    opts: &EvalOptions,
    on_task: &mut dyn FnMut(&TaskOutcome) -> bool,
) -> Result<Vec<TaskOutcome>> {
    let mut all = run_policies(
        engine,
        std::slice::from_ref(policy),
        tasks,
        opts,
        &mut |_, o| on_task(o),
    )?;
    Ok(all.pop().unwrap_or_default())
}

/// Runs every task under every policy, task by task (all policies of a task, then the next
/// task), prefilling each task's context once for the policies that can share it when
/// `opts.shared_prefill` is set. Returns one outcome list per policy, in `policies` order;
/// `on_task(policy_index, outcome)` sees each outcome as it is produced and returns false to
/// stop early (the outcomes so far are returned).
pub fn run_policies(
    engine: &Engine,
    policies: &[Policy],
    tasks: &[Task],
    opts: &EvalOptions,
    on_task: &mut dyn FnMut(usize, &TaskOutcome) -> bool,
) -> Result<Vec<Vec<TaskOutcome>>> {
    if opts.ppl_chunk == 0 {
        return Err(EngineError::Setting {
            setting: "EvalOptions.ppl_chunk",
            problem: "must be at least 1".into(),
        });
    }
    if let PplContext::Fraction(f) = opts.ppl_context {
        if !(f > 0.0 && f < 1.0) {
            return Err(EngineError::Setting {
                setting: "EvalOptions.ppl_context",
                problem: format!("fraction {f} is outside (0, 1)"),
            });
        }
    }
    for p in policies {
        p.validate(engine.model_config())?;
    }
    let sharing: Vec<Policy> = policies
        .iter()
        .filter(|p| opts.shared_prefill && p.shares_context())
        .cloned()
        .collect();
    // Every task is tokenized and checked against the context before any work starts.
    let context = engine.model_config().max_position;
    let prompts = tasks
        .iter()
        .enumerate()
        .map(|(index, task)| {
            let prompt = TaskPrompt::new(engine, task, opts)
                .map_err(|e| task_error(index, task, None, e))?;
            let new = prompt.prompt_tokens();
            if new > context {
                let e = EngineError::ContextOverflow {
                    new,
                    seen: 0,
                    context,
                };
                return Err(task_error(index, task, None, e));
            }
            Ok(prompt)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut out = vec![Vec::with_capacity(tasks.len()); policies.len()];
    for (index, (task, prompt)) in tasks.iter().zip(&prompts).enumerate() {
        let failed = |policy: Option<&Policy>, e| task_error(index, task, policy, e);
        let shared = if sharing.is_empty() {
            None
        } else {
            Some(
                SharedContext::prefill_in(engine, &prompt.context, &sharing, opts.positions)
                    .map_err(|e| failed(None, e))?,
            )
        };
        for (pi, policy) in policies.iter().enumerate() {
            let start = match &shared {
                Some(ctx) if policy.shares_context() => Start::Shared(ctx),
                _ => Start::Fresh(opts.positions),
            };
            let outcome = score_task(engine, policy, task, prompt, &start, opts)
                .map_err(|e| failed(Some(policy), e))?;
            let outcome = TaskOutcome { index, ..outcome };
            let go_on = on_task(pi, &outcome);
            out[pi].push(outcome);
            if !go_on {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

/// An error of task `index` (under `policy`, if one), saying which task it is.
fn task_error(index: usize, task: &Task, policy: Option<&Policy>, e: EngineError) -> EngineError {
    EngineError::Task {
        number: index + 1,
        kind: task.kind(),
        policy: policy.map(Policy::kind),
        source: Box::new(e),
    }
}

/// A task's prompt as token ids: the context the policy compresses and the continuation fed
/// after it (see the module's protocol), plus what is scored after them.
struct TaskPrompt {
    context: Vec<u32>,
    continuation: Vec<u32>,
    chat: bool,
    /// Choice tasks: each choice's tokens.
    choices: Vec<Vec<u32>>,
    /// Perplexity tasks: the whole text's tokens (the context is its head).
    text: Vec<u32>,
}

impl TaskPrompt {
    fn new(engine: &Engine, task: &Task, opts: &EvalOptions) -> Result<Self> {
        let tok = engine.tokenizer();
        let chat = match task {
            Task::Choice { chat, .. } | Task::Generate { chat, .. } => chat.unwrap_or(opts.chat),
            Task::Perplexity { .. } => false,
        };
        let (context, question, answer_prefix) = match task {
            Task::Choice {
                context, question, ..
            } => (context.as_str(), question.as_str(), ""),
            Task::Generate {
                context,
                question,
                answer_prefix,
                ..
            } => (context.as_str(), question.as_str(), answer_prefix.as_str()),
            Task::Perplexity { text } => return Self::perplexity(engine, text, opts),
        };
        let (head, tail, bos) = if chat {
            chat_split(engine, context, question, answer_prefix)?
        } else if context.is_empty() {
            (format!("{question}{answer_prefix}"), String::new(), true)
        } else if question.is_empty() && answer_prefix.is_empty() {
            (context.to_string(), String::new(), true)
        } else {
            (
                context.to_string(),
                format!("\n{question}{answer_prefix}"),
                true,
            )
        };
        let mut context_ids = tok.encode(&head, bos)?;
        let mut continuation = if tail.is_empty() {
            Vec::new()
        } else {
            tok.encode(&tail, false)?
        };
        if opts.query_aware || context_ids.is_empty() {
            context_ids.append(&mut continuation);
        }
        if context_ids.is_empty() {
            return Err(EngineError::Unscored(
                "the prompt tokenizes to nothing".into(),
            ));
        }
        let choices = match task {
            Task::Choice { choices, .. } => choice_ids(engine, choices, chat)?,
            _ => Vec::new(),
        };
        Ok(TaskPrompt {
            context: context_ids,
            continuation,
            chat,
            choices,
            text: Vec::new(),
        })
    }

    /// A perplexity task's prompt: the whole text, its head (`opts.ppl_context`) the context.
    fn perplexity(engine: &Engine, text: &str, opts: &EvalOptions) -> Result<Self> {
        let ids = engine.tokenizer().encode(text, true)?;
        let n = ids.len();
        if n < 2 {
            return Err(EngineError::Unscored(format!(
                "the text has {n} token(s); perplexity needs at least 2"
            )));
        }
        let head = match opts.ppl_context {
            PplContext::Fraction(f) => (f * n as f64).round() as usize,
            PplContext::Tokens(t) if t >= n => {
                return Err(EngineError::Unscored(format!(
                    "a context of {t} tokens leaves nothing to score: the text has {n} tokens \
                     (give the context as a fraction, or fewer tokens)"
                )))
            }
            PplContext::Tokens(t) => t,
        }
        .clamp(1, n - 1);
        Ok(TaskPrompt {
            context: ids[..head].to_vec(),
            continuation: Vec::new(),
            chat: false,
            choices: Vec::new(),
            text: ids,
        })
    }

    fn prompt_tokens(&self) -> usize {
        if self.text.is_empty() {
            self.context.len() + self.continuation.len()
        } else {
            self.text.len()
        }
    }
}

/// Each choice's tokens as scored after the prompt (none may be empty).
fn choice_ids(engine: &Engine, choices: &[String], chat: bool) -> Result<Vec<Vec<u32>>> {
    choices
        .iter()
        .map(|c| {
            // lm-eval-harness: a space before the choice in raw text, none after the chat
            // template's assistant header.
            let text = if chat { c.clone() } else { format!(" {c}") };
            let ids = engine.tokenizer().encode(&text, false)?;
            if ids.is_empty() {
                return Err(EngineError::Unscored(format!(
                    "choice `{c}` tokenizes to nothing"
                )));
            }
            Ok(ids)
        })
        .collect()
}

/// The chat-templated prompt split into (template head + context, the rest + answer prefix,
/// whether to add BOS): the user's message is `context + "\n" + question`.
fn chat_split(
    engine: &Engine,
    context: &str,
    question: &str,
    answer_prefix: &str,
) -> Result<(String, String, bool)> {
    let tok = engine.tokenizer();
    let user = match (context.is_empty(), question.is_empty()) {
        (false, false) => format!("{context}\n{question}"),
        (true, _) => question.to_string(),
        (false, true) => context.to_string(),
    };
    let rendered = tok.apply_chat_template(&[ChatMessage::new("user", &user)], true)?;
    let at = rendered.rfind(&user).ok_or_else(|| {
        EngineError::Unscored(
            "the chat template changed the user's message; cannot tell its context from its question"
                .into(),
        )
    })?;
    let split = if context.is_empty() {
        at
    } else {
        at + context.len()
    };
    let tail = format!("{}{}", &rendered[split..], answer_prefix.trim_start());
    // Templates that write the BOS token themselves must not get a second one.
    let bos_text = tok
        .bos_id()
        .and_then(|id| tok.inner().id_to_token(id))
        .unwrap_or_default();
    let bos = bos_text.is_empty() || !rendered.starts_with(&bos_text);
    Ok((rendered[..split].to_string(), tail, bos))
}

/// Where a policy's session for a task starts.
enum Start<'a> {
    /// A fresh session (with these positions) prefills the context itself.
    Fresh(crate::Positions),
    /// A fork of the context prefilled once for every policy.
    Shared(&'a SharedContext),
}

impl Start<'_> {
    /// A session under `policy` that has just prefilled `context`, then `continuation`.
    fn session(
        &self,
        engine: &Engine,
        policy: &Policy,
        context: &[u32],
        continuation: &[u32],
    ) -> Result<Session> {
        let mut session = match self {
            Start::Fresh(positions) => {
                let mut s = engine.session_with(policy.clone())?;
                s.set_positions(*positions)?;
                s.prefill(context)?;
                s
            }
            Start::Shared(shared) => shared.session(policy)?,
        };
        if !continuation.is_empty() {
            session.prefill_as(continuation, PrefillKind::Continuation)?;
        }
        Ok(session)
    }
}

/// Tokens the chat template adds around a user message (its markers, default system prompt and
/// generation prompt), beyond the BOS a raw prompt has too: what `--chat` costs a synthetic
/// task's length budget.
pub fn chat_template_overhead(engine: &Engine) -> Result<usize> {
    let (head, tail, bos) = chat_split(engine, "", "x", "")?;
    let tok = engine.tokenizer();
    let rendered = tok.encode(&format!("{head}{tail}"), bos)?.len();
    Ok(rendered.saturating_sub(tok.encode("x", false)?.len() + usize::from(tok.adds_bos())))
}
