//! Flags and sizes: values that overflow or make no sense are refused before any work, naming
//! the flag; flags the chosen policy would ignore are refused (a note when only some of several
//! policies ignore them); per-layer thresholds must fit the model; train-gates checks its
//! outputs before training; a full stdout is an error, not a panic.

use std::process::Command;

use crate::common::{agate, fails_with, random_gates, s, stdout_json, succeeds, text, tiny_model};

#[test]
fn sizes_that_overflow_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let m = s(&model);
    let huge = "18446744073709551615";
    let out = agate(&[
        "bench", "--model", m, "-d", huge, "-p", "8", "-n", "8", "-r", "1",
    ]);
    let sizes = "--depth + --prompt + --generate: ";
    fails_with(&out, &[sizes, "exceeds the model's context of 64"]);
    let out = agate(&["bench", "--model", m, "-n", huge, "-p", "8", "-r", "1"]);
    fails_with(&out, &[sizes, "exceeds the model's context of 64"]);
    let passkey = ["eval", "--model", m, "--synthetic", "passkey", "--length"];
    let out = agate(&[&passkey[..], &[huge]].concat());
    fails_with(&out, &["--length", "longer than the model's context of 64"]);
    let out = agate(&[&passkey[..], &["60", "-n", huge]].concat());
    fails_with(&out, &["--samples", "at most"]);
    let out = agate(&[
        "generate",
        "hi",
        "--model",
        m,
        "--policy",
        "streaming",
        "--window",
        huge,
    ]);
    fails_with(&out, &["--sinks + --window", "too large"]);
    let out = agate(&["bench", "--model", m, "-r", huge]);
    assert!(!out.status.success() && !text(&out).contains("panicked"));
}

// ---- output streams ----

#[cfg(target_os = "linux")]
#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    for args in [
        vec!["inspect", "--json", "--model", s(&model)],
        vec![
            "generate",
            "hello",
            "--model",
            s(&model),
            "--max-tokens",
            "4",
        ],
        vec!["--help"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_agate"))
            .args(&args)
            .stdout(full())
            .output()
            .unwrap();
        fails_with(&out, &["cannot write to standard output", "No space left"]);
    }
    // A full stderr: the error cannot be told, but the status says it.
    let out = Command::new(env!("CARGO_BIN_EXE_agate"))
        .args(["generate", ""])
        .stderr(full())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

// ---- flags ----

