//! Evaluation: scoring [`Task`]s (from JSONL task files or the [`synthetic`] generators) on a
//! session under an eviction policy, with the kvpress protocol, and sweeping policies × eviction
//! ratios ([`sweep`]).
//!
//! Protocol (documented in `docs/eval.md`, kept in step with this code):
//! - The *context* is prefilled first (with BOS) and is what the policy evicts; the *question*
//!   (`"\n" + question` when both are non-empty) is prefilled after it, so one-shot policies,
//!   which evict at the end of a prefill, never drop it. With `query_aware` the two are
//!   prefilled as one run, so the policy sees the question before it evicts.
//! - choice: for each choice, the session restarts, context and question are prefilled, and
//!   `" " + choice` is scored: the sum of its tokens' log-probabilities (log-softmax in f64).
//!   `acc` picks the largest sum, `acc_norm` the largest sum divided by the choice's length in
//!   characters (Unicode scalar values, the leading space not counted), as lm-eval-harness'
//!   `acc_norm` does (`len(choice)` of the Python string). Ties go to the lowest index.
//! - generate: greedy, at most `tokens(answer) + answer_margin` tokens, stop at EOS; scored by
//!   [`MatchKind`] after [`task::normalize`].
//! - perplexity: the text (with BOS) is split at `ppl_context`; the head is prefilled (and
//!   evicted), the tail is scored teacher-forced in chunks of `ppl_chunk` tokens, both under
//!   the policy and under a full cache in lockstep: PPL = exp(mean NLL of the tail tokens), KL =
//!   mean over tail tokens of KL(full ‖ policy), accuracy = next-token top-1 accuracy.
//! - KV figures (eviction ratio, bytes in use, bytes full) are read once the question is in the
//!   cache, before any answer token (perplexity: after the last chunk), and averaged over tasks.
//!
//! Invariants: a task either scores or the whole run fails with an error naming the task's
//! index; no task is skipped; the session is cleared before every task (and every choice).

pub mod sweep;
pub mod synthetic;
pub mod task;

use std::collections::BTreeMap;

use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::policy::Policy;
use crate::report::KvReport;
use crate::session::{GenerateRequest, Session};
use crate::SamplingParams;

pub use task::{load_tasks, parse_tasks, MatchKind, Task};

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
    /// Where RoPE places the policy session's keys (the full-cache reference of perplexity
    /// tasks keeps original positions).
    pub positions: crate::Positions,
    /// Prefill the question with the context, before eviction.
    pub query_aware: bool,
    /// Generate tasks: tokens allowed beyond the reference answer's length.
    pub answer_margin: usize,
    /// Perplexity tasks: the evicted head.
    pub ppl_context: PplContext,
    /// Perplexity tasks: tokens scored per forward pass.
    pub ppl_chunk: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            positions: crate::Positions::Original,
            query_aware: false,
            answer_margin: 8,
            ppl_context: PplContext::Fraction(0.5),
            ppl_chunk: 256,
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
    /// Prompt tokens (context + question, or the whole text).
    pub prompt_tokens: usize,
    /// The cache when the answer was produced.
    pub kv: KvSnapshot,
    /// The task's `meta` labels (synthetic tasks: family, depth, …).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub meta: serde_json::Map<String, serde_json::Value>,
}

/// The KV figures of one task.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct KvSnapshot {
    /// Fraction of (token, layer, head) entries evicted.
    pub eviction_ratio: f64,
    /// Bytes the session's blocks hold.
    pub bytes_in_use: usize,
    /// Bytes a full cache would hold.
    pub bytes_full: usize,
}

impl From<&KvReport> for KvSnapshot {
    fn from(r: &KvReport) -> Self {
        KvSnapshot {
            eviction_ratio: r.eviction_ratio,
            bytes_in_use: r.bytes_in_use,
            bytes_full: r.bytes_full,
        }
    }
}

