//! Training examples: CPT text packed into fixed-length sequences, SFT prompt/answer pairs under
//! the chat template, and the seeded order in which batches visit them.
//!
//! - The format of a file is read from its content, not its name: a file is JSONL when its
//!   first non-blank line is a JSON object, or when its name ends in `.jsonl` or `.json` (any
//!   case; then a line that is not JSON is an error, not text); otherwise it is plain text.
//!   A leading UTF-8 byte-order mark is skipped. Each file is read once (a pipe works).
//! - CPT files: plain text (one document per file) or JSONL (one `{"text": ...}` per line).
//!   Each document is tokenized with BOS (if the tokenizer adds one)
//!   and followed by EOS; all documents are concatenated and cut into `seq_len + 1`-token windows
//!   (`seq_len` inputs, the next token as target), the remainder dropped. CE on every target.
//! - SFT files: JSONL (a plain text file is refused), one `{"prompt": ..., "answer": ...}` per line; the prompt is rendered as a
//!   user turn with the chat template (generation prompt added) and the answer plus the end of
//!   turn follows; CE on answer tokens only. Or a multi-turn chat, `{"messages": [{"role",
//!   "content"}, ...]}` ending with an assistant turn: the conversation is tokenized turn by
//!   turn as a chat session feeds it (each turn's template text is a delta of the rendering),
//!   and every assistant answer is a CE target. Too-long items are cut from the left (the
//!   prompt's start); items are padded (with EOS, masked out of CE and of the eviction loss) to
//!   `seq_len`.
//! - Mixed (`Mode::Mix`): each file is CPT or SFT by its content (plain text, or JSONL whose
//!   first record has `text`: CPT; other JSONL: SFT), and the examples of all files are visited
//!   together. A file given k times contributes its examples k times: its weight in the
//!   mixture (the epoch permutation draws uniformly over all examples).
//!
//! Invariants: errors name the file and the 1-based line; the batch order of step `s` depends
//! only on `(seed, s)` (an epoch permutation seeded by `seed + epoch`), so a resumed run sees
//! exactly the batches an uninterrupted one would.

use std::path::{Path, PathBuf};

use model_zoo::{ChatMessage, Tokenizer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::data_file::{data_error, parse_json_line, read_text};
use crate::error::{EngineError, Result};

/// One training sequence: `seq_len + 1` tokens, and per target position (`seq_len`) whether CE
/// counts it; `valid[i]` marks real (non-pad) input tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Tokens, `seq_len + 1` long.
    pub tokens: Vec<u32>,
    /// Per target `i` (predicting `tokens[i + 1]`): counted in CE.
    pub target_mask: Vec<bool>,
    /// Per input `i`: a real token (counted in the eviction loss and ratios).
    pub valid: Vec<bool>,
}

/// Training mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Continual pre-training: CE on all tokens.
    Cpt,
    /// Supervised fine-tuning: CE on answer tokens only.
    Sft,
    /// Both, each file by its content (see the module header).
    Mix,
}

impl Mode {
    /// Parses `cpt`, `sft` or `mix`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cpt" => Ok(Mode::Cpt),
            "sft" => Ok(Mode::Sft),
            "mix" => Ok(Mode::Mix),
            other => Err(EngineError::Setting {
                setting: "TrainConfig.mode",
                problem: format!("unknown `{other}` (expected cpt, sft or mix)"),
            }),
        }
    }
}

