//! The deterministic train/held-out split of each source (the rules are listed in the header of
//! `data/mod.rs` and in `docs/training.md`), and the items made from it: perplexity passages,
//! CoQA chats, synthetic retrieval items and HellaSwag choice tasks.
//!
//! Invariant: every function here is a pure function of its input (synthetic items of their
//! seed), so the same wheels always give the same items in the same order.

use std::collections::HashMap;

use anyhow::{bail, Result};
use engine::eval::synthetic::{self, Family, SyntheticSpec};
use engine::eval::Task;
use serde_json::{json, Value};

/// Approximate characters per held-out perplexity passage (~1k tokens).
pub const PPL_CHARS: usize = 4000;

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

/// Characters a training chat may take (about 480 tokens with the template: it fits a
/// 512-token sequence whole, so the story is never cut).
const CHAT_CHARS: usize = 1800;

/// Template characters counted per chat turn (role headers and end-of-turn markers).
const CHAT_TURN_OVERHEAD: usize = 40;

/// User turns of a held-out conversation.
const CHAT_TURNS: usize = 12;

/// Items split into a training and a held-out part.
#[derive(Debug, Default)]
pub struct Split<T> {
    /// The training part.
    pub train: Vec<T>,
    /// The held-out part.
    pub heldout: Vec<T>,
}

impl<T> Split<T> {
    fn push(&mut self, heldout: bool, item: T) {
        if heldout {
            self.heldout.push(item)
        } else {
            self.train.push(item)
        }
    }
}

/// The essays (in file-name order), trimmed: every 8th (index % 8 == 7) is held out.
pub fn essays(essays: &[(String, String)]) -> Split<String> {
    let mut split = Split::default();
    for (i, (_, text)) in essays.iter().enumerate() {
        split.push(i % 8 == 7, text.trim().to_string());
    }
    split
}

/// LAMBADA passages (context + continuation; empty ones skipped) split by index % 10 == 9, and
/// the contexts of the training passages (a retrieval haystack).
pub fn lambada(requests: &[Value]) -> (Split<String>, Vec<&str>) {
    let mut split = Split::default();
    let mut train_contexts = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let ctx = r["request"]["context"].as_str();
        let cont = r["request"]["continuation"].as_str().unwrap_or_default();
        if i % 10 != 9 {
            train_contexts.extend(ctx);
        }
        let text = format!("{}{cont}", ctx.unwrap_or_default());
        if !text.trim().is_empty() {
            split.push(i % 10 == 9, text);
        }
    }
    (split, train_contexts)
}

/// CoQA, split by story (first-seen order, story index % 10 == 9 held out).
#[derive(Default)]
pub struct Coqa {
    /// The stories.
    pub stories: Split<String>,
    /// `{"prompt", "answer"}` question turns, by their story's part.
    pub sft: Split<Value>,
    /// Training chats (`{"messages"}`) and held-out conversations (`{"turns"}`).
    pub chats: Split<Value>,
}

/// Splits CoQA requests (one per question turn, a story's turns repeating its story).
pub fn coqa(requests: &[Value]) -> Coqa {
    let mut out = Coqa::default();
    let mut story_index: HashMap<String, usize> = HashMap::new();
    for r in requests {
        let story = r["doc"]["story"].as_str().unwrap_or_default();
        let idx = match story_index.get(story) {
            Some(&i) => i,
            None => {
                let i = story_index.len();
                story_index.insert(story.to_string(), i);
                let qa = previous_qa(&r["doc"]["previous_qa"]);
                if i % 10 == 9 {
                    out.chats.heldout.extend(chat_turns(story, &qa, CHAT_TURNS));
                } else {
                    out.chats.train.extend(chat_item(story, &qa));
                }
                out.stories.push(i % 10 == 9, story.to_string());
                i
            }
        };
        let prompt = r["request"]["context"].as_str().unwrap_or_default();
        let answer = r["request"]["continuation"]
            .as_str()
            .unwrap_or_default()
            .trim();
        if !prompt.is_empty() && !answer.is_empty() {
            let item = json!({ "prompt": prompt, "answer": answer });
            out.sft.push(idx % 10 == 9, item);
        }
    }
    out
}

