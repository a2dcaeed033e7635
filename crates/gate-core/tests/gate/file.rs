//! The gate file format: bit-exact round trips (f32), half-precision files rounding to their
//! dtype, the attention window's round trip and older files without one, and every load error
//! naming the file, the tensor or field, and what was expected.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use gate_core::{model_identity, AttentionGate, GateError, GateFileDtype, ModelIdentity};

use crate::{cfg, spread_gate, HIDDEN};

fn identity() -> ModelIdentity {
    model_identity("llama", 2, HIDDEN, 3, "sha256:abc")
}

fn saved(dir: &Path, dtype: GateFileDtype) -> (AttentionGate, std::path::PathBuf) {
    let mut g = spread_gate(&cfg());
    g.set_identity(identity());
    let path = dir.join("gate.safetensors");
    std::fs::write(&path, g.to_bytes(&path, dtype).unwrap()).unwrap();
    (g, path)
}

#[test]
fn save_load_round_trip_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (g, path) = saved(dir.path(), GateFileDtype::F32);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["gate.safetensors"], "no temporary file left behind");
    let back = AttentionGate::load(&path, &identity(), &Device::Cpu).unwrap();
    assert_eq!(back.config(), g.config());
    assert_eq!(back.identity(), g.identity());
    for ((n1, a), (n2, b)) in g.named_tensors().into_iter().zip(back.named_tensors()) {
        assert_eq!(n1, n2);
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{n1} differs"
        );
    }
    // Empty expectation: no identity check.
    AttentionGate::load(&path, &ModelIdentity::new(), &Device::Cpu).unwrap();
}

#[test]
fn half_precision_files_round_to_the_stored_dtype() {
    let dir = tempfile::tempdir().unwrap();
    for (dtype, cd) in [
        (GateFileDtype::F16, DType::F16),
        (GateFileDtype::BF16, DType::BF16),
    ] {
        let (g, path) = saved(dir.path(), dtype);
        let back = AttentionGate::load(&path, &identity(), &Device::Cpu).unwrap();
        assert_eq!(back.dtype(), DType::F32);
        for ((_, a), (_, b)) in g.named_tensors().into_iter().zip(back.named_tensors()) {
            let a = a
                .to_dtype(cd)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(a, b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
    }
}

#[test]
fn the_attention_window_round_trips_and_older_files_are_unbounded() {
    let dir = tempfile::tempdir().unwrap();
    let (g, path) = saved(dir.path(), GateFileDtype::F32);
    assert_eq!(
        g.config().attention_window,
        gate_core::gate::DEFAULT_ATTENTION_WINDOW
    );
    let back = AttentionGate::load(&path, &identity(), &Device::Cpu).unwrap();
    assert_eq!(back.config().attention_window, g.config().attention_window);
    // A file written before the window existed has no such field: its gate attends to all.
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&meta["gate_config"]).unwrap();
    cfg.as_object_mut()
        .unwrap()
        .remove("attention_window")
        .unwrap();
    meta.insert("gate_config".into(), cfg.to_string());
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    std::fs::write(&path, safetensors::serialize(tensors, Some(meta)).unwrap()).unwrap();
    let old = AttentionGate::load(&path, &identity(), &Device::Cpu).unwrap();
    assert_eq!(old.config().attention_window, 0);
}

/// Rewrites the gate file at `path` with `edit` applied to its tensors, keeping its metadata.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors: Vec<(String, Tensor)> =
        candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let out = safetensors::serialize(tensors, meta.metadata().clone()).unwrap();
    std::fs::write(path, out).unwrap();
}

fn load_err(path: &Path, expected: &ModelIdentity) -> (GateError, String) {
    let e = AttentionGate::load(path, expected, &Device::Cpu).unwrap_err();
    let msg = e.to_string();
    (e, msg)
}