/// The examples of `files` in `mode`. A problem of one file names it (and its line); one of the
/// files together (too little text, no item) is a setting error (`TrainConfig.data`, or
/// `TrainConfig.seq_len` when the CPT text is shorter than one sequence).
pub fn load(
    mode: Mode,
    files: &[PathBuf],
    tok: &Tokenizer,
    seq_len: usize,
) -> Result<Vec<Example>> {
    let texts = files
        .iter()
        .map(|p| DataText::read(p))
        .collect::<Result<Vec<_>>>()?;
    match mode {
        Mode::Cpt => cpt_examples(&texts, tok, seq_len),
        Mode::Sft => sft_examples(&texts, tok, seq_len),
        Mode::Mix => {
            let mut out = Vec::new();
            for text in &texts {
                let one = std::slice::from_ref(text);
                out.extend(if text.is_cpt()? {
                    cpt_examples(one, tok, seq_len)?
                } else {
                    sft_examples(one, tok, seq_len)?
                });
            }
            Ok(out)
        }
    }
}

/// A data file read once, with its format.
struct DataText<'a> {
    /// The file.
    path: &'a Path,
    /// Its text, without a leading byte-order mark.
    text: String,
    /// Whether it is JSONL (see the module header).
    jsonl: bool,
}

impl<'a> DataText<'a> {
    /// Reads `path` and tells its format.
    fn read(path: &'a Path) -> Result<Self> {
        let text = read_text(path)?;
        let named = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"));
        let jsonl = named
            || first_record(&text).is_some_and(|(_, line)| {
                serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v.is_object())
            });
        Ok(DataText { path, text, jsonl })
    }

    /// Whether the file holds CPT text: plain text, or JSONL whose first record has `text`.
    fn is_cpt(&self) -> Result<bool> {
        if !self.jsonl {
            return Ok(true);
        }
        let Some((i, first)) = first_record(&self.text) else {
            return Err(data_error(
                self.path,
                None,
                "no examples (empty file)",
                None,
            ));
        };
        let v = parse_json_line(self.path, i + 1, first)?;
        Ok(v.get("text").is_some())
    }
}

/// The first non-blank line of `text` and its 0-based index.
fn first_record(text: &str) -> Option<(usize, &str)> {
    text.lines().enumerate().find(|(_, l)| !l.trim().is_empty())
}

/// The string field `field` of each non-blank line of a JSONL file (required).
fn jsonl_field(file: &DataText, field: &str) -> Result<Vec<String>> {
    let path = file.path;
    let mut out = Vec::new();
    for (i, line) in file.text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v = parse_json_line(path, i + 1, line)?;
        let value = v.get(field).and_then(|x| x.as_str()).ok_or_else(|| {
            let problem = format!("expected a string field `{field}`");
            data_error(path, Some(i + 1), problem, None)
        })?;
        out.push(value.to_string());
    }
    if out.is_empty() {
        return Err(data_error(path, None, "no examples (empty file)", None));
    }
    Ok(out)
}

/// CPT: tokenizes and packs `files` into `seq_len + 1`-token examples.
pub fn load_cpt(files: &[PathBuf], tok: &Tokenizer, seq_len: usize) -> Result<Vec<Example>> {
    load(Mode::Cpt, files, tok, seq_len)
}

/// SFT: one example per line, `{"prompt", "answer"}` or `{"messages"}`, chat template applied.
pub fn load_sft(files: &[PathBuf], tok: &Tokenizer, seq_len: usize) -> Result<Vec<Example>> {
    load(Mode::Sft, files, tok, seq_len)
}

/// [`load_cpt`] of files read.
fn cpt_examples(files: &[DataText], tok: &Tokenizer, seq_len: usize) -> Result<Vec<Example>> {
    let eos = tok.eos_ids().first().copied();
    let mut stream: Vec<u32> = Vec::new();
    for file in files {
        let path = file.path;
        let docs = if file.jsonl {
            jsonl_field(file, "text")?
        } else {
            if file.text.trim().is_empty() {
                return Err(data_error(path, None, "empty text file", None));
            }
            vec![file.text.clone()]
        };
        for d in docs {
            let ids = tok
                .encode(&d, tok.adds_bos())
                .map_err(|e| data_error(path, None, "cannot tokenize", Some(Box::new(e))))?;
            stream.extend(ids);
            stream.extend(eos);
        }
    }
    let w = seq_len + 1;
    let examples: Vec<Example> = stream
        .chunks_exact(w)
        .map(|c| Example {
            tokens: c.to_vec(),
            target_mask: vec![true; seq_len],
            valid: vec![true; seq_len],
        })
        .collect();
    if examples.is_empty() {
        let names: Vec<String> = files.iter().map(|f| f.path.display().to_string()).collect();
        return Err(EngineError::Setting {
            setting: "TrainConfig.seq_len",
            problem: format!(
                "{seq_len} (plus 1 for the next-token target: {w} tokens) is longer than the CPT text of {} ({} tokens): give more text or a shorter sequence",
                names.join(", "),
                stream.len()
            ),
        });
    }
    Ok(examples)
}

