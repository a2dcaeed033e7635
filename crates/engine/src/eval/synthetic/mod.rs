//! Synthetic long-context tasks (RULER's families), generated from a seed and a haystack:
//! passkey retrieval, needle in a haystack (single and multi key), key-value retrieval, variable
//! tracking and common-word extraction. They need no dataset and yield ordinary
//! [`Task::Generate`] tasks, so they run through the same scorer as task files.
//!
//! The haystack is RULER's noise by default — [`NOISE_BLOCK`] repeated as a whole, one block
//! per line, needles placed between blocks and never after the last one (RULER's `noise`
//! haystack; llama.cpp's passkey example places its needle between whole blocks too) — or any
//! text (`filler`): its sentences joined by spaces, needles between sentences (RULER's essay
//! haystack). The instructions open the context on their own line, as in RULER's templates.
//!
//! Every task asks its question and then starts the answer for the model (RULER's answer
//! prefix, e.g. `The pass key is`), as [`Task::Generate::answer_prefix`]: in raw text it follows
//! the question; with the chat template it opens the assistant's turn.
//!
//! Invariants: the same [`SyntheticSpec`] and token counter always give the same tasks; every
//! task's prompt (context + `"\n"` + question + answer prefix, plus `overhead` tokens of chat
//! template) is at most `length` tokens as the counter counts them, and within one filler
//! sentence (kv: one JSON pair; cwe: one rare word's three list items) of it; a needle asked
//! about sits at the sentence boundary nearest to its requested depth (fraction of the filler
//! before it).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use super::task::{MatchKind, Task};
use crate::error::{EngineError, Result};
use puzzle::puzzle;
use words::{shuffle, uuid, ADJECTIVES, WORDS};

mod family;
mod puzzle;
mod words;

pub use family::{Family, UnknownFamily};

/// RULER's noise haystack: this block, repeated whole.
pub const NOISE_BLOCK: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

/// What to generate.
#[derive(Clone, Debug)]
pub struct SyntheticSpec {
    /// The family.
    pub family: Family,
    /// Prompt length in tokens (context + question).
    pub length: usize,
    /// Needle depths in `[0, 1]` (families with a depth); `n` tasks are made per depth.
    pub depths: Vec<f64>,
    /// Tasks per depth (or in all, for families without a depth).
    pub n: usize,
    /// Random seed.
    pub seed: u64,
    /// Haystack text, split into sentences and cycled; `None`: RULER's noise ([`NOISE_BLOCK`]
    /// blocks).
    pub filler: Option<String>,
    /// Keys hidden by `niah-multi` (the asked one included).
    pub keys: usize,
    /// Tokens the prompt format adds around context and question (a chat template's markers
    /// and default system prompt), taken from `length`.
    pub overhead: usize,
}

impl SyntheticSpec {
    /// A spec with the defaults: depths {0.5}, 10 tasks, seed 1, RULER's noise, 4 keys.
    pub fn new(family: Family, length: usize) -> Self {
        SyntheticSpec {
            family,
            length,
            depths: vec![0.5],
            n: 10,
            seed: 1,
            filler: None,
            keys: 4,
            overhead: 0,
        }
    }
}

/// Generates the tasks. `count` gives the token count of a text (no BOS); the prompt length
/// budget leaves one token for a BOS.
pub fn generate(spec: &SyntheticSpec, count: &dyn Fn(&str) -> Result<usize>) -> Result<Vec<Task>> {
    if spec.n == 0 {
        return Err(spec_error("SyntheticSpec.n", "must be at least 1".into()));
    }
    if let Some(d) = spec.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        return Err(spec_error(
            "SyntheticSpec.depths",
            format!("{d} is outside [0, 1]"),
        ));
    }
    if spec.depths.is_empty() {
        return Err(spec_error("SyntheticSpec.depths", "no depth given".into()));
    }
    if spec.family == Family::NiahMulti && spec.keys < 2 {
        return Err(spec_error(
            "SyntheticSpec.keys",
            "niah-multi needs at least 2".into(),
        ));
    }
    if spec.overhead >= spec.length {
        return Err(spec_error(
            "SyntheticSpec.length",
            format!(
                "{} tokens: the chat template alone takes {}",
                spec.length, spec.overhead
            ),
        ));
    }
    let (units, noise) = match &spec.filler {
        Some(text) => (split_sentences(text), false),
        None => (vec![NOISE_BLOCK.to_string()], true),
    };
    if units.is_empty() {
        return Err(spec_error(
            "SyntheticSpec.filler",
            "the text has no sentences".into(),
        ));
    }
    let depths: Vec<Option<f64>> = if spec.family.uses_depth() {
        spec.depths.iter().copied().map(Some).collect()
    } else {
        vec![None]
    };
    let mut gen = Generator {
        units,
        joiner: if noise { "\n" } else { " " },
        last_is_free: !noise,
        counts: Vec::new(),
        count,
    };
    let mut tasks = Vec::new();
    for (di, depth) in depths.iter().enumerate() {
        for i in 0..spec.n {
            let mut rng = StdRng::seed_from_u64(
                spec.seed
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    .wrapping_add((di * 1_000_003 + i) as u64),
            );
            let mut task = gen.make(spec, *depth, &mut rng)?;
            if let Task::Generate { meta, .. } = &mut task {
                meta.insert("index".into(), json!(i));
            }
            tasks.push(task);
        }
    }
    Ok(tasks)
}

