//! Shared fixtures for the `agate` binary's integration tests: running the binary, tiny
//! random models written to a test's temporary directory, and the default model (`None`, with
//! the reason on stderr, when it is not cached and `AGATE_OFFLINE` forbids fetching it: the
//! test then reports itself skipped).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