/// [`load_sft`] of files read.
fn sft_examples(files: &[DataText], tok: &Tokenizer, seq_len: usize) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for file in files {
        let path = file.path;
        if !file.jsonl {
            return Err(data_error(
                path,
                None,
                "SFT data must be JSONL (one JSON object per line) with prompt and answer fields, or messages",
                None,
            ));
        }
        for (i, line) in file.text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = |p: LineProblem| data_error(path, Some(i + 1), p.problem, p.source);
            let v = parse_json_line(path, i + 1, line)?;
            let messages = sft_messages(&v).map_err(|p| at(p.into()))?;
            let pieces = chat_pieces(&messages, tok).map_err(at)?;
            out.push(sft_example(&pieces, tok, seq_len).map_err(|p| at(p.into()))?);
        }
    }
    if out.is_empty() {
        return Err(EngineError::Setting {
            setting: "TrainConfig.data",
            problem: "no SFT examples in the files".into(),
        });
    }
    Ok(out)
}

/// What is wrong with one line of a data file, and the error behind it, if any.
struct LineProblem {
    problem: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl LineProblem {
    /// `problem`, caused by `source`.
    fn caused(problem: &str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        LineProblem {
            problem: problem.into(),
            source: Some(Box::new(source)),
        }
    }
}

impl From<String> for LineProblem {
    fn from(problem: String) -> Self {
        LineProblem {
            problem,
            source: None,
        }
    }
}

impl From<&str> for LineProblem {
    fn from(problem: &str) -> Self {
        problem.to_string().into()
    }
}

/// The conversation of one SFT record: `prompt` + `answer` as a user and an assistant turn, or
/// `messages` as given (non-empty, ending with an assistant turn).
fn sft_messages(v: &serde_json::Value) -> std::result::Result<Vec<ChatMessage>, String> {
    let field = |name: &str| -> std::result::Result<String, String> {
        v.get(name)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("expected a string field `{name}`"))
    };
    if let Some(list) = v.get("messages") {
        let list = list
            .as_array()
            .ok_or("`messages` must be an array of {role, content}")?;
        let messages = list
            .iter()
            .enumerate()
            .map(|(k, m)| match (m["role"].as_str(), m["content"].as_str()) {
                (Some(role @ ("system" | "user" | "assistant")), Some(content)) => {
                    Ok(ChatMessage::new(role, content))
                }
                _ => Err(format!(
                    "messages[{k}]: expected role system, user or assistant and a string content"
                )),
            })
            .collect::<std::result::Result<Vec<_>, String>>()?;
        if messages.last().is_none_or(|m| m.role != "assistant") {
            return Err("`messages` must end with an assistant turn (the answer to learn)".into());
        }
        return Ok(messages);
    }
    Ok(vec![
        ChatMessage::new("user", &field("prompt")?),
        ChatMessage::new("assistant", &field("answer")?),
    ])
}

