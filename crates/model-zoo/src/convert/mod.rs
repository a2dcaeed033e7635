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
//! - Both conversions plan `Shard`s (each output safetensors file: tensor plan, origins,
//!   metadata, gates merged into the first) and write them with one `write_shards`; what is
//!   particular to GGUF (tensor names, llama.cpp's q/k row permutation undone, config and
//!   tokenizer files) lives in `gguf.rs`, the safetensors format in `safetensors_io.rs`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::safetensors_io::open_safetensors;
pub use crate::safetensors_io::{
    read_safetensors_header, read_safetensors_metadata, write_safetensors, TensorPlan,
};
use crate::weights::GgufFile;

mod gguf;
pub use gguf::unpermute_rows;

/// Prefix under which merged gate tensors and their metadata keys are stored.
pub const GATES_PREFIX: &str = "gates.";

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
/// [`ModelError::Write`] with an empty path, which the sink fills in
/// ([`ModelError::written_to`]).
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
    /// A tensor of the GGUF input, dequantized, rows un-permuted for `heads` heads when set.
    Gguf {
        name: String,
        unpermute_heads: Option<usize>,
    },
    /// A tensor of a memory-mapped safetensors set (a shard of the input or the gates file).
    Safetensors { index: usize, name: String },
}

/// One output safetensors file: its plan, where each planned tensor comes from, the
/// safetensors sets those read from, and its metadata.
struct Shard {
    name: String,
    plan: Vec<TensorPlan>,
    origins: Vec<Origin>,
    sources: Vec<MmapedSafetensors>,
    metadata: BTreeMap<String, String>,
}

impl Shard {
    fn new(name: String, metadata: BTreeMap<String, String>) -> Self {
        Shard {
            name,
            plan: Vec::new(),
            origins: Vec::new(),
            sources: Vec::new(),
            metadata,
        }
    }

    /// Plans tensor `name` of `shape` (written in `dtype`) from `origin`.
    fn push(&mut self, name: String, dtype: DType, shape: Vec<usize>, origin: Origin) {
        self.plan.push(TensorPlan { name, dtype, shape });
        self.origins.push(origin);
    }

    /// Tensor `i` of the plan, read from its origin (`gguf`: the GGUF input, if any) and cast.
    fn produce(&self, i: usize, gguf: Option<&GgufFile>) -> Result<Tensor> {
        let dtype = self.plan[i].dtype;
        let t = match &self.origins[i] {
            Origin::Gguf {
                name,
                unpermute_heads,
            } => {
                let Some(file) = gguf else {
                    return Err(ModelError::Input(format!(
                        "internal: tensor `{name}` planned from a GGUF input there is none of"
                    )));
                };
                let t = file.tensor(name)?.dequantize(&Device::Cpu)?;
                match unpermute_heads {
                    Some(h) => unpermute_rows(&t, *h)?,
                    None => t,
                }
            }
            Origin::Safetensors { index, name } => self.sources[*index].load(name, &Device::Cpu)?,
        };
        Ok(t.to_dtype(dtype)?)
    }
}

/// Writes each shard as a file of `out`, tensor by tensor, with one progress count over all of
/// them; returns the file names and the tensor bytes written.
fn write_shards(
    out: &mut dyn FileSink,
    shards: &[Shard],
    gguf: Option<&GgufFile>,
    progress: &mut Progress<'_>,
) -> Result<(Vec<String>, u64)> {
    progress(ConvertEvent::Start {
        tensors: shards.iter().map(|s| s.plan.len()).sum(),
    })?;
    let (mut done, mut bytes) = (0, 0);
    let mut files = Vec::new();
    for shard in shards {
        let offset = done;
        let mut inner = |e: ConvertEvent<'_>| match e {
            ConvertEvent::Start { .. } => Ok(()),
            ConvertEvent::Tensor { index, name } => progress(ConvertEvent::Tensor {
                index: offset + index,
                name,
            }),
        };
        out.file(&shard.name, &mut |w| {
            bytes += write_safetensors(w, &shard.plan, &shard.metadata, &mut inner, |i| {
                shard.produce(i, gguf)
            })?;
            Ok(())
        })?;
        files.push(shard.name.clone());
        done += shard.plan.len();
    }
    Ok((files, bytes))
}

