//! Weight conversion: a GGUF file to a Hugging Face directory (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json` with the chat template), dtype casts of safetensors
//! checkpoints, and merging trained gates into the output.
//!
//! Invariants:
//! - Streaming: tensors are read one at a time (GGUF and safetensors inputs are memory-mapped),
//!   converted and written straight to disk; the header is computed up front from shapes and
//!   dtypes, so at most one tensor is ever held in RAM (twice: source and converted).
//! - No file is opened here: every output file is written into a [`FileSink`] the caller owns
//!   (engine's `StagedDir` writes the directory atomically and cleans up after failures, a
//!   cancellation — the progress callback returning an error — or a killed process).
//! - llama.cpp's converter permutes the rows of `attn_q`/`attn_k` for Llama and Mistral GGUFs;
//!   GGUF → HF undoes it (`[n_head, out/n_head/2, 2, in]` → swap axes 1, 2), so the result runs
//!   with the half-split RoPE layout of Hugging Face. Qwen2 GGUFs are not permuted.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;
use crate::weights::{GgufFile, Naming, TensorRole};

/// Prefix under which merged gate tensors and their metadata keys are stored.
pub const GATES_PREFIX: &str = "gates.";

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

/// Progress of a conversion, reported once before and once after each tensor is written.
#[derive(Clone, Debug)]
pub enum ConvertEvent<'a> {
    /// The plan is known: this many tensors will be written.
    Start {
        /// Tensors to write.
        tensors: usize,
    },
    /// One tensor has been written.
    Tensor {
        /// Its 1-based index.
        index: usize,
        /// Its output name.
        name: &'a str,
    },
}

/// Where the files of an output directory go: `file(name, body)` creates the file `name` there
/// and `body` fills it. model-zoo never opens a file for writing; the sink owns the files
/// (engine's `StagedDir`: atomic, never clobbering). A body reports its writer's I/O errors as
/// [`ModelError::Write`] with an empty path, which the sink fills in.
pub trait FileSink {
    /// Writes one file of the directory.
    fn file(
        &mut self,
        name: &str,
        body: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
    ) -> Result<()>;
}

/// What a conversion wrote.
#[derive(Clone, Debug, Default)]
pub struct ConvertSummary {
    /// Files written (names only).
    pub files: Vec<String>,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub tensor_bytes: u64,
    /// Source tensors not carried over (e.g. `rope_freqs.weight`, which HF derives from the config).
    pub skipped: Vec<String>,
    /// Gate tensors merged under [`GATES_PREFIX`].
    pub gate_tensors: usize,
}

/// Options shared by the conversions.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// The dtype floating-point tensors are written in (f32, f16 or bf16).
    pub dtype: DType,
    /// A safetensors file of trained gates to merge in under [`GATES_PREFIX`], metadata included.
    pub gates: Option<PathBuf>,
}

/// Receives progress; returning an error cancels the conversion (nothing is left behind).
pub type Progress<'a> = dyn FnMut(ConvertEvent<'_>) -> Result<()> + 'a;

/// Checks that `dtype` is one the converter writes.
pub fn check_output_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(ModelError::Input(format!(
            "output dtype {other:?} is not supported (expected f32, f16 or bf16)"
        ))),
    }
}

/// Where a tensor of the output comes from.
enum Origin {
    /// A GGUF tensor, dequantized, rows un-permuted for `heads` heads when set.
    Gguf {
        name: String,
        unpermute_heads: Option<usize>,
    },
    /// A tensor of a memory-mapped safetensors set (the input or the gates file).
    Safetensors { index: usize, name: String },
}

