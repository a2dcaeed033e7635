//! model-zoo: model configs, weight loading (GGUF, safetensors), tokenizers with chat templates,
//! and the Llama-family decoder with one eviction hook per attention layer.
//!
//! Entry point: [`load`] opens a GGUF file or a Hugging Face directory and returns the decoder
//! and its tokenizer. Nothing here knows about sampling, requests or files other than weights.

pub mod config;
pub mod convert;
pub mod cpu_pool;
pub mod error;
pub mod gguf;
pub mod hook;
mod linear;
pub mod llama;
pub mod packed;
pub mod random;
pub mod rope;
mod safetensors_io;
mod tensor_names;
pub mod tokenizer;
pub mod train;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::{Architecture, Llama3Scaling, ModelConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use hook::{AttentionOutcome, KeepAll, LayerHook, LayerPlan, Pass, PrefillChunk, PrefillKind};
pub use llama::{LlamaModel, LogitsFor, SequenceInput};
pub use tokenizer::{ChatMessage, Tokenizer};
pub use weights::{GgufFile, WeightFormat, Weights};

/// What kind of file a model came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A single GGUF file.
    Gguf,
    /// A Hugging Face directory (`config.json`, `*.safetensors`, `tokenizer.json`).
    Safetensors,
    /// Random weights of a `config.json`'s shapes (`--dummy-weights`), for measuring speed.
    Random,
}

/// A decoder with its tokenizer.
pub struct LoadedModel {
    /// The decoder.
    pub model: LlamaModel,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The file or directory loaded.
    pub path: PathBuf,
    /// Its kind.
    pub kind: SourceKind,
}

/// Loads a model from a GGUF file or a Hugging Face directory.
pub fn load(path: &Path, format: WeightFormat) -> Result<LoadedModel> {
    let loaded = load_unchecked(path, format)?;
    let vocab = loaded.model.config().vocab_size;
    let tok = &loaded.tokenizer;
    let ids = tok.bos_id().into_iter().map(|i| ("bos", i));
    if let Some((which, id)) = ids
        .chain(tok.eos_ids().iter().map(|&i| ("eos", i)))
        .find(|&(_, id)| id as usize >= vocab)
    {
        return Err(ModelError::tokenizer(
            &path.display().to_string(),
            format!(
                "the {which} token id {id} is outside the model's vocabulary of {vocab} tokens"
            ),
        ));
    }
    Ok(loaded)
}

/// The config of the model at `path`: a Hugging Face directory's `config.json`, or a GGUF
/// file's metadata (no weights are read).
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    if path.is_dir() {
        let config = path.join("config.json");
        regular_file(&config)?;
        ModelConfig::from_hf_json(&config)
    } else {
        let file = GgufFile::open(path)?;
        ModelConfig::from_gguf(path, file.content())
    }
}

/// Fails unless `path` is a regular file (after links): a FIFO or device would block a read or
/// cannot be memory-mapped.
pub(crate) fn regular_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(ModelError::Input(format!(
            "{} is not a regular file (a model is a GGUF file or a Hugging Face directory)",
            path.display()
        )))
    }
}

fn load_unchecked(path: &Path, format: WeightFormat) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        for file in ["config.json", "tokenizer.json"] {
            regular_file(&path.join(file))?;
        }
        let cfg = read_config(path)?;
        let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
        let weights = Weights::from_safetensors_dir(path, format)?;
        let model = LlamaModel::load(&cfg, &weights)?;
        Ok(LoadedModel {
            model,
            tokenizer,
            path: path.to_path_buf(),
            kind: SourceKind::Safetensors,
        })
    } else {
        let file = GgufFile::open(path)?;
        let cfg = ModelConfig::from_gguf(path, file.content())?;
        let tokenizer = Tokenizer::from_gguf(path, file.content())?;
        let weights = Weights::from_gguf(file, format);
        let model = LlamaModel::load(&cfg, &weights)?;
        Ok(LoadedModel {
            model,
            tokenizer,
            path: path.to_path_buf(),
            kind: SourceKind::Gguf,
        })
    }
}

/// A decoder of `config`'s shapes (a Hugging Face `config.json`) with random weights held as
/// `format` asks, and the byte-level test tokenizer: a model to measure without its files
/// (`agate bench --dummy-weights`). Its outputs mean nothing.
pub fn load_random(config: &Path, format: WeightFormat, seed: u64) -> Result<LoadedModel> {
    let cfg = ModelConfig::from_hf_json(config)?;
    let weights = Weights::random(config, &cfg, format, seed)?;
    let model = LlamaModel::load(&cfg, &weights)?;
    Ok(LoadedModel {
        model,
        tokenizer: random::byte_tokenizer()?,
        path: config.to_path_buf(),
        kind: SourceKind::Random,
    })
}