/// Figures for one task type.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct TypeSummary {
    /// Tasks of this type.
    pub n: usize,
    /// Mean score (see [`TaskOutcome::score`]).
    pub accuracy: f64,
    /// Choice: mean character-length-normalised accuracy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<f64>,
    /// Perplexity: exp(total NLL / total scored tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
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
            return Err(EngineError::Invalid("no tasks were scored".into()));
        }
        let mean = |f: &dyn Fn(&TaskOutcome) -> f64, of: &[&TaskOutcome]| {
            of.iter().map(|o| f(o)).sum::<f64>() / of.len().max(1) as f64
        };
        let mut per_type = BTreeMap::new();
        for kind in ["choice", "generate", "perplexity"] {
            let of: Vec<&TaskOutcome> = outcomes.iter().filter(|o| o.kind == kind).collect();
            if of.is_empty() {
                continue;
            }
            let tokens: usize = of.iter().map(|o| o.scored_tokens).sum();
            let ppl = kind == "perplexity";
            per_type.insert(
                kind.to_string(),
                TypeSummary {
                    n: of.len(),
                    accuracy: if ppl {
                        of.iter()
                            .map(|o| o.score * o.scored_tokens as f64)
                            .sum::<f64>()
                            / tokens.max(1) as f64
                    } else {
                        mean(&|o| o.score, &of)
                    },
                    acc_norm: (kind == "choice").then(|| mean(&|o| o.acc_norm.unwrap_or(0.0), &of)),
                    perplexity: ppl.then(|| {
                        (of.iter().filter_map(|o| o.nll).sum::<f64>() / tokens.max(1) as f64).exp()
                    }),
                    kl: ppl.then(|| {
                        of.iter().filter_map(|o| o.kl).sum::<f64>() / tokens.max(1) as f64
                    }),
                },
            );
        }
        let graded: Vec<&TaskOutcome> =
            outcomes.iter().filter(|o| o.kind != "perplexity").collect();
        let accuracy = if graded.is_empty() {
            per_type.get("perplexity").map_or(0.0, |t| t.accuracy)
        } else {
            mean(&|o| o.score, &graded)
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
    if opts.ppl_chunk == 0 {
        return Err(EngineError::Invalid(
            "--ppl-chunk: must be at least 1".into(),
        ));
    }
    if let PplContext::Fraction(f) = opts.ppl_context {
        if !(f > 0.0 && f < 1.0) {
            return Err(EngineError::Invalid(format!(
                "--ppl-context: fraction {f} is outside (0, 1)"
            )));
        }
    }
    let mut session = engine.session_with(policy.clone())?;
    session.set_positions(opts.positions)?;
    let mut full = None;
    let mut out = Vec::with_capacity(tasks.len());
    for (index, task) in tasks.iter().enumerate() {
        let outcome = match task {
            Task::Choice {
                context,
                question,
                choices,
                answer,
            } => score_choice(&mut session, context, question, choices, *answer, opts),
            Task::Generate {
                context,
                question,
                answer,
                match_kind,
                meta,
            } => score_generate(&mut session, context, question, answer, *match_kind, opts).map(
                |mut o| {
                    o.meta = meta.clone();
                    o
                },
            ),
            Task::Perplexity { text } => {
                let full = match &mut full {
                    Some(f) => f,
                    None => full.insert(engine.session_with(Policy::Full)?),
                };
                score_perplexity(
                    &mut session,
                    full,
                    text,
                    opts,
                    matches!(policy, Policy::Full),
                )
            }
        }
        .map_err(|e| EngineError::Invalid(format!("task {} ({}): {e}", index + 1, task.kind())))?;
        let outcome = TaskOutcome { index, ..outcome };
        let go_on = on_task(&outcome);
        out.push(outcome);
        if !go_on {
            break;
        }
    }
    Ok(out)
}

/// Token ids of the evicted lead and of the question run after it (empty with `query_aware`,
/// which joins the two token lists, so both modes feed the same tokens).
fn prompt_ids(
    engine: &Engine,
    context: &str,
    question: &str,
    query_aware: bool,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let tok = engine.tokenizer();
    if context.is_empty() {
        return Ok((tok.encode(question, true)?, Vec::new()));
    }
    let mut lead = tok.encode(context, true)?;
    let q = if question.is_empty() {
        Vec::new()
    } else {
        tok.encode(&format!("\n{question}"), false)?
    };
    if query_aware {
        lead.extend(q);
        return Ok((lead, Vec::new()));
    }
    Ok((lead, q))
}

/// Clears the session and prefills the lead, then the question; returns prompt tokens.
fn prefill_prompt(session: &mut Session, lead: &[u32], question: &[u32]) -> Result<usize> {
    if lead.is_empty() {
        return Err(EngineError::Invalid(
            "the prompt tokenizes to nothing".into(),
        ));
    }
    session.clear()?;
    session.prefill(lead)?;
    if !question.is_empty() {
        session.prefill(question)?;
    }
    Ok(lead.len() + question.len())
}

fn blank(kind: &'static str, prompt_tokens: usize, kv: KvSnapshot) -> TaskOutcome {
    TaskOutcome {
        index: 0,
        kind,
        score: 0.0,
        acc_norm: None,
        loglikelihoods: Vec::new(),
        output: None,
        nll: None,
        kl: None,
        scored_tokens: 0,
        prompt_tokens,
        kv,
        meta: serde_json::Map::new(),
    }
}

/// log-softmax of `logits` in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

fn rows(t: &candle_core::Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_vec2::<f32>().map_err(model_zoo::ModelError::from)?)
}

fn last_logits(session: &Session) -> Result<Vec<f32>> {
    session
        .last_logits()
        .map(<[f32]>::to_vec)
        .ok_or_else(|| EngineError::Invalid("no logits after the prompt".into()))
}

