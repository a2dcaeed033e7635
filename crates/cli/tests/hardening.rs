//! Hostile input through the binary, one test per class: broken models (corrupt GGUF structure,
//! metadata outside its meaning, NaN weights and gates) fail with one line naming the file,
//! field or tensor and value; sizes that overflow are refused before any work; stdout write
//! errors end the program with status 1; flags a policy ignores are refused; output paths that
//! are links, FIFOs or devices are written through, never replaced, and stale temporaries of a
//! killed run are removed; a chat whose pool runs out keeps its state, and one given a line
//! that is not UTF-8 goes on; a bounded chat in cache
//! positions runs past the context; train-gates checkpoints are checksummed, its log is never
//! left with holes, and Ctrl-C ends it with status 130. No output may contain `panicked`.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{agate, tiny_model};

/// Runs agate with `stdin` as its standard input.
fn agate_with_input(args: &[&str], stdin: impl AsRef<[u8]>) -> Output {
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
        .unwrap()
        .write_all(stdin.as_ref())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Failure with one stderr line that starts with `error:` and contains every needle.
fn fails_with(out: &Output, needles: &[&str]) {
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

fn succeeds(out: &Output) {
    assert!(out.status.success(), "failed: {}", text(out));
    assert!(!text(out).contains("panicked"), "panic: {}", text(out));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---- broken models ----

/// Edits `config.json` of a model directory.
fn edit_config(model: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = model.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, json.to_string()).unwrap();
}

#[test]
fn metadata_outside_its_meaning_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, serde_json::Value, &str); 6] = [
        ("rms_norm_eps", (-1e-5).into(), "got -0.00001"),
        ("rms_norm_eps", 0.into(), "got 0"),
        ("rope_theta", (-10000.0).into(), "got -10000"),
        (
            "num_hidden_layers",
            (-2).into(),
            "non-negative integer, got -2",
        ),
        ("max_position_embeddings", 0.into(), "must be > 0"),
        (
            "vocab_size",
            serde_json::json!(1u64 << 40),
            "must be at most",
        ),
    ];
    for (i, (field, value, says)) in cases.into_iter().enumerate() {
        let model = tiny_model(&dir.path().join(i.to_string()), 2, 2, 64);
        edit_config(&model, |j| j[field] = value);
        let out = agate(&["generate", "hi", "--model", s(&model)]);
        fails_with(&out, &["config.json", field, says]);
    }
    let model = tiny_model(&dir.path().join("scaling"), 2, 2, 64);
    edit_config(&model, |j| {
        j["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 0.0})
    });
    let out = agate(&["generate", "hi", "--model", s(&model)]);
    fails_with(&out, &["rope_scaling.factor", "got 0"]);
}

