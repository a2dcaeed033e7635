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
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::tokens;
use engine::train::{open_trainable, Mode, StepReport, TrainConfig, Trainables, Trainer};
use engine::{Engine, EngineError, GateFileDtype, PolicySpec};
use gate_core::Protection;
use model_zoo::train::{GateMode, Gating};
use model_zoo::{KeepAll, LogitsFor, WeightFormat};

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

/// Inference logits `[T, V]` of `toks` with a full cache (dense f32 weights).
fn inference_logits(path: &Path, toks: &[u32]) -> Tensor {
    let loaded = model_zoo::load(path, WeightFormat::Dense(DType::F32)).unwrap();
    let cfg = loaded.model.config().clone();
    let pool = kv_store::BlockPool::new(kv_store::PoolConfig::from_memory_budget(
        16,
        cfg.head_dim,
        kv_store::KvDtype::F32,
        256 << 20,
    ));
    let mut kv = kv_store::SequenceKv::new(&pool, cfg.n_layers, cfg.n_kv_heads);
    loaded
        .model
        .forward(toks, 0, &mut kv, &mut KeepAll, LogitsFor::All)
        .unwrap()
}

fn training_logits(engine: &Engine, toks: &[u32], gating: Option<Gating<'_>>) -> Tensor {
    let dec = open_trainable(engine.model_path(), engine.model_config()).unwrap();
    let inp = Tensor::from_vec(toks.to_vec(), (1, toks.len()), &Device::Cpu).unwrap();
    dec.forward(&inp, gating, None)
        .unwrap()
        .logits
        .squeeze(0)
        .unwrap()
}

#[test]
fn training_forward_equals_inference_on_a_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path());
    let toks = tokens(40, 3);
    let d = max_abs_diff(
        &training_logits(&engine, &toks, None),
        &inference_logits(dir.path(), &toks),
    );
    assert!(
        d < 1e-3,
        "full cache: training vs inference logits differ by {d}"
    );
}

#[test]
fn hard_flags_equal_the_ag_policy_in_threshold_mode() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(dir.path());
    let gates_path = dir.path().join("gates.safetensors");
    engine
        .random_gates(
            &engine::GateConfig {
                bias_init: 0.0,
                ..engine.gate_config()
            },
            7,
        )
        .and_then(|g| engine::policy::write_gates(&g, &gates_path, GateFileDtype::F32))
        .unwrap();
    let gates = gate_core::AttentionGate::load(
        &gates_path,
        &engine.model_identity().unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let toks = tokens(48, 9);
    let full = training_logits(&engine, &toks, None);
    let mut previous: Option<Tensor> = None;
    // No protection (the paper's setting), then sinks and a local window that straddles the
    // prefill's 16-token chunks.
    for protect in [
        Protection::NONE,
        Protection {
            sinks: 2,
            recent: 5,
        },
    ] {
        let policy = PolicySpec {
            gates: Some(gates_path.clone()),
            sinks: Some(protect.sinks),
            recent: Some(protect.recent),
            ..PolicySpec::new(engine::PolicyKind::Ag)
        }
        .build(&engine)
        .unwrap();
        let mut session = engine.session_with(policy).unwrap();
        let inference = session.prefill_all_logits(&toks).unwrap();
        let ratio = session.kv_report().eviction_ratio;
        assert!(ratio > 0.2, "random gates evicted too little ({ratio})");
        let gating = Gating {
            gates: &gates,
            mode: GateMode::Hard,
            protect,
        };
        let trained = training_logits(&engine, &toks, Some(gating));
        let d = max_abs_diff(&trained, &inference.to_dtype(DType::F32).unwrap());
        assert!(
            d < 1e-3,
            "hard flags, {protect:?}: training vs AG policy logits differ by {d}"
        );
        // Eviction changes the logits, and so do the protections (the comparisons are not
        // vacuous).
        assert!(max_abs_diff(&full, &trained) > 1e-3);
        if let Some(p) = &previous {
            assert!(max_abs_diff(p, &trained) > 1e-3);
        }
        previous = Some(trained);
    }
}

