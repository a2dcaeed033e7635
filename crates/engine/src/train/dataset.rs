//! Training examples: CPT text packed into fixed-length sequences, SFT prompt/answer pairs under
//! the chat template, and the seeded order in which batches visit them.
//!
//! - CPT files: plain text (one document per file) or JSONL (`.jsonl`/`.json`: one
//!   `{"text": ...}` per line). Each document is tokenized with BOS (if the tokenizer adds one)
//!   and followed by EOS; all documents are concatenated and cut into `seq_len + 1`-token windows
//!   (`seq_len` inputs, the next token as target), the remainder dropped. CE on every target.
//! - SFT files: JSONL, one `{"prompt": ..., "answer": ...}` per line; the prompt is rendered as a
//!   user turn with the chat template (generation prompt added) and the answer plus the end of
//!   turn follows; CE on answer tokens only. Too-long items are cut from the left (the prompt's
//!   start); items are padded (with EOS, masked out of CE and of the eviction loss) to `seq_len`.
//!
//! Invariants: errors name the file and the 1-based line; the batch order of step `s` depends
//! only on `(seed, s)` (an epoch permutation seeded by `seed + epoch`), so a resumed run sees
//! exactly the batches an uninterrupted one would.

use std::path::{Path, PathBuf};

use model_zoo::{ChatMessage, Tokenizer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

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
}

impl Mode {
    /// Parses `cpt` or `sft`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cpt" => Ok(Mode::Cpt),
            "sft" => Ok(Mode::Sft),
            other => Err(EngineError::Invalid(format!(
                "invalid training mode `{other}` (expected cpt or sft)"
            ))),
        }
    }
}

fn file_err(path: &Path, line: Option<usize>, msg: impl std::fmt::Display) -> EngineError {
    match line {
        Some(l) => EngineError::Invalid(format!("{}:{l}: {msg}", path.display())),
        None => EngineError::Invalid(format!("{}: {msg}", path.display())),
    }
}

fn is_jsonl(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e == "jsonl" || e == "json")
}

/// Reads a JSONL file: for each non-blank line, the string fields `fields` (all required).
fn read_jsonl_fields(path: &Path, fields: &[&str]) -> Result<Vec<Vec<String>>> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, None, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| file_err(path, Some(i + 1), format!("invalid JSON: {e}")))?;
        let row = fields
            .iter()
            .map(|f| {
                v.get(*f)
                    .and_then(|x| x.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        file_err(path, Some(i + 1), format!("expected a string field `{f}`"))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(row);
    }
    if out.is_empty() {
        return Err(file_err(path, None, "no examples (empty file)"));
    }
    Ok(out)
}

/// CPT: tokenizes and packs `files` into `seq_len + 1`-token examples.
pub fn load_cpt(files: &[PathBuf], tok: &Tokenizer, seq_len: usize) -> Result<Vec<Example>> {
    let eos = tok.eos_ids().first().copied();
    let mut stream: Vec<u32> = Vec::new();
    for path in files {
        let docs = if is_jsonl(path) {
            read_jsonl_fields(path, &["text"])?
                .into_iter()
                .map(|mut r| r.remove(0))
                .collect()
        } else {
            let text = std::fs::read_to_string(path).map_err(|e| file_err(path, None, e))?;
            if text.trim().is_empty() {
                return Err(file_err(path, None, "empty text file"));
            }
            vec![text]
        };
        for d in docs {
            let ids = tok
                .encode(&d, tok.adds_bos())
                .map_err(|e| file_err(path, None, e))?;
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
        return Err(EngineError::Invalid(format!(
            "the CPT data ({} tokens) is shorter than one sequence of {w} tokens",
            stream.len()
        )));
    }
    Ok(examples)
}

/// SFT: one example per `{"prompt", "answer"}` line, chat template applied.
pub fn load_sft(files: &[PathBuf], tok: &Tokenizer, seq_len: usize) -> Result<Vec<Example>> {
    let pad = tok.eos_ids().first().copied().unwrap_or(0);
    let end = tok
        .token_id("<|im_end|>")
        .or(tok.eos_ids().first().copied());
    let mut out = Vec::new();
    for path in files {
        if !is_jsonl(path) {
            return Err(file_err(
                path,
                None,
                "SFT data must be JSONL (.jsonl) with prompt and answer fields",
            ));
        }
        for (i, row) in read_jsonl_fields(path, &["prompt", "answer"])?
            .into_iter()
            .enumerate()
        {
            let (prompt, answer) = (&row[0], &row[1]);
            let rendered = tok
                .apply_chat_template(&[ChatMessage::new("user", prompt)], true)
                .map_err(|e| file_err(path, Some(i + 1), e))?;
            let p = tok
                .encode(&rendered, false)
                .map_err(|e| file_err(path, Some(i + 1), e))?;
            let mut a = tok
                .encode(answer, false)
                .map_err(|e| file_err(path, Some(i + 1), e))?;
            a.extend(end);
            if a.is_empty() || a.len() >= seq_len {
                return Err(file_err(
                    path,
                    Some(i + 1),
                    format!(
                        "answer of {} tokens does not fit in --seq-len {seq_len}",
                        a.len()
                    ),
                ));
            }
            let keep_p = (seq_len + 1 - a.len()).min(p.len());
            let mut tokens: Vec<u32> = p[p.len() - keep_p..].to_vec();
            let n_prompt = tokens.len();
            tokens.extend(&a);
            let n = tokens.len();
            tokens.resize(seq_len + 1, pad);
            // Target i predicts tokens[i + 1]: an answer token iff i + 1 in [n_prompt, n).
            let target_mask = (0..seq_len)
                .map(|i| i + 1 >= n_prompt && i + 1 < n)
                .collect();
            let valid = (0..seq_len).map(|i| i < n).collect();
            out.push(Example {
                tokens,
                target_mask,
                valid,
            });
        }
    }
    if out.is_empty() {
        return Err(EngineError::Invalid("no SFT examples".into()));
    }
    Ok(out)
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
