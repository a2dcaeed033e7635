//! Weight loading: GGUF files (memory-mapped, tensors kept quantized or dequantized) and Hugging
//! Face safetensors directories (memory-mapped, possibly sharded), behind one `Weights` type that
//! hands out layers by *logical* name, so the decoder never sees a file format.
//!
//! Invariants: every tensor handed out has been checked against the shape the config implies
//! (errors name the file, tensor and both shapes); hidden states are always f32, whatever the
//! weight dtype.

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{candle_message, ModelError, Result};
use crate::rope::RopeLayout;

/// How weights are held in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// GGUF tensors stay quantized; quantized types without a SIMD CPU kernel in candle
    /// (Q4_1, Q5_0, Q5_1, …) are re-quantized to Q8_0 at load, which is near lossless and several
    /// times faster. Safetensors weights load in their stored float dtype.
    Auto,
    /// GGUF tensors exactly as stored, even where that runs scalar code.
    AsStored,
    /// Every tensor quantized to this GGML type at load.
    Quantize(GgmlDType),
    /// Every tensor dequantized to a dense float dtype (f32, f16 or bf16).
    Dense(DType),
}

impl WeightFormat {
    /// Parses `auto`, `stored`, `q8_0`, `q4_0`, `f32`, `f16`, `bf16`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(WeightFormat::Auto),
            "stored" => Ok(WeightFormat::AsStored),
            "q8_0" => Ok(WeightFormat::Quantize(GgmlDType::Q8_0)),
            "q4_0" => Ok(WeightFormat::Quantize(GgmlDType::Q4_0)),
            "f32" => Ok(WeightFormat::Dense(DType::F32)),
            "f16" => Ok(WeightFormat::Dense(DType::F16)),
            "bf16" => Ok(WeightFormat::Dense(DType::BF16)),
            other => Err(format!(
                "invalid weight format `{other}` (expected auto, stored, q8_0, q4_0, f32, f16 or bf16)"
            )),
        }
    }
}

/// Rows from which a quantized projection dequantizes its weight and runs the dense f32 GEMM
/// instead of quantized dot products (activations then stay f32). Measured on the default model
/// (2 cores, AVX-512): dequantizing costs ~0.15 s per pass, so this wins from ~128 rows (+25% at
/// 128, +45% at 512); decode (one row) stays quantized, where reading 8-bit weights is what matters.
pub const DENSE_GEMM_MIN_ROWS: usize = 128;

/// A projection `y = x W^T (+ b)` with `x: [n, in]` f32 and `y: [n, out]` f32.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

#[derive(Clone, Debug)]
enum LinearWeight {
    Quantized(QMatMul),
    Dense(Tensor),
}