fn first_max(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

fn score_choice(
    session: &mut Session,
    context: &str,
    question: &str,
    choices: &[String],
    answer: usize,
    opts: &EvalOptions,
) -> Result<TaskOutcome> {
    let engine = session.engine().clone();
    let (lead, q) = prompt_ids(&engine, context, question, opts.query_aware)?;
    let mut lls = Vec::with_capacity(choices.len());
    let mut kv = None;
    let mut prompt_tokens = 0;
    for choice in choices {
        let ids = engine.tokenizer().encode(&format!(" {choice}"), false)?;
        if ids.is_empty() {
            return Err(EngineError::Invalid(format!(
                "choice `{choice}` tokenizes to nothing"
            )));
        }
        prompt_tokens = prefill_prompt(session, &lead, &q)?;
        kv.get_or_insert_with(|| KvSnapshot::from(&session.kv_report()));
        let mut ll = log_softmax(&last_logits(session)?)[ids[0] as usize];
        if ids.len() > 1 {
            let logits = rows(&session.prefill_all_logits(&ids[..ids.len() - 1])?)?;
            for (row, &next) in logits.iter().zip(&ids[1..]) {
                ll += log_softmax(row)[next as usize];
            }
        }
        lls.push(ll);
    }
    let normed: Vec<f64> = lls
        .iter()
        .zip(choices)
        .map(|(ll, c)| ll / c.chars().count().max(1) as f64)
        .collect();
    let mut o = blank("choice", prompt_tokens, kv.unwrap_or_default());
    o.score = f64::from(u8::from(first_max(&lls) == answer));
    o.acc_norm = Some(f64::from(u8::from(first_max(&normed) == answer)));
    o.loglikelihoods = lls;
    Ok(o)
}

fn score_generate(
    session: &mut Session,
    context: &str,
    question: &str,
    answer: &str,
    match_kind: MatchKind,
    opts: &EvalOptions,
) -> Result<TaskOutcome> {
    let engine = session.engine().clone();
    let (lead, q) = prompt_ids(&engine, context, question, opts.query_aware)?;
    let prompt_tokens = prefill_prompt(session, &lead, &q)?;
    let kv = KvSnapshot::from(&session.kv_report());
    let request = GenerateRequest {
        max_tokens: engine
            .tokenizer()
            .encode(answer, false)?
            .len()
            .saturating_add(opts.answer_margin),
        sampling: SamplingParams::default(),
        stop: Vec::new(),
        stop_at_eos: true,
    };
    let generation = session.generate(&request, &mut |_| true)?;
    let mut o = blank("generate", prompt_tokens, kv);
    o.score = match_kind.score(&generation.text, answer);
    o.output = Some(generation.text);
    Ok(o)
}

fn score_perplexity(
    session: &mut Session,
    full: &mut Session,
    text: &str,
    opts: &EvalOptions,
    policy_is_full: bool,
) -> Result<TaskOutcome> {
    let ids = session.engine().tokenizer().encode(text, true)?;
    let n = ids.len();
    if n < 2 {
        return Err(EngineError::Invalid(format!(
            "the text has {n} token(s); perplexity needs at least 2"
        )));
    }
    let head = match opts.ppl_context {
        PplContext::Fraction(f) => (f * n as f64).round() as usize,
        PplContext::Tokens(t) => t,
    }
    .clamp(1, n - 1);
    let sessions: Vec<&mut Session> = if policy_is_full {
        vec![session]
    } else {
        vec![session, full]
    };
    let mut sessions = sessions;
    let mut firsts = Vec::new();
    for s in sessions.iter_mut() {
        s.clear()?;
        s.prefill(&ids[..head])?;
        firsts.push(last_logits(s)?);
    }
    let (mut nll, mut kl, mut correct, mut scored) = (0.0, 0.0, 0usize, 0usize);
    // Predictions for ids[head..]: the prefill's last logits, then one row per fed tail token.
    let mut score_rows = |policy_rows: &[Vec<f32>], full_rows: &[Vec<f32>], targets: &[u32]| {
        for ((p, f), &t) in policy_rows.iter().zip(full_rows).zip(targets) {
            let lp = log_softmax(p);
            nll -= lp[t as usize];
            if crate::sampling::argmax(p) == t {
                correct += 1;
            }
            if !policy_is_full {
                let lf = log_softmax(f);
                kl += lf
                    .iter()
                    .zip(&lp)
                    .map(|(a, b)| a.exp() * (a - b))
                    .sum::<f64>();
            }
            scored += 1;
        }
    };
    let last = firsts.len() - 1;
    score_rows(&firsts[..1], &firsts[last..], &ids[head..head + 1]);
    let tail = &ids[head..n - 1];
    for (c, chunk) in tail.chunks(opts.ppl_chunk).enumerate() {
        let targets = &ids[head + 1 + c * opts.ppl_chunk..][..chunk.len()];
        let mut out = Vec::new();
        for s in sessions.iter_mut() {
            out.push(rows(&s.prefill_all_logits(chunk)?)?);
        }
        let last = out.len() - 1;
        score_rows(&out[0], &out[last], targets);
    }
    let kv = KvSnapshot::from(&sessions[0].kv_report());
    let mut o = blank("perplexity", n, kv);
    o.score = correct as f64 / scored.max(1) as f64;
    o.nll = Some(nll);
    o.kl = Some(kl);
    o.scored_tokens = scored;
    Ok(o)
}
