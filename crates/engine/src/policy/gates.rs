//! Attention-Gate files for the `ag` policy: [`write_gates`] saves gates atomically, and
//! [`default_gates`] gives the trained gates committed for the default model
//! (`gates/smollm2-135m-instruct.ag.safetensors`, produced by the command in
//! `docs/training.md`), so that `ag` works without a gates file.
//!
//! The default gates are embedded in the binary (13 MB) only with the engine's `default-gates`
//! feature (on by default and in the `agate` CLI; an embedding program built with
//! `default-features = false` leaves it out and loads a gates file instead). They are parsed from
//! the embedded bytes in place: no temporary file, no copy on disk.
//!
//! Invariant: the default gates are only ever used for a model whose identity (architecture,
//! shape and weights fingerprint) equals the one stored in the file; for any other model, or
//! without the feature, [`default_gates`] returns `None` and the caller asks for a gates file.

use std::path::Path;

use gate_core::{AttentionGate, GateFileDtype};

use crate::engine::Engine;
use crate::error::Result;

/// The committed gates file of the default model, byte for byte (with `default-gates`).
#[cfg(feature = "default-gates")]
const DEFAULT_GATES: &[u8] =
    include_bytes!("../../../../gates/smollm2-135m-instruct.ag.safetensors");

/// How errors name the embedded file.
#[cfg(feature = "default-gates")]
const EMBEDDED_NAME: &str = "(embedded default gates)";

/// Writes a gates file (parameters in `dtype`, config and identity) to `path` atomically.
pub fn write_gates(gates: &AttentionGate, path: &Path, dtype: GateFileDtype) -> Result<()> {
    let bytes = gates.to_bytes(path, dtype)?;
    crate::atomic::write_atomically(path, |w| w.write_all(&bytes))?;
    Ok(())
}

/// The committed gates if `engine`'s model is the one they were trained for and the engine was
/// built with the `default-gates` feature, else `None`.
#[cfg(feature = "default-gates")]
pub fn default_gates(engine: &Engine) -> Result<Option<AttentionGate>> {
    let expected = engine.model_identity()?;
    if embedded_identity()? != expected {
        return Ok(None);
    }
    let name = Path::new(EMBEDDED_NAME);
    let gates =
        AttentionGate::from_bytes(DEFAULT_GATES, name, &expected, &candle_core::Device::Cpu)?;
    Ok(Some(gates))
}

/// Without the `default-gates` feature no gates are embedded: always `None`.
#[cfg(not(feature = "default-gates"))]
pub fn default_gates(_engine: &Engine) -> Result<Option<AttentionGate>> {
    Ok(None)
}

/// The model identity recorded in the embedded file (read from its header alone); a malformed
/// header is a [`gate_core::GateError::Format`], as a gates file's would be.
#[cfg(feature = "default-gates")]
fn embedded_identity() -> Result<gate_core::ModelIdentity> {
    let bad = |detail: String| gate_core::GateError::Format {
        path: EMBEDDED_NAME.into(),
        detail,
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(DEFAULT_GATES)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let id = meta
        .get("model_identity")
        .ok_or_else(|| bad("metadata field `model_identity` is missing".into()))?;
    Ok(serde_json::from_str(id).map_err(|e| {
        bad(format!(
            "metadata `model_identity` is not a string map: {e}"
        ))
    })?)
}