impl Linear {
    /// Applies the projection.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, self.takes_dense_gemm(x.dim(0)?))
    }

    /// Applies the projection; a quantized weight runs as a dequantized dense GEMM when
    /// `dense_gemm` is set, else with the quantized kernel.
    fn apply(&self, x: &Tensor, dense_gemm: bool) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Quantized(QMatMul::QTensor(q)) if dense_gemm => {
                x.matmul(&q.dequantize(&Device::Cpu)?.t()?)?
            }
            LinearWeight::Quantized(m) => m.forward(x)?,
            LinearWeight::Dense(w) => {
                let y = x.to_dtype(w.dtype())?.matmul(&w.t()?)?;
                y.to_dtype(DType::F32)?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Applies the projection to the rows of several sequences stacked in `x` (`rows[i]`
    /// consecutive rows for sequence `i`). With quantized weights every row gets bit for bit what
    /// [`Linear::forward`] gives it when its sequence's rows run alone: the quantized kernel quantizes and dots each
    /// row on its own, so rows that take it share one call (the weights are read once for all of
    /// them); a sequence whose row count selects the dense GEMM, whose rounding depends on the row
    /// count, gets a call of its own. Dense float weights take one GEMM for all rows (there,
    /// results equal lone passes to rounding: the GEMM's blocking depends on the row count).
    pub fn forward_segments(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        if !rows.iter().any(|&r| self.takes_dense_gemm(r)) {
            // However many rows there are in all: each one takes the kernel it takes alone.
            return self.apply(x, false);
        }
        let mut parts = Vec::new();
        let (mut start, mut shared) = (0, 0);
        for &r in rows {
            if self.takes_dense_gemm(r) {
                if shared > 0 {
                    parts.push(self.apply(&x.narrow(0, start - shared, shared)?, false)?);
                    shared = 0;
                }
                parts.push(self.apply(&x.narrow(0, start, r)?, true)?);
            } else {
                shared += r;
            }
            start += r;
        }
        if shared > 0 {
            parts.push(self.apply(&x.narrow(0, start - shared, shared)?, false)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Whether `rows` rows of a quantized weight run as a dequantized dense GEMM.
    fn takes_dense_gemm(&self, rows: usize) -> bool {
        matches!(self.weight, LinearWeight::Quantized(QMatMul::QTensor(_)))
            && rows >= DENSE_GEMM_MIN_ROWS
    }

    /// The weight dequantized to a dense f32 `[out, in]` tensor.
    pub fn dense_weight(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            LinearWeight::Quantized(QMatMul::QTensor(q)) => q.dequantize(&Device::Cpu)?,
            LinearWeight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.to_dtype(DType::F32)?
            }
            LinearWeight::Dense(w) => w.to_dtype(DType::F32)?,
        })
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// The token embedding table.
#[derive(Clone, Debug)]
pub enum Embedding {
    /// Rows dequantized on lookup from the stored quantized table.
    Quantized(std::sync::Arc<QTensor>),
    /// A dense `[vocab, hidden]` table.
    Dense(Tensor),
}

impl Embedding {
    /// Looks up `ids`, giving `[n, hidden]` f32.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, &Device::Cpu)?;
        Ok(match self {
            Embedding::Quantized(q) => q.embedding(&ids)?.to_dtype(DType::F32)?,
            Embedding::Dense(t) => t.embedding(&ids)?.to_dtype(DType::F32)?,
        })
    }

    /// The table as dense f32 `[vocab, hidden]`.
    pub fn dense(&self) -> Result<Tensor> {
        Ok(match self {
            Embedding::Quantized(q) => q.dequantize(&Device::Cpu)?,
            Embedding::Dense(t) => t.to_dtype(DType::F32)?,
        })
    }
}

/// The logical tensors of a Llama-family decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// Token embedding `[vocab, hidden]`.
    Embedding,
    /// Final RMSNorm weight.
    OutputNorm,
    /// LM head `[vocab, hidden]` (absent when tied).
    LmHead,
    /// Pre-attention RMSNorm.
    AttnNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// Pre-FFN RMSNorm.
    FfnNorm,
    /// FFN gate projection.
    Gate,
    /// FFN up projection.
    Up,
    /// FFN down projection.
    Down,
}

/// Tensor naming conventions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// llama.cpp's GGUF names (`blk.N.attn_q.weight`).
    Gguf,
    /// Hugging Face names (`model.layers.N.self_attn.q_proj.weight`).
    HuggingFace,
}

impl TensorRole {
    /// The weight's name in a convention (`layer` ignored for global tensors).
    pub fn name(self, naming: Naming, layer: usize) -> String {
        self.name_with_suffix(naming, layer, "weight")
    }

    /// The bias's name in a convention.
    pub fn bias_name(self, naming: Naming, layer: usize) -> String {
        self.name_with_suffix(naming, layer, "bias")
    }

