//! The one error type of model-zoo. Every variant names the file, field or tensor involved, so a
//! user reading a one-line message knows what to fix.

use std::path::PathBuf;

/// Errors raised while reading configs, weights and tokenizers, or running a decoder.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An output file could not be written (a [`crate::convert::FileSink`] names the file; an
    /// I/O error of a writer converts to this variant with an empty path, which the sink fills
    /// with [`ModelError::written_to`]).
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A GGUF file is malformed or truncated.
    #[error("{path} is not a valid GGUF file: {reason}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What the reader found (with the message of `source`, when there is one).
        reason: String,
        /// The error of candle's GGUF reader behind it, if any.
        #[source]
        source: Option<BoxedError>,
    },
    /// A safetensors file is malformed or truncated.
    #[error("{path} is not a valid safetensors file: {reason}")]
    Safetensors {
        /// The file (or the directory of shards).
        path: PathBuf,
        /// What the reader found (with the message of `source`, when there is one).
        reason: String,
        /// The library error behind it (candle's reader, I/O, JSON), if any.
        #[source]
        source: Option<BoxedError>,
    },
    /// Quantized projection weights could not be repacked for the VNNI kernel (types that do not
    /// pack together, or rows that are not whole 32-value blocks), whatever file they came from.
    #[error(
        "{}: tensor `{tensor}`: cannot pack {dtypes:?} blocks of {cols} columns for the VNNI kernel",
        path.display()
    )]
    Pack {
        /// The weights file or directory.
        path: PathBuf,
        /// The tensor (`a+b+c` for projections stacked into one).
        tensor: String,
        /// The GGML type of each stacked part.
        dtypes: Vec<candle_core::quantized::GgmlDType>,
        /// The column count.
        cols: usize,
    },
    /// A config (GGUF metadata or `config.json`) lacks a field or has a bad value.
    #[error("{path}: field `{field}` {problem}")]
    Config {
        /// The file holding the config.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong with it ("is missing", "must be > 0, got 0", …; with the message of
        /// `source`, when there is one).
        problem: String,
        /// The library error behind it (a JSON parser's, candle's GGUF reader's), if any.
        #[source]
        source: Option<BoxedError>,
    },
    /// The model's architecture is not one agate implements.
    #[error("{path}: unsupported architecture `{architecture}` (supported: {supported})")]
    UnsupportedArchitecture {
        /// The file holding the config.
        path: PathBuf,
        /// The architecture named there.
        architecture: String,
        /// The architectures agate supports.
        supported: &'static str,
    },
    /// A weight tensor is absent.
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor {
        /// The weights file or directory.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A weight tensor has the wrong shape.
    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// The weights file or directory.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape found.
        actual: Vec<usize>,
    },
    /// The tokenizer could not be built or used.
    #[error("tokenizer ({source_name}): {reason}")]
    Tokenizer {
        /// Where the tokenizer came from (a file path or "GGUF metadata").
        source_name: String,
        /// What went wrong (with the message of `source`, when there is one).
        reason: String,
        /// The library error behind it (tokenizers, candle's GGUF reader, serde_json), if any.
        #[source]
        source: Option<BoxedError>,
    },
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(#[source] minijinja::Error),
    /// Random weights of a config's shapes (`--dummy-weights`) would not fit in memory: refused
    /// before anything is allocated.
    #[error(
        "{}: these shapes need {} of weights, more than the {}",
        path.display(),
        show_needed(*needed),
        show_available(*available, *measured)
    )]
    WeightsTooLarge {
        /// The config file.
        path: PathBuf,
        /// Bytes the weights take (`None`: more than a `u128` counts).
        needed: Option<u128>,
        /// Bytes of memory available.
        available: u64,
        /// Whether `available` was read from the system (otherwise a fixed cap).
        measured: bool,
    },
    /// A model path holds no weights agate can read: a file that is neither GGUF nor
    /// safetensors, or a directory without weight files.
    #[error("{}: {what}", path.display())]
    NoWeights {
        /// The file or directory.
        path: PathBuf,
        /// What it is instead ("is neither a GGUF nor a safetensors file", …).
        what: String,
    },
    /// A forward pass was given bad input.
    #[error("{0}")]
    Input(String),
    /// The KV store refused an operation (out of blocks, bad shape).
    #[error(transparent)]
    Kv(#[from] kv_store::KvError),
    /// JSON could not be written or read.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A forward pass produced NaN or infinite logits: the weights or the metadata are broken.
    #[error(
        "the model produced non-finite logits (NaN or infinity) at position {position}: its \
         weights or metadata are broken (e.g. NaN weights, a non-positive RMSNorm epsilon)"
    )]
    NonFinite {
        /// Position of the first token whose logits are not finite.
        position: u32,
    },
    /// A tensor operation failed (the message without the backtrace candle may attach).
    #[error("tensor operation failed: {}", candle_message(.0))]
    Candle(#[source] candle_core::Error),
    /// An eviction policy's scorer or selector refused its input.
    #[error("eviction: {0}")]
    Eviction(#[from] gate_core::GateError),
    /// The gates of a training or evaluation forward pass ([`crate::train`]) refused their
    /// input (boxed: a second unboxed `GateError` would grow every `ModelError` by a word).
    #[error("{0}")]
    Gates(#[source] Box<gate_core::GateError>),
}

impl From<std::io::Error> for ModelError {
    fn from(source: std::io::Error) -> Self {
        ModelError::Write {
            path: PathBuf::new(),
            source,
        }
    }
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::Candle(e)
    }
}

/// candle's message without the backtrace it attaches when `RUST_BACKTRACE` is set, nor the
/// debug-quoted path it prefixes to file errors (every variant quoting it names the file).
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. }
        | candle_core::Error::WithPath { inner, .. } => candle_message(inner),
        other => other.to_string(),
    }
}

