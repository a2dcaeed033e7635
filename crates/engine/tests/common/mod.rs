//! Shared fixtures for the engine's integration tests: the default model (fetched on first use,
//! loaded once per test binary; with `AGATE_OFFLINE` set and no cached copy, the tests that need
//! it print why they are skipped and return) and the llama.cpp reference outputs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use engine::{Engine, WeightFormat};

/// The default model's path, fetched on first use; `None` (after saying why the calling test
/// is skipped) when it is not cached and `AGATE_OFFLINE` forbids fetching it.
pub fn default_model() -> Option<PathBuf> {
    let path = engine::model_cache::default_model_unless_offline(&mut |l| eprintln!("{l}"))
        .expect("default model");
    if path.is_none() {
        eprintln!("skipped: this test needs the default model, which is not cached, and AGATE_OFFLINE is set");
    }
    path
}

/// The default model in the given weight format, loaded once per format per test binary
/// (`None`: skipped, see [`default_model`]).
pub fn default_engine(format: WeightFormat) -> Option<Engine> {
    static AUTO: OnceLock<Engine> = OnceLock::new();
    static F32: OnceLock<Engine> = OnceLock::new();
    let cell = match format {
        WeightFormat::Auto => &AUTO,
        WeightFormat::Dense(candle_core::DType::F32) => &F32,
        other => panic!("no shared engine for {other:?}"),
    };
    let path = default_model()?;
    let engine = cell.get_or_init(|| {
        Engine::builder()
            .model(path)
            .weights(format)
            .build()
            .expect("load default model")
    });
    Some(engine.clone())
}

/// One reference case recorded by a script in `scripts/reference/`.
#[derive(Clone, serde::Deserialize)]
pub struct Case {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub top5: Vec<Vec<(u32, f64)>>,
}

/// A tokenizer case.
#[derive(serde::Deserialize)]
pub struct TokCase {
    pub text: String,
    pub ids: Vec<u32>,
}

/// The fixture file.
#[derive(serde::Deserialize)]
pub struct Reference {
    pub model_sha256: String,
    pub cases: Vec<Case>,
    pub tokenizer: Vec<TokCase>,
}

/// llama.cpp's outputs (`scripts/reference/llama_cpp_reference.py`).
pub fn llama_cpp() -> Reference {
    serde_json::from_str(include_str!("../fixtures/llama_cpp_reference.json"))
        .expect("fixture parses")
}

/// The exact float64 numpy forward pass (`scripts/reference/numpy_reference.py`).
pub fn numpy() -> Reference {
    serde_json::from_str(include_str!("../fixtures/numpy_reference.json")).expect("fixture parses")
}

/// A tiny random Llama (`layers` layers, 6 query / 2 KV heads, head dim 16, context 8192)
/// written to a temp dir (kept alive by the returned guard) and loaded with the given KV dtype
/// and prefill chunk.
pub fn tiny_engine(
    layers: usize,
    seed: u64,
    kv_dtype: engine::KvDtype,
    prefill_chunk: usize,
) -> (tempfile::TempDir, Engine) {
    tiny_engine_with_context(layers, seed, kv_dtype, prefill_chunk, 8192)
}

/// [`tiny_engine`] with a context of `context` tokens.
pub fn tiny_engine_with_context(
    layers: usize,
    seed: u64,
    kv_dtype: engine::KvDtype,
    prefill_chunk: usize,
    context: usize,
) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("temp dir");
    write_tiny_model(dir.path(), layers, 6, seed, context);
    let engine = Engine::builder()
        .model(dir.path())
        .weights(WeightFormat::Dense(candle_core::DType::F32))
        .kv_dtype(kv_dtype)
        .prefill_chunk(prefill_chunk)
        .build()
        .expect("load tiny model");
    (dir, engine)
}

/// Writes a tiny random Llama into `dir`: `layers` layers, `heads` query / 2 KV heads, head
/// dim 16, a context of `context` tokens, weights drawn from `seed`.
pub fn write_tiny_model(dir: &Path, layers: usize, heads: usize, seed: u64, context: usize) {
    let mut cfg = model_zoo::random::tiny_config(layers, heads, 2);
    cfg.max_position = context;
    engine::atomic::write_dir(dir, |s| {
        model_zoo::random::write_random_model(s, &cfg, seed)
    })
    .expect("write tiny model");
}

/// The largest `|a[i] - b[i]|`.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `n` pseudo-random byte tokens (the tiny models' vocabulary), different per seed.
pub fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) % 256)
        .collect()
}

/// The policy `name` evicting the fraction `evict` of every head.
pub fn evicting(name: &str, evict: f32) -> engine::PolicySpec {
    engine::PolicySpec {
        evict: Some(evict),
        ..engine::PolicySpec::new(name.parse().expect("a policy name"))
    }
}

/// Random gates for `engine`'s model drawn from `seed` (keep bias `bias_init` when given, else
/// the default), written to `path` in f32; returns them.
pub fn write_random_gates(
    engine: &Engine,
    path: &Path,
    seed: u64,
    bias_init: Option<f32>,
) -> engine::AttentionGate {
    let default = engine.gate_config();
    let cfg = engine::GateConfig {
        bias_init: bias_init.unwrap_or(default.bias_init),
        ..default
    };
    let gates = engine.random_gates(&cfg, seed).expect("random gates");
    engine::policy::write_gates(&gates, path, engine::GateFileDtype::F32).expect("write gates");
    gates
}