/// An I/O error naming `path`.
fn io(path: &Path) -> impl Fn(std::io::Error) -> ModelError {
    let path = path.to_path_buf();
    move |source| ModelError::Io {
        path: path.clone(),
        source,
    }
}

/// Converts the model `src` into the files of a Hugging Face directory written into `out`: a
/// GGUF file (told by its magic) dequantized to `opts.dtype` with its q/k permutation undone
/// (see `gguf.rs`), or a safetensors checkpoint cast to `opts.dtype` ([`cast_safetensors`]).
pub fn convert(
    src: &Path,
    out: &mut dyn FileSink,
    opts: &ConvertOptions,
    progress: &mut Progress<'_>,
) -> Result<ConvertSummary> {
    check_output_dtype(opts.dtype)?;
    if src.is_dir() {
        return cast_safetensors(src, out, opts, progress);
    }
    let head = file_head(src)?;
    if head.starts_with(b"GGUF") {
        gguf::gguf_to_hf(GgufFile::open(src)?, out, opts, progress)
    } else if head.get(8) == Some(&b'{') {
        // A safetensors file: a little-endian header length, then the JSON header.
        cast_safetensors(src, out, opts, progress)
    } else {
        Err(ModelError::NoWeights {
            path: src.to_path_buf(),
            what: "is neither a GGUF file nor a safetensors file".into(),
        })
    }
}

/// The first 9 bytes of the file `path` (fewer when it is shorter): enough to tell the GGUF
/// magic from a safetensors header.
fn file_head(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(io(path))?;
    let mut head = Vec::with_capacity(9);
    f.take(9).read_to_end(&mut head).map_err(io(path))?;
    Ok(head)
}

/// Casts a safetensors checkpoint (one `.safetensors` file, or a Hugging Face directory whose
/// shards are each cast to a file of the same name) to `opts.dtype`, tensor by tensor from a
/// memory map. Non-float tensors are copied unchanged. The JSON files of a directory are copied,
/// `config.json` with its `torch_dtype` updated. Gates, when given, go into the first shard.
/// `opts.dtype` is one [`check_output_dtype`] accepts.
fn cast_safetensors(
    src: &Path,
    out: &mut dyn FileSink,
    opts: &ConvertOptions,
    progress: &mut Progress<'_>,
) -> Result<ConvertSummary> {
    let (shard_paths, extra_files) = checkpoint_files(src)?;
    let mut shards = Vec::new();
    let mut gate_tensors = 0;
    for (k, path) in shard_paths.iter().enumerate() {
        let (st, tensors) = open_safetensors(path, "")?;
        let mut metadata = read_safetensors_metadata(path)?;
        metadata
            .entry("format".to_string())
            .or_insert_with(|| "pt".to_string());
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let mut shard = Shard::new(name.into_owned(), metadata);
        for (name, dtype, shape) in tensors {
            let dtype = if dtype.is_float() { opts.dtype } else { dtype };
            let origin = Origin::Safetensors {
                index: 0,
                name: name.clone(),
            };
            shard.push(name, dtype, shape, origin);
        }
        shard.sources.push(st);
        if k == 0 {
            gate_tensors = add_gates(opts, &mut shard)?;
        }
        shards.push(shard);
    }
    let (mut files, bytes) = write_shards(out, &shards, None, progress)?;
    for extra in &extra_files {
        files.push(copy_json_file(out, extra, opts.dtype)?);
    }
    files.sort();
    Ok(ConvertSummary {
        files,
        tensors: shards.iter().map(|s| s.plan.len()).sum(),
        tensor_bytes: bytes,
        skipped: Vec::new(),
        gate_tensors,
    })
}

/// The shards (`.safetensors` files) and JSON files of a checkpoint `src` (a directory, or one
/// safetensors file with no JSON files), each sorted by name.
fn checkpoint_files(src: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut shards, mut extra) = (Vec::new(), Vec::new());
    if src.is_dir() {
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
    } else {
        shards.push(src.to_path_buf());
    }
    if shards.is_empty() {
        return Err(ModelError::no_weight_files(src));
    }
    Ok((shards, extra))
}