/// Splits text into sentences (ending in `.`, `!` or `?` followed by whitespace, or at line
/// ends), trimmed, without empty ones.
pub fn split_sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let end_line = c == '\n';
        if !end_line {
            cur.push(c);
        }
        let boundary =
            end_line || (".!?".contains(c) && chars.peek().is_none_or(|n| n.is_whitespace()));
        if boundary {
            let s = cur.trim();
            if !s.is_empty() {
                out.push(s.to_string());
            }
            cur.clear();
        }
    }
    let s = cur.trim();
    if !s.is_empty() {
        out.push(s.to_string());
    }
    out
}

struct Generator<'a> {
    /// The haystack's units, cycled: noise blocks or a text's sentences.
    units: Vec<String>,
    /// What separates units and inserts: a line break between noise blocks, a space between
    /// sentences.
    joiner: &'static str,
    /// Whether an insert may follow the last unit (not in RULER's noise haystack).
    last_is_free: bool,
    counts: Vec<usize>,
    count: &'a dyn Fn(&str) -> Result<usize>,
}

/// A piece of the haystack inserted between units at a depth.
struct Insert {
    depth: f64,
    text: String,
    /// The needle the question asks about (its placement is recorded).
    asked: bool,
}

/// The context: `prefix`, then the `filler` units (index into `units`, tokens) joined by
/// `joiner`, each insert at the unit boundary nearest its depth by haystack tokens (unless
/// `last_is_free`, never after the last unit); and where the asked needle landed (a fraction of
/// the haystack).
fn haystack(
    prefix: &str,
    inserts: &[Insert],
    filler: &[(usize, usize)],
    units: &[String],
    joiner: &str,
    last_is_free: bool,
) -> (String, Option<f64>) {
    let total: usize = filler.iter().map(|f| f.1).sum();
    let mut pieces: Vec<&str> = Vec::new();
    let mut cum = 0;
    let mut next = 0;
    let mut needle_at = None;
    for (k, &(ui, t)) in filler.iter().enumerate() {
        let last = k + 1 == filler.len();
        while next < inserts.len()
            && (boundary_before(inserts[next].depth, total, cum, t) || (last && !last_is_free))
        {
            if inserts[next].asked {
                needle_at = Some(cum as f64 / total.max(1) as f64);
            }
            pieces.push(&inserts[next].text);
            next += 1;
        }
        pieces.push(&units[ui]);
        cum += t;
    }
    for ins in &inserts[next..] {
        if ins.asked {
            needle_at = Some(1.0);
        }
        pieces.push(&ins.text);
    }
    (format!("{prefix}\n{}", pieces.join(joiner)), needle_at)
}

