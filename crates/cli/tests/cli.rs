//! The `agate` binary as a user meets it: bad input gives one line naming what is wrong and a
//! non-zero exit (never a panic), and `generate --json` keeps its key contract.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

mod common;

use std::path::Path;
use std::process::Command;

use common::{agate, fails_with, tiny_model};

/// With `AGATE_OFFLINE` set and an empty cache nothing is fetched: one line says why.
#[test]
fn offline_without_a_cached_model_names_the_switch() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_agate"))
        .args(["generate", "hi"])
        .env("AGATE_HOME", home.path())
        .env("AGATE_OFFLINE", "1")
        .output()
        .unwrap();
    fails_with(&out, &["AGATE_OFFLINE is set"]);
    assert!(
        !home.path().join("models").exists()
            || std::fs::read_dir(home.path().join("models"))
                .unwrap()
                .next()
                .is_none()
    );
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    // A valid header and metadata, cut off in the middle of the tensor data.
    let Some(real) = common::default_model() else {
        return;
    };
    let bytes = std::fs::read(&real).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let out = agate(&["generate", "hi", "--model", cut.to_str().unwrap()]);
    fails_with(&out, &["truncated"]);
    // Cut inside the header: also a clean error.
    std::fs::write(&cut, &bytes[..1000]).unwrap();
    let out = agate(&["generate", "hi", "--model", cut.to_str().unwrap()]);
    fails_with(&out, &["not a valid GGUF file"]);
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
    fails_with(&out, &["unsupported architecture `gptneox`"]);
}

#[test]
fn config_json_missing_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let config = model.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("num_hidden_layers");
    std::fs::write(&config, json.to_string()).unwrap();
    let out = agate(&["generate", "hi", "--model", model.to_str().unwrap()]);
    fails_with(
        &out,
        &["field `num_hidden_layers` is missing", "config.json"],
    );
}

#[test]
fn empty_prompt() {
    let out = agate(&["generate", ""]);
    fails_with(&out, &["the prompt is empty"]);
}

#[test]
fn prompt_longer_than_context() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let prompt = "x".repeat(100); // byte-level tokenizer: 100 tokens
    let out = agate(&["generate", &prompt, "--model", model.to_str().unwrap()]);
    fails_with(
        &out,
        &["prompt of 100 tokens does not fit", "context is 64 tokens"],
    );
}

#[test]
fn invalid_flag_values_are_named() {
    let out = agate(&["generate", "hi", "--weights", "q3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid weight format `q3`"));
    let out = agate(&["generate", "hi", "--top-p", "1.5"]);
    fails_with(&out, &["--top-p: top-p must be in (0, 1], got 1.5"]);
    // A negative number is a flag's (bad) value, not an unknown argument.
    let out = agate(&["generate", "hi", "--max-tokens", "-3"]);
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("'-3' for '--max-tokens <MAX_TOKENS>': expected a whole number >= 0"));
    let out = agate(&["generate", "hi", "--policy", "h2o", "--evict", "-0.5"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be in [0, 1), got -0.5"));
    let out = agate(&["generate", "hi", "--temp", "-1"]);
    fails_with(
        &out,
        &["--temp: temperature must be finite and >= 0, got -1"],
    );
    let out = agate(&["generate", "hi", "--temp", "inf"]);
    fails_with(
        &out,
        &["--temp: temperature must be finite and >= 0, got inf"],
    );
    // Policy names are lower case; another spelling is told the names.
    let out = agate(&["generate", "hi", "--policy", "H2O"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("unknown policy `H2O`")
            && stderr.contains("full, ag, random, streaming, h2o"),
        "{stderr}"
    );
}

/// A prompt the KV pool cannot hold: the error says which flag sizes the pool.
#[test]
fn a_full_pool_names_the_flag_that_sizes_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 8192);
    let prompt = "x".repeat(5000);
    let out = agate(&[
        "generate",
        &prompt,
        "--model",
        model.to_str().unwrap(),
        "--kv-memory-mb",
        "1",
        "--max-tokens",
        "2",
    ]);
    fails_with(&out, &["out of KV blocks", "--kv-memory-mb"]);
}

/// bench-serve without a server fails at once, naming the URL (no table of zeros).
#[test]
fn bench_serve_without_a_server_is_one_error() {
    let out = agate(&["bench-serve", "--url", "http://127.0.0.1:1"]);
    fails_with(&out, &["--url http://127.0.0.1:1: cannot reach the server"]);
    assert!(out.stdout.is_empty());
}