/// The conversation as token pieces in order, each flagged when it is an answer to learn (an
/// assistant turn and its end-of-turn token). Turns are tokenized as a chat session feeds them:
/// the template text before each answer (rendered with the generation prompt) and each answer
/// are deltas of the rendering so far.
fn chat_pieces(
    messages: &[ChatMessage],
    tok: &Tokenizer,
) -> std::result::Result<Vec<(Vec<u32>, bool)>, LineProblem> {
    let end = tok
        .token_id("<|im_end|>")
        .or(tok.eos_ids().first().copied());
    let mut pieces = Vec::new();
    let mut rendered = String::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let head = tok
            .apply_chat_template(&messages[..i], true)
            .map_err(|e| LineProblem::caused("cannot render the conversation", e))?;
        let delta = head
            .strip_prefix(rendered.as_str())
            .ok_or("the chat template re-renders earlier turns differently")?;
        let tokenize_error = |e| LineProblem::caused("cannot tokenize", e);
        pieces.push((
            tok.encode(delta, rendered.is_empty())
                .map_err(tokenize_error)?,
            false,
        ));
        if m.content.trim().is_empty() {
            return Err(format!("assistant turn {i} is empty").into());
        }
        let mut answer = tok.encode(&m.content, false).map_err(tokenize_error)?;
        answer.extend(end);
        // What a session has fed after this answer: the answer and its end-of-turn token (the
        // template's text after that token comes with the next turn's delta).
        let end_text = match end {
            Some(id) => tok
                .decode(&[id])
                .map_err(|e| LineProblem::caused("cannot decode the end-of-turn token", e))?,
            None => String::new(),
        };
        rendered = format!("{head}{}{end_text}", m.content);
        pieces.push((answer, true));
    }
    Ok(pieces)
}

/// One padded example from token pieces: the last `seq_len + 1` tokens (the conversation's
/// start is cut when too long), CE on the answer pieces, padding with EOS after the end.
fn sft_example(
    pieces: &[(Vec<u32>, bool)],
    tok: &Tokenizer,
    seq_len: usize,
) -> std::result::Result<Example, String> {
    let pad = tok.eos_ids().first().copied().unwrap_or(0);
    let last_answer = pieces.last().map_or(0, |(p, _)| p.len());
    if last_answer == 0 || last_answer >= seq_len {
        return Err(format!(
            "answer of {last_answer} tokens does not fit in a sequence of {seq_len} tokens"
        ));
    }
    let (mut tokens, mut answer) = (Vec::new(), Vec::new());
    for (piece, is_answer) in pieces {
        tokens.extend_from_slice(piece);
        answer.extend(std::iter::repeat_n(*is_answer, piece.len()));
    }
    let cut = tokens.len().saturating_sub(seq_len + 1);
    let (mut tokens, answer) = (tokens.split_off(cut), answer.split_off(cut));
    let n = tokens.len();
    tokens.resize(seq_len + 1, pad);
    // Target i predicts tokens[i + 1]: counted iff that token is part of an answer.
    let target_mask = (0..seq_len).map(|i| i + 1 < n && answer[i + 1]).collect();
    let valid = (0..seq_len).map(|i| i < n).collect();
    Ok(Example {
        tokens,
        target_mask,
        valid,
    })
}

/// The example indices of micro-batch `micro` (global count) of size `batch`: the examples are
/// visited in a permutation per epoch (seeded by `seed + epoch`), wrapping around.
pub fn batch_indices(n: usize, batch: usize, seed: u64, micro: u64) -> Vec<usize> {
    let mut out = Vec::with_capacity(batch);
    let mut cached: Option<(u64, Vec<usize>)> = None;
    for j in 0..batch as u64 {
        let pos = micro * batch as u64 + j;
        let (epoch, off) = (pos / n as u64, (pos % n as u64) as usize);
        if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<usize> = (0..n).collect();
            perm.shuffle(&mut StdRng::seed_from_u64(seed.wrapping_add(epoch)));
            cached = Some((epoch, perm));
        }
        out.push(cached.as_ref().map_or(0, |(_, p)| p[off]));
    }
    out
}