impl Generator<'_> {
    fn unit_tokens(&mut self, i: usize) -> Result<usize> {
        if self.counts.is_empty() {
            self.counts = self
                .units
                .iter()
                .map(|s| (self.count)(&format!("{}{s}", self.joiner)))
                .collect::<Result<_>>()?;
        }
        Ok(self.counts[i % self.units.len()].max(1))
    }

    fn make(&mut self, spec: &SyntheticSpec, depth: Option<f64>, rng: &mut StdRng) -> Result<Task> {
        let d = depth.unwrap_or(0.5);
        let mut meta = Map::new();
        meta.insert("family".into(), json!(spec.family.name()));
        meta.insert("length".into(), json!(spec.length));
        if let Some(d) = depth {
            meta.insert("depth".into(), json!(d));
        }
        let length = spec.length - spec.overhead;
        let Some((prefix, inserts, question, answer_prefix, answer, kind)) = puzzle(spec, d, rng)
        else {
            return match spec.family {
                Family::Kv => self.kv(spec, d, rng, meta),
                _ => self.cwe(spec, rng, meta),
            };
        };
        let question_tokens = (self.count)(&format!("\n{question}{answer_prefix}"))?;
        let joiner = self.joiner;
        let fixed = (self.count)(&format!("{prefix}\n"))?
            + inserts
                .iter()
                .map(|i| (self.count)(&format!("{joiner}{}", i.text)))
                .sum::<Result<usize>>()?;
        let budget = length
            .checked_sub(1 + question_tokens + fixed)
            .filter(|b| *b > 0)
            .ok_or_else(|| {
                spec_error(
                    "SyntheticSpec.length",
                    format!(
                        "{} tokens is too short for a {} task ({} tokens without filler)",
                        spec.length,
                        spec.family.name(),
                        1 + question_tokens + fixed + spec.overhead
                    ),
                )
            })?;
        let mut filler = self.filler(budget, rng)?;
        let last_is_free = self.last_is_free;
        let build = |filler: &[(usize, usize)], units: &[String]| {
            haystack(prefix, &inserts, filler, units, joiner, last_is_free)
        };
        let (mut context, mut placed) = build(&filler, &self.units);
        // Unit-wise counts may undercount the joined text: trim until it fits.
        while 1 + (self.count)(&context)? + question_tokens > length && !filler.is_empty() {
            filler.pop();
            (context, placed) = build(&filler, &self.units);
        }
        if spec.family.uses_depth() {
            if let Some(p) = placed {
                meta.insert("placed_depth".into(), json!(p));
            }
        }
        Ok(Task::Generate {
            context,
            question,
            answer_prefix,
            answer,
            match_kind: kind,
            meta,
            chat: None,
        })
    }

    /// Haystack units from a seeded offset, as many as fit `budget` tokens: (unit index,
    /// tokens) each.
    fn filler(&mut self, budget: usize, rng: &mut StdRng) -> Result<Vec<(usize, usize)>> {
        let start = rng.random_range(0..self.units.len());
        let mut filler = Vec::new();
        let mut used = 0;
        loop {
            let i = start + filler.len();
            let t = self.unit_tokens(i)?;
            if used + t > budget {
                break;
            }
            used += t;
            filler.push((i % self.units.len(), t));
        }
        Ok(filler)
    }

    fn kv(
        &mut self,
        spec: &SyntheticSpec,
        d: f64,
        rng: &mut StdRng,
        mut meta: Map<String, Value>,
    ) -> Result<Task> {
        let head = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{";
        let pair = |rng: &mut StdRng| (uuid(rng), uuid(rng));
        let (qk, qv) = pair(rng);
        let length = spec.length - spec.overhead;
        let question = format!("}}\n\nKey: \"{qk}\"");
        let answer_prefix = "\nThe value associated with the specified key is:".to_string();
        let q_tokens = (self.count)(&format!("\n{question}{answer_prefix}"))?;
        let pair_tokens = |k: &str, v: &str| (self.count)(&format!("\"{k}\": \"{v}\", "));
        let mut used = 1 + q_tokens + (self.count)(head)? + pair_tokens(&qk, &qv)?;
        if used > length {
            return Err(spec_error(
                "SyntheticSpec.length",
                format!("{} tokens is too short for a kv task", spec.length),
            ));
        }
        // Distractor pairs, each counted, as many as fit.
        let mut pairs: Vec<(String, String)> = Vec::new();
        loop {
            let (k, v) = pair(rng);
            let t = pair_tokens(&k, &v)?;
            if used + t > length {
                break;
            }
            used += t;
            pairs.push((k, v));
        }
        let at = ((d * pairs.len() as f64).round() as usize).min(pairs.len());
        pairs.insert(at, (qk, qv.clone()));
        let render = |pairs: &[(String, String)]| {
            let body: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("\"{k}\": \"{v}\""))
                .collect();
            format!("{head}{}", body.join(", "))
        };
        let mut context = render(&pairs);
        while 1 + (self.count)(&context)? + q_tokens > length && pairs.len() > 1 {
            // Drop a pair away from the asked one.
            let drop = if at + 1 < pairs.len() {
                pairs.len() - 1
            } else {
                0
            };
            pairs.remove(drop);
            context = render(&pairs);
        }
        let pos = pairs.iter().position(|p| p.1 == qv).unwrap_or(0);
        meta.insert(
            "placed_depth".into(),
            json!(pos as f64 / (pairs.len().max(2) - 1) as f64),
        );
        Ok(Task::Generate {
            context,
            question,
            answer_prefix,
            answer: qv,
            match_kind: MatchKind::Contains,
            meta,
            chat: None,
        })
    }

    fn cwe(
        &mut self,
        spec: &SyntheticSpec,
        rng: &mut StdRng,
        meta: Map<String, Value>,
    ) -> Result<Task> {
        const COMMON_FREQ: usize = 30;
        const RARE_FREQ: usize = 3;
        let (common, rare) = cwe_words(rng);
        let length = spec.length - spec.overhead;
        let question =
            format!("Question: What are the {COMMON} most common words in the above list?");
        let answer_prefix =
            format!(" Answer: The top {COMMON} words that appear most often in the list are:");
        let q_tokens = (self.count)(&format!("\n{question}{answer_prefix}"))?;
        let head = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n";
        let per_word = (self.count)(" 100. alpha")?.max(1);
        let budget = length.saturating_sub(1 + q_tokens + (self.count)(head)?);
        let total_words = budget / per_word;
        let order = rng.clone();
        // The list with `cf` copies of each common word and `rn` rare words, if it fits.
        let attempt = |cf: usize, rn: usize| -> Result<Option<String>> {
            let mut words: Vec<&str> = Vec::new();
            for w in &common {
                words.extend(std::iter::repeat_n(w.as_str(), cf));
            }
            for w in &rare[..rn] {
                words.extend(std::iter::repeat_n(w.as_str(), RARE_FREQ));
            }
            shuffle(&mut words, &mut order.clone());
            let list: Vec<String> = words
                .iter()
                .enumerate()
                .map(|(i, w)| format!("{}. {w}", i + 1))
                .collect();
            let context = format!("{head}{}", list.join(" "));
            let fits = 1 + (self.count)(&context)? + q_tokens <= length;
            Ok(fits.then_some(context))
        };
        let too_short = || {
            spec_error(
                "SyntheticSpec.length",
                format!("{} tokens is too short for a cwe task", spec.length),
            )
        };
        let mut cf = COMMON_FREQ
            .min(total_words / (2 * COMMON))
            .max(RARE_FREQ + 1);
        while attempt(cf, 0)?.is_none() {
            if cf == RARE_FREQ + 1 {
                return Err(too_short());
            }
            cf -= 1;
        }
        let estimate = total_words.saturating_sub(COMMON * cf) / RARE_FREQ;
        let best = largest_fitting(estimate, rare.len(), |rn| attempt(cf, rn))?;
        Ok(Task::Generate {
            context: best.ok_or_else(too_short)?,
            question,
            answer_prefix,
            answer: common.join(", "),
            match_kind: MatchKind::All,
            meta,
            chat: None,
        })
    }
}

