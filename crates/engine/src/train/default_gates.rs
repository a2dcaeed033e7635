//! The trained Attention-Gates committed for the default model
//! (`gates/smollm2-135m-instruct.ag.safetensors`, produced by the command in
//! `docs/training.md`), embedded in the binary so that `--policy ag` works without `--gates`.
//!
//! Invariant: the embedded gates are only ever used for a model whose identity (architecture,
//! shape and weights fingerprint) equals the one stored in the file; for any other model
//! [`for_engine`] returns `None` and the caller asks for `--gates`.

use gate_core::{AttentionGate, ModelIdentity};

use crate::engine::Engine;
use crate::error::{EngineError, Result};

/// The committed gates file, byte for byte.
pub const BYTES: &[u8] = include_bytes!("../../../../gates/smollm2-135m-instruct.ag.safetensors");

/// The model identity recorded in the embedded file.
pub fn identity() -> Result<ModelIdentity> {
    let bad = |e: String| EngineError::Invalid(format!("embedded default gates: {e}"));
    let (_, header) =
        safetensors::SafeTensors::read_metadata(BYTES).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let id = meta
        .get("model_identity")
        .ok_or_else(|| bad("no model_identity metadata".into()))?;
    serde_json::from_str(id).map_err(|e| bad(e.to_string()))
}

/// The embedded gates if `engine`'s model is the one they were trained for, else `None`.
pub fn for_engine(engine: &Engine) -> Result<Option<AttentionGate>> {
    let expected = engine.model_identity()?;
    if identity()? != expected {
        return Ok(None);
    }
    let name = std::path::Path::new("(embedded default gates)");
    let gates = AttentionGate::from_bytes(BYTES, name, &expected, &candle_core::Device::Cpu)
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    Ok(Some(gates))
}