/// Copies the JSON file `path` into `out` under its name (`config.json` with its `torch_dtype`
/// set to `dtype`); returns the name.
fn copy_json_file(out: &mut dyn FileSink, path: &Path, dtype: DType) -> Result<String> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    if name == "config.json" {
        let mut v = crate::config::read_json(path)?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "torch_dtype".into(),
                dtype_torch_name(dtype).to_string().into(),
            );
        }
        write_json(out, &name, &v)?;
    } else {
        let bytes = std::fs::read(path).map_err(io(path))?;
        out.file(&name, &mut |w| Ok(w.write_all(&bytes)?))?;
    }
    Ok(name.into_owned())
}

/// Appends the gates file's tensors (under [`GATES_PREFIX`], kept in their stored dtype) and all
/// of its metadata (keys prefixed likewise: an Attention-Gate file's `format = "agate-gate"`,
/// `gate_config`, `model_identity`, … become `gates.format`, …) to a shard; returns how many
/// tensors were added.
fn add_gates(opts: &ConvertOptions, shard: &mut Shard) -> Result<usize> {
    let Some(path) = &opts.gates else {
        return Ok(0);
    };
    let (st, tensors) = open_safetensors(path, "gates file: ")?;
    for (k, v) in read_safetensors_metadata(path)? {
        shard.metadata.insert(format!("{GATES_PREFIX}{k}"), v);
    }
    let index = shard.sources.len();
    let count = tensors.len();
    for (name, dtype, shape) in tensors {
        let out_name = format!("{GATES_PREFIX}{name}");
        if shard.plan.iter().any(|p| p.name == out_name) {
            return Err(ModelError::Input(format!(
                "{}: tensor `{out_name}` already exists in the model",
                path.display()
            )));
        }
        shard.push(out_name, dtype, shape, Origin::Safetensors { index, name });
    }
    shard.sources.push(st);
    Ok(count)
}

/// The `torch_dtype` string of a dtype.
fn dtype_torch_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Writes `v` as pretty JSON into the file `name` of `out`.
pub(crate) fn write_json(out: &mut dyn FileSink, name: &str, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    out.file(name, &mut |w| Ok(w.write_all(text.as_bytes())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{Naming, TensorRole};

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
        let s = convert(&src, &mut Dir(out.clone()), &opts, &mut |_| Ok(())).unwrap();
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
        let err = convert(
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

    #[test]
    fn inputs_without_weights_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ConvertOptions {
            dtype: DType::F16,
            gates: None,
        };
        let fails = |src: &Path| {
            let out = dir.path().join("out");
            let e = convert(src, &mut Dir(out), &opts, &mut |_| Ok(())).unwrap_err();
            e.to_string()
        };
        let text = dir.path().join("good.jsonl");
        std::fs::write(&text, "{\"text\": \"hello\"}\n").unwrap();
        assert_eq!(
            fails(&text),
            format!(
                "{}: is neither a GGUF file nor a safetensors file",
                text.display()
            )
        );
        let empty = dir.path().join("emptydir");
        std::fs::create_dir(&empty).unwrap();
        assert_eq!(
            fails(&empty),
            format!(
                "{}: the directory holds no .safetensors or .gguf weight files",
                empty.display()
            )
        );
        std::fs::write(empty.join("m.gguf"), b"GGUF").unwrap();
        assert!(
            fails(&empty)
                .contains("no .safetensors weight files (a GGUF model is given as its file"),
            "{}",
            fails(&empty)
        );
        // A broken safetensors header is named once, without candle's debug-quoted path.
        let broken = dir.path().join("broken.safetensors");
        std::fs::write(
            &broken,
            [0xff; 8].iter().chain(b"{}").copied().collect::<Vec<_>>(),
        )
        .unwrap();
        let msg = fails(&broken);
        assert!(
            msg.starts_with(&format!(
                "{} is not a valid safetensors file: ",
                broken.display()
            )) && !msg.contains("path:"),
            "{msg}"
        );
    }
}
