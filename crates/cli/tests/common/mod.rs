//! Shared fixtures for the `agate` binary's integration tests: running the binary (with or
//! without standard input) and checking how it ended (one `error:` line, success, never a
//! panic), tiny random models (and random gates for them) written to a test's temporary
//! directory, and the default model (`None`, with the reason on stderr, when it is not cached
//! and `AGATE_OFFLINE` forbids fetching it: the test then reports itself skipped).

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The default model's path, fetched on first use; `None` (after saying why the calling test
/// is skipped) when it is not cached and `AGATE_OFFLINE` is set.
pub fn default_model() -> Option<PathBuf> {
    let path = engine::model_cache::default_model_unless_offline(&mut |l| eprintln!("{l}"))
        .expect("default model");
    if path.is_none() {
        eprintln!("skipped: needs the default model (not cached; AGATE_OFFLINE is set)");
    }
    path
}

/// Runs the `agate` binary with `args` and collects its output.
pub fn agate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agate"))
        .args(args)
        .output()
        .expect("run agate")
}

/// Runs agate with `stdin` as its standard input.
pub fn agate_with_input(args: &[&str], stdin: impl AsRef<[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agate"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run agate");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_ref())
        .expect("write agate's stdin");
    child.wait_with_output().expect("wait for agate")
}

/// Stdout and stderr together.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Failure with one stderr line that starts with `error:` and contains every needle; no
/// output mentions a panic.
pub fn fails_with(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure: {}", text(out));
    assert!(!text(out).contains("panicked"), "panic: {}", text(out));
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error:"), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "expected {n:?} in: {stderr}");
    }
}

/// Success, and no output mentions a panic.
pub fn succeeds(out: &Output) {
    assert!(out.status.success(), "failed: {}", text(out));
    assert!(!text(out).contains("panicked"), "panic: {}", text(out));
}

/// The one JSON object a successful run printed on stdout.
pub fn stdout_json(out: &Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "agate failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "expected one line: {stdout}");
    serde_json::from_str(&stdout).expect("stdout is JSON")
}

/// A path as the `&str` an argument list takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// Random gates for `model`, made by `agate init-gates` into `dir/g.safetensors` (that path).
pub fn random_gates(dir: &Path, model: &Path) -> PathBuf {
    let gates = dir.join("g.safetensors");
    succeeds(&agate(&[
        "init-gates",
        "--model",
        s(model),
        "--out",
        s(&gates),
    ]));
    gates
}

/// Writes a tiny random Llama to `dir/tiny` and returns that path: `layers` layers, 4 query /
/// `kv_heads` KV heads, head dim 16, a context of `context` tokens, seed 7.
pub fn tiny_model(dir: &Path, layers: usize, kv_heads: usize, context: usize) -> PathBuf {
    let mut cfg = model_zoo::random::tiny_config(layers, 4, kv_heads);
    cfg.max_position = context;
    let path = dir.join("tiny");
    engine::atomic::write_dir(&path, |s| model_zoo::random::write_random_model(s, &cfg, 7))
        .expect("write tiny model");
    path
}
