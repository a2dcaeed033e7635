//! `cargo xtask` as its users meet it, on the real default model: GGUF → safetensors → agate gives
//! the same greedy tokens as the GGUF path dequantized to f32 (converted twice, in a temporary
//! directory: the same bytes both times); an interrupted conversion leaves no file; `inspect`
//! lists tensors of both formats; `convert` refuses gates of another model as agate does, and
//! names inputs that hold no model (exit 1); `kernels` without nvcc fails naming what to
//! install; `dist` packages a binary whose `--version` and `inspect` run from a clean directory,
//! with checksums that verify.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use engine::{Engine, GenerateRequest, WeightFormat};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("run xtask")
}

/// `cargo xtask convert --from model --out out --dtype dtype` with `extra` flags.
fn convert(model: &Path, out: &Path, dtype: &str, extra: &[&str]) -> Output {
    let (model, out) = (model.to_str().unwrap(), out.to_str().unwrap());
    let args = ["convert", "--dtype", dtype, "--out", out, "--from", model];
    xtask(&[&args[..], extra].concat())
}

/// The default model (fetched on first use); `None` (skipped) when it is not cached and
/// `AGATE_OFFLINE` forbids fetching it.
fn default_model() -> Option<PathBuf> {
    let path = engine::model_cache::default_model_unless_offline(&mut |l| eprintln!("{l}"))
        .expect("default model");
    if path.is_none() {
        eprintln!("skipped: needs the default model (not cached; AGATE_OFFLINE is set)");
    }
    path
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn greedy(engine: &Engine, prompt: &str, n: usize) -> Vec<u32> {
    let mut session = engine.new_session();
    let request = GenerateRequest {
        max_tokens: n,
        stop_at_eos: false,
        ..GenerateRequest::default()
    };
    session
        .complete(prompt, &request, &mut |_| true)
        .unwrap()
        .tokens
}

#[test]
fn gguf_to_safetensors_keeps_greedy_tokens_and_inspects() {
    let Some(model) = default_model() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smol-f32");
    let o = convert(&model, &out, "f32", &["--to", "safetensors"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A conversion is reproducible: the same input gives the same bytes.
    let again = tmp.path().join("smol-f32-again");
    let o = convert(&model, &again, "f32", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for name in entries(&out) {
        let same =
            std::fs::read(out.join(&name)).unwrap() == std::fs::read(again.join(&name)).unwrap();
        assert!(same, "{name} differs between two conversions");
    }
    std::fs::remove_dir_all(&again).unwrap();
    let mut files = entries(&out);
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));

    let from_gguf = Engine::builder()
        .model(&model)
        .weights(WeightFormat::parse("f32").unwrap())
        .build()
        .unwrap();
    let from_hf = Engine::builder().model(&out).build().unwrap();
    for prompt in ["The capital of France is", "def fibonacci(n):"] {
        let a = greedy(&from_gguf, prompt, 24);
        let b = greedy(&from_hf, prompt, 24);
        assert_eq!(a, b, "prompt {prompt:?}");
    }
    let chat_a = from_gguf
        .tokenizer()
        .apply_chat_template(&[engine::ChatMessage::new("user", "Hi")], true)
        .unwrap();
    let chat_b = from_hf
        .tokenizer()
        .apply_chat_template(&[engine::ChatMessage::new("user", "Hi")], true)
        .unwrap();
    assert_eq!(chat_a, chat_b);

    let o = xtask(&["inspect", out.join("model.safetensors").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        text.contains("model.layers.29.self_attn.q_proj.weight"),
        "{text}"
    );
    assert!(text.contains("F32"));
    let o = xtask(&["inspect", model.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("blk.0.attn_q.weight") && text.contains("Q4_1"),
        "{text}"
    );
    assert!(text.contains("llama.block_count = 30"), "{text}");
}

#[test]
fn interrupted_conversion_leaves_no_output() {
    let Some(model) = default_model() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("half");
    let o = convert(&model, &out, "bf16", &["--fail-after-tensors", "20"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("injected failure after 20 tensors"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(entries(tmp.path()).is_empty(), "{:?}", entries(tmp.path()));
}

/// The message and exit status of a failed `cargo xtask` run (a failure is exit 1, never clap's
/// usage code 2).
fn failure(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Gates for another model are refused before anything is written, as `agate --gates` does;
/// corrupt or missing gates files are named.
#[test]
fn convert_checks_gates_like_agate() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |name: &str| tmp.path().join(name);
    let model = path("model");
    let o = xtask(&["random-model", "--out", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let engine = Engine::builder().model(&model).build().unwrap();
    let gates = engine.random_gates(&engine.gate_config(), 1).unwrap();
    let write = |name: &str, gates: &engine::AttentionGate| {
        let p = path(name);
        let bytes = gates.to_bytes(&p, engine::GateFileDtype::F32).unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let good = write("good.st", &gates);
    let mut wrong = gates.clone();
    let mut identity = gates.identity().clone();
    let fingerprint = identity
        .insert("base_checksum".into(), "0".repeat(64))
        .unwrap();
    wrong.set_identity(identity);
    let wrong = write("wrong.st", &wrong);

    let o = convert(
        &model,
        &path("o1"),
        "f16",
        &["--gates", wrong.to_str().unwrap()],
    );
    let err = failure(&o);
    let zeros = "0".repeat(64);
    assert!(
        err.contains(&format!(
            "gate file {}: model identity field `base_checksum` is {zeros} in the file but \
             {fingerprint} for this model",
            wrong.display()
        )),
        "{err}"
    );
    assert!(!path("o1").exists());
    let o = convert(
        &model,
        &path("o2"),
        "f16",
        &["--gates", good.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("merged"));

    let corrupt = path("corrupt.st");
    std::fs::write(&corrupt, b"not gates").unwrap();
    let err = failure(&convert(
        &model,
        &path("o6"),
        "f16",
        &["--gates", corrupt.to_str().unwrap()],
    ));
    assert!(
        err.contains(&format!("gate file {}", corrupt.display())),
        "{err}"
    );
    let err = failure(&convert(
        &model,
        &path("o7"),
        "f16",
        &["--gates", "nope.st"],
    ));
    assert!(err.contains("--gates nope.st: no such file"), "{err}");
}

/// Inputs that hold no model and broken inputs: one line naming the file, exit 1.
#[test]
fn convert_names_inputs_that_hold_no_model() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |name: &str| tmp.path().join(name);
    let text = path("good.jsonl");
    std::fs::write(&text, "{\"text\": \"hi\"}\n").unwrap();
    let err = failure(&convert(&text, &path("o3"), "f16", &[]));
    assert!(
        err.contains(&format!(
            "{}: is neither a GGUF file nor a safetensors file",
            text.display()
        )),
        "{err}"
    );
    let empty = path("emptydir");
    std::fs::create_dir(&empty).unwrap();
    let err = failure(&convert(&empty, &path("o4"), "f16", &[]));
    assert!(
        err.contains("the directory holds no .safetensors or .gguf weight files"),
        "{err}"
    );
    let truncated = path("trunc.gguf");
    std::fs::write(&truncated, b"GGUF\x03\x00\x00\x00\x01").unwrap();
    let err = failure(&convert(&truncated, &path("o5"), "f16", &[]));
    assert!(err.contains("is not a valid GGUF file"), "{err}");
}

#[test]
fn kernels_without_nvcc_names_what_to_install() {
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["kernels", "--check-only"])
        .env("PATH", "/usr/bin:/bin")
        .env_remove("CUDA_HOME")
        .env_remove("CUDA_PATH")
        .env_remove("LIBRARY_PATH")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("nvcc: not on PATH"), "{err}");
    assert!(
        err.contains(
            "pip install \"cuda-toolkit[nvcc,cudart,cublas,curand,nvrtc,cccl,crt,nvvm]==13.0.2\""
        ),
        "{err}"
    );
    assert!(err.contains("libcublas.so"), "{err}");
}

/// The `agate` release binary beside this test's own binary (target/release/agate), which
/// `cargo test --release --workspace` builds.
fn agate_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("agate");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --release -p cli` first",
        bin.display()
    );
    bin
}

#[test]
fn dist_packages_a_runnable_binary_with_checksums() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dist");
    let o = xtask(&[
        "dist",
        "--out",
        out.to_str().unwrap(),
        "--binary",
        agate_binary().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let tarball = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    let name = tarball.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("agate-{}-", env!("CARGO_PKG_VERSION")))
            && name.ends_with(".tar.gz"),
        "{name}"
    );
    let check = Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&out)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    let clean = tmp.path().join("clean");
    std::fs::create_dir(&clean).unwrap();
    let untar = Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&clean)
        .status()
        .unwrap();
    assert!(untar.success());
    let top = clean.join(name.trim_end_matches(".tar.gz"));
    for f in [
        "agate",
        "README.md",
        "LICENSE-MIT",
        "LICENSE-APACHE",
        "docs",
    ] {
        assert!(top.join(f).exists(), "{f} missing from the tarball");
    }
    let run = |args: &[&str]| {
        Command::new(top.join("agate"))
            .args(args)
            .current_dir(&clean)
            .output()
            .unwrap()
    };
    let v = run(&["--version"]);
    assert!(v.status.success());
    assert_eq!(
        String::from_utf8_lossy(&v.stdout).trim(),
        format!("agate {}", env!("CARGO_PKG_VERSION"))
    );
    let Some(model) = default_model() else {
        return;
    };
    let i = run(&["inspect", "--model", model.to_str().unwrap(), "--json"]);
    assert!(i.status.success(), "{}", String::from_utf8_lossy(&i.stderr));
    let report: serde_json::Value = serde_json::from_slice(&i.stdout).unwrap();
    assert_eq!(report["config"]["n_layers"], 30, "{report}");
}