/// JSON has no NaN or infinity: bench-serve refuses them instead of sending `null` (which the
/// server would read as "use the default", measuring a setting nobody asked for).
#[test]
fn bench_serve_refuses_non_finite_request_values() {
    for (flag, value, why) in [
        ("--kv-evict", "NaN", "must be in [0, 1), got NaN"),
        ("--kv-evict", "inf", "must be in [0, 1), got inf"),
        ("--temperature", "NaN", "must be a finite number"),
    ] {
        let out = agate(&["bench-serve", "--url", "http://127.0.0.1:1", flag, value]);
        refused(&out, &[flag, why]);
    }
}

/// A failure whose first stderr line (clap adds a usage line) holds every needle; no stdout.
fn refused(out: &std::process::Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().next().unwrap_or("");
    assert!(!out.status.success() && out.stdout.is_empty(), "{stderr}");
    assert!(first.starts_with("error:"), "{stderr}");
    for n in needles {
        assert!(first.contains(n), "expected {n:?} in: {stderr}");
    }
}

/// bench-serve checks the `kv_*` values and the URL as agate's own flags are checked, before
/// any request: a bad one is one error naming it, never "N of N requests failed".
#[test]
fn bench_serve_checks_its_values_before_sending() {
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["--kv-policy", "nope"],
            &["--kv-policy", "unknown policy `nope`"],
        ),
        (
            &["--kv-evict", "2"],
            &["--kv-evict", "must be in [0, 1), got 2"],
        ),
        (&["--kv-keep", "0"], &["--kv-keep", "0"]),
        (
            &["--kv-keep", "8", "--kv-evict", "0.5"],
            &["--kv-keep", "--kv-evict"],
        ),
        (&["--url", "notaurl"], &["--url notaurl: not a valid URL"]),
    ];
    for (args, expected) in cases {
        let mut all = vec!["bench-serve"];
        if args[0] != "--url" {
            all.extend(["--url", "http://127.0.0.1:1"]);
        }
        all.extend_from_slice(args);
        refused(&agate(&all), expected);
    }
}

/// More threads than cores would make the spin-waiting pools crawl (it looks like a hang):
/// agate says so and uses the cores it has.
#[test]
fn more_threads_than_cores_are_capped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let out = agate(&[
        "--threads",
        "1024",
        "generate",
        "hi",
        "--model",
        model.to_str().unwrap(),
        "--max-tokens",
        "2",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(
        stderr.contains(&format!(
            "--threads 1024 is more than the {cores} cores available; using {cores}"
        )),
        "{stderr}"
    );
}

#[test]
fn generate_json_contract() {
    let Some(_) = common::default_model() else {
        return;
    };
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

/// A held-out file that cannot be used is refused before training, not after it: nothing is
/// written.
#[test]
fn train_gates_checks_the_heldout_file_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 4096);
    let (data, empty) = (dir.path().join("prose.txt"), dir.path().join("empty.txt"));
    std::fs::write(&data, "The river ran past the old mill. ".repeat(40)).unwrap();
    std::fs::write(&empty, "").unwrap();
    let out_file = dir.path().join("gates.safetensors");
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let out = agate(&[
        "train-gates",
        "--model",
        &p(&model),
        "--data",
        &p(&data),
        "--seq-len",
        "16",
        "--steps",
        "1",
        "--heldout",
        &p(&empty),
        "--out",
        &p(&out_file),
    ]);
    fails_with(&out, &["empty.txt"]);
    assert!(!out_file.exists());
}