#[test]
fn training_forward_equals_inference_on_the_default_model() {
    let Some(path) = common::default_model() else {
        return;
    };
    let engine = Engine::builder()
        .model(&path)
        .weights(WeightFormat::Dense(DType::F32))
        .build()
        .unwrap();
    let toks = engine
        .tokenizer()
        .encode("The history of the city begins in the Roman era, when a small settlement grew on the river bank.", true)
        .unwrap();
    let d = max_abs_diff(
        &training_logits(&engine, &toks, None),
        &inference_logits(&path, &toks),
    );
    assert!(
        d < 1e-3,
        "default model: training vs inference logits differ by {d}"
    );
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

/// Runs `n` (>= 1) optimiser steps; the reports of the first and the last.
fn run_steps(t: &mut Trainer, n: usize) -> (StepReport, StepReport) {
    let first = t.train_step().unwrap();
    let mut last = first.clone();
    for _ in 1..n {
        last = t.train_step().unwrap();
    }
    (first, last)
}

#[test]
fn fifty_cpt_steps_reduce_the_loss_and_approach_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    let data = prose(dir.path());
    let mut t = Trainer::new(&engine, tiny_config(data, 50)).unwrap();
    let (first, last) = run_steps(&mut t, 50);
    assert!(
        last.loss < first.loss,
        "loss {} -> {}",
        first.loss,
        last.loss
    );
    let (d0, d1) = (
        (first.hard_evict - 0.5).abs(),
        (last.hard_evict - 0.5).abs(),
    );
    assert!(
        d1 < d0,
        "hard eviction {} -> {} (target 0.5)",
        first.hard_evict,
        last.hard_evict
    );
    assert!(
        d1 < 0.1,
        "hard eviction {} after 50 steps (target 0.5)",
        last.hard_evict
    );
}

#[test]
fn resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    let data = prose(dir.path());
    let cfg = tiny_config(data, 6);
    let mut straight = Trainer::new(&engine, cfg.clone()).unwrap();
    for _ in 0..6 {
        straight.train_step().unwrap();
    }
    let ckpt = dir.path().join("ckpt").join("checkpoint.safetensors");
    let mut first = Trainer::new(&engine, cfg.clone()).unwrap();
    let reports: Vec<_> = (0..3).map(|_| first.train_step().unwrap()).collect();
    first.save_checkpoint(&ckpt, &reports).unwrap();
    drop(first);
    let mut resumed = Trainer::new(&engine, cfg.clone()).unwrap();
    let steps: Vec<usize> = resumed
        .resume(&ckpt)
        .unwrap()
        .iter()
        .map(|r| r.step)
        .collect();
    assert_eq!((resumed.step(), steps), (3, vec![1, 2, 3]));
    for _ in 0..3 {
        resumed.train_step().unwrap();
    }
    for ((name, a), (_, b)) in straight
        .gates()
        .named_tensors()
        .iter()
        .zip(resumed.gates().named_tensors().iter())
    {
        let d = max_abs_diff(a, b);
        assert!(d < 1e-6, "{name}: resumed differs from straight by {d}");
    }
    // A different configuration is refused.
    let mut other = cfg;
    other.lr = 1e-3;
    let mut wrong = Trainer::new(&engine, other).unwrap();
    let err = wrong.resume(&ckpt).unwrap_err();
    assert!(
        matches!(&err, EngineError::Checkpoint { file, .. } if *file == ckpt),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(
        err.contains("different configuration")
            && err.contains("`lr` 0.05 in the checkpoint, 0.001 now"),
        "{err}"
    );
}

#[test]
fn calibration_sets_tau_to_the_target_quantile() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    for target in [0.3, 0.7] {
        let cfg = TrainConfig {
            target_evict: target,
            sinks: 2,
            window: 4,
            ..tiny_config(prose(dir.path()), 3)
        };
        let mut t = Trainer::new(&engine, cfg).unwrap();
        for _ in 0..3 {
            t.train_step().unwrap();
        }
        let ratio = t.calibrate_threshold(6, 3).unwrap();
        assert!(
            (ratio - target).abs() < 0.03,
            "target {target}: calibrated hard ratio {ratio}"
        );
        assert_ne!(t.gates().config().threshold, 0.5);
    }
}

#[test]
fn init_gates_starts_from_saved_gates() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    let data = prose(dir.path());
    let mut first = Trainer::new(&engine, tiny_config(data.clone(), 3)).unwrap();
    for _ in 0..3 {
        first.train_step().unwrap();
    }
    let saved = dir.path().join("cpt.safetensors");
    first.save_gates(&saved, GateFileDtype::F32).unwrap();
    let cfg = TrainConfig {
        init_gates: Some(saved),
        seed: 99, // a random init would differ
        ..tiny_config(data, 3)
    };
    let second = Trainer::new(&engine, cfg).unwrap();
    for ((name, a), (_, b)) in first
        .gates()
        .named_tensors()
        .iter()
        .zip(second.gates().named_tensors().iter())
    {
        assert_eq!(max_abs_diff(a, b), 0.0, "{name}");
    }
    // Gates of another model are refused, naming the file.
    let other_dir = dir.path().join("other-model");
    let mut other_cfg = model_zoo::random::tiny_config(2, 4, 2);
    other_cfg.max_position = 4096;
    engine::atomic::write_dir(&other_dir, |s| {
        model_zoo::random::write_random_model(s, &other_cfg, 6)
    })
    .unwrap();
    let other = Engine::builder().model(&other_dir).build().unwrap();
    let wrong = dir.path().join("wrong.safetensors");
    other
        .random_gates(&engine.gate_config(), 0)
        .and_then(|g| engine::policy::write_gates(&g, &wrong, GateFileDtype::F32))
        .unwrap();
    let cfg = TrainConfig {
        init_gates: Some(wrong),
        ..tiny_config(prose(dir.path()), 3)
    };
    let err = Trainer::new(&engine, cfg).err().unwrap().to_string();
    assert!(err.contains("wrong.safetensors"), "{err}");
}

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