/// A library error kept as the source of a [`ModelError`] whose variant several libraries feed.
pub type BoxedError = Box<dyn std::error::Error + Send + Sync>;

/// Result alias for model-zoo.
pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    /// [`ModelError::NoWeights`] for a directory without `.safetensors` files (pointing at the
    /// file itself when it holds a GGUF file: a GGUF model is given as its file).
    pub fn no_weight_files(dir: &std::path::Path) -> Self {
        let gguf = std::fs::read_dir(dir).ok().and_then(|entries| {
            entries.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
                p.extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
            })
        });
        let what = match gguf {
            Some(file) => format!(
                "the directory holds no .safetensors weight files (a GGUF model is given as its \
                 file: {})",
                file.display()
            ),
            None => "the directory holds no .safetensors or .gguf weight files".to_string(),
        };
        ModelError::NoWeights {
            path: dir.to_path_buf(),
            what,
        }
    }

    /// This error with the file named, when it is a writer's I/O error that does not name one
    /// yet ([`ModelError::Write`] with an empty path): what a [`crate::convert::FileSink`] does
    /// with the errors of the body writing its file `path`.
    pub fn written_to(self, path: &std::path::Path) -> Self {
        match self {
            ModelError::Write { path: p, source } if p.as_os_str().is_empty() => {
                ModelError::Write {
                    path: path.to_path_buf(),
                    source,
                }
            }
            other => other,
        }
    }

    /// A tokenizer error from `source_name`.
    pub(crate) fn tokenizer(source_name: &str, reason: String) -> Self {
        ModelError::Tokenizer {
            source_name: source_name.to_string(),
            reason,
            source: None,
        }
    }

    /// A tokenizer error from `source_name` whose library error `source` is kept (its message
    /// ends the reason, after `context`).
    pub(crate) fn tokenizer_failed(
        source_name: &str,
        context: &str,
        source: impl Into<BoxedError>,
    ) -> Self {
        let source = source.into();
        ModelError::Tokenizer {
            source_name: source_name.to_string(),
            reason: format!("{context}{source}"),
            source: Some(source),
        }
    }

    pub(crate) fn config(path: &std::path::Path, field: &str, problem: impl Into<String>) -> Self {
        ModelError::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            problem: problem.into(),
            source: None,
        }
    }

    /// A config error whose library error `source` is kept (its message ends the problem,
    /// after `context`).
    pub(crate) fn config_failed(
        path: &std::path::Path,
        field: &str,
        context: &str,
        source: impl Into<BoxedError>,
    ) -> Self {
        let source = source.into();
        ModelError::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            problem: format!("{context}{source}"),
            source: Some(source),
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes needed, for [`ModelError::WeightsTooLarge`]: `5.6e17 bytes`, with GiB when that reads
/// better.
fn show_needed(needed: Option<u128>) -> String {
    match needed {
        None => format!("more than {:.1e} bytes", u128::MAX as f64),
        Some(b) if (b as f64) < 1e6 * GIB => {
            format!("{:.1e} bytes ({:.1} GiB)", b as f64, b as f64 / GIB)
        }
        Some(b) => format!("{:.1e} bytes", b as f64),
    }
}

/// The memory a [`ModelError::WeightsTooLarge`] compared against, and where it came from.
fn show_available(available: u64, measured: bool) -> String {
    let gib = available as f64 / GIB;
    if measured {
        format!("{gib:.1} GiB this machine has available")
    } else {
        format!("{gib:.0} GiB allowed where the machine's available memory cannot be read")
    }
}