#[test]
fn flags_the_policy_ignores_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    for (flags, says) in [
        (
            &["--policy", "full", "--evict", "0.5"][..],
            "--evict does nothing with --policy full",
        ),
        (
            &["--policy", "h2o", "--gates", "x"],
            "--gates does nothing with --policy h2o",
        ),
        (
            &["--policy", "ag", "--evict", "0.5"],
            "--evict does nothing with --policy ag in threshold mode",
        ),
        (
            &["--policy", "tova", "--window", "4"],
            "--window does nothing with --policy tova",
        ),
        (
            &["--policy", "streaming", "--keep", "8", "--window", "4"],
            "--window does nothing with --policy streaming",
        ),
        // A policy option of another policy.
        (
            &[
                "--policy",
                "h2o",
                "--evict",
                "0.5",
                "--policy-opt",
                "kernel=5",
            ],
            "--policy-opt: `kernel` does not apply to h2o",
        ),
    ] {
        let out = agate(&[&["generate", "hi", "--model", s(&model)][..], flags].concat());
        fails_with(&out, &[says]);
    }
    // Empty texts are refused when the flags are read (clap's usage error): an empty stop
    // text would end every generation at once, an empty model id names nothing.
    for (args, says) in [
        (
            &["generate", "hi", "--stop", ""][..],
            "a value is required for '--stop <STOP>'",
        ),
        (
            &["serve", "--model-name", ""][..],
            "a value is required for '--model-name <ID>'",
        ),
    ] {
        let out = agate(&[args, &["--model", s(&model)][..]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.starts_with("error: "),
            "{stderr}"
        );
        assert!(
            stderr.contains(says) && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

/// `generate "hi"` on a tiny model of 2 layers under ag with random gates, plus `flags`.
fn generate_ag(flags: &[&str]) -> std::process::Output {
    generate_ag_on("hi", flags)
}

/// [`generate_ag`] of `prompt` (the same model and gates on every call: both are seeded).
fn generate_ag_on(prompt: &str, flags: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let gates = random_gates(dir.path(), &model);
    let base = [
        "generate",
        prompt,
        "--model",
        s(&model),
        "--max-tokens",
        "2",
        "--policy",
        "ag",
        "--gates",
        s(&gates),
    ];
    agate(&[&base[..], flags].concat())
}

/// `--layer-thresholds` gives one threshold per model layer, for ag in threshold mode only: a
/// wrong count and a policy that ignores it are one error line naming the flag.
#[test]
fn layer_thresholds_must_fit_the_model_and_the_policy() {
    succeeds(&generate_ag(&["--layer-thresholds", "0,1"]));
    fails_with(
        &generate_ag(&["--layer-thresholds", "0.5,0.5,0.5"]),
        &["error: --layer-thresholds gives 3 thresholds, but the model has 2 layers: give one per layer"],
    );
    fails_with(
        &generate_ag(&["--ag-mode", "budget", "--layer-thresholds", "0.5,0.5"]),
        &["--layer-thresholds does nothing with --policy ag in budget mode"],
    );
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let out = agate(&[
        "generate",
        "hi",
        "--model",
        s(&model),
        "--policy",
        "h2o",
        "--layer-thresholds",
        "0.5,0.5",
    ]);
    fails_with(
        &out,
        &["error: --layer-thresholds does nothing with --policy h2o (Attention-Gate only)"],
    );
    // Several policies that all do without it: each named with its own reason.
    let out = agate(&[
        "bench",
        "--model",
        s(&model),
        "--policy",
        "full,h2o,ag",
        "--ag-mode",
        "budget",
        "--layer-thresholds",
        "0.5,0.5",
    ]);
    fails_with(
        &out,
        &["error: --layer-thresholds does nothing with --policy full, h2o (Attention-Gate only), \
           ag in budget mode (each head keeps its budget of the most likely tokens); remove it"],
    );
}

/// `--threshold` and each `--layer-thresholds` value are fractions in [0, 1], and one excludes
/// the other: refused when the flags are read, naming the flag.
#[test]
fn thresholds_are_fractions_and_exclude_each_other() {
    for (flags, says) in [
        (
            &["--threshold", "1.5"][..],
            &["--threshold <THRESHOLD>", "must be in [0, 1], got 1.5"][..],
        ),
        (
            &["--layer-thresholds", "0.5,1.5"][..],
            &[
                "--layer-thresholds <T0,T1,...>",
                "must be in [0, 1], got 1.5",
            ][..],
        ),
        (
            &["--layer-thresholds", "NaN,0.5"],
            &[
                "--layer-thresholds <T0,T1,...>",
                "must be in [0, 1], got NaN",
            ],
        ),
        (
            &["--layer-thresholds", "0.5,x"],
            &["--layer-thresholds <T0,T1,...>", "`x` is not a number"],
        ),
        (
            &["--layer-thresholds", "0.5,0.5", "--threshold", "0.5"],
            &[
                "--layer-thresholds <T0,T1,...>",
                "cannot be used with",
                "--threshold",
            ],
        ),
    ] {
        let out = generate_ag(flags);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.starts_with("error: ") && !stderr.contains("panicked"),
            "{stderr}"
        );
        for needle in says {
            assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
        }
    }
}

/// train-gates: flags the run would ignore, or fail on only after training.
#[test]
fn train_gates_flags_the_run_would_ignore_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let m = s(&model);
    let train = |extra: &[&str]| {
        let mut args = vec!["train-gates", "--model", m, "--data", "x.txt"];
        args.extend(extra);
        agate(&args)
    };
    fails_with(
        &train(&["--lora-out", "a.safetensors"]),
        &["--lora-out does nothing with --train gates"],
    );
    fails_with(
        &train(&["--lora-rank", "4"]),
        &["--lora-rank does nothing with --train gates"],
    );
    fails_with(
        &train(&[
            "--train",
            "lora",
            "--lora-rank",
            "4",
            "--calibrate-seqs",
            "2",
        ]),
        &["--calibrate-seqs does nothing with --train lora"],
    );
    fails_with(
        &train(&["--heldout-seqs", "4"]),
        &["--heldout-seqs does nothing without --heldout"],
    );
    fails_with(
        &train(&["--checkpoint-every", "5"]),
        &["--checkpoint-every does nothing without --checkpoint-dir"],
    );
    // Training from given gates keeps their bias and window: flags setting them are refused.
    for flag in ["--gate-attention-window", "--gate-bias-init"] {
        let out = agate(&[
            "train-gates",
            "--model",
            m,
            "--data",
            "d.jsonl",
            "--init-gates",
            "g.safetensors",
            flag,
            "8",
            "--out",
            "o.safetensors",
        ]);
        fails_with(&out, &[flag, "does nothing with --init-gates"]);
    }
}

/// The training settings' own checks name the flags, before the model loads; too little text
/// for one sequence names the file and `--seq-len`.
#[test]
fn train_gates_settings_name_their_flags() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "A few words.").unwrap();
    let train = |extra: &[&str]| {
        let mut args = vec!["train-gates", "--model", s(&model), "--data", s(&short)];
        args.extend(extra);
        agate(&args)
    };
    let lora = ["--train", "both", "--lora-rank"];
    for (extra, says) in [
        (
            &["--heldout", "h.txt", "--heldout-seqs", "0"][..],
            &["--heldout-seqs: must be a positive number, got 0"][..],
        ),
        (&[&lora[..], &["0"]].concat(), &["--lora-rank: ", "got 0"]),
        (
            &[&lora[..], &["2", "--lora-alpha", "NaN"]].concat(),
            &["--lora-alpha: ", "got NaN"],
        ),
        (
            &[&lora[..], &["2", "--lora-targets", "q,zz"]].concat(),
            &["--lora-targets: unknown `zz`"],
        ),
        (
            &["--seq-len", "32"][..],
            &[
                "--seq-len: 32 (plus 1 for the next-token target: 33 tokens)",
                "short.txt",
            ][..],
        ),
    ] {
        fails_with(&train(extra), says);
    }
}

