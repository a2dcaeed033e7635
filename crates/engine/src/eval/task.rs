//! Evaluation tasks and the JSONL task-file format (a stable contract, documented in
//! `docs/eval.md`): one JSON object per line, `type` ∈ {`choice`, `generate`, `perplexity`}.
//!
//! Invariants: a parsed [`Task`] is valid — a choice task has at least two choices and its
//! `answer` indexes one of them; a choice or generate task's `context` and `question` are not
//! both empty; a generate task's answer is not blank; a perplexity text is not empty. Parsing
//! never skips a line: the first bad line fails the whole file with `FILE:LINE: message` naming
//! the field at fault. Blank lines are allowed and ignored, and so is a UTF-8 byte-order mark
//! at the start of the file.

use std::path::Path;

use serde_json::{Map, Value};

use crate::data_file::{data_error, parse_json_line, read_text};
use crate::error::Result;

/// How a generated answer is compared with the reference (after [`normalize`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchKind {
    /// The output, trailing punctuation trimmed, equals the answer.
    Exact,
    /// The output contains the answer.
    Contains,
    /// The answer is a comma-separated list; the score is the fraction of its items the output
    /// contains (RULER's `string_match_all`, used by variable tracking and common words).
    All,
}

impl MatchKind {
    /// The name used in task files.
    pub fn name(self) -> &'static str {
        match self {
            MatchKind::Exact => "exact",
            MatchKind::Contains => "contains",
            MatchKind::All => "all",
        }
    }

    /// Score in `[0, 1]` of `output` against `answer`.
    pub fn score(self, output: &str, answer: &str) -> f64 {
        let out = normalize(output);
        match self {
            MatchKind::Exact => {
                let trimmed = out
                    .trim_end_matches(|c: char| ".,;:!?\"'".contains(c))
                    .trim();
                f64::from(u8::from(trimmed == normalize(answer)))
            }
            MatchKind::Contains => f64::from(u8::from(out.contains(&normalize(answer)))),
            MatchKind::All => {
                let items: Vec<String> = answer
                    .split(',')
                    .map(normalize)
                    .filter(|s| !s.is_empty())
                    .collect();
                if items.is_empty() {
                    return 0.0;
                }
                let found = items.iter().filter(|i| out.contains(i.as_str())).count();
                found as f64 / items.len() as f64
            }
        }
    }
}

/// Lower-cases and collapses every run of whitespace to one space, trimming both ends.
pub fn normalize(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// One evaluation task.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Task {
    /// Log-likelihood multiple choice (lm-eval-harness style).
    Choice {
        /// The text that gets evicted (may be empty).
        context: String,
        /// Appended after the context's eviction (before it with `query_aware`).
        question: String,
        /// Candidate continuations, each scored after `question` with a leading space.
        choices: Vec<String>,
        /// Index of the correct choice.
        answer: usize,
        /// Render through the model's chat template (`None`: the run's `--chat`).
        #[serde(skip_serializing_if = "Option::is_none")]
        chat: Option<bool>,
    },
    /// Greedy generation scored by string match.
    Generate {
        /// The text that gets evicted.
        context: String,
        /// Appended after the context's eviction (before it with `query_aware`).
        question: String,
        /// Text the answer starts with, already written for the model (RULER's answer prefix,
        /// e.g. ` The pass key is`): appended to the question as is, or, with the chat template,
        /// opening the assistant's turn (leading whitespace dropped).
        #[serde(skip_serializing_if = "String::is_empty")]
        answer_prefix: String,
        /// The reference answer.
        answer: String,
        /// How the output is compared with `answer`.
        #[serde(rename = "match")]
        match_kind: MatchKind,
        /// Free-form labels (synthetic tasks record family, depth, length), echoed in reports.
        #[serde(skip_serializing_if = "Map::is_empty")]
        meta: Map<String, Value>,
        /// Render through the model's chat template (`None`: the run's `--chat`).
        #[serde(skip_serializing_if = "Option::is_none")]
        chat: Option<bool>,
    },
    /// Perplexity and KL divergence from the full cache over a text.
    Perplexity {
        /// The text: its first part is the evicted context, the rest is scored.
        text: String,
    },
}

impl Task {
    /// The task's type name, as in task files.
    pub fn kind(&self) -> &'static str {
        match self {
            Task::Choice { .. } => "choice",
            Task::Generate { .. } => "generate",
            Task::Perplexity { .. } => "perplexity",
        }
    }

    /// One JSONL line for this task (the format [`parse_tasks`] reads).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Reads and validates a task file.
pub fn load_tasks(path: &Path) -> Result<Vec<Task>> {
    Ok(load_task_lines(path)?.into_iter().map(|(_, t)| t).collect())
}

/// Reads and validates a task file: each task with its line in the file (1-based), for
/// messages about a task that fails when it runs.
pub fn load_task_lines(path: &Path) -> Result<Vec<(usize, Task)>> {
    parse_task_lines(&read_text(path)?, path)
}

/// Parses JSONL task text; `name` prefixes error messages (`name:LINE: …`). A UTF-8 byte-order
/// mark at the start (some editors write one) is skipped.
pub fn parse_tasks(text: &str, name: &str) -> Result<Vec<Task>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    Ok(parse_task_lines(text, Path::new(name))?
        .into_iter()
        .map(|(_, t)| t)
        .collect())
}

