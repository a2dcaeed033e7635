//! Training data files: bad ones are refused naming the file and line; a multi-turn chat
//! learns every answer as a session renders it; `mix` reads CPT and SFT files together.

use std::path::{Path, PathBuf};

use engine::train::{Mode, Trainer};
use engine::EngineError;

use super::{prose, tiny_config, tiny_engine};

#[test]
fn bad_data_files_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"text\": 3}\n").unwrap();
    let err = Trainer::new(&engine, tiny_config(bad.clone(), 1))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("bad.jsonl:2:") && err.contains("`text`"),
        "{err}"
    );
    std::fs::write(&bad, "{\"prompt\": \"q\", \"answer\": \"a\"}\nnot json\n").unwrap();
    let mut cfg = tiny_config(bad.clone(), 1);
    cfg.mode = Mode::Sft;
    let err = Trainer::new(&engine, cfg).err().unwrap().to_string();
    assert!(
        err.contains("bad.jsonl:2:") && err.contains("invalid JSON"),
        "{err}"
    );
    // The line is a field of the error, and the JSON parser's error its source.
    let mut cfg = tiny_config(bad.clone(), 1);
    cfg.mode = Mode::Sft;
    let err = Trainer::new(&engine, cfg).err().unwrap();
    assert!(
        matches!(&err, EngineError::DataFile { file, line: Some(2), .. } if *file == bad),
        "{err:?}"
    );
    let source = std::error::Error::source(&err).unwrap();
    assert!(source.is::<serde_json::Error>(), "{source:?}");
    let missing = dir.path().join("missing.txt");
    let err = Trainer::new(&engine, tiny_config(missing, 1))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing.txt"), "{err}");
}

/// The turns of the chat of [`chat_file`].
const TURNS: [(&str, &str); 4] = [
    ("user", "My dog is called Max."),
    ("assistant", "Nice name."),
    ("user", "What is my dog called?"),
    ("assistant", "Max"),
];

/// `chat.jsonl` in `dir`: one SFT item, the multi-turn chat [`TURNS`].
fn chat_file(dir: &Path) -> PathBuf {
    let chat = dir.join("chat.jsonl");
    let messages: Vec<serde_json::Value> = TURNS
        .iter()
        .map(|(r, c)| serde_json::json!({ "role": r, "content": c }))
        .collect();
    std::fs::write(
        &chat,
        serde_json::json!({ "messages": messages }).to_string(),
    )
    .unwrap();
    chat
}

/// A multi-turn chat item learns every assistant answer (and its end of turn), and its tokens
/// are the conversation as a chat session renders it.
#[test]
fn chats_learn_every_answer_as_a_session_renders_them() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    let tok = engine.tokenizer();
    let chat = chat_file(dir.path());
    let ex = engine::train::dataset::load_sft(std::slice::from_ref(&chat), tok, 128).unwrap();
    let e = &ex[0];
    let end = tok
        .token_id("<|im_end|>")
        .or(tok.eos_ids().first().copied());
    let mut want = Vec::new();
    for answer in ["Nice name.", "Max"] {
        want.extend(tok.encode(answer, false).unwrap());
        want.extend(end);
    }
    let targets: Vec<u32> = (0..128)
        .filter(|&i| e.target_mask[i])
        .map(|i| e.tokens[i + 1])
        .collect();
    assert_eq!(targets, want);
    let n = e.valid.iter().filter(|&&v| v).count();
    let all: Vec<engine::ChatMessage> = TURNS
        .iter()
        .map(|(r, c)| engine::ChatMessage::new(r, c))
        .collect();
    // The whole rendering, up to the last end of turn (what follows it is never fed).
    let fed = tok.decode(&e.tokens[..n]).unwrap();
    let rendered = tok.apply_chat_template(&all, false).unwrap();
    assert!(
        rendered.starts_with(&fed) && rendered[fed.len()..].trim().is_empty(),
        "{fed:?} vs {rendered:?}"
    );
}

/// `mix` reads CPT and SFT files together, a file listed twice weighing twice; a chat that
/// does not end with an answer is refused with its file and line.
#[test]
fn mix_reads_both_kinds_and_weighs_each_file_by_its_count() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    let tok = engine.tokenizer();
    let chat = chat_file(dir.path());
    let sft = engine::train::dataset::load_sft(std::slice::from_ref(&chat), tok, 128).unwrap();
    let e = &sft[0];
    let text = prose(dir.path());
    let mixed =
        engine::train::dataset::load(Mode::Mix, &[text.clone(), chat.clone()], tok, 128).unwrap();
    let cpt = engine::train::dataset::load_cpt(std::slice::from_ref(&text), tok, 128).unwrap();
    assert_eq!(mixed.len(), cpt.len() + 1);
    assert!(mixed[..cpt.len()]
        .iter()
        .all(|e| e.target_mask.iter().all(|&m| m)));
    assert_eq!(mixed[cpt.len()], *e);
    // A file listed twice weighs twice: its examples appear twice, in the order given.
    let weighted = engine::train::dataset::load(
        Mode::Mix,
        &[text.clone(), text.clone(), chat.clone()],
        tok,
        128,
    )
    .unwrap();
    assert_eq!(weighted.len(), 2 * cpt.len() + 1);
    assert_eq!(weighted[..cpt.len()], weighted[cpt.len()..2 * cpt.len()]);
    assert_eq!(weighted[2 * cpt.len()], *e);

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    let err = engine::train::dataset::load(Mode::Mix, &[bad], tok, 128)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.jsonl:2") && err.contains("assistant"),
        "{err}"
    );
}

/// A file's format is read from its content, not its name: JSONL named `.txt`, `.JSONL` or
/// nothing gives the examples of the same file named `.jsonl` (never its `{"text": …}` lines
/// as text), in CPT and SFT alike; plain text stays text, and SFT refuses it.
#[test]
fn the_format_of_a_data_file_is_read_from_its_content() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    let tok = engine.tokenizer();
    let prose_text = std::fs::read_to_string(prose(dir.path())).unwrap();
    let record = serde_json::json!({ "text": prose_text }).to_string();
    let load = |mode: Mode, name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        engine::train::dataset::load(mode, &[path], tok, 32)
    };
    let jsonl = load(Mode::Cpt, "cpt.jsonl", &record).unwrap();
    for name in ["cpt.txt", "cpt.JSONL", "cpt"] {
        assert_eq!(load(Mode::Cpt, name, &record).unwrap(), jsonl, "{name}");
    }
    // A byte-order mark does not hide the format.
    let with_bom = format!("\u{feff}\n{record}\n");
    assert_eq!(load(Mode::Cpt, "bom.txt", &with_bom).unwrap(), jsonl);
    // The record's document alone is trained: the same examples as the plain text file.
    let text = load(Mode::Cpt, "prose", &prose_text).unwrap();
    assert_eq!(text, jsonl);
    assert_eq!(load(Mode::Mix, "prose.md", &prose_text).unwrap(), text);
    // A `.jsonl` name with a line that is not JSON is an error, not text.
    let err = load(Mode::Cpt, "bad.Jsonl", "just words\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.Jsonl:1: invalid JSON"), "{err}");
    let item = "{\"prompt\": \"The key is 4.\", \"answer\": \"4\"}\n";
    let sft = load(Mode::Sft, "sft.jsonl", item).unwrap();
    assert_eq!(load(Mode::Sft, "sft.txt", item).unwrap(), sft);
    let err = load(Mode::Sft, "plain.txt", &prose_text)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plain.txt") && err.contains("must be JSONL"),
        "{err}"
    );
}