#[test]
fn nan_weights_stop_with_the_cause_at_any_temperature() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let weights = model.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let poisoned: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(name, t)| {
            if name == "model.layers.1.mlp.down_proj.weight" {
                let nan = (t.ones_like().unwrap() * f64::NAN).unwrap();
                (name, nan)
            } else {
                (name, t)
            }
        })
        .collect();
    candle_core::safetensors::save(&poisoned, &weights).unwrap();
    for temp in ["0", "0.8"] {
        let out = agate(&["generate", "hello", "--model", s(&model), "--temp", temp]);
        fails_with(&out, &["non-finite logits", "tiny", "NaN weights"]);
    }
    let data = dir.path().join("data.txt");
    std::fs::write(&data, "The cat sat on the mat. ".repeat(40)).unwrap();
    let out = agate(&[
        "train-gates",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--seq-len",
        "16",
        "--steps",
        "1",
        "--out",
        s(&dir.path().join("g.safetensors")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error:") && last.contains("cross-entropy is not finite"),
        "{err}"
    );
    let tasks = dir.path().join("ppl.jsonl");
    std::fs::write(
        &tasks,
        r#"{"type":"perplexity","text":"some text to score here"}"#,
    )
    .unwrap();
    let out = agate(&["eval", "--tasks", s(&tasks), "--model", s(&model)]);
    assert!(
        !out.status.success() && text(&out).contains("non-finite logits"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("panicked"));
}

/// The default model's bytes, and the byte offsets a GGUF walk finds in them.
struct Gguf {
    bytes: Vec<u8>,
    /// Offset of each metadata value (after its type), by key, with its type.
    values: std::collections::HashMap<String, (usize, u32)>,
    /// Offset of each tensor's data offset field, in header order.
    tensor_offsets: Vec<(String, usize)>,
}

/// The default model's GGUF, parsed; `None` (skipped) when it is not cached and `AGATE_OFFLINE`
/// forbids fetching it.
fn default_gguf() -> Option<Gguf> {
    let path = common::default_model()?;
    let bytes = std::fs::read(path).unwrap();
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let (n_tensors, n_kv) = (u64_at(&bytes, 8), u64_at(&bytes, 16));
    let mut at = 24;
    let string = |at: &mut usize| {
        let n = u64_at(&bytes, *at) as usize;
        let s = String::from_utf8_lossy(&bytes[*at + 8..*at + 8 + n]).into_owned();
        *at += 8 + n;
        s
    };
    fn skip(b: &[u8], at: &mut usize, ty: u32) {
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        match ty {
            0 | 1 | 7 => *at += 1,
            2 | 3 => *at += 2,
            4..=6 => *at += 4,
            10..=12 => *at += 8,
            8 => *at += 8 + u64_at(*at) as usize,
            9 => {
                let elem = u32::from_le_bytes(b[*at..*at + 4].try_into().unwrap());
                let n = u64_at(*at + 4);
                *at += 12;
                for _ in 0..n {
                    skip(b, at, elem);
                }
            }
            other => panic!("type {other}"),
        }
    }
    let mut values = std::collections::HashMap::new();
    for _ in 0..n_kv {
        let key = string(&mut at);
        let ty = u32_at(&bytes, at);
        at += 4;
        values.insert(key, (at, ty));
        skip(&bytes, &mut at, ty);
    }
    let mut tensor_offsets = Vec::new();
    for _ in 0..n_tensors {
        let name = string(&mut at);
        let dims = u32_at(&bytes, at) as usize;
        at += 4 + 8 * dims + 4;
        tensor_offsets.push((name, at));
        at += 8;
    }
    Some(Gguf {
        bytes,
        values,
        tensor_offsets,
    })
}

#[test]
fn gguf_structure_and_metadata_are_checked_as_ggml_does() {
    let dir = tempfile::tempdir().unwrap();
    let Some(gguf) = default_gguf() else {
        return;
    };
    let run = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = gguf.bytes.clone();
        edit(&mut bytes);
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        agate(&["inspect", "--model", s(&path)])
    };
    let value = |key: &str| gguf.values[key];
    let put = |b: &mut Vec<u8>, at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
    // Tensor data: misaligned, overlapping.
    let (second, at) = gguf.tensor_offsets[1].clone();
    let offset = u64::from_le_bytes(gguf.bytes[at..at + 8].try_into().unwrap());
    let out = run("misaligned.gguf", &|b| {
        put(b, at, &(offset + 1).to_le_bytes())
    });
    fails_with(
        &out,
        &[
            "misaligned.gguf",
            &second,
            "not a multiple of the alignment 32",
        ],
    );
    let out = run("overlap.gguf", &|b| put(b, at, &0u64.to_le_bytes()));
    fails_with(&out, &["overlap.gguf", &second, "overlaps"]);
    // Metadata: a negative epsilon, a NaN rope base, a negative count, partial rotary
    // dimensions, an EOS outside the vocabulary, a zero alignment.
    let (eps, ty) = value("llama.attention.layer_norm_rms_epsilon");
    assert_eq!(ty, 6);
    let out = run("eps.gguf", &|b| put(b, eps, &(-1e-5f32).to_le_bytes()));
    fails_with(
        &out,
        &[
            "eps.gguf",
            "llama.attention.layer_norm_rms_epsilon",
            "got -0.00001",
        ],
    );
    let (theta, _) = value("llama.rope.freq_base");
    let out = run("theta.gguf", &|b| put(b, theta, &f32::NAN.to_le_bytes()));
    fails_with(&out, &["llama.rope.freq_base", "got NaN"]);
    let (layers, ty) = value("llama.block_count");
    assert_eq!(ty, 4);
    let out = run("layers.gguf", &|b| {
        put(b, layers - 4, &5u32.to_le_bytes()); // i32
        put(b, layers, &(-1i32).to_le_bytes());
    });
    fails_with(&out, &["llama.block_count", "non-negative integer, got -1"]);
    let (rotary, ty) = value("llama.rope.dimension_count");
    assert_eq!(ty, 4);
    let out = run("rotary.gguf", &|b| put(b, rotary, &32u32.to_le_bytes()));
    fails_with(
        &out,
        &[
            "rotary.gguf",
            "llama.rope.dimension_count",
            "is 32",
            "key head width (64)",
        ],
    );
    let (template, ty) = value("tokenizer.chat_template");
    assert_eq!(ty, 8);
    let len = u64::from_le_bytes(gguf.bytes[template..template + 8].try_into().unwrap()) as usize;
    let out = run("template.gguf", &|b| put(b, template + 8, &vec![b' '; len]));
    fails_with(&out, &["tokenizer.chat_template", "is empty"]);
    let (eos, _) = value("tokenizer.ggml.eos_token_id");
    let out = run("eos.gguf", &|b| put(b, eos, &60_000u32.to_le_bytes()));
    fails_with(
        &out,
        &[
            "tokenizer.ggml.eos_token_id",
            "60000",
            "outside the vocabulary",
        ],
    );
    // A zero alignment (candle divides by it): refused first.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(17u64.to_le_bytes());
    b.extend(b"general.alignment");
    b.extend(4u32.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    let align = dir.path().join("align.gguf");
    std::fs::write(&align, b).unwrap();
    let out = agate(&["inspect", "--model", s(&align)]);
    fails_with(
        &out,
        &[
            "align.gguf",
            "general.alignment",
            "is 0, expected a power of two",
        ],
    );
    // A safetensors file given as a model is called one.
    let st = dir.path().join("w.safetensors");
    std::fs::copy(
        tiny_model(dir.path(), 2, 2, 64).join("model.safetensors"),
        &st,
    )
    .unwrap();
    let out = agate(&["inspect", "--model", s(&st)]);
    fails_with(
        &out,
        &[
            "is a safetensors file, not a GGUF file",
            "Hugging Face directory",
        ],
    );
}

#[test]
fn a_missing_file_is_named_once() {
    let out = agate(&["generate", "hi", "--model", "/nonexistent/model.gguf"]);
    fails_with(&out, &["/nonexistent/model.gguf"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

#[test]
fn nan_gates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let gates = dir.path().join("g.safetensors");
    succeeds(&agate(&[
        "init-gates",
        "--model",
        s(&model),
        "--out",
        s(&gates),
    ]));
    // Nor can random gates be made with a bias that is not a number.
    for bias in ["NaN", "inf"] {
        let out = agate(&[
            "init-gates",
            "--model",
            s(&model),
            "--bias",
            bias,
            "--out",
            "x.safetensors",
        ]);
        fails_with(&out, &["--bias must be a finite number", bias]);
    }
    let bytes = std::fs::read(&gates).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> =
        candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    for (name, t) in tensors.iter_mut() {
        if name == "layers.0.bg" {
            *t = (t.ones_like().unwrap() * f64::NAN).unwrap();
        }
    }
    std::fs::write(
        &gates,
        safetensors::serialize(tensors, meta.metadata().clone()).unwrap(),
    )
    .unwrap();
    let out = agate(&[
        "generate",
        "hi",
        "--model",
        s(&model),
        "--policy",
        "ag",
        "--gates",
        s(&gates),
    ]);
    fails_with(&out, &["g.safetensors", "layers.0.bg", "non-finite"]);
}

// ---- sizes ----

#[test]
fn sizes_that_overflow_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let m = s(&model);
    let huge = "18446744073709551615";
    let out = agate(&[
        "bench", "--model", m, "-d", huge, "-p", "8", "-n", "8", "-r", "1",
    ]);
    fails_with(&out, &["exceeds the model's context of 64"]);
    let out = agate(&["bench", "--model", m, "-n", huge, "-p", "8", "-r", "1"]);
    fails_with(&out, &["exceeds the model's context of 64"]);
    let out = agate(&[
        "eval",
        "--model",
        m,
        "--synthetic",
        "passkey",
        "--length",
        huge,
    ]);
    fails_with(&out, &["--length", "longer than the model's context of 64"]);
    let out = agate(&[
        "eval",
        "--model",
        m,
        "--synthetic",
        "passkey",
        "--length",
        "60",
        "-n",
        huge,
    ]);
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
    let m = s(&model);
    let out = agate(&[
        "generate", "hi", "--model", m, "--policy", "full", "--evict", "0.5",
    ]);
    fails_with(&out, &["--evict does nothing with --policy full"]);
    let out = agate(&[
        "generate", "hi", "--model", m, "--policy", "h2o", "--gates", "x",
    ]);
    fails_with(&out, &["--gates does nothing with --policy h2o"]);
    let out = agate(&[
        "generate", "hi", "--model", m, "--policy", "ag", "--evict", "0.5",
    ]);
    fails_with(
        &out,
        &["--evict does nothing with --policy ag in threshold mode"],
    );
    let out = agate(&[
        "generate", "hi", "--model", m, "--policy", "tova", "--window", "4",
    ]);
    fails_with(&out, &["--window does nothing with --policy tova"]);
    let out = agate(&[
        "generate",
        "hi",
        "--model",
        m,
        "--policy",
        "streaming",
        "--keep",
        "8",
        "--window",
        "4",
    ]);
    fails_with(&out, &["--window does nothing with --policy streaming"]);
    // A policy option of another policy.
    let out = agate(&[
        "generate",
        "hi",
        "--model",
        m,
        "--policy",
        "h2o",
        "--evict",
        "0.5",
        "--policy-opt",
        "kernel=5",
    ]);
    fails_with(&out, &["--policy-opt: `kernel` does not apply to h2o"]);
    // train-gates: flags the run would ignore, or fail on only after training.
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
    // Several policies: a warning names those that run without the flag.
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
    // Outputs are checked before training: never one of the inputs, always writable.
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

// ---- files ----

/// A PNG's signature.
fn is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.starts_with(b"\x89PNG"))
}

#[cfg(unix)]
#[test]
fn outputs_are_written_through_links_fifos_and_devices_never_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let map = |out: &Path| {
        agate(&[
            "generate",
            "hello",
            "--model",
            s(&model),
            "--max-tokens",
            "2",
            "--eviction-map",
            s(out),
        ])
    };
    // A symlink stays a link; its target gets the picture.
    let target = dir.path().join("target.png");
    let link = dir.path().join("link.png");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    succeeds(&map(&link));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(is_png(&target));
    // /dev/null stays a device (a name without an extension takes the one format).
    succeeds(&map(Path::new("/dev/null")));
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    // A FIFO is written through to its reader.
    let fifo = dir.path().join("pipe.png");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    succeeds(&map(&fifo));
    assert!(reader.join().unwrap().starts_with(b"\x89PNG"));
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    // A directory is refused; so is a picture format the extension does not name.
    let as_dir = dir.path().join("d.png");
    std::fs::create_dir(&as_dir).unwrap();
    fails_with(&map(&as_dir), &["d.png", "is a directory"]);
    fails_with(
        &map(&dir.path().join("x.bmp")),
        &["--eviction-map", "x.bmp", ".png"],
    );
    fails_with(
        &map(&dir.path().join("no/such/map.png")),
        &["--eviction-map", "no/such", "does not exist"],
    );
    // A temporary file of a killed run is removed on the next write of that output.
    let out = dir.path().join("map.png");
    let dead = Command::new("true").spawn().unwrap();
    let pid = dead.id();
    dead.wait_with_output().unwrap();
    let stale = dir.path().join(format!(".map.png.agate-tmp.{pid}.x1y2z3"));
    std::fs::write(&stale, "half a picture").unwrap();
    succeeds(&map(&out));
    assert!(is_png(&out));
    assert!(!stale.exists(), "stale temporary file kept");
}

// ---- sessions ----

#[test]
fn a_chat_whose_pool_runs_out_keeps_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 8192);
    // 1 MiB: 1,024 blocks of 16 tokens of one head; 4 heads: about 4,000 tokens.
    let long = "x".repeat(5000);
    let input = format!("hello\n/stats\n{long}\n/stats\nhi again\n/stats\n/exit\n");
    let out = agate_with_input(
        &[
            "chat",
            "--model",
            s(&model),
            "--kv-memory-mb",
            "1",
            "--max-tokens",
            "4",
        ],
        &input,
    );
    succeeds(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("out of KV blocks"), "{stderr}");
    let stats: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("tokens seen"))
        .collect();
    assert_eq!(stats.len(), 3, "{stderr}");
    assert_eq!(stats[0], stats[1], "the failed turn changed the session");
    let seen = |l: &str| -> usize {
        l.split(" tokens seen")
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(seen(stats[2]) > seen(stats[1]));
    assert!(!stderr.contains("eviction ratio -"), "{stderr}");
}