/// The tasks of `text` (read from `file`, without a byte-order mark), each with its line
/// (1-based).
fn parse_task_lines(text: &str, file: &Path) -> Result<Vec<(usize, Task)>> {
    let mut tasks = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value = parse_json_line(file, i + 1, line)?;
        let task =
            parse_task(&value).map_err(|problem| data_error(file, Some(i + 1), problem, None))?;
        tasks.push((i + 1, task));
    }
    if tasks.is_empty() {
        return Err(data_error(file, None, "no tasks in the file", None));
    }
    Ok(tasks)
}

/// One line of a task file, parsed as JSON: an object of a known `type` with its fields, each
/// checked.
fn parse_task(value: &Value) -> std::result::Result<Task, String> {
    let obj = value
        .as_object()
        .ok_or_else(|| "expected a JSON object".to_string())?;
    let kind = string(obj, "type")?;
    let known: &[&str] = match kind.as_str() {
        "choice" => &[
            "type", "id", "meta", "context", "question", "choices", "answer", "chat",
        ],
        "generate" => &[
            "type",
            "id",
            "meta",
            "context",
            "question",
            "answer_prefix",
            "answer",
            "match",
            "chat",
        ],
        "perplexity" => &["type", "id", "meta", "text"],
        other => {
            return Err(format!(
            "field `type`: unknown task type `{other}` (expected choice, generate or perplexity)"
        ))
        }
    };
    if let Some(extra) = obj.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown field `{extra}` for a {kind} task"));
    }
    match kind.as_str() {
        "choice" => parse_choice(obj),
        "generate" => parse_generate(obj),
        _ => parse_perplexity(obj),
    }
}

/// The fields of a `choice` task.
fn parse_choice(obj: &Map<String, Value>) -> std::result::Result<Task, String> {
    let choices = match obj.get("choices") {
        None => return Err("field `choices` is missing".into()),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, c)| {
                c.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("field `choices`: element {i} is not a string"))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
        Some(_) => return Err("field `choices` must be an array of strings".into()),
    };
    if choices.len() < 2 {
        return Err("field `choices` needs at least two choices".into());
    }
    if let Some(i) = choices.iter().position(|c| c.is_empty()) {
        return Err(format!("field `choices`: choice {i} is empty"));
    }
    let answer = match obj.get("answer") {
        None => return Err("field `answer` is missing".into()),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| "field `answer` must be a choice index (0, 1, …)".to_string())?,
    };
    if answer as usize >= choices.len() {
        return Err(format!(
            "field `answer`: index {answer} is out of range ({} choices)",
            choices.len()
        ));
    }
    let (context, question) = prompt_fields(obj)?;
    Ok(Task::Choice {
        context,
        question,
        choices,
        answer: answer as usize,
        chat: chat_field(obj)?,
    })
}

/// The `context` and `question` of a choice or generate task: not both empty (the prompt would
/// be nothing).
fn prompt_fields(obj: &Map<String, Value>) -> std::result::Result<(String, String), String> {
    let context = string(obj, "context")?;
    let question = string(obj, "question")?;
    if context.is_empty() && question.is_empty() {
        return Err("fields `context` and `question` are both empty".into());
    }
    Ok((context, question))
}

/// The fields of a `generate` task.
fn parse_generate(obj: &Map<String, Value>) -> std::result::Result<Task, String> {
    let answer = string(obj, "answer")?;
    if answer.trim().is_empty() {
        return Err("field `answer` is empty".into());
    }
    let match_kind = match obj.get("match") {
        None => MatchKind::Contains,
        Some(Value::String(s)) => match s.as_str() {
            "exact" => MatchKind::Exact,
            "contains" => MatchKind::Contains,
            "all" => MatchKind::All,
            other => {
                return Err(format!(
                    "field `match`: unknown `{other}` (expected exact, contains or all)"
                ))
            }
        },
        Some(_) => return Err("field `match` must be a string".into()),
    };
    let meta = match obj.get("meta") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err("field `meta` must be an object".into()),
    };
    let (context, question) = prompt_fields(obj)?;
    let answer_prefix = match obj.get("answer_prefix") {
        None => String::new(),
        Some(_) => string(obj, "answer_prefix")?,
    };
    Ok(Task::Generate {
        context,
        question,
        answer_prefix,
        answer,
        match_kind,
        meta,
        chat: chat_field(obj)?,
    })
}

/// The fields of a `perplexity` task.
fn parse_perplexity(obj: &Map<String, Value>) -> std::result::Result<Task, String> {
    let text = string(obj, "text")?;
    if text.is_empty() {
        return Err("field `text` is empty".into());
    }
    Ok(Task::Perplexity { text })
}

/// The optional `chat` field: a boolean.
fn chat_field(obj: &Map<String, Value>) -> std::result::Result<Option<bool>, String> {
    match obj.get("chat") {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err("field `chat` must be true or false".into()),
    }
}

fn string(obj: &Map<String, Value>, field: &str) -> std::result::Result<String, String> {
    match obj.get(field) {
        None => Err(format!("field `{field}` is missing")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("field `{field}` must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_normalizes_case_and_whitespace() {
        assert_eq!(MatchKind::Exact.score("  Paris.\n", "paris"), 1.0);
        assert_eq!(MatchKind::Exact.score("Paris is nice", "paris"), 0.0);
        assert_eq!(
            MatchKind::Contains.score("It is  PARIS   now", "is paris"),
            1.0
        );
        assert_eq!(MatchKind::All.score("a x b", "a, b, c, d"), 0.5);
    }

    #[test]
    fn round_trips_through_json_lines() {
        let t = Task::Choice {
            context: "c".into(),
            question: "q".into(),
            choices: vec!["a".into(), "b".into()],
            answer: 1,
            chat: Some(true),
        };
        assert_eq!(parse_tasks(&t.to_json_line(), "x").unwrap(), vec![t]);
    }
}
