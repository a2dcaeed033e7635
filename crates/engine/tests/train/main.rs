//! Gate training (`engine::train`, `model_zoo::train`):
//! - the training forward equals the inference decoder: without gates (full cache) on a tiny
//!   random model and on the default model with dense f32 weights, and with hard flags under the
//!   Attention-Gate policy in threshold mode (in-context eviction, without and with sinks and a
//!   local window across prefill chunks) on a tiny model, within 1e-3;
//! - 50 steps of CPT on a tiny random model reduce the loss and move the hard eviction ratio
//!   toward the target (seconds);
//! - checkpoint + resume gives the same gates as an uninterrupted run;
//! - threshold calibration reaches the target ratio; `init_gates` starts from saved gates and
//!   refuses another model's;
//! - bad data files fail with errors naming the file and line, bad settings naming their field.
//!
//! `forward` holds the first (and the committed default gates), `run` the training runs and
//! their settings, `data` the data files.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

#[path = "../common/mod.rs"]
mod common;

mod data;
mod forward;
mod run;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use engine::train::{Mode, TrainConfig, Trainables};
use engine::Engine;

/// A tiny random model whose prefill runs in chunks of 16 tokens (so that protections cross
/// chunk boundaries).
fn tiny_engine(dir: &Path) -> Engine {
    common::write_tiny_model(dir, 2, 4, 5, 4096);
    Engine::builder()
        .model(dir)
        .kv_dtype(engine::KvDtype::F32)
        .prefill_chunk(16)
        .build()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    gate_core::testing::max_abs_diff(a, b).unwrap()
}

fn prose(dir: &Path) -> PathBuf {
    let text = "The river ran past the old mill, and every morning the miller counted the sacks of grain \
                that the farmers had left by the door. When the rains came the wheel turned faster. ";
    let p = dir.join("prose.txt");
    std::fs::write(&p, text.repeat(40)).unwrap();
    p
}

fn tiny_config(data: PathBuf, steps: usize) -> TrainConfig {
    TrainConfig {
        mode: Mode::Cpt,
        data: vec![data],
        heldout: vec![],
        heldout_seqs: 4,
        seq_len: 32,
        batch: 2,
        grad_accum: 2,
        steps,
        lr: 5e-2,
        warmup: 2,
        min_lr_ratio: 0.1,
        weight_decay: 0.0,
        clip: 1.0,
        seed: 1,
        target_evict: 0.5,
        lambda: 10.0,
        adapt_lambda: true,
        gate_bias_init: Some(1.0),
        gate_attention_window: None,
        init_gates: None,
        sinks: 0,
        window: 0,
        train: Trainables::Gates,
        lora: None,
    }
}
