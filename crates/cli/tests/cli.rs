//! The `agate` binary as a user meets it: bad input gives one line naming what is wrong and a
//! non-zero exit (never a panic), and `generate --json` keeps its key contract.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn agate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agate"))
        .args(args)
        .output()
        .expect("run agate")
}

/// Asserts failure with exactly one stderr line that starts with `error:` and contains `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error:"), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "expected {needle:?} in: {stderr}"
    );
}

fn tiny_model(dir: &Path, max_position: usize) -> PathBuf {
    let mut cfg = model_zoo::random::tiny_config(2, 4, 2);
    cfg.max_position = max_position;
    let path = dir.join("tiny");
    model_zoo::random::write_random_model(&path, &cfg, 7).unwrap();
    path
}

#[test]
fn missing_model_file() {
    let out = agate(&["generate", "hi", "--model", "/nonexistent/model.gguf"]);
    assert_one_line_error(&out, "/nonexistent/model.gguf");
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    // A valid header and metadata, cut off in the middle of the tensor data.
    let real = engine::model_cache::ensure_default_model(&mut |_| {}).unwrap();
    let bytes = std::fs::read(&real).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let out = agate(&["generate", "hi", "--model", cut.to_str().unwrap()]);
    assert_one_line_error(&out, "truncated");
    // Cut inside the header: also a clean error.
    std::fs::write(&cut, &bytes[..1000]).unwrap();
    let out = agate(&["generate", "hi", "--model", cut.to_str().unwrap()]);
    assert_one_line_error(&out, "not a valid GGUF file");
}

/// A GGUF whose only metadata says `general.architecture = gptneox`.
fn write_gguf_with_architecture(path: &Path, arch: &str) {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    let key = "general.architecture";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    b.extend_from_slice(&(arch.len() as u64).to_le_bytes());
    b.extend_from_slice(arch.as_bytes());
    std::fs::write(path, b).unwrap();
}

#[test]
fn unsupported_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("neox.gguf");
    write_gguf_with_architecture(&path, "gptneox");
    let out = agate(&["generate", "hi", "--model", path.to_str().unwrap()]);
    assert_one_line_error(&out, "unsupported architecture `gptneox`");
}

#[test]
fn config_json_missing_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 64);
    let config = model.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(&config, json.to_string()).unwrap();
    let out = agate(&["generate", "hi", "--model", model.to_str().unwrap()]);
    assert_one_line_error(&out, "field `num_hidden_layers` is missing");
    assert_one_line_error(&out, "config.json");
}

#[test]
fn empty_prompt() {
    let out = agate(&["generate", ""]);
    assert_one_line_error(&out, "the prompt is empty");
}

#[test]
fn prompt_longer_than_context() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 64);
    let prompt = "x".repeat(100); // byte-level tokenizer: 100 tokens
    let out = agate(&["generate", &prompt, "--model", model.to_str().unwrap()]);
    assert_one_line_error(&out, "prompt of 100 tokens does not fit");
    assert_one_line_error(&out, "context is 64 tokens");
}

#[test]
fn negative_temperature() {
    let out = agate(&["generate", "hi", "--temp", "-1"]);
    assert_one_line_error(&out, "temperature must be >= 0, got -1");
}

#[test]
fn invalid_flag_values_are_named() {
    let out = agate(&["generate", "hi", "--weights", "q3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid weight format `q3`"));
    let out = agate(&["generate", "hi", "--top-p", "1.5"]);
    assert_one_line_error(&out, "top-p must be in (0, 1], got 1.5");
}

#[test]
fn generate_json_contract() {
    let out = agate(&[
        "generate",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--temp",
        "0",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(
        json["text"].as_str().unwrap().starts_with(" Paris"),
        "{json}"
    );
    assert_eq!(json["generated_tokens"], 8);
    assert_eq!(json["prompt_tokens"], 5);
    for key in ["prefill_tokens_per_s", "decode_tokens_per_s"] {
        assert!(json[key].as_f64().unwrap() > 0.0, "{key}: {json}");
    }
    let kv = &json["kv"];
    assert_eq!(kv["tokens_seen"], 12);
    assert_eq!(kv["tokens_retained"], 12);
    assert_eq!(kv["eviction_ratio"], 0.0);
    assert!(kv["bytes_in_use"].as_u64().unwrap() > 0);
    assert_eq!(kv["bytes_in_use"], kv["bytes_full"]);
}