/// Settings outside their domain are refused before any work, each naming its field (never a
/// command-line flag: front ends map the field to their own name).
#[test]
fn bad_settings_name_their_field() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    let data = prose(dir.path());
    let cases: [(fn(&mut TrainConfig), &str, &str); 9] = [
        (|c| c.data.clear(), "TrainConfig.data", "no data file"),
        (|c| c.seq_len = 0, "TrainConfig.seq_len", "got 0"),
        (
            |c| c.seq_len = 5000,
            "TrainConfig.seq_len",
            "context of 4096",
        ),
        (
            |c| c.batch = 1024,
            "TrainConfig.batch",
            "at most 16384 tokens",
        ),
        (
            |c| c.grad_accum = 5000,
            "TrainConfig.grad_accum",
            "at most 4096",
        ),
        (|c| c.lr = f64::NAN, "TrainConfig.lr", "got NaN"),
        (
            |c| c.target_evict = 1.5,
            "TrainConfig.target_evict",
            "[0, 1]",
        ),
        (|c| c.clip = -1.0, "TrainConfig.clip", "non-negative"),
        (|c| c.train = Trainables::Lora, "TrainConfig.lora", "`lora`"),
    ];
    for (spoil, field, says) in cases {
        let mut cfg = tiny_config(data.clone(), 1);
        spoil(&mut cfg);
        match Trainer::new(&engine, cfg) {
            Err(EngineError::Setting { setting, problem }) => {
                assert_eq!(setting, field, "{problem}");
                assert!(
                    problem.contains(says) && !problem.contains("--"),
                    "{problem}"
                );
            }
            Err(other) => panic!("{field}: expected a setting error, got {other}"),
            Ok(_) => panic!("{field}: accepted"),
        }
    }
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "A few words.").unwrap();
    let err = Trainer::new(&engine, tiny_config(short, 1)).err().unwrap();
    assert!(
        matches!(&err, EngineError::Setting { setting: "TrainConfig.data", problem }
            if problem.contains("shorter than one sequence of 33 tokens")),
        "{err}"
    );
}

#[test]
fn lora_trains_alone_and_sft_masks_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    let sft = dir.path().join("sft.jsonl");
    std::fs::write(
        &sft,
        "{\"prompt\": \"The key is 41. What is the key?\", \"answer\": \"41\"}\n{\"prompt\": \"The key is 7. What is the key?\", \"answer\": \"7\"}\n",
    )
    .unwrap();
    let ex = engine::train::dataset::load_sft(std::slice::from_ref(&sft), engine.tokenizer(), 64)
        .unwrap();
    for e in &ex {
        let counted = e.target_mask.iter().filter(|&&m| m).count();
        assert!((1..=4).contains(&counted), "CE on {counted} targets");
        assert!(
            e.valid.iter().filter(|&&v| v).count() < 64,
            "padding is not valid"
        );
    }
    let mut cfg = tiny_config(sft, 4);
    cfg.mode = Mode::Sft;
    cfg.seq_len = 64;
    cfg.train = Trainables::Lora;
    cfg.lora = Some(engine::train::LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec!["q".into(), "v".into()],
    });
    let mut t = Trainer::new(&engine, cfg).unwrap();
    let (first, last) = run_steps(&mut t, 4);
    assert!(
        last.ce < first.ce,
        "LoRA SFT CE {} -> {}",
        first.ce,
        last.ce
    );
    assert_eq!(last.hard_evict, 0.0, "LoRA alone uses no gates");
    t.save_lora(&dir.path().join("lora.safetensors")).unwrap();
}

#[cfg(feature = "default-gates")]
#[test]
fn policy_ag_defaults_to_the_committed_gates_only_for_the_default_model() {
    let Some(path) = common::default_model() else {
        return;
    };
    let engine = Engine::builder().model(&path).build().unwrap();
    match PolicySpec::new(engine::PolicyKind::Ag)
        .build(&engine)
        .unwrap()
    {
        engine::Policy::Ag { gates, .. } => {
            assert_eq!(gates.identity(), &engine.model_identity().unwrap())
        }
        other => panic!("expected the ag policy, got {}", other.name()),
    }
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_engine(dir.path());
    let err = PolicySpec::new(engine::PolicyKind::Ag)
        .build(&tiny)
        .unwrap_err();
    assert!(
        matches!(err, EngineError::Policy(engine::PolicyError::NeedsGates)),
        "{err}"
    );
    assert!(err.to_string().contains("needs gates"), "{err}");
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