    fn name_with_suffix(self, naming: Naming, layer: usize, suffix: &str) -> String {
        use TensorRole::*;
        match naming {
            Naming::Gguf => match self {
                Embedding => format!("token_embd.{suffix}"),
                OutputNorm => format!("output_norm.{suffix}"),
                LmHead => format!("output.{suffix}"),
                AttnNorm => format!("blk.{layer}.attn_norm.{suffix}"),
                Q => format!("blk.{layer}.attn_q.{suffix}"),
                K => format!("blk.{layer}.attn_k.{suffix}"),
                V => format!("blk.{layer}.attn_v.{suffix}"),
                O => format!("blk.{layer}.attn_output.{suffix}"),
                FfnNorm => format!("blk.{layer}.ffn_norm.{suffix}"),
                Gate => format!("blk.{layer}.ffn_gate.{suffix}"),
                Up => format!("blk.{layer}.ffn_up.{suffix}"),
                Down => format!("blk.{layer}.ffn_down.{suffix}"),
            },
            Naming::HuggingFace => match self {
                Embedding => format!("model.embed_tokens.{suffix}"),
                OutputNorm => format!("model.norm.{suffix}"),
                LmHead => format!("lm_head.{suffix}"),
                AttnNorm => format!("model.layers.{layer}.input_layernorm.{suffix}"),
                Q => format!("model.layers.{layer}.self_attn.q_proj.{suffix}"),
                K => format!("model.layers.{layer}.self_attn.k_proj.{suffix}"),
                V => format!("model.layers.{layer}.self_attn.v_proj.{suffix}"),
                O => format!("model.layers.{layer}.self_attn.o_proj.{suffix}"),
                FfnNorm => format!("model.layers.{layer}.post_attention_layernorm.{suffix}"),
                Gate => format!("model.layers.{layer}.mlp.gate_proj.{suffix}"),
                Up => format!("model.layers.{layer}.mlp.up_proj.{suffix}"),
                Down => format!("model.layers.{layer}.mlp.down_proj.{suffix}"),
            },
        }
    }
}

/// An opened GGUF file: its metadata and a memory map of its tensor data.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    content: gguf_file::Content,
}

impl GgufFile {
    /// Opens and memory-maps `path`, checks its structure as ggml does ([`crate::gguf::check`]:
    /// alignment, offsets, overlap, sizes, extents) and parses the header and metadata.
    pub fn open(path: &Path) -> Result<Self> {
        crate::regular_file(path)?;
        let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the map is read-only; like every mmap-based loader we rely on the file not being
        // truncated by another process while the model is loaded.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: String| ModelError::Gguf {
            path: path.to_path_buf(),
            reason,
        };
        if looks_like_safetensors(&mmap) {
            return Err(ModelError::Input(format!(
                "{} is a safetensors file, not a GGUF file: pass the Hugging Face directory that holds it (config.json, tokenizer.json and *.safetensors)",
                path.display()
            )));
        }
        let layout = crate::gguf::check(&mmap).map_err(invalid)?;
        let content = gguf_file::Content::read(&mut std::io::Cursor::new(&mmap[..]))
            .map_err(|e| invalid(candle_message(&e)))?;
        if content.tensor_data_offset != layout.data_offset {
            return Err(invalid(format!(
                "tensor data starts at byte {}, the header implies {}",
                content.tensor_data_offset, layout.data_offset
            )));
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            content,
        })
    }

    /// The parsed header (metadata and tensor table).
    pub fn content(&self) -> &gguf_file::Content {
        &self.content
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads one tensor (quantized as stored).
    pub fn tensor(&self, name: &str) -> Result<QTensor> {
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor {
                    path: self.path.clone(),
                    name: name.to_string(),
                })?;
        info.read(
            &mut std::io::Cursor::new(&self.mmap[..]),
            self.content.tensor_data_offset,
            &Device::Cpu,
        )
        .map_err(|e| ModelError::Gguf {
            path: self.path.clone(),
            reason: format!("tensor `{name}`: {}", candle_message(&e)),
        })
    }

    /// Shape of a tensor in row-major (out, in) order, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims().to_vec())
    }
}

enum Source {
    Gguf(GgufFile),
    Safetensors { dir: PathBuf, st: MmapedSafetensors },
}

/// Weights of one model, from either source, handed out by role.
pub struct Weights {
    source: Source,
    format: WeightFormat,
}

