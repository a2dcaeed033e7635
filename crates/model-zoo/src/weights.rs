//! Weight loading: GGUF files (memory-mapped, tensors kept quantized or dequantized) and Hugging
//! Face safetensors directories (memory-mapped, possibly sharded), behind one `Weights` type that
//! hands out layers by *logical* name, so the decoder never sees a file format.
//!
//! Invariants: every tensor handed out has been checked against the shape the config implies
//! (errors name the file, tensor and both shapes); hidden states are always f32, whatever the
//! weight dtype.
//!
//! What it hands out lives beside it: the projections and the embedding table in `linear.rs`,
//! the tensor names of each convention in `tensor_names.rs`, random weights in `random.rs`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{candle_message, ModelError, Result};
use crate::linear::LinearWeight;
pub use crate::linear::{Embedding, FusedLinear, Linear, DENSE_GEMM_MIN_ROWS};
use crate::packed::{PackedKind, PackedMatrix};
use crate::random::TensorSpec;
use crate::rope::RopeLayout;
pub use crate::tensor_names::{Naming, TensorRole};

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
        let invalid = |reason: String, source| ModelError::Gguf {
            path: path.to_path_buf(),
            reason,
            source,
        };
        if looks_like_safetensors(&mmap) {
            return Err(ModelError::Input(format!(
                "{} is a safetensors file, not a GGUF file: pass the Hugging Face directory that holds it (config.json, tokenizer.json and *.safetensors)",
                path.display()
            )));
        }
        let layout = crate::gguf::check(&mmap).map_err(|reason| invalid(reason, None))?;
        let content = gguf_file::Content::read(&mut std::io::Cursor::new(&mmap[..]))
            .map_err(|e| invalid(candle_message(&e), Some(e.into())))?;
        if content.tensor_data_offset != layout.data_offset {
            return Err(invalid(
                format!(
                    "tensor data starts at byte {}, the header implies {}",
                    content.tensor_data_offset, layout.data_offset
                ),
                None,
            ));
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
            source: Some(e.into()),
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
    Safetensors {
        dir: PathBuf,
        st: MmapedSafetensors,
    },
    /// Random weights of a config's shapes (`--dummy-weights`): Hugging Face names, generated
    /// on demand from `seed` and the tensor's name.
    Random {
        config: PathBuf,
        specs: HashMap<String, TensorSpec>,
        seed: u64,
    },
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

    /// Random weights of `cfg`'s shapes (read from `config`), for measuring a model without its
    /// files: projections quantized as the format asks (Q4_0 codes for `auto` and `stored`), the
    /// embedding dense f16, norms ones. The same seed gives the same weights. Shapes whose
    /// weights would not fit in the memory available are refused before anything is allocated
    /// ([`ModelError::WeightsTooLarge`]).
    pub fn random(
        config: &Path,
        cfg: &crate::config::ModelConfig,
        format: WeightFormat,
        seed: u64,
    ) -> Result<Self> {
        crate::random::check_fits(config, cfg, format)?;
        let specs = crate::random::tensor_specs(cfg)
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        Ok(Weights {
            source: Source::Random {
                config: config.to_path_buf(),
                specs,
                seed,
            },
            format,
        })
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
            return Err(ModelError::no_weight_files(dir));
        }
        for f in &files {
            crate::regular_file(f)?;
        }
        // SAFETY: read-only maps; see `GgufFile::open`.
        let st =
            unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| ModelError::Safetensors {
                path: dir.to_path_buf(),
                reason: candle_message(&e),
                source: Some(e.into()),
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
            Source::Random { config, .. } => config,
        }
    }

    /// The naming convention of the source.
    pub fn naming(&self) -> Naming {
        match self.source {
            Source::Gguf(_) => Naming::Gguf,
            Source::Safetensors { .. } | Source::Random { .. } => Naming::HuggingFace,
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
            Source::Random { specs, .. } => specs.contains_key(&name),
        }
    }

    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        match &self.source {
            Source::Gguf(f) => f.shape(name),
            Source::Safetensors { st, .. } => st.get(name).ok().map(|v| v.shape().to_vec()),
            Source::Random { specs, .. } => specs.get(name).map(|s| s.shape.clone()),
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
            Source::Random { specs, seed, .. } => specs[name].dense(*seed)?,
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
        let weight = match self.projection_source(&name)? {
            ProjectionSource::Pack(q) => {
                LinearWeight::Packed(Arc::new(pack(self.path(), &name, &[&q])?))
            }
            ProjectionSource::Ready(w) => w,
        };
        let bias = if with_bias {
            Some(self.required_bias(role, layer, out)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// Projections of one input stacked by rows (`roles[i]` with `outs[i]` rows, all `[.., in]`):
    /// one packed weight when every part packs, separate projections otherwise.
    pub fn fused_linear(
        &self,
        roles: &[TensorRole],
        layer: usize,
        outs: &[usize],
        inp: usize,
        with_bias: bool,
    ) -> Result<FusedLinear> {
        let names: Vec<String> = roles.iter().map(|r| r.name(self.naming(), layer)).collect();
        for (name, &out) in names.iter().zip(outs) {
            self.check_shape(name, &[out, inp])?;
        }
        let sources = names
            .iter()
            .map(|n| self.projection_source(n))
            .collect::<Result<Vec<_>>>()?;
        let biases = roles
            .iter()
            .zip(outs)
            .map(|(&r, &out)| {
                with_bias
                    .then(|| self.required_bias(r, layer, out))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let packable: Option<Vec<&QTensor>> = sources
            .iter()
            .map(|s| match s {
                ProjectionSource::Pack(q) => Some(q),
                ProjectionSource::Ready(_) => None,
            })
            .collect();
        let parts = match packable {
            Some(qs) => {
                let bias = if with_bias {
                    Some(Tensor::cat(
                        &biases.iter().flatten().collect::<Vec<_>>(),
                        0,
                    )?)
                } else {
                    None
                };
                let weight =
                    LinearWeight::Packed(Arc::new(pack(self.path(), &names.join("+"), &qs)?));
                vec![Linear { weight, bias }]
            }
            None => sources
                .into_iter()
                .zip(&names)
                .zip(biases)
                .map(|((s, name), bias)| {
                    let weight = match s {
                        ProjectionSource::Pack(q) => {
                            LinearWeight::Packed(Arc::new(pack(self.path(), name, &[&q])?))
                        }
                        ProjectionSource::Ready(w) => w,
                    };
                    Ok(Linear { weight, bias })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(FusedLinear {
            widths: outs.to_vec(),
            parts,
        })
    }

    fn required_bias(&self, role: TensorRole, layer: usize, out: usize) -> Result<Tensor> {
        self.bias(role, layer, out)?
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path().to_path_buf(),
                name: role.bias_name(self.naming(), layer),
            })
    }

    /// What a projection's weight becomes under the configured format: quantized blocks to pack
    /// (GGUF Q4_0/Q4_1/Q8_0, and types without a fast kernel re-quantized to Q8_0, on CPUs with
    /// the packed kernel), or a weight as candle holds it.
    fn projection_source(&self, name: &str) -> Result<ProjectionSource> {
        let packs = PackedMatrix::supported();
        let quantized = |q: QTensor| -> Result<ProjectionSource> {
            if packs && PackedKind::for_ggml(q.dtype()).is_some() {
                return Ok(ProjectionSource::Pack(q));
            }
            Ok(ProjectionSource::Ready(LinearWeight::Quantized(
                QMatMul::from_qtensor(q)?,
            )))
        };
        match (&self.source, self.format) {
            (Source::Gguf(f), WeightFormat::Auto) => {
                let q = f.tensor(name)?;
                if fast_cpu_type(q.dtype()).is_some() || PackedKind::for_ggml(q.dtype()).is_some() {
                    quantized(q)
                } else {
                    quantized(QTensor::quantize(
                        &q.dequantize(&Device::Cpu)?,
                        GgmlDType::Q8_0,
                    )?)
                }
            }
            (
                Source::Random { specs, seed, .. },
                WeightFormat::Auto
                | WeightFormat::AsStored
                | WeightFormat::Quantize(GgmlDType::Q8_0 | GgmlDType::Q4_0),
            ) => {
                let dtype = match self.format {
                    WeightFormat::Quantize(t) => t,
                    _ => GgmlDType::Q4_0,
                };
                whole_blocks(name, &specs[name].shape, dtype)?;
                quantized(specs[name].quantized(dtype, *seed)?)
            }
            (Source::Gguf(f), WeightFormat::AsStored) => Ok(ProjectionSource::Ready(
                LinearWeight::Quantized(QMatMul::from_qtensor(f.tensor(name)?)?),
            )),
            (_, WeightFormat::Quantize(t)) => {
                let shape = self.shape_of(name).unwrap_or_default();
                whole_blocks(name, &shape, t)?;
                let dense = self.load_dense(name, &shape)?;
                quantized(QTensor::quantize(&dense.to_dtype(DType::F32)?, t)?)
            }
            (_, WeightFormat::Dense(dt)) => {
                let dense = self.load_dense(name, &self.shape_of(name).unwrap_or_default())?;
                Ok(ProjectionSource::Ready(LinearWeight::Dense(
                    dense.to_dtype(dt)?,
                )))
            }
            (Source::Safetensors { st, .. }, WeightFormat::Auto | WeightFormat::AsStored) => Ok(
                ProjectionSource::Ready(LinearWeight::Dense(st.load(name, &Device::Cpu)?)),
            ),
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
            (Source::Random { .. }, _) => Ok(Embedding::Dense(
                self.load_dense(&name, &[vocab, hidden])?
                    .to_dtype(DType::F16)?,
            )),
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

/// A projection weight before it is finalised: quantized blocks the packed kernel takes, or a
/// weight ready as candle holds it.
enum ProjectionSource {
    Pack(QTensor),
    Ready(LinearWeight),
}

/// Packs quantized `[rows_i, cols]` tensors (all of one packed kind) stacked by rows; `path`
/// and `name` name them in errors.
fn pack(path: &Path, name: &str, parts: &[&QTensor]) -> Result<PackedMatrix> {
    let mut raw = Vec::with_capacity(parts.len());
    let mut cols = 0;
    for q in parts {
        let (rows, c) = q.shape().dims2()?;
        cols = c;
        raw.push((q.dtype(), rows, q.data()?));
    }
    let views: Vec<_> = raw.iter().map(|(t, r, d)| (*t, *r, d.as_ref())).collect();
    PackedMatrix::from_ggml_parts(cols, &views).ok_or_else(|| ModelError::Pack {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        dtypes: parts.iter().map(|q| q.dtype()).collect(),
        cols,
    })
}

/// Refuses to quantize the tensor `name` (`shape`) to `dtype` unless its rows are whole blocks.
fn whole_blocks(name: &str, shape: &[usize], dtype: GgmlDType) -> Result<()> {
    let (cols, block) = (shape.last().copied().unwrap_or(0), dtype.block_size());
    if cols.is_multiple_of(block) {
        return Ok(());
    }
    Err(ModelError::Input(format!(
        "tensor `{name}` has rows of {cols} values, not a multiple of {block}: it cannot be \
         held as {dtype:?} blocks (use --weights f16 or f32)"
    )))
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
