//! The Attention-Gate file: one safetensors file holding every layer's parameters
//! (`layers.{l}.wq`, `.wk`, `.wv`, `.wg`, `.bg`) and, in the safetensors metadata,
//! `format = "agate-gate"`, `version = "1"`, `dtype` (`f32`, `f16` or `bf16`), `gate_config`
//! (the [`GateConfig`] as JSON) and `model_identity` (a JSON string map the engine fills:
//! architecture, n_layers, hidden, n_kv_heads, base checksum, ...).
//!
//! Invariants: this crate never writes a file: [`AttentionGate::to_bytes`] gives the file's
//! bytes and the caller writes them (engine's atomic writer). A load validates the format tag,
//! the config, every expected tensor's presence, shape, dtype and finiteness (a NaN or infinite
//! parameter is refused), the absence of unexpected tensors, the identity fields the caller
//! requires, and the agreement of the stored config with its own identity; each failure names
//! the file and the tensor or field. A load maps the file (only what it parses is read) and
//! refuses anything but a regular file before opening it. Loaded parameters are f32 on the requested device.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use super::{AttentionGate, GateConfig};
use crate::error::{CandleContext, GateError, Result};

/// Free-form description of the base model a gate was trained for (string to string, sorted).
pub type ModelIdentity = BTreeMap<String, String>;

/// Identity keys that mirror [`GateConfig`] fields; a file whose config disagrees with its own
/// identity on one of them is rejected.
const CONFIG_IDENTITY_KEYS: [&str; 3] = ["n_layers", "hidden", "n_kv_heads"];