#[test]
fn load_errors_name_file_tensor_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = saved(dir.path(), GateFileDtype::F32);
    let file = path.display().to_string();

    rewrite(&path, |t| t.retain(|(n, _)| n != "layers.1.wv"));
    let (e, msg) = load_err(&path, &identity());
    assert!(matches!(e, GateError::MissingTensor { .. }), "{msg}");
    assert!(
        msg.contains(&file) && msg.contains("layers.1.wv") && msg.contains("[16, 48]"),
        "{msg}"
    );

    saved(dir.path(), GateFileDtype::F32);
    rewrite(&path, |t| {
        for (n, x) in t.iter_mut() {
            if n == "layers.0.wq" {
                *x = Tensor::zeros((16, 47), DType::F32, &Device::Cpu).unwrap();
            }
        }
    });
    let (e, msg) = load_err(&path, &identity());
    assert!(matches!(e, GateError::WrongShape { .. }), "{msg}");
    assert!(
        msg.contains(&file)
            && msg.contains("layers.0.wq")
            && msg.contains("[16, 47]")
            && msg.contains("[16, 48]"),
        "{msg}"
    );

    saved(dir.path(), GateFileDtype::F32);
    rewrite(&path, |t| {
        for (n, x) in t.iter_mut() {
            if n == "layers.1.bg" {
                *x = x.to_dtype(DType::F16).unwrap();
            }
        }
    });
    let (e, msg) = load_err(&path, &identity());
    assert!(matches!(e, GateError::WrongDtype { .. }), "{msg}");
    assert!(
        msg.contains("layers.1.bg") && msg.contains("F16") && msg.contains("f32"),
        "{msg}"
    );

    saved(dir.path(), GateFileDtype::F32);
    rewrite(&path, |t| {
        t.push((
            "layers.9.wq".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        ))
    });
    let (_, msg) = load_err(&path, &identity());
    assert!(msg.contains("unexpected tensor `layers.9.wq`"), "{msg}");

    // A NaN or infinite parameter would flag tokens at random: refused, named.
    for bad in [f32::NAN, f32::INFINITY] {
        saved(dir.path(), GateFileDtype::F32);
        rewrite(&path, |t| {
            for (n, x) in t.iter_mut() {
                if n == "layers.1.wk" {
                    let mut v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v[7] = bad;
                    *x = Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap();
                }
            }
        });
        let (_, msg) = load_err(&path, &identity());
        assert!(
            msg.contains(&file) && msg.contains("tensor `layers.1.wk` holds a non-finite value"),
            "{msg}"
        );
    }
}

#[test]
fn load_errors_on_identity_and_format() {
    let dir = tempfile::tempdir().unwrap();
    let (mut g, path) = saved(dir.path(), GateFileDtype::F32);
    let other = model_identity("llama", 2, HIDDEN, 3, "sha256:def");
    let (e, msg) = load_err(&path, &other);
    assert!(matches!(e, GateError::IdentityMismatch { .. }), "{msg}");
    assert!(
        msg.contains(&format!(
            "gate file {}: model identity field `base_checksum` is sha256:abc in the file but \
             sha256:def for this model",
            path.display()
        )),
        "{msg}"
    );
    assert!(!msg.contains("Some(") && !msg.contains('"'), "{msg}");
    let mut extra = identity();
    extra.insert("tokenizer".into(), "t1".into());
    let (_, msg) = load_err(&path, &extra);
    assert!(
        msg.contains("`tokenizer` is absent in the file but t1 for this model"),
        "{msg}"
    );

    // A file whose identity disagrees with its own config.
    g.set_identity(model_identity("llama", 5, HIDDEN, 3, "x"));
    std::fs::write(&path, g.to_bytes(&path, GateFileDtype::F32).unwrap()).unwrap();
    let (_, msg) = load_err(&path, &ModelIdentity::new());
    assert!(
        msg.contains("its model identity says `n_layers` is 5 but its own gate_config says 2"),
        "{msg}"
    );

    std::fs::write(&path, b"not a safetensors file").unwrap();
    let (e, msg) = load_err(&path, &identity());
    assert!(
        matches!(e, GateError::Format { .. }) && msg.contains(&path.display().to_string()),
        "{msg}"
    );

    // Plain safetensors without our metadata.
    let t: HashMap<String, Tensor> = [(
        "a".to_string(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    )]
    .into();
    candle_core::safetensors::save(&t, &path).unwrap();
    let (_, msg) = load_err(&path, &identity());
    assert!(msg.contains("`format`"), "{msg}");

    let missing = dir.path().join("nope.safetensors");
    let (e, msg) = load_err(&missing, &identity());
    assert!(
        matches!(e, GateError::Io { .. }) && msg.contains("nope.safetensors"),
        "{msg}"
    );

    // What is not a regular file (a directory here; a FIFO or device alike) is refused before it
    // is opened; a huge file with a bad header is refused from its header, without reading
    // its data (64 GiB, sparse: reading it would fail to allocate).
    let (_, msg) = load_err(dir.path(), &identity());
    assert!(msg.contains("not a regular file"), "{msg}");
    let huge = dir.path().join("huge.safetensors");
    std::fs::File::create(&huge)
        .and_then(|f| f.set_len(64 << 30))
        .unwrap();
    let (_, msg) = load_err(&huge, &identity());
    assert!(msg.contains("not a safetensors file"), "{msg}");
}
