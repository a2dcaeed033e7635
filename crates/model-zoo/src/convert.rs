//! Weight conversion: a GGUF file to a Hugging Face directory (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json` with the chat template), dtype casts of safetensors
//! checkpoints, and merging trained gates into the output.
//!
//! Invariants:
//! - Streaming: tensors are read one at a time (GGUF and safetensors inputs are memory-mapped),
//!   converted and written straight to disk; the header is computed up front from shapes and
//!   dtypes, so at most one tensor is ever held in RAM (twice: source and converted).
//! - Atomic: everything is written into a hidden staging directory beside the output, which is
//!   renamed onto the output only once complete. A failure or cancellation (the progress callback
//!   returning an error) removes the staging directory: no half-written model is ever left at the
//!   output path. A process killed by SIGKILL leaves only a `.{name}.agate-tmp*` directory.
//! - llama.cpp's converter permutes the rows of `attn_q`/`attn_k` for Llama and Mistral GGUFs;
//!   GGUF → HF undoes it (`[n_head, out/n_head/2, 2, in]` → swap axes 1, 2), so the result runs
//!   with the half-split RoPE layout of Hugging Face. Qwen2 GGUFs are not permuted.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
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

/// What a conversion wrote.
#[derive(Clone, Debug, Default)]
pub struct ConvertSummary {
    /// The output directory.
    pub out_dir: PathBuf,
    /// Files written there (names only).
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

/// Converts a GGUF file into a Hugging Face directory at `out` (which must not exist or be empty).
pub fn gguf_to_hf(
    src: &Path,
    out: &Path,
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

    let staging = Staging::new(out)?;
    let weights = staging.path().join("model.safetensors");
    let bytes = write_safetensors(&weights, &plan, &metadata, progress, |i| {
        match &origins[i] {
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
        }
    })?;

    let mut hf_config = cfg.to_hf_value(tokenizer.bos_id(), tokenizer.eos_ids());
    hf_config["torch_dtype"] = dtype_torch_name(opts.dtype).into();
    write_json(&staging.path().join("config.json"), &hf_config)?;
    let tok_path = staging.path().join("tokenizer.json");
    tokenizer
        .inner()
        .save(&tok_path, false)
        .map_err(|e| ModelError::Tokenizer {
            source_name: tok_path.display().to_string(),
            reason: format!("cannot write: {e}"),
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
    write_json(&staging.path().join("tokenizer_config.json"), &tok_config)?;
    let files = staging.commit()?;
    Ok(ConvertSummary {
        out_dir: out.to_path_buf(),
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
    out: &Path,
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
    let staging = Staging::new(out)?;
    let mut total_plan = Vec::new();
    let mut per_shard = Vec::new();
    let mut gate_tensors = 0;
    for (k, shard) in shards.iter().enumerate() {
        // SAFETY: read-only map; like every mmap-based loader we rely on the file not being
        // truncated by another process during the conversion.
        let st = unsafe { MmapedSafetensors::new(shard) }.map_err(|e| ModelError::Gguf {
            path: shard.clone(),
            reason: format!("safetensors: {}", crate::error::candle_message(&e)),
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
            let dtype: DType = view.dtype().try_into().map_err(|e| ModelError::Gguf {
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
    let mut done = 0;
    let mut bytes = 0;
    for (shard, plan, origins, sources, metadata) in &per_shard {
        let file_name = shard.file_name().unwrap_or_default();
        let dest = staging.path().join(file_name);
        let offset = done;
        let mut inner = |e: ConvertEvent<'_>| match e {
            ConvertEvent::Start { .. } => Ok(()),
            ConvertEvent::Tensor { index, name } => progress(ConvertEvent::Tensor {
                index: offset + index,
                name,
            }),
        };
        bytes += write_safetensors(&dest, plan, metadata, &mut inner, |i| match &origins[i] {
            Origin::Safetensors { index, name } => Ok(sources[*index]
                .load(name, &Device::Cpu)?
                .to_dtype(plan[i].dtype)?),
            Origin::Gguf { .. } => Err(ModelError::Input(
                "internal: GGUF origin in a safetensors cast".into(),
            )),
        })?;
        done += plan.len();
    }
    for extra in &extra_files {
        let name = extra.file_name().unwrap_or_default();
        let dest = staging.path().join(name);
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
            write_json(&dest, &v)?;
        } else {
            std::fs::copy(extra, &dest).map_err(io(&dest))?;
        }
    }
    let files = staging.commit()?;
    Ok(ConvertSummary {
        out_dir: out.to_path_buf(),
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
    let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| ModelError::Gguf {
        path: path.clone(),
        reason: format!(
            "gates file is not safetensors: {}",
            crate::error::candle_message(&e)
        ),
    })?;
    for (k, v) in read_safetensors_metadata(path)? {
        metadata.insert(format!("{GATES_PREFIX}{k}"), v);
    }
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let index = sources.len();
    let count = tensors.len();
    for (name, view) in tensors {
        let dtype: DType = view.dtype().try_into().map_err(|e| ModelError::Gguf {
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
    let bad = |reason: String| ModelError::Gguf {
        path: path.to_path_buf(),
        reason: format!("not a safetensors file: {reason}"),
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

/// Writes a safetensors file tensor by tensor: the header comes from `plan`, then `produce(i)`
/// is called for each tensor in order and its bytes are streamed out. The file is written under a
/// temporary name in the same directory and renamed when complete. Returns tensor bytes written.
pub fn write_safetensors(
    path: &Path,
    plan: &[TensorPlan],
    metadata: &BTreeMap<String, String>,
    progress: &mut Progress<'_>,
    mut produce: impl FnMut(usize) -> Result<Tensor>,
) -> Result<u64> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
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
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".agate-tmp-")
        .tempfile_in(dir)
        .map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, tmp);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
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
        write_tensor_bytes(&mut w, &t).map_err(|e| match e {
            ModelError::Io { source, .. } => io(source),
            other => other,
        })?;
        progress(ConvertEvent::Tensor {
            index: i + 1,
            name: &p.name,
        })?;
    }
    let tmp = w.into_inner().map_err(|e| io(e.into_error()))?;
    tmp.as_file().sync_all().map_err(io)?;
    set_mode(tmp.path(), 0o644)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(offset)
}

/// Writes a tensor's elements little-endian, in row-major order.
fn write_tensor_bytes(w: &mut impl Write, t: &Tensor) -> Result<()> {
    let flat = t.flatten_all()?;
    let io = |source| ModelError::Io {
        path: PathBuf::from("(output)"),
        source,
    };
    macro_rules! put {
        ($ty:ty) => {{
            let v = flat.to_vec1::<$ty>()?;
            let mut buf = Vec::with_capacity(v.len() * std::mem::size_of::<$ty>());
            for x in &v {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            w.write_all(&buf).map_err(io)?;
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

/// Gives a file or directory the usual permissions (temporary files are created private).
fn set_mode(path: &Path, mode: u32) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| ModelError::Io {
                path: path.to_path_buf(),
                source,
            },
        )?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    crate::random::write_atomic(path, &serde_json::to_string_pretty(v)?)
}

/// A hidden directory beside the output; removed on drop unless committed.
struct Staging {
    dir: Option<tempfile::TempDir>,
    out: PathBuf,
}

impl Staging {
    fn new(out: &Path) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ModelError::Io { path, source }
        };
        if out.exists() {
            let mut entries = std::fs::read_dir(out).map_err(io(out))?;
            if entries.next().is_some() {
                return Err(ModelError::Input(format!(
                    "output directory {} exists and is not empty; choose a new directory or remove it",
                    out.display()
                )));
            }
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{name}.agate-tmp"))
            .tempdir_in(&parent)
            .map_err(io(&parent))?;
        Ok(Staging {
            dir: Some(dir),
            out: out.to_path_buf(),
        })
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).unwrap_or(&self.out)
    }

    /// Renames the staging directory onto the output; returns the file names written.
    fn commit(mut self) -> Result<Vec<String>> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ModelError::Io { path, source }
        };
        let Some(dir) = self.dir.take() else {
            return Ok(Vec::new());
        };
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .map_err(io(dir.path()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        if self.out.exists() {
            // Checked empty in `new`; an empty directory is replaced.
            std::fs::remove_dir(&self.out).map_err(io(&self.out))?;
        }
        set_mode(dir.path(), 0o755)?;
        let kept = dir.keep();
        if let Err(source) = std::fs::rename(&kept, &self.out) {
            let _ = std::fs::remove_dir_all(&kept);
            return Err(ModelError::Io {
                path: self.out.clone(),
                source,
            });
        }
        Ok(files)
    }
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

    #[test]
    fn cast_round_trips_and_merges_gates() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::random::tiny_config(1, 2, 1);
        let src = dir.path().join("src");
        crate::random::write_random_model(&src, &cfg, 3).unwrap();
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
        write_safetensors(&gates, &plan, &md, &mut |_| Ok(()), |_| Ok(g.clone())).unwrap();
        let out = dir.path().join("out");
        let opts = ConvertOptions {
            dtype: DType::BF16,
            gates: Some(gates),
        };
        let s = cast_safetensors(&src, &out, &opts, &mut |_| Ok(())).unwrap();
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
        // A cancelled cast leaves nothing behind.
        let out2 = dir.path().join("out2");
        let err = cast_safetensors(
            &src,
            &out2,
            &ConvertOptions {
                dtype: DType::F16,
                gates: None,
            },
            &mut |e| match e {
                ConvertEvent::Tensor { index: 2, .. } => Err(ModelError::Input("stop".into())),
                _ => Ok(()),
            },
        );
        assert!(err.is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!left.iter().any(|n| n.contains("out2")), "{left:?}");
        // Output that exists and is non-empty is refused.
        assert!(cast_safetensors(&src, &out, &opts, &mut |_| Ok(())).is_err());
    }
}