/// Converts a GGUF file into the files of a Hugging Face directory, written into `out`.
pub fn gguf_to_hf(
    src: &Path,
    out: &mut dyn FileSink,
    opts: &ConvertOptions,
    progress: &mut Progress<'_>,
) -> Result<ConvertSummary> {
    check_output_dtype(opts.dtype)?;
    let file = GgufFile::open(src)?;
    let cfg = ModelConfig::from_gguf(src, file.content())?;
    let tokenizer = Tokenizer::from_gguf(src, file.content())?;
    let permuted = matches!(
        cfg.architecture,
        Architecture::Llama | Architecture::Mistral
    );

    // GGUF name → (HF name, heads to un-permute for).
    let mut names: BTreeMap<String, (String, Option<usize>)> = BTreeMap::new();
    let global = [
        TensorRole::Embedding,
        TensorRole::OutputNorm,
        TensorRole::LmHead,
    ];
    let per_layer = [
        TensorRole::AttnNorm,
        TensorRole::Q,
        TensorRole::K,
        TensorRole::V,
        TensorRole::O,
        TensorRole::FfnNorm,
        TensorRole::Gate,
        TensorRole::Up,
        TensorRole::Down,
    ];
    let roles = global
        .iter()
        .map(|r| (*r, 0))
        .chain((0..cfg.n_layers).flat_map(|l| per_layer.iter().map(move |r| (*r, l))));
    for (role, layer) in roles {
        let heads = match role {
            TensorRole::Q if permuted => Some(cfg.n_heads),
            TensorRole::K if permuted => Some(cfg.n_kv_heads),
            _ => None,
        };
        names.insert(
            role.name(Naming::Gguf, layer),
            (role.name(Naming::HuggingFace, layer), heads),
        );
        names.insert(
            role.bias_name(Naming::Gguf, layer),
            (role.bias_name(Naming::HuggingFace, layer), heads),
        );
    }
    let mut plan = Vec::new();
    let mut origins = Vec::new();
    let mut skipped = Vec::new();
    for (gguf_name, info) in &file.content().tensor_infos {
        match names.get(gguf_name) {
            Some((hf, heads)) => {
                let shape = info.shape.dims().to_vec();
                if let Some(h) = heads {
                    check_unpermutable(src, gguf_name, &shape, *h)?;
                }
                plan.push(TensorPlan {
                    name: hf.clone(),
                    dtype: opts.dtype,
                    shape,
                });
                origins.push(Origin::Gguf {
                    name: gguf_name.clone(),
                    unpermute_heads: *heads,
                });
            }
            None => skipped.push(gguf_name.clone()),
        }
    }
    skipped.sort();
    let mut sources = Vec::new();
    let mut metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let gate_tensors = add_gates(opts, &mut plan, &mut origins, &mut sources, &mut metadata)?;

    let mut files = Vec::new();
    let mut bytes = 0;
    out.file("model.safetensors", &mut |w| {
        bytes = write_safetensors(w, &plan, &metadata, progress, |i| match &origins[i] {
            Origin::Gguf {
                name,
                unpermute_heads,
            } => {
                let t = file.tensor(name)?.dequantize(&Device::Cpu)?;
                let t = match unpermute_heads {
                    Some(h) => unpermute_rows(&t, *h)?,
                    None => t,
                };
                Ok(t.to_dtype(opts.dtype)?)
            }
            Origin::Safetensors { index, name } => Ok(sources[*index]
                .load(name, &Device::Cpu)?
                .to_dtype(plan[i].dtype)?),
        })?;
        Ok(())
    })?;
    files.push("model.safetensors".to_string());

    let mut hf_config = cfg.to_hf_value(tokenizer.bos_id(), tokenizer.eos_ids());
    hf_config["torch_dtype"] = dtype_torch_name(opts.dtype).into();
    write_json(out, "config.json", &hf_config)?;
    let tok_json = tokenizer
        .inner()
        .to_string(false)
        .map_err(|e| ModelError::Tokenizer {
            source_name: src.display().to_string(),
            reason: format!("cannot serialise: {e}"),
        })?;
    out.file("tokenizer.json", &mut |w| {
        Ok(w.write_all(tok_json.as_bytes())?)
    })?;
    let token_text = |id: Option<u32>| id.and_then(|i| tokenizer.inner().id_to_token(i));
    let tok_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_text(tokenizer.bos_id()),
        "eos_token": token_text(tokenizer.eos_ids().first().copied()),
        "add_bos_token": tokenizer.adds_bos(),
        "add_eos_token": false,
        "model_max_length": cfg.max_position,
        "chat_template": tokenizer.chat_template(),
    });
    write_json(out, "tokenizer_config.json", &tok_config)?;
    files.extend(["config.json", "tokenizer.json", "tokenizer_config.json"].map(String::from));
    files.sort();
    Ok(ConvertSummary {
        files,
        tensors: plan.len(),
        tensor_bytes: bytes,
        skipped,
        gate_tensors,
    })
}