/// A line that is not UTF-8 is skipped with a message; the chat goes on.
#[test]
fn a_chat_line_that_is_not_utf8_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 256);
    let out = agate_with_input(
        &["chat", "--model", s(&model), "--max-tokens", "2"],
        b"\xff\xfe bad\nhello\n/stats\n/exit\n",
    );
    succeeds(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not valid UTF-8"), "{stderr}");
    assert!(stderr.contains("tokens seen"), "{stderr}");
}

#[test]
fn a_bounded_chat_in_cache_positions_runs_past_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    // Short turns: each must fit beside the 32 kept tokens in the 64-token context.
    let mut input: String = (0..60).map(|i| format!("go {i}\n")).collect();
    input.push_str("/stats\n/exit\n");
    let out = agate_with_input(
        &[
            "chat",
            "--model",
            s(&model),
            "--policy",
            "streaming",
            "--keep",
            "32",
            "--max-tokens",
            "8",
        ],
        &input,
    );
    succeeds(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cache positions"), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    let stats = stderr.lines().find(|l| l.contains("tokens seen")).unwrap();
    let seen: usize = stats
        .split(" tokens seen")
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(seen >= 1000, "{stats}");
    // Original positions stop at the context.
    let out = agate_with_input(
        &[
            "chat",
            "--model",
            s(&model),
            "--policy",
            "streaming",
            "--keep",
            "32",
            "--max-tokens",
            "8",
            "--positions",
            "original",
        ],
        "a first message\nand a second one\nand a third one that no longer fits\n/exit\n",
    );
    assert!(text(&out).contains("does not fit"), "{}", text(&out));
}