/// Several policies: a note names those that run without a flag, and a policy named twice
/// runs once.
#[test]
fn several_policies_run_with_a_note_naming_those_a_flag_does_nothing_for() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let m = s(&model);
    let out = agate(&[
        "bench", "--model", m, "--policy", "full,h2o", "--evict", "0.5", "-p", "8", "-n", "2",
        "-r", "1",
    ]);
    succeeds(&out);
    assert!(
        text(&out).contains("--evict does nothing with full"),
        "{}",
        text(&out)
    );
    let out = agate(&[
        "bench",
        "--model",
        m,
        "--policy",
        "h2o,snapkv",
        "--evict",
        "0.5",
        "--policy-opt",
        "kernel=5",
        "-p",
        "8",
        "-n",
        "2",
        "-r",
        "1",
    ]);
    succeeds(&out);
    assert!(
        text(&out).contains("--policy-opt kernel does nothing with h2o"),
        "{}",
        text(&out)
    );
    let out = agate(&[
        "bench", "--model", m, "--policy", "h2o,h2o", "-p", "8", "-n", "2", "-r", "1", "--json",
    ]);
    succeeds(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--policy names h2o more than once"),
        "{}",
        text(&out)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["repetitions"], 1, "{row}");
}

/// train-gates checks its outputs before training: never one of the inputs, always writable.
#[test]
fn train_gates_outputs_are_checked_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let m = s(&model);
    let data = dir.path().join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"hello\"}\n").unwrap();
    let d = s(&data);
    let train = |extra: &[&str]| {
        let mut args = vec!["train-gates", "--model", m, "--data", d, "--steps", "1"];
        args.extend_from_slice(extra);
        agate(&args)
    };
    fails_with(&train(&["--out", d]), &["--out", "is also --data"]);
    fails_with(
        &train(&["--out", "g.safetensors", "--log", d]),
        &["--log", "is also --data"],
    );
    // Outputs that do not exist yet are compared by the file they name.
    // (Refused before anything is written, so the working folder is left as it was.)
    fails_with(
        &train(&[
            "--out",
            "./no-such-gates.safetensors",
            "--log",
            "no-such-gates.safetensors",
        ]),
        &["--log", "is also --out"],
    );
    let plot = dir.path().join("p.svg");
    fails_with(
        &train(&["--out", s(&plot), "--plot", s(&plot)]),
        &["--plot", "is also --out"],
    );
    let missing = dir.path().join("no/such/g.safetensors");
    fails_with(
        &train(&["--out", s(&missing)]),
        &["--out", "does not exist"],
    );
    fails_with(
        &train(&["--out", s(dir.path())]),
        &["--out", "is a directory"],
    );
    assert_eq!(
        std::fs::read_to_string(&data).unwrap(),
        "{\"text\": \"hello\"}\n"
    );
}