/// Runs `train-gates` on the files of `dir` (the tiny model, prose.txt; checkpoints in ckpt/,
/// the log train.jsonl, the gates gates.safetensors) for `steps` steps with the protections
/// (2 sinks, a window of 3) and a calibrated threshold, plus `extra` flags; returns stderr.
fn train_in(dir: &Path, steps: &str, extra: &[&str]) -> String {
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let mut args: Vec<String> = [
        "train-gates",
        "--model",
        &p("tiny"),
        "--data",
        &p("prose.txt"),
        "--seq-len",
        "24",
        "--steps",
        steps,
        "--warmup",
        "2",
        "--sinks",
        "2",
        "--window",
        "3",
        "--checkpoint-dir",
        &p("ckpt"),
        "--checkpoint-every",
        "3",
        "--log",
        &p("train.jsonl"),
        "--out",
        &p("gates.safetensors"),
        "--calibrate-seqs",
        "4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = agate(&refs);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

/// `train-gates` end to end on a tiny model: checkpoints, an interrupted run resumed with the
/// log kept up to the checkpoint, the curve drawn as PNG and SVG over the whole run, and the
/// threshold calibrated into the gates file with the training protections.
#[test]
fn train_gates_resumes_and_draws_the_whole_run() {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), 2, 2, 4096);
    std::fs::write(
        dir.path().join("prose.txt"),
        "The river ran past the old mill, and every morning the miller counted the sacks. "
            .repeat(60),
    )
    .unwrap();
    let log = dir.path().join("train.jsonl");
    let (png, svg) = (dir.path().join("curve.png"), dir.path().join("curve.svg"));
    let p = |p: &Path| p.to_str().unwrap().to_string();
    train_in(dir.path(), "5", &[]);
    // A crash after step 5 but before the next checkpoint: the log runs ahead of the
    // checkpoint (step 5 was checkpointed at the end; pretend step 6 was logged after it).
    let mut text = std::fs::read_to_string(&log).unwrap();
    let last = text
        .lines()
        .last()
        .unwrap()
        .replace("\"step\":5", "\"step\":6");
    text.push_str(&last);
    text.push('\n');
    std::fs::write(&log, text).unwrap();
    let stderr = train_in(dir.path(), "8", &["--resume", "--plot", &p(&png)]);
    assert!(stderr.contains("resumed from"), "{stderr}");
    assert!(stderr.contains("threshold calibrated"), "{stderr}");
    let steps: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    // Export again without training (steps = the checkpoint's), drawing SVG.
    train_in(dir.path(), "8", &["--resume", "--plot", &p(&svg)]);
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.starts_with("<svg") && svg_text.contains("hard eviction"));
    // The gates carry the calibrated threshold and the training protections.
    let bytes = std::fs::read(dir.path().join("gates.safetensors")).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()["gate_config"]).unwrap();
    assert_eq!(
        (cfg["sinks"].as_u64(), cfg["window"].as_u64()),
        (Some(2), Some(3))
    );
    assert_ne!(cfg["threshold"].as_f64(), Some(0.5), "{cfg}");
}

/// `generate --policy pyramidkv --evict R --json` on a 30-layer model and a
/// 1,009-token prompt reports the requested ratio (within one token).
#[test]
fn generate_pyramidkv_meets_the_requested_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = model_zoo::random::tiny_config(30, 4, 2);
    cfg.max_position = 4096;
    let model = dir.path().join("tiny30");
    engine::atomic::write_dir(&model, |s| {
        model_zoo::random::write_random_model(s, &cfg, 5)
    })
    .unwrap();
    // The random models' tokenizer is byte-level: one token per byte.
    let prompt: String = "The grass is green. The sky is blue. "
        .chars()
        .cycle()
        .take(1009)
        .collect();
    for ratio in ["0.25", "0.5", "0.75"] {
        let out = agate(&[
            "generate",
            &prompt,
            "--model",
            model.to_str().unwrap(),
            "--policy",
            "pyramidkv",
            "--evict",
            ratio,
            "--max-tokens",
            "1",
            "--json",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let t = v["kv"]["tokens_seen"].as_f64().unwrap();
        assert_eq!(t, 1009.0, "{v}");
        let measured = v["kv"]["eviction_ratio"].as_f64().unwrap();
        let want: f64 = ratio.parse().unwrap();
        assert!(
            (measured - want).abs() <= 1.0 / t,
            "requested {ratio}, measured {measured}"
        );
    }
}

/// The [choice] knobs are settable with `--policy-opt key=value`, and a bad
/// key, value or policy is one error line naming it.
#[test]
fn policy_options_are_settable_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 512);
    let m = model.to_str().unwrap();
    let ok = agate(&[
        "generate",
        "hello there, a short prompt",
        "--model",
        m,
        "--policy",
        "pyramidkv",
        "--policy-opt",
        "beta=5,kernel=3",
        "--max-tokens",
        "2",
        "--json",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for (policy, opt, needle) in [
        ("pyramidkv", "beta=0.5", "beta"),
        ("snapkv", "kernel=4", "kernel"),
        ("h2o", "beta=5", "does not apply to h2o"),
        ("nacl", "nonsense=1", "normalise"),
        ("nacl", "kp_frac", "key=value"),
    ] {
        let out = agate(&[
            "generate",
            "hello",
            "--model",
            m,
            "--policy",
            policy,
            "--policy-opt",
            opt,
        ]);
        fails_with(&out, &[needle]);
    }
}