/// A CoQA story's `(question, answer)` turns.
fn previous_qa(turns: &Value) -> Vec<(&str, &str)> {
    turns
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| Some((t["question"].as_str()?, t["answer"].as_str()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The first user turn of a chat about a story: the story, then the first question.
fn story_turn(story: &str, question: &str) -> String {
    format!("Read this story, then answer my questions briefly.\n\n{story}\n\n{question}")
}

/// A training chat about `story`: the story and the first question, then question/answer turns
/// while the whole chat fits in [`CHAT_CHARS`] (at least three answers), else `None`.
fn chat_item(story: &str, qa: &[(&str, &str)]) -> Option<Value> {
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
        messages.push(json!({ "role": "user", "content": user }));
        messages.push(json!({ "role": "assistant", "content": a.trim() }));
    }
    (messages.len() >= 6).then(|| json!({ "messages": messages }))
}

/// The user side of a `turns`-turn conversation about `story` (story and first question, then
/// one question per turn), if the story has that many questions. Each turn is one line (the
/// story's line breaks become spaces), so that the turns can be typed into `agate chat`.
fn chat_turns(story: &str, qa: &[(&str, &str)], turns: usize) -> Option<Value> {
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
    Some(json!({ "turns": user }))
}

/// Synthetic SFT items `{"prompt", "answer"}`: `per_depth` items of every family in
/// [`SYNTHETIC_FAMILIES`], length in [`SYNTHETIC_LENGTHS`] and depth in [`SYNTHETIC_DEPTHS`],
/// with `filler` as the haystack. Lengths are counted as characters / 4 (no tokenizer is
/// needed, and the files do not depend on one), about the default model's English rate.
pub fn synthetic_sft(filler: &str, seed: u64, per_depth: usize) -> Result<Vec<Value>> {
    let count = |text: &str| -> engine::Result<usize> { Ok(text.chars().count().div_ceil(4)) };
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
                    items.push(json!({
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
pub fn hellaswag(requests: &[Value]) -> Result<Split<Value>> {
    let mut seen = std::collections::HashSet::new();
    let mut split = Split::default();
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
            bail!("HellaSwag request {id}: missing query, choices or gold");
        };
        if gold >= choices.len() {
            bail!(
                "HellaSwag request {id}: gold {gold} outside {} choices",
                choices.len()
            );
        }
        if id % 2 == 0 {
            split.push(false, json!({ "prompt": query, "answer": choices[gold] }));
        } else {
            let (context, question) = match query.rfind(". ") {
                Some(i) => (&query[..=i], query[i + 2..].trim()),
                None => ("", query),
            };
            let task = json!({
                "type": "choice",
                "id": format!("hellaswag-{id}"),
                "context": context,
                "question": question,
                "choices": choices,
                "answer": gold,
            });
            split.push(true, task);
        }
    }
    Ok(split)
}

/// Cuts `text` into passages of about `chars` characters at paragraph breaks (a last passage
/// shorter than a quarter of `chars` is dropped).
pub fn passages(text: &str, chars: usize) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passages_cut_at_paragraphs_and_drop_a_short_tail() {
        let (a, b) = ("a".repeat(6), "b".repeat(6));
        let text = format!("{a}\n\n{b}\n\nc");
        // 14 characters hold a and b; the tail `c` is shorter than 14 / 4 and is dropped.
        assert_eq!(passages(&text, 14), vec![format!("{a}\n\n{b}")]);
        // 8 characters hold one paragraph; `b` and `c` fit together.
        assert_eq!(passages(&text, 8), vec![a.clone(), format!("{b}\n\nc")]);
    }

    #[test]
    fn every_eighth_essay_and_tenth_passage_is_held_out() {
        let essays_in: Vec<(String, String)> = (0..16)
            .map(|i| (format!("{i:02}.txt"), format!(" essay {i} \n")))
            .collect();
        let s = essays(&essays_in);
        assert_eq!(s.heldout, vec!["essay 7", "essay 15"]);
        assert_eq!(s.train.len(), 14);
        let requests: Vec<Value> = (0..20)
            .map(|i| json!({ "request": { "context": format!("ctx{i} "), "continuation": "end" } }))
            .collect();
        let (split, contexts) = lambada(&requests);
        assert_eq!(split.heldout, vec!["ctx9 end", "ctx19 end"]);
        assert_eq!(split.train.len(), 18);
        assert_eq!(contexts.len(), 18);
    }

    #[test]
    fn coqa_holds_out_whole_stories_with_their_questions() {
        let mut requests = Vec::new();
        for story in 0..10 {
            for q in 0..2 {
                requests.push(json!({
                    "doc": { "story": format!("story {story}"), "previous_qa": [] },
                    "request": { "context": format!("story {story} q{q}"), "continuation": " a " },
                }));
            }
        }
        let c = coqa(&requests);
        assert_eq!(c.stories.heldout, vec!["story 9"]);
        assert_eq!(c.stories.train.len(), 9);
        assert_eq!(c.sft.heldout.len(), 2);
        assert_eq!(c.sft.train.len(), 18);
        assert_eq!(
            c.sft.train[0],
            json!({ "prompt": "story 0 q0", "answer": "a" })
        );
    }

    #[test]
    fn hellaswag_splits_by_id_parity_and_names_a_bad_request() {
        let req = |id: u64, gold: u64| {
            json!({ "native_id": id, "doc": {
                "query": "A man sits. He then", "choices": ["x", "y"], "gold": gold } })
        };
        let s = hellaswag(&[req(2, 1), req(3, 0), req(3, 0)]).unwrap();
        assert_eq!(
            s.train,
            vec![json!({ "prompt": "A man sits. He then", "answer": "y" })]
        );
        assert_eq!(s.heldout.len(), 1, "a repeated id is read once");
        assert_eq!(s.heldout[0]["context"], "A man sits.");
        assert_eq!(s.heldout[0]["question"], "He then");
        let err = hellaswag(&[req(4, 2)]).unwrap_err().to_string();
        assert!(
            err.contains("HellaSwag request 4: gold 2 outside 2 choices"),
            "{err}"
        );
    }
}
