//! Training runs on a tiny model: the loss falls and the eviction ratio approaches the target,
//! resuming continues exactly, calibration meets the target, `init_gates` starts from saved
//! gates, LoRA trains alone; bad settings are refused naming their field.

use std::ops::ControlFlow;

use engine::train::{Mode, StepReport, TrainConfig, Trainables, Trainer};
use engine::{Engine, EngineError, GateFileDtype};

use super::{max_abs_diff, prose, tiny_config, tiny_engine};

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
        let mut passes = Vec::new();
        let ratio = t
            .calibrate_threshold(6, 3, &mut |done, total| {
                passes.push((done, total));
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(passes, (1..=24).map(|d| (d, 24)).collect::<Vec<_>>());
        assert!(
            (ratio - target).abs() < 0.03,
            "target {target}: calibrated hard ratio {ratio}"
        );
        assert_ne!(t.gates().config().threshold, 0.5);
        // More sequences than the data holds: capped at what it holds (one round: two passes).
        let n = t.n_examples();
        let mut last = (0, 0);
        t.calibrate_threshold(n + 100, 1, &mut |done, total| {
            last = (done, total);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(last, (2 * n, 2 * n));
        // Stopped in its second round (after a first round moved tau): tau is left as it was.
        let before = t.gates().config().threshold;
        let e = t
            .calibrate_threshold(2, 3, &mut |done, _| {
                if done == 3 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap_err();
        assert!(matches!(e, EngineError::Stopped(_)), "{e}");
        assert_eq!(t.gates().config().threshold, before);
    }
}

/// A loss that stops being finite after an update is the run's divergence, never blamed on the
/// model; parameters no longer finite are not written.
#[test]
fn a_huge_learning_rate_diverges() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    let cfg = TrainConfig {
        lr: 1e38,
        warmup: 0,
        ..tiny_config(prose(dir.path()), 4)
    };
    let mut t = Trainer::new(&engine, cfg).unwrap();
    t.train_step().unwrap();
    let failed = (1..4).find_map(|_| t.train_step().err());
    match failed {
        Some(EngineError::TrainingDiverged { step }) => {
            assert!(step >= 2, "diverged at step {step}");
            let err = EngineError::TrainingDiverged { step }.to_string();
            assert!(err.starts_with("training diverged at step"), "{err}");
        }
        Some(other) => panic!("expected divergence, got {other:?}"),
        None => {
            let out = dir.path().join("g.safetensors");
            let err = t.save_gates(&out, GateFileDtype::F32).unwrap_err();
            assert!(matches!(err, EngineError::Diverged { .. }), "{err:?}");
        }
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

/// A change that puts a setting outside its domain.
type Spoil = fn(&mut TrainConfig);

/// Settings outside their domain are refused before any work, each naming its field (never a
/// command-line flag: front ends map the field to their own name).
#[test]
fn bad_settings_name_their_field() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    let data = prose(dir.path());
    // (how the setting is spoiled, the field named, what the problem says)
    let cases: [(Spoil, &str, &str); 15] = [
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
            |c| (c.batch, c.seq_len) = (1, 20_000),
            "TrainConfig.seq_len",
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
        (|c| lora(c).rank = 0, "TrainConfig.lora.rank", "got 0"),
        (
            |c| lora(c).alpha = f32::NAN,
            "TrainConfig.lora.alpha",
            "got NaN",
        ),
        (
            |c| lora(c).targets = vec!["zz".into()],
            "TrainConfig.lora.targets",
            "`zz`",
        ),
        (
            |c| lora(c).rank = 1000,
            "TrainConfig.lora.rank",
            "hidden size",
        ),
        (
            |c| (c.heldout, c.heldout_seqs) = (c.data.clone(), 0),
            "TrainConfig.heldout_seqs",
            "got 0",
        ),
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
}

/// CPT text shorter than one sequence is refused naming the sequence length and the files,
/// held-out files alike.
#[test]
fn too_little_text_names_the_files_and_the_sequence_length() {
    let dir = tempfile::tempdir().unwrap();
    let engine = tiny_engine(&dir.path().join("model"));
    let data = prose(dir.path());
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "A few words.").unwrap();
    // Too little text for one sequence: the sequence length and every file named.
    let err = Trainer::new(&engine, tiny_config(short.clone(), 1))
        .err()
        .unwrap();
    assert!(
        matches!(&err, EngineError::Setting { setting: "TrainConfig.seq_len", problem }
            if problem.starts_with("32 (plus 1 for the next-token target: 33 tokens)")
                && problem.contains("short.txt")),
        "{err}"
    );
    // The same in held-out files names them.
    let t = Trainer::new(&engine, tiny_config(data, 1)).unwrap();
    let err = t.load_heldout(&[short]).err().unwrap().to_string();
    assert!(err.contains("short.txt"), "{err}");
}

/// The LoRA settings of `c`, made with valid values when unset.
fn lora(c: &mut TrainConfig) -> &mut engine::train::LoraConfig {
    c.train = Trainables::Both;
    c.lora.get_or_insert_with(|| engine::train::LoraConfig {
        rank: 2,
        alpha: 4.0,
        targets: vec!["q".into()],
    })
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