impl Weights {
    /// Weights from an opened GGUF file.
    pub fn from_gguf(file: GgufFile, format: WeightFormat) -> Self {
        Weights {
            source: Source::Gguf(file),
            format,
        }
    }

    /// Weights from the `*.safetensors` files of a Hugging Face directory (memory-mapped).
    pub fn from_safetensors_dir(dir: &Path, format: WeightFormat) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| ModelError::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ModelError::MissingTensor {
                path: dir.to_path_buf(),
                name: "*.safetensors (no weight files)".into(),
            });
        }
        for f in &files {
            crate::regular_file(f)?;
        }
        // SAFETY: read-only maps; see `GgufFile::open`.
        let st =
            unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| ModelError::Safetensors {
                path: dir.to_path_buf(),
                reason: candle_message(&e),
            })?;
        Ok(Weights {
            source: Source::Safetensors {
                dir: dir.to_path_buf(),
                st,
            },
            format,
        })
    }

    /// Where the weights come from.
    pub fn path(&self) -> &Path {
        match &self.source {
            Source::Gguf(f) => f.path(),
            Source::Safetensors { dir, .. } => dir,
        }
    }

    /// The naming convention of the source.
    pub fn naming(&self) -> Naming {
        match self.source {
            Source::Gguf(_) => Naming::Gguf,
            Source::Safetensors { .. } => Naming::HuggingFace,
        }
    }

    /// The rotation-pair layout the q/k weights were stored for.
    pub fn rope_layout(&self, arch: crate::config::Architecture) -> RopeLayout {
        match (&self.source, arch) {
            (
                Source::Gguf(_),
                crate::config::Architecture::Llama | crate::config::Architecture::Mistral,
            ) => RopeLayout::Interleaved,
            _ => RopeLayout::Halves,
        }
    }

    /// Whether a tensor exists.
    pub fn contains(&self, role: TensorRole, layer: usize) -> bool {
        let name = role.name(self.naming(), layer);
        match &self.source {
            Source::Gguf(f) => f.content().tensor_infos.contains_key(&name),
            Source::Safetensors { st, .. } => st.get(&name).is_ok(),
        }
    }

    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        match &self.source {
            Source::Gguf(f) => f.shape(name),
            Source::Safetensors { st, .. } => st.get(name).ok().map(|v| v.shape().to_vec()),
        }
    }

    fn check_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        let actual = self
            .shape_of(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path().to_path_buf(),
                name: name.to_string(),
            })?;
        if actual != expected {
            return Err(ModelError::TensorShape {
                path: self.path().to_path_buf(),
                name: name.to_string(),
                expected: expected.to_vec(),
                actual,
            });
        }
        Ok(())
    }

    fn load_dense(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        self.check_shape(name, expected)?;
        Ok(match &self.source {
            Source::Gguf(f) => f.tensor(name)?.dequantize(&Device::Cpu)?,
            Source::Safetensors { st, .. } => st.load(name, &Device::Cpu)?,
        })
    }

    /// A 1-D f32 tensor (norm weight or bias).
    pub fn vector(&self, role: TensorRole, layer: usize, len: usize) -> Result<Tensor> {
        Ok(self
            .load_dense(&role.name(self.naming(), layer), &[len])?
            .to_dtype(DType::F32)?)
    }

    /// The bias of a projection, if the file has one.
    pub fn bias(&self, role: TensorRole, layer: usize, len: usize) -> Result<Option<Tensor>> {
        let name = role.bias_name(self.naming(), layer);
        if self.shape_of(&name).is_none() {
            return Ok(None);
        }
        Ok(Some(self.load_dense(&name, &[len])?.to_dtype(DType::F32)?))
    }

    /// A projection `[out, in]` in the configured format.
    pub fn linear(
        &self,
        role: TensorRole,
        layer: usize,
        out: usize,
        inp: usize,
        with_bias: bool,
    ) -> Result<Linear> {
        let name = role.name(self.naming(), layer);
        self.check_shape(&name, &[out, inp])?;
        let weight = self.projection_weight(&name)?;
        let bias = if with_bias {
            Some(
                self.bias(role, layer, out)?
                    .ok_or_else(|| ModelError::MissingTensor {
                        path: self.path().to_path_buf(),
                        name: role.bias_name(self.naming(), layer),
                    })?,
            )
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    fn projection_weight(&self, name: &str) -> Result<LinearWeight> {
        let quantized = |q: QTensor| -> Result<LinearWeight> {
            Ok(LinearWeight::Quantized(QMatMul::from_qtensor(q)?))
        };
        match (&self.source, self.format) {
            (Source::Gguf(f), WeightFormat::Auto) => {
                let q = f.tensor(name)?;
                match fast_cpu_type(q.dtype()) {
                    Some(_) => quantized(q),
                    None => quantized(QTensor::quantize(
                        &q.dequantize(&Device::Cpu)?,
                        GgmlDType::Q8_0,
                    )?),
                }
            }
            (Source::Gguf(f), WeightFormat::AsStored) => quantized(f.tensor(name)?),
            (_, WeightFormat::Quantize(t)) => {
                let dense = self.load_dense(name, &self.shape_of(name).unwrap_or_default())?;
                quantized(QTensor::quantize(&dense.to_dtype(DType::F32)?, t)?)
            }
            (_, WeightFormat::Dense(dt)) => {
                let dense = self.load_dense(name, &self.shape_of(name).unwrap_or_default())?;
                Ok(LinearWeight::Dense(dense.to_dtype(dt)?))
            }
            (Source::Safetensors { st, .. }, WeightFormat::Auto | WeightFormat::AsStored) => {
                Ok(LinearWeight::Dense(st.load(name, &Device::Cpu)?))
            }
        }
    }

    /// The embedding table (kept quantized for GGUF sources, rows dequantized on lookup).
    pub fn embedding(&self, vocab: usize, hidden: usize) -> Result<Embedding> {
        let name = TensorRole::Embedding.name(self.naming(), 0);
        self.check_shape(&name, &[vocab, hidden])?;
        match (&self.source, self.format) {
            (
                Source::Gguf(f),
                WeightFormat::Auto | WeightFormat::AsStored | WeightFormat::Quantize(_),
            ) => {
                let q = f.tensor(&name)?;
                if q.dtype().block_size() > 1 && hidden.is_multiple_of(q.dtype().block_size()) {
                    Ok(Embedding::Quantized(std::sync::Arc::new(q)))
                } else {
                    Ok(Embedding::Dense(q.dequantize(&Device::Cpu)?))
                }
            }
            (_, WeightFormat::Dense(dt)) => Ok(Embedding::Dense(
                self.load_dense(&name, &[vocab, hidden])?.to_dtype(dt)?,
            )),
            (Source::Safetensors { st, .. }, _) => {
                Ok(Embedding::Dense(st.load(&name, &Device::Cpu)?))
            }
        }
    }

    /// The LM head: its own tensor, or the embedding matrix when tied.
    pub fn lm_head(&self, vocab: usize, hidden: usize, tied: bool) -> Result<Linear> {
        let role = if tied && !self.contains(TensorRole::LmHead, 0) {
            TensorRole::Embedding
        } else {
            TensorRole::LmHead
        };
        self.linear(role, 0, vocab, hidden, false)
    }
}

/// Whether `bytes` start like a safetensors file: a little-endian header length, then a JSON
/// object (`{"`).
fn looks_like_safetensors(bytes: &[u8]) -> bool {
    bytes.len() > 10 && bytes[8..10] == *b"{\"" && bytes[..8] != *b"GGUF\x03\0\0\0"
}

/// The type a quantized weight runs as on CPU when it has a SIMD kernel in candle; `None` means
/// candle would run scalar code for it.
fn fast_cpu_type(t: GgmlDType) -> Option<GgmlDType> {
    use GgmlDType::*;
    match t {
        Q4_0 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K | Q8K | F32 | F16 | BF16 => Some(t),
        _ => None,
    }
}