/// Values that leave a command nothing sensible to do are refused before any work, naming the
/// flag.
#[test]
fn absurd_values_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let train = |extra: &[&str]| {
        let mut args = vec!["train-gates", "--model", s(&model), "--data", "x.txt"];
        args.extend(extra);
        agate(&args)
    };
    fails_with(
        &train(&["--seq-len", "1"]),
        &["--seq-len 1", "too short", "use --seq-len 2 or more"],
    );
    fails_with(
        &train(&["--seq-len", "16", "--sinks", "16"]),
        &["--sinks 16", "not below --seq-len 16"],
    );
    fails_with(
        &train(&["--seq-len", "16", "--sinks", "4", "--window", "12"]),
        &[
            "--seq-len 16",
            "--sinks 4 and --window 12",
            "use --seq-len 18 or more",
        ],
    );
    // A request timeout of zero would abandon every request.
    let out = agate(&["bench-serve", "--timeout", "0"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("'0' for '--timeout <TIMEOUT>'"),
        "{}",
        text(&out)
    );
}

/// `--threshold 1` flags every token out, exactly as 1 in every layer does.
#[test]
fn threshold_one_is_one_in_every_layer() {
    let kv = |threshold: &[&str]| {
        let flags = [threshold, &["--window", "4", "--json"]].concat();
        let out = generate_ag_on("a long enough prompt to leave the window", &flags);
        stdout_json(&out)["kv"].clone()
    };
    let uniform = kv(&["--threshold", "1"]);
    assert_eq!(uniform, kv(&["--layer-thresholds", "1,1"]));
    assert!(
        uniform["eviction_ratio"].as_f64().unwrap() > 0.5,
        "{uniform}"
    );
}

/// Notes come only once every check passed: a command that takes one policy refuses several,
/// and a flag no named policy uses is refused, each as the only line.
#[test]
fn several_policies_where_one_is_taken_is_the_only_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let m = s(&model);
    let eval = [
        "eval",
        "--model",
        m,
        "--synthetic",
        "passkey",
        "--length",
        "48",
        "-n",
        "1",
    ];
    let policies = ["--policy", "full,h2o", "--evict", "0.5"];
    fails_with(
        &agate(&[&eval[..], &policies].concat()),
        &["--policy: name one policy, or sweep several with --sweep RATIOS"],
    );
    fails_with(
        &agate(&[&["generate", "hi", "--model", m][..], &policies].concat()),
        &["--policy: name one policy here, got full,h2o"],
    );
    let twice = ["--policy", "full, full", "--threshold", "0.5"];
    fails_with(
        &agate(&[&["generate", "hi", "--model", m][..], &twice].concat()),
        &["--threshold does nothing with --policy full (Attention-Gate only); remove it"],
    );
}