/// Casts a safetensors checkpoint (one `.safetensors` file, or a Hugging Face directory whose
/// shards are each cast to a file of the same name) to `opts.dtype`, tensor by tensor from a
/// memory map. Non-float tensors are copied unchanged. The JSON files of a directory are copied,
/// `config.json` with its `torch_dtype` updated. Gates, when given, go into the first shard.
pub fn cast_safetensors(
    src: &Path,
    out: &mut dyn FileSink,
    opts: &ConvertOptions,
    progress: &mut Progress<'_>,
) -> Result<ConvertSummary> {
    check_output_dtype(opts.dtype)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    let (shards, extra_files) = if src.is_dir() {
        let mut shards = Vec::new();
        let mut extra = Vec::new();
        for entry in std::fs::read_dir(src).map_err(io(src))? {
            let p = entry.map_err(io(src))?.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                shards.push(p);
            } else if p.is_file() && p.extension().is_some_and(|x| x == "json") {
                extra.push(p);
            }
        }
        shards.sort();
        extra.sort();
        (shards, extra)
    } else {
        (vec![src.to_path_buf()], Vec::new())
    };
    if shards.is_empty() {
        return Err(ModelError::MissingTensor {
            path: src.to_path_buf(),
            name: "*.safetensors (no weight files)".into(),
        });
    }
    let mut total_plan = Vec::new();
    let mut per_shard = Vec::new();
    let mut gate_tensors = 0;
    for (k, shard) in shards.iter().enumerate() {
        // SAFETY: read-only map; like every mmap-based loader we rely on the file not being
        // truncated by another process during the conversion.
        let st = unsafe { MmapedSafetensors::new(shard) }.map_err(|e| ModelError::Safetensors {
            path: shard.clone(),
            reason: crate::error::candle_message(&e),
        })?;
        let mut metadata = read_safetensors_metadata(shard)?;
        metadata
            .entry("format".to_string())
            .or_insert_with(|| "pt".to_string());
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut plan = Vec::new();
        let mut origins = Vec::new();
        for (name, view) in tensors {
            let dtype: DType = view
                .dtype()
                .try_into()
                .map_err(|e| ModelError::Safetensors {
                    path: shard.clone(),
                    reason: format!("tensor `{name}`: {}", crate::error::candle_message(&e)),
                })?;
            plan.push(TensorPlan {
                name: name.clone(),
                dtype: if dtype.is_float() { opts.dtype } else { dtype },
                shape: view.shape().to_vec(),
            });
            origins.push(Origin::Safetensors { index: 0, name });
        }
        let mut sources = vec![st];
        if k == 0 {
            gate_tensors = add_gates(opts, &mut plan, &mut origins, &mut sources, &mut metadata)?;
        }
        total_plan.extend(plan.iter().cloned());
        per_shard.push((shard.clone(), plan, origins, sources, metadata));
    }
    progress(ConvertEvent::Start {
        tensors: total_plan.len(),
    })?;
    let (mut done, mut bytes) = (0, 0);
    let mut files = Vec::new();
    for (shard, plan, origins, sources, metadata) in &per_shard {
        let name = shard.file_name().unwrap_or_default().to_string_lossy();
        let offset = done;
        let mut inner = |e: ConvertEvent<'_>| match e {
            ConvertEvent::Start { .. } => Ok(()),
            ConvertEvent::Tensor { index, name } => progress(ConvertEvent::Tensor {
                index: offset + index,
                name,
            }),
        };
        out.file(&name, &mut |w| {
            bytes += write_safetensors(w, plan, metadata, &mut inner, |i| match &origins[i] {
                Origin::Safetensors { index, name } => Ok(sources[*index]
                    .load(name, &Device::Cpu)?
                    .to_dtype(plan[i].dtype)?),
                Origin::Gguf { .. } => Err(ModelError::Input(
                    "internal: GGUF origin in a safetensors cast".into(),
                )),
            })?;
            Ok(())
        })?;
        files.push(name.into_owned());
        done += plan.len();
    }
    for extra in &extra_files {
        let name = extra.file_name().unwrap_or_default().to_string_lossy();
        if name == "config.json" {
            let text = std::fs::read_to_string(extra).map_err(io(extra))?;
            let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                ModelError::config(extra, "(file)", format!("is not valid JSON: {e}"))
            })?;
            if let Some(obj) = v.as_object_mut() {
                obj.insert(
                    "torch_dtype".into(),
                    dtype_torch_name(opts.dtype).to_string().into(),
                );
            }
            write_json(out, &name, &v)?;
        } else {
            let bytes = std::fs::read(extra).map_err(io(extra))?;
            out.file(&name, &mut |w| Ok(w.write_all(&bytes)?))?;
        }
        files.push(name.into_owned());
    }
    files.sort();
    Ok(ConvertSummary {
        files,
        tensors: total_plan.len(),
        tensor_bytes: bytes,
        skipped: Vec::new(),
        gate_tensors,
    })
}