/// Common words of a cwe task.
const COMMON: usize = 10;

/// The words of a cwe task in a seeded order: [`COMMON`] common nouns, and the rare words (the
/// other nouns, then adjective-noun pairs).
fn cwe_words(rng: &mut StdRng) -> (Vec<String>, Vec<String>) {
    let mut pool: Vec<&str> = WORDS.to_vec();
    shuffle(&mut pool, rng);
    let common: Vec<String> = pool[..COMMON].iter().map(|w| w.to_string()).collect();
    let mut rare: Vec<String> = pool[COMMON..].iter().map(|w| w.to_string()).collect();
    let mut pairs: Vec<String> = ADJECTIVES
        .iter()
        .flat_map(|a| WORDS.iter().map(move |w| format!("{a}-{w}")))
        .collect();
    shuffle(&mut pairs, rng);
    rare.extend(pairs);
    (common, rare)
}

/// The text of the largest `n` in `0..=max` for which `fits(n)` gives one (`fits` is monotone:
/// what fits with `n` fits with fewer), stepping one at a time from the estimate `start`;
/// `None` when not even 0 fits.
fn largest_fitting(
    start: usize,
    max: usize,
    fits: impl Fn(usize) -> Result<Option<String>>,
) -> Result<Option<String>> {
    let mut n = start.min(max);
    let mut best = fits(n)?;
    if best.is_some() {
        while n < max {
            match fits(n + 1)? {
                Some(text) => {
                    best = Some(text);
                    n += 1;
                }
                None => break,
            }
        }
    } else {
        while best.is_none() && n > 0 {
            n -= 1;
            best = fits(n)?;
        }
    }
    Ok(best)
}

/// A setting of the spec outside what it can make.
pub(super) fn spec_error(setting: &'static str, problem: String) -> EngineError {
    EngineError::Setting { setting, problem }
}

/// Whether an insert at `depth` goes before the filler sentence starting at token `cum`.
fn boundary_before(depth: f64, total: usize, cum: usize, t: usize) -> bool {
    let target = depth * total as f64;
    // Nearest boundary: this one (at `cum`) rather than the next (at `cum + t`).
    target <= cum as f64 + t as f64 / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_on_terminators_and_lines() {
        assert_eq!(
            split_sentences("A b. C? D\nE 1.5 f"),
            vec!["A b.", "C?", "D", "E 1.5 f"]
        );
    }
}