/// The identity the engine records: `architecture`, `n_layers`, `hidden` (the hidden size),
/// `n_kv_heads` and `base_checksum` (of the base weights).
pub fn model_identity(
    architecture: &str,
    n_layers: usize,
    hidden_size: usize,
    n_kv_heads: usize,
    base_checksum: &str,
) -> ModelIdentity {
    [
        ("architecture", architecture.to_string()),
        ("n_layers", n_layers.to_string()),
        ("hidden", hidden_size.to_string()),
        ("n_kv_heads", n_kv_heads.to_string()),
        ("base_checksum", base_checksum.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The dtype parameters are stored in (compute is f32 after loading).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GateFileDtype {
    /// 32-bit float: bit-exact round trip (the default).
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl GateFileDtype {
    /// The metadata spelling: `f32`, `f16`, `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            GateFileDtype::F32 => "f32",
            GateFileDtype::F16 => "f16",
            GateFileDtype::BF16 => "bf16",
        }
    }

    fn candle(self) -> DType {
        match self {
            GateFileDtype::F32 => DType::F32,
            GateFileDtype::F16 => DType::F16,
            GateFileDtype::BF16 => DType::BF16,
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            GateFileDtype::F32 => Dtype::F32,
            GateFileDtype::F16 => Dtype::F16,
            GateFileDtype::BF16 => Dtype::BF16,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [GateFileDtype::F32, GateFileDtype::F16, GateFileDtype::BF16]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
}

const FORMAT: &str = "agate-gate";
const VERSION: &str = "1";

fn format_err(path: &Path, detail: impl Into<String>) -> GateError {
    GateError::Format {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

impl AttentionGate {
    /// The gate file's bytes: parameters cast to `dtype`, the config and
    /// [`AttentionGate::identity`] (see the module header); `path` only names the file in errors.
    pub fn to_bytes(&self, path: &Path, dtype: GateFileDtype) -> Result<Vec<u8>> {
        let tensors = self
            .named_tensors()
            .into_iter()
            .map(|(name, t)| Ok((name, t.to_dtype(dtype.candle())?.to_device(&Device::Cpu)?)))
            .collect::<candle_core::Result<Vec<(String, Tensor)>>>()
            .ctx("casting gate parameters for saving")?;
        let config = serde_json::to_string(&self.cfg)
            .map_err(|e| format_err(path, format!("encoding gate_config: {e}")))?;
        let identity = serde_json::to_string(&self.identity)
            .map_err(|e| format_err(path, format!("encoding model_identity: {e}")))?;
        let metadata: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("version", VERSION.to_string()),
            ("dtype", dtype.as_str().to_string()),
            ("gate_config", config),
            ("model_identity", identity),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize(tensors, Some(metadata))
            .map_err(|e| format_err(path, format!("serialising safetensors: {e}")))
    }

    /// Loads a gate file onto `device` (parameters as f32), checking that its stored identity
    /// has every field of `expected` with the same value (pass an empty map to skip), and
    /// everything listed in the module header.
    /// The file is memory-mapped, not read: a bad header is refused before any data is touched,
    /// however large the file; a FIFO or device (which would block or never end) is refused
    /// before it is opened.
    pub fn load(path: &Path, expected: &ModelIdentity, device: &Device) -> Result<Self> {
        let io = |op, source| GateError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        if !std::fs::metadata(path)
            .map_err(|e| io("read", e))?
            .is_file()
        {
            return Err(format_err(
                path,
                "not a regular file (a gates file is a safetensors file)",
            ));
        }
        let file = std::fs::File::open(path).map_err(|e| io("read", e))?;
        // SAFETY: the map is read-only and dropped once the parameters are copied out of it;
        // like every mmap-based loader (the model's weights too) we rely on the file not being
        // truncated by another process meanwhile.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io("map", e))?;
        Self::from_bytes(&bytes, path, expected, device)
    }

    /// [`AttentionGate::load`] of a gate file's bytes; `path` names them in errors.
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        expected: &ModelIdentity,
        device: &Device,
    ) -> Result<Self> {
        let (dtype, cfg, identity) = read_metadata(bytes, path)?;
        check_identity(path, &cfg, &identity, expected)?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| format_err(path, format!("not a safetensors file: {e}")))?;
        let mut tensors = HashMap::new();
        for (name, shape) in cfg.param_shapes() {
            let t = load_tensor(&st, &name, &shape, dtype, path, device)?;
            tensors.insert(name, t);
        }
        if let Some(extra) = st.names().into_iter().find(|n| !tensors.contains_key(*n)) {
            return Err(format_err(
                path,
                format!("unexpected tensor `{extra}` for gate_config {cfg:?}"),
            ));
        }
        let mut gate = Self::from_tensors(&cfg, tensors)?;
        gate.identity = identity;
        Ok(gate)
    }
}

/// The metadata of a gate file's bytes, checked: the format tag and version, the parameters'
/// dtype, the (valid) gate config and the model identity.
fn read_metadata(bytes: &[u8], path: &Path) -> Result<(GateFileDtype, GateConfig, ModelIdentity)> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| format_err(path, format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let field = |key: &str| {
        meta.get(key).ok_or_else(|| {
            format_err(
                path,
                format!("metadata field `{key}` is missing (not an agate gate file?)"),
            )
        })
    };
    let format = field("format")?;
    if format != FORMAT {
        return Err(format_err(
            path,
            format!("metadata `format` is {format:?}, expected {FORMAT:?}"),
        ));
    }
    let version = field("version")?;
    if version != VERSION {
        return Err(format_err(
            path,
            format!("metadata `version` is {version:?}, expected {VERSION:?}"),
        ));
    }
    let dtype_name = field("dtype")?;
    let dtype = GateFileDtype::parse(dtype_name).ok_or_else(|| {
        format_err(
            path,
            format!("metadata `dtype` is {dtype_name:?}, expected f32, f16 or bf16"),
        )
    })?;
    let cfg: GateConfig = serde_json::from_str(field("gate_config")?).map_err(|e| {
        format_err(
            path,
            format!("metadata `gate_config` is not a valid GateConfig: {e}"),
        )
    })?;
    cfg.validate()
        .map_err(|e| format_err(path, format!("metadata `gate_config` is invalid: {e}")))?;
    let identity: ModelIdentity = serde_json::from_str(field("model_identity")?).map_err(|e| {
        format_err(
            path,
            format!("metadata `model_identity` is not a string map: {e}"),
        )
    })?;
    Ok((dtype, cfg, identity))
}

/// Parameter `name` of a gate file, checked (present, of `shape`, stored in `dtype`, every
/// value finite), as f32 on `device`.
fn load_tensor(
    st: &SafeTensors<'_>,
    name: &str,
    shape: &[usize],
    dtype: GateFileDtype,
    path: &Path,
    device: &Device,
) -> Result<Tensor> {
    let view = st.tensor(name).map_err(|_| GateError::MissingTensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        expected: shape.to_vec(),
    })?;
    if view.shape() != shape {
        return Err(GateError::WrongShape {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            expected: shape.to_vec(),
            actual: view.shape().to_vec(),
        });
    }
    if view.dtype() != dtype.safetensors() {
        return Err(GateError::WrongDtype {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            expected: dtype.as_str().to_string(),
            actual: format!("{:?}", view.dtype()),
        });
    }
    let t = view
        .load(device)
        .and_then(|t| t.to_dtype(DType::F32))
        .ctx("loading a gate tensor")?;
    let values = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .ctx("reading a gate tensor")?;
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        return Err(format_err(
            path,
            format!("tensor `{name}` holds a non-finite value ({bad}): the gates are corrupt or their training diverged"),
        ));
    }
    Ok(t)
}

/// Checks `found` (the file's identity) against `expected` and against the file's own config.
fn check_identity(
    path: &Path,
    cfg: &GateConfig,
    found: &ModelIdentity,
    expected: &ModelIdentity,
) -> Result<()> {
    for (field, want) in expected {
        if found.get(field) != Some(want) {
            return Err(GateError::IdentityMismatch {
                path: path.to_path_buf(),
                field: field.to_string(),
                expected: want.clone(),
                actual: found.get(field).cloned(),
            });
        }
    }
    let from_cfg = [cfg.n_layers, cfg.hidden_size, cfg.n_kv_heads];
    for (field, value) in CONFIG_IDENTITY_KEYS.into_iter().zip(from_cfg) {
        if let Some(v) = found.get(field).filter(|v| **v != value.to_string()) {
            return Err(format_err(
                path,
                format!(
                    "its model identity says `{field}` is {v} but its own gate_config says \
                     {value}: the file is inconsistent (edited by hand or corrupt)"
                ),
            ));
        }
    }
    Ok(())
}
