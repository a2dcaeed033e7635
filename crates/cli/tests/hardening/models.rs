//! Broken model and gate files: config.json and GGUF metadata outside their meaning, corrupt
//! GGUF structure, NaN weights and NaN gates each fail with one line naming the file, the field
//! or tensor, and the value.

use std::path::Path;
use std::process::Output;

use crate::common::{self, agate, fails_with, random_gates, s, text, tiny_model};

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

/// Writes the default model's GGUF, edited by `edit`, to `dir/name` and runs `agate inspect` on
/// it.
fn inspect_edited(gguf: &Gguf, dir: &Path, name: &str, edit: &dyn Fn(&mut Vec<u8>)) -> Output {
    let mut bytes = gguf.bytes.clone();
    edit(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    agate(&["inspect", "--model", s(&path)])
}

/// Overwrites the bytes at `at` with `v`.
fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

#[test]
fn gguf_tensor_data_misaligned_or_overlapping_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Some(gguf) = default_gguf() else {
        return;
    };
    let run =
        |name: &str, edit: &dyn Fn(&mut Vec<u8>)| inspect_edited(&gguf, dir.path(), name, edit);
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
}

/// A negative epsilon, a NaN rope base, a negative count, partial rotary dimensions, an empty
/// chat template and an EOS outside the vocabulary are each named with their key and value.
#[test]
fn gguf_metadata_outside_its_meaning_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let Some(gguf) = default_gguf() else {
        return;
    };
    let run =
        |name: &str, edit: &dyn Fn(&mut Vec<u8>)| inspect_edited(&gguf, dir.path(), name, edit);
    let value = |key: &str| gguf.values[key];
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
}

/// A zero alignment (candle divides by it) is refused first.
#[test]
fn a_gguf_alignment_of_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
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
}

/// A safetensors file given as a model is called one.
#[test]
fn a_safetensors_file_given_as_a_model_is_called_one() {
    let dir = tempfile::tempdir().unwrap();
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
    let gates = random_gates(dir.path(), &model);
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