// ---- training ----

fn train_args<'a>(model: &'a str, data: &'a str, dir: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train-gates",
        "--model",
        model,
        "--data",
        data,
        "--seq-len",
        "16",
        "--steps",
        steps,
        "--checkpoint-dir",
        dir,
        "--checkpoint-every",
        "1",
        "--warmup",
        "1",
    ]
}

#[test]
fn checkpoints_are_checksummed_and_resumed_logs_have_no_holes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let data = dir.path().join("data.txt");
    std::fs::write(&data, "The cat sat on the mat. ".repeat(40)).unwrap();
    let ckpt_dir = dir.path().join("ckpt");
    let log = dir.path().join("log.jsonl");
    let out_gates = dir.path().join("gates.safetensors");
    let mut args = train_args(s(&model), s(&data), s(&ckpt_dir), "3");
    args.extend(["--log", s(&log), "--out", s(&out_gates)]);
    succeeds(&agate(&args));
    // Resume with a truncated log: it is rebuilt from the checkpoint, whole.
    std::fs::write(
        &log,
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let mut resume = train_args(s(&model), s(&data), s(&ckpt_dir), "5");
    resume.extend(["--log", s(&log), "--out", s(&out_gates), "--resume"]);
    let out = agate(&resume);
    succeeds(&out);
    assert!(text(&out).contains("rebuilt from"), "{}", text(&out));
    let steps: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5]);
    // A missing log too.
    std::fs::remove_file(&log).unwrap();
    let mut more = train_args(s(&model), s(&data), s(&ckpt_dir), "6");
    more.extend(["--log", s(&log), "--out", s(&out_gates), "--resume"]);
    succeeds(&agate(&more));
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 6);
    // One flipped byte anywhere in the checkpoint is refused.
    let ckpt = ckpt_dir.join("checkpoint.safetensors");
    let mut bytes = std::fs::read(&ckpt).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x10;
    std::fs::write(&ckpt, bytes).unwrap();
    let out = agate(&more);
    fails_with(&out, &["checkpoint.safetensors", "checksum mismatch"]);
}

#[cfg(unix)]
#[test]
fn ctrl_c_ends_training_with_130_and_names_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let data = dir.path().join("data.txt");
    std::fs::write(&data, "The cat sat on the mat. ".repeat(40)).unwrap();
    let ckpt_dir = dir.path().join("ckpt");
    let gates = dir.path().join("gates.safetensors");
    let mut args = train_args(s(&model), s(&data), s(&ckpt_dir), "100000");
    args.extend(["--out", s(&gates)]);
    let child = Command::new(env!("CARGO_BIN_EXE_agate"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ckpt = ckpt_dir.join("checkpoint.safetensors");
    for _ in 0..600 {
        if ckpt.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(ckpt.exists(), "no checkpoint appeared");
    assert!(Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("interrupted at step"), "{stderr}");
    assert!(
        stderr.contains(s(&ckpt)) && stderr.contains("--resume"),
        "{stderr}"
    );
    assert!(!gates.exists(), "an interrupted run wrote its final gates");
    assert!(!stderr.contains("panicked"));
}