/// Appends the gates file's tensors (under [`GATES_PREFIX`], kept in their stored dtype) and all
/// of its metadata (keys prefixed likewise: an Attention-Gate file's `format = "agate-gate"`,
/// `gate_config`, `model_identity`, … become `gates.format`, …) to a plan; returns how many
/// tensors were added.
fn add_gates(
    opts: &ConvertOptions,
    plan: &mut Vec<TensorPlan>,
    origins: &mut Vec<Origin>,
    sources: &mut Vec<MmapedSafetensors>,
    metadata: &mut BTreeMap<String, String>,
) -> Result<usize> {
    let Some(path) = &opts.gates else {
        return Ok(0);
    };
    // SAFETY: read-only map, see `cast_safetensors`.
    let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| ModelError::Safetensors {
        path: path.clone(),
        reason: format!("gates file: {}", crate::error::candle_message(&e)),
    })?;
    for (k, v) in read_safetensors_metadata(path)? {
        metadata.insert(format!("{GATES_PREFIX}{k}"), v);
    }
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let index = sources.len();
    let count = tensors.len();
    for (name, view) in tensors {
        let dtype: DType = view
            .dtype()
            .try_into()
            .map_err(|e| ModelError::Safetensors {
                path: path.clone(),
                reason: format!("tensor `{name}`: {}", crate::error::candle_message(&e)),
            })?;
        let out_name = format!("{GATES_PREFIX}{name}");
        if plan.iter().any(|p| p.name == out_name) {
            return Err(ModelError::Input(format!(
                "{}: tensor `{out_name}` already exists in the model",
                path.display()
            )));
        }
        plan.push(TensorPlan {
            name: out_name,
            dtype,
            shape: view.shape().to_vec(),
        });
        origins.push(Origin::Safetensors { index, name });
    }
    sources.push(st);
    Ok(count)
}

fn check_unpermutable(src: &Path, name: &str, shape: &[usize], heads: usize) -> Result<()> {
    let rows = shape.first().copied().unwrap_or(0);
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(ModelError::Input(format!(
            "{}: tensor `{name}` has {rows} rows, not a multiple of 2 × {heads} heads: cannot undo llama.cpp's q/k permutation",
            src.display()
        )));
    }
    Ok(())
}

