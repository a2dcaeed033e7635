//! Scoring one task on a prepared session, by kind (the protocol is in the header of
//! [`super`]): choices by summed log-probabilities, generation by a greedy answer, perplexity
//! teacher-forced against a full cache in lockstep; and the KV figures each outcome carries.

use super::{EvalOptions, MatchKind, Start, Task, TaskOutcome, TaskPrompt};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::policy::Policy;
use crate::report::KvReport;
use crate::session::{GenerateRequest, Session};
use crate::SamplingParams;

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

pub(super) fn score_task(
    engine: &Engine,
    policy: &Policy,
    task: &Task,
    prompt: &TaskPrompt,
    start: &Start<'_>,
    opts: &EvalOptions,
) -> Result<TaskOutcome> {
    let mut outcome = match task {
        Task::Choice {
            answer, choices, ..
        } => score_choice(engine, policy, prompt, start, choices, *answer),
        Task::Generate {
            answer,
            match_kind,
            meta,
            ..
        } => {
            score_generate(engine, policy, prompt, start, answer, *match_kind, opts).map(|mut o| {
                o.meta = meta.clone();
                o
            })
        }
        Task::Perplexity { .. } => score_perplexity(engine, policy, prompt, start, opts),
    }?;
    outcome.chat = prompt.chat;
    outcome.prompt_tokens = prompt.prompt_tokens();
    Ok(outcome)
}

fn blank(kind: &'static str, kv: KvSnapshot) -> TaskOutcome {
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
        prompt_tokens: 0,
        chat: false,
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
        .ok_or_else(|| EngineError::Unscored("no logits after the prompt".into()))
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
    engine: &Engine,
    policy: &Policy,
    prompt: &TaskPrompt,
    start: &Start<'_>,
    choices: &[String],
    answer: usize,
) -> Result<TaskOutcome> {
    let mut lls = Vec::with_capacity(choices.len());
    let mut kv = None;
    for ids in &prompt.choices {
        // Every choice from the same freshly compressed prompt.
        let mut session = start.session(engine, policy, &prompt.context, &prompt.continuation)?;
        kv.get_or_insert_with(|| KvSnapshot::from(&session.kv_report()));
        let mut ll = log_softmax(&last_logits(&session)?)[ids[0] as usize];
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
    let mut o = blank("choice", kv.unwrap_or_default());
    o.score = f64::from(u8::from(first_max(&lls) == answer));
    o.acc_norm = Some(f64::from(u8::from(first_max(&normed) == answer)));
    o.loglikelihoods = lls;
    Ok(o)
}

fn score_generate(
    engine: &Engine,
    policy: &Policy,
    prompt: &TaskPrompt,
    start: &Start<'_>,
    answer: &str,
    match_kind: MatchKind,
    opts: &EvalOptions,
) -> Result<TaskOutcome> {
    let mut session = start.session(engine, policy, &prompt.context, &prompt.continuation)?;
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
    let mut o = blank("generate", kv);
    o.score = match_kind.score(&generation.text, answer);
    o.output = Some(generation.text);
    Ok(o)
}

fn score_perplexity(
    engine: &Engine,
    policy: &Policy,
    prompt: &TaskPrompt,
    start: &Start<'_>,
    opts: &EvalOptions,
) -> Result<TaskOutcome> {
    let ids = &prompt.text;
    let (n, head) = (ids.len(), prompt.context.len());
    let policy_is_full = matches!(policy, Policy::Full);
    // The policy's session, and a full-cache one in lockstep for the KL (unless it is full).
    let mut sessions = vec![start.session(engine, policy, &prompt.context, &[])?];
    if !policy_is_full {
        sessions.push(start.session(engine, &Policy::Full, &prompt.context, &[])?);
    }
    let firsts = sessions
        .iter()
        .map(last_logits)
        .collect::<Result<Vec<_>>>()?;
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
    let mut o = blank("perplexity", KvSnapshot::from(&sessions[0].kv_report()));
    o.score = correct as f64 / scored.max(1) as f64;
    o.nll = Some(nll);
    o.kl = Some(kl);
    o.scored_tokens = scored;
    Ok(o)
}
