//! The safetensors format as the converters stream it: a file's JSON header read without mapping
//! the data, a memory-mapped file's tensor list, and a file written tensor by tensor from a plan
//! (the header computed up front from shapes and dtypes, each tensor produced, checked against
//! its plan and written, so one tensor at a time is held in RAM).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Tensor};

use crate::convert::{ConvertEvent, Progress};
use crate::error::{BoxedError, ModelError, Result};

/// One tensor to be written: its name, output dtype and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorPlan {
    /// The tensor's name in the output file.
    pub name: String,
    /// The dtype written.
    pub dtype: DType,
    /// The shape written.
    pub shape: Vec<usize>,
}

/// A tensor of a safetensors file: name, dtype, shape.
pub(crate) type TensorEntry = (String, DType, Vec<usize>);

/// Memory-maps the safetensors file `path` and lists its tensors (name, dtype, shape) sorted by
/// name; errors name the file, after `what` (e.g. "gates file: ").
pub(crate) fn open_safetensors(
    path: &Path,
    what: &str,
) -> Result<(MmapedSafetensors, Vec<TensorEntry>)> {
    // SAFETY: read-only map; like every mmap-based loader we rely on the file not being
    // truncated by another process during the conversion.
    let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        reason: format!("{what}{}", crate::error::candle_message(&e)),
        source: Some(e.into()),
    })?;
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let dtype: DType = view
            .dtype()
            .try_into()
            .map_err(|e| ModelError::Safetensors {
                path: path.to_path_buf(),
                reason: format!("tensor `{name}`: {}", crate::error::candle_message(&e)),
                source: Some(e.into()),
            })?;
        let shape = view.shape().to_vec();
        tensors.push((name, dtype, shape));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((st, tensors))
}

fn safetensors_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I64 => "I64",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        _ => "F32",
    }
}

/// Reads the `__metadata__` map of a safetensors file's header.
pub fn read_safetensors_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let header = read_safetensors_header(path)?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// Reads a safetensors file's JSON header (tensor table and `__metadata__`) without mapping the
/// data.
pub fn read_safetensors_header(path: &Path) -> Result<serde_json::Value> {
    use std::io::Read;
    let bad = |reason: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        reason,
        source: None,
    };
    let failed = |context: &str, e: BoxedError| ModelError::Safetensors {
        path: path.to_path_buf(),
        reason: format!("{context}{e}"),
        source: Some(e),
    };
    let mut f = std::fs::File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file_len = f
        .metadata()
        .map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| failed("header length: ", e.into()))?;
    let len = u64::from_le_bytes(len);
    if len.saturating_add(8) > file_len || len > 100 << 20 {
        return Err(bad(format!(
            "header length {len} does not fit the file ({file_len} bytes)"
        )));
    }
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf)
        .map_err(|e| failed("header: ", e.into()))?;
    serde_json::from_slice(&buf).map_err(|e| failed("header JSON: ", e.into()))
}

/// Writes a safetensors file into `w` tensor by tensor: the header comes from `plan`, then
/// `produce(i)` is called for each tensor in order and its bytes are streamed out. Returns the
/// tensor bytes written.
pub fn write_safetensors(
    w: &mut dyn Write,
    plan: &[TensorPlan],
    metadata: &BTreeMap<String, String>,
    progress: &mut Progress<'_>,
    mut produce: impl FnMut(usize) -> Result<Tensor>,
) -> Result<u64> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    let mut offset = 0u64;
    for p in plan {
        let bytes = (p.shape.iter().product::<usize>() * p.dtype.size_in_bytes()) as u64;
        header.insert(
            p.name.clone(),
            serde_json::json!({
                "dtype": safetensors_dtype_name(p.dtype),
                "shape": p.shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;
    progress(ConvertEvent::Start {
        tensors: plan.len(),
    })?;
    for (i, p) in plan.iter().enumerate() {
        let t = produce(i)?;
        if t.dims() != p.shape.as_slice() || t.dtype() != p.dtype {
            return Err(ModelError::Input(format!(
                "tensor `{}`: produced {:?} {:?}, planned {:?} {:?}",
                p.name,
                t.dtype(),
                t.dims(),
                p.dtype,
                p.shape
            )));
        }
        write_tensor_bytes(w, &t)?;
        progress(ConvertEvent::Tensor {
            index: i + 1,
            name: &p.name,
        })?;
    }
    Ok(offset)
}

/// Writes a tensor's elements little-endian, in row-major order.
fn write_tensor_bytes(w: &mut dyn Write, t: &Tensor) -> Result<()> {
    let flat = t.flatten_all()?;
    macro_rules! put {
        ($ty:ty) => {{
            let v = flat.to_vec1::<$ty>()?;
            let mut buf = Vec::with_capacity(v.len() * std::mem::size_of::<$ty>());
            for x in &v {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            w.write_all(&buf)?;
        }};
    }
    match t.dtype() {
        DType::U8 => put!(u8),
        DType::U32 => put!(u32),
        DType::I64 => put!(i64),
        DType::F16 => put!(half::f16),
        DType::BF16 => put!(half::bf16),
        DType::F32 => put!(f32),
        DType::F64 => put!(f64),
        other => {
            return Err(ModelError::Input(format!(
                "cannot write tensors of dtype {other:?}"
            )))
        }
    }
    Ok(())
}