/// Undoes llama.cpp's q/k row permutation: rows `[n_head, 2, half, …]` (GGUF) become
/// `[n_head, half, 2, …]` swapped back, i.e. HF = reshape `[n_head, half, 2, in]` → swap axes
/// 1 and 2 → `[out, in]`. Works for weights `[out, in]` and biases `[out]`.
pub fn unpermute_rows(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = dims.first().copied().unwrap_or(0);
    let inner: usize = dims.iter().skip(1).product();
    if n_head == 0 || out % (2 * n_head) != 0 {
        return Err(ModelError::Input(format!(
            "cannot un-permute {out} rows for {n_head} heads (rows must be a multiple of 2 × heads)"
        )));
    }
    let half = out / n_head / 2;
    Ok(t.reshape((n_head, half, 2, inner))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// The `torch_dtype` string of a dtype.
fn dtype_torch_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
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
        .map_err(|e| bad(format!("header length: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len.saturating_add(8) > file_len || len > 100 << 20 {
        return Err(bad(format!(
            "header length {len} does not fit the file ({file_len} bytes)"
        )));
    }
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf)
        .map_err(|e| bad(format!("header: {e}")))?;
    serde_json::from_slice(&buf).map_err(|e| bad(format!("header JSON: {e}")))
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

/// Writes `v` as pretty JSON into the file `name` of `out`.
pub(crate) fn write_json(out: &mut dyn FileSink, name: &str, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    out.file(name, &mut |w| Ok(w.write_all(text.as_bytes())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inverse of llama.cpp's permute (`reshape(n_head, 2, half, in).swapaxes(1, 2)`).
    fn permute(t: &Tensor, n_head: usize) -> Tensor {
        let dims = t.dims().to_vec();
        let half = dims[0] / n_head / 2;
        t.reshape((n_head, 2, half, dims[1]))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape(dims)
            .unwrap()
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let data: Vec<f32> = (0..24 * 3).map(|i| i as f32).collect();
        let hf = Tensor::from_vec(data, (24, 3), &Device::Cpu).unwrap();
        let gguf = permute(&hf, 3);
        assert_ne!(gguf.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        let back = unpermute_rows(&gguf, 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        assert!(unpermute_rows(&hf, 5).is_err());
    }

    /// Writes straight into a directory (tests only; engine's `StagedDir` is the real sink).
    struct Dir(std::path::PathBuf);

    impl FileSink for Dir {
        fn file(
            &mut self,
            name: &str,
            body: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
        ) -> Result<()> {
            std::fs::create_dir_all(&self.0)?;
            let mut f = std::fs::File::create(self.0.join(name))?;
            body(&mut f)
        }
    }

    #[test]
    fn cast_round_trips_and_merges_gates() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::random::tiny_config(1, 2, 1);
        let src = dir.path().join("src");
        crate::random::write_random_model(&mut Dir(src.clone()), &cfg, 3).unwrap();
        let gates = dir.path().join("gates.safetensors");
        let g = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
        let plan = vec![TensorPlan {
            name: "layers.0.w".into(),
            dtype: DType::F32,
            shape: vec![2, 4],
        }];
        let md = BTreeMap::from([
            ("format".to_string(), "agate-gate".to_string()),
            ("gate_config".to_string(), "{\"k\":1}".to_string()),
        ]);
        let mut f = std::fs::File::create(&gates).unwrap();
        write_safetensors(&mut f, &plan, &md, &mut |_| Ok(()), |_| Ok(g.clone())).unwrap();
        let out = dir.path().join("out");
        let opts = ConvertOptions {
            dtype: DType::BF16,
            gates: Some(gates),
        };
        let s = cast_safetensors(&src, &mut Dir(out.clone()), &opts, &mut |_| Ok(())).unwrap();
        assert_eq!(s.gate_tensors, 1);
        assert!(s.files.contains(&"config.json".to_string()));
        let md = read_safetensors_metadata(&out.join("model.safetensors")).unwrap();
        assert_eq!(md["gates.gate_config"], "{\"k\":1}");
        assert_eq!(md["gates.format"], "agate-gate");
        assert_eq!(md["format"], "pt");
        let st = unsafe { MmapedSafetensors::new(out.join("model.safetensors")) }.unwrap();
        let q = st
            .load(&TensorRole::Q.name(Naming::HuggingFace, 0), &Device::Cpu)
            .unwrap();
        assert_eq!(q.dtype(), DType::BF16);
        assert_eq!(
            st.load("gates.layers.0.w", &Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            vec![vec![1.0; 4]; 2]
        );
        // A cancelled cast stops at once with the callback's error.
        let err = cast_safetensors(
            &src,
            &mut Dir(dir.path().join("out2")),
            &ConvertOptions {
                dtype: DType::F16,
                gates: None,
            },
            &mut |e| match e {
                ConvertEvent::Tensor { index: 2, .. } => Err(ModelError::Input("stop".into())),
                _ => Ok(()),
            },
        );
        assert_eq!(err.unwrap_err().to_string(), "stop");
    }
}
