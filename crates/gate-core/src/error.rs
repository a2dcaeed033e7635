//! The crate's single error type, [`GateError`].
//!
//! Owns: every failure the public API of `gate-core` can report. Invariant: no public function
//! panics on bad input; it returns one of these variants instead, and each message names the
//! argument, field, tensor, file, shape or value involved so that a caller can act on it
//! without reading this crate's source.

use std::path::PathBuf;

/// Everything that can go wrong in `gate-core`.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// An argument is out of its documented domain (a ratio outside `[0, 1)`, a zero count, a
    /// slice whose length does not match the one it must match, ...).
    #[error("gate-core: invalid argument `{name}` = {value}: {expected}")]
    InvalidArgument {
        /// The parameter or field name, e.g. `"eviction ratio"` or `"GateConfig.head_dim"`.
        name: &'static str,
        /// The offending value, formatted.
        value: String,
        /// What was expected instead.
        expected: String,
    },

    /// A gate's keep probability came out NaN: finite parameters too large for f32 (a gates
    /// file can hold them; the loader refuses only NaN and infinity).
    #[error(
        "gate-core: the gate of layer {layer} gave a keep probability that is not a number \
         (NaN) at position {position}: its weights overflow f32 arithmetic (a broken or \
         mis-scaled gates file)"
    )]
    NonFiniteKeepProb {
        /// The layer whose gate failed.
        layer: usize,
        /// The first position whose keep probability is NaN.
        position: u32,
    },

    /// A tensor argument has the wrong rank, shape or dtype.
    #[error("gate-core: tensor `{name}` has shape {actual:?} ({dtype}), expected {expected}")]
    TensorShape {
        /// Which argument (e.g. `"keep_ste"`, `"x"`).
        name: &'static str,
        /// Its actual dimensions.
        actual: Vec<usize>,
        /// Its actual dtype, formatted.
        dtype: String,
        /// The expected shape or dtype, in words.
        expected: String,
    },

    /// An (layer, head) index is outside the configured range.
    #[error("gate-core: {what} index {index} out of range (have {len})")]
    OutOfRange {
        /// What was indexed: `"layer"` or `"kv head"`.
        what: &'static str,
        /// The index given.
        index: usize,
        /// How many exist.
        len: usize,
    },

    /// A candle operation failed (shape mismatch inside a kernel, device error, ...).
    #[error("gate-core: candle error while {context}: {source}")]
    Candle {
        /// What this crate was doing.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: candle_core::Error,
    },

    /// Reading or writing a gate file failed at the OS level.
    #[error("gate file {path}: {op} failed: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The operation: `"read"`, `"write"`, `"rename"`, ...
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A gate file is not valid safetensors, or its metadata is missing or malformed.
    #[error("gate file {path}: {detail}")]
    Format {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },

    /// A tensor the configuration requires is absent from a gate file.
    #[error("gate file {path}: missing tensor `{tensor}` (expected shape {expected:?})")]
    MissingTensor {
        /// The file involved.
        path: PathBuf,
        /// The tensor name, e.g. `layers.3.wk`.
        tensor: String,
        /// The shape it should have had.
        expected: Vec<usize>,
    },

    /// A tensor in a gate file has the wrong shape for the configuration in its metadata.
    #[error("gate file {path}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    WrongShape {
        /// The file involved.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape found.
        actual: Vec<usize>,
    },

    /// A tensor in a gate file has a dtype other than the one the metadata declares.
    #[error("gate file {path}: tensor `{tensor}` has dtype {actual}, expected {expected}")]
    WrongDtype {
        /// The file involved.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The expected dtype.
        expected: String,
        /// The dtype found.
        actual: String,
    },

    /// The model identity stored in a gate file does not match the model it is loaded for.
    #[error(
        "gate file {path}: model identity field `{field}` is {} in the file but {expected} for \
         this model (the gate was trained for a different base model)",
        actual.as_deref().unwrap_or("absent")
    )]
    IdentityMismatch {
        /// The file involved.
        path: PathBuf,
        /// The identity field, e.g. `base_checksum`.
        field: String,
        /// The value the caller expects.
        expected: String,
        /// The value in the file (`None`: the field is absent).
        actual: Option<String>,
    },
}

/// Shorthand for `Result<T, GateError>`.
pub type Result<T> = std::result::Result<T, GateError>;

/// Attaches a context to candle errors: `tensor_op(..).ctx("computing the gate projection")?`.
pub(crate) trait CandleContext<T> {
    /// Wraps a candle error in [`GateError::Candle`] with `context`.
    fn ctx(self, context: &'static str) -> Result<T>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn ctx(self, context: &'static str) -> Result<T> {
        self.map_err(|source| GateError::Candle { context, source })
    }
}

/// Builds a [`GateError::InvalidArgument`].
pub(crate) fn invalid(
    name: &'static str,
    value: impl std::fmt::Display,
    expected: impl Into<String>,
) -> GateError {
    GateError::InvalidArgument {
        name,
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// Builds a [`GateError::TensorShape`] for tensor `t`.
pub(crate) fn bad_tensor(
    name: &'static str,
    t: &candle_core::Tensor,
    expected: impl Into<String>,
) -> GateError {
    GateError::TensorShape {
        name,
        actual: t.dims().to_vec(),
        dtype: format!("{:?}", t.dtype()),
        expected: expected.into(),
    }
}
