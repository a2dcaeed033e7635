//! [`ModelConfig::from_gguf`]: the config from GGUF metadata, whose keys are
//! `{architecture}.{name}` (`llama.embedding_length`); integers of any GGUF type, negative ones
//! refused.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;

use super::{Architecture, ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};

impl ModelConfig {
    /// Reads the config from GGUF metadata.
    pub fn from_gguf(path: &Path, content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let arch_name = md
            .get("general.architecture")
            .ok_or_else(|| ModelError::config(path, "general.architecture", "is missing"))?
            .to_string()
            .map_err(|e| ModelError::config_failed(path, "general.architecture", "", e))?
            .clone();
        let architecture = Architecture::from_name(path, &arch_name, Architecture::gguf_name)?;
        let keys = ArchKeys {
            path,
            md,
            arch: &arch_name,
        };
        let hidden_size = keys.usize("embedding_length")?;
        let n_heads = keys.usize("attention.head_count")?;
        // Fields are read in this order: the first bad one is the one reported.
        let cfg = ModelConfig {
            n_kv_heads: keys
                .opt_usize("attention.head_count_kv")?
                .unwrap_or(n_heads),
            head_dim: keys.head_dim(hidden_size, n_heads)?,
            vocab_size: keys.vocab_size(content)?,
            rope_scaling: keys.rope_scaling()?,
            architecture,
            hidden_size,
            intermediate_size: keys.usize("feed_forward_length")?,
            n_layers: keys.usize("block_count")?,
            n_heads,
            rms_norm_eps: keys
                .opt_f32("attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-5) as f64,
            rope_theta: keys.opt_f32("rope.freq_base")?.unwrap_or(10_000.0),
            max_position: keys.usize("context_length")?,
            tie_embeddings: !content.tensor_infos.contains_key("output.weight"),
        };
        cfg.validate(path, &|f| f.gguf_key(&arch_name))?;
        keys.check_full_width(cfg.head_dim)?;
        Ok(cfg)
    }
}

/// The metadata keys of one architecture (`{arch}.{name}`), read with errors naming the key.
struct ArchKeys<'a> {
    path: &'a Path,
    md: &'a HashMap<String, gguf_file::Value>,
    arch: &'a str,
}

impl ArchKeys<'_> {
    /// The full key of `name`.
    fn key(&self, name: &str) -> String {
        format!("{}.{name}", self.arch)
    }

    /// A config error for key `name`.
    fn error(&self, name: &str, problem: impl Into<String>) -> ModelError {
        ModelError::config(self.path, &self.key(name), problem)
    }

    /// An integer, if present.
    fn opt_usize(&self, name: &str) -> Result<Option<usize>> {
        self.md
            .get(&self.key(name))
            .map(|v| gguf_usize(v).map_err(|problem| self.error(name, problem)))
            .transpose()
    }

    /// An integer that must be present.
    fn usize(&self, name: &str) -> Result<usize> {
        self.opt_usize(name)?
            .ok_or_else(|| self.error(name, "is missing"))
    }

    /// A float (f32 or f64), if present.
    fn opt_f32(&self, name: &str) -> Result<Option<f32>> {
        let Some(v) = self.md.get(&self.key(name)) else {
            return Ok(None);
        };
        v.to_f32()
            .or_else(|_| v.to_f64().map(|x| x as f32))
            .map(Some)
            .map_err(|_| {
                self.error(
                    name,
                    format!("must be a float, got {}", gguf_value_words(v)),
                )
            })
    }

    /// The head dimension: `attention.key_length`, else the hidden size over the heads (which
    /// must divide it).
    fn head_dim(&self, hidden_size: usize, n_heads: usize) -> Result<usize> {
        match self.opt_usize("attention.key_length")? {
            Some(d) => Ok(d),
            None if n_heads > 0 && !hidden_size.is_multiple_of(n_heads) => Err(self.error(
                "embedding_length",
                format!(
                    "({hidden_size}) must be a multiple of {} ({n_heads}) when {} is absent",
                    self.key("attention.head_count"),
                    self.key("attention.key_length")
                ),
            )),
            None => Ok(hidden_size / n_heads.max(1)),
        }
    }

    /// The vocabulary size: `vocab_size`, else the tokenizer's token count, else the rows of
    /// the embedding.
    fn vocab_size(&self, content: &gguf_file::Content) -> Result<usize> {
        if let Some(v) = self.opt_usize("vocab_size")? {
            return Ok(v);
        }
        match self.md.get("tokenizer.ggml.tokens") {
            Some(gguf_file::Value::Array(tokens)) => Ok(tokens.len()),
            _ => content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| self.error("vocab_size", "is missing")),
        }
    }

    /// `rope.scaling.type` (`none` or `linear`, with `rope.scaling.factor`).
    fn rope_scaling(&self) -> Result<Option<RopeScaling>> {
        let Some(v) = self.md.get(&self.key("rope.scaling.type")) else {
            return Ok(None);
        };
        let kind = v.to_string().map_err(|e| {
            ModelError::config_failed(self.path, &self.key("rope.scaling.type"), "", e)
        })?;
        let factor = self.opt_f32("rope.scaling.factor")?.unwrap_or(1.0);
        match kind.as_str() {
            "none" => Ok(None),
            "linear" => Ok(Some(RopeScaling::Linear { factor })),
            other => Err(self.error(
                "rope.scaling.type",
                format!("has unsupported value `{other}` (supported: none, linear)"),
            )),
        }
    }

    /// agate rotates the whole head and gives values the keys' width; a file that says
    /// otherwise would run with the wrong math.
    fn check_full_width(&self, head_dim: usize) -> Result<()> {
        for (name, meaning) in [
            ("rope.dimension_count", "rotary dimensions"),
            ("attention.value_length", "value head width"),
        ] {
            if let Some(d) = self.opt_usize(name)? {
                if d != head_dim {
                    return Err(self.error(
                        name,
                        format!(
                            "is {d}, but agate supports only {meaning} equal to the key head width ({head_dim})"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A GGUF integer as a `usize`: any integer type, negative values refused (a signed `-1` is not
/// a huge unsigned count).
pub(crate) fn gguf_usize(v: &gguf_file::Value) -> std::result::Result<usize, String> {
    use gguf_file::Value as V;
    let signed = match v {
        V::U8(x) => return Ok(*x as usize),
        V::U16(x) => return Ok(*x as usize),
        V::U32(x) => return Ok(*x as usize),
        V::U64(x) => {
            return usize::try_from(*x).map_err(|_| format!("is too large, got {x}"));
        }
        V::I8(x) => i64::from(*x),
        V::I16(x) => i64::from(*x),
        V::I32(x) => i64::from(*x),
        V::I64(x) => *x,
        other => {
            return Err(format!(
                "must be an integer, got {}",
                gguf_value_words(other)
            ))
        }
    };
    usize::try_from(signed).map_err(|_| format!("must be a non-negative integer, got {signed}"))
}

/// A GGUF value as an error message shows it: its kind and, when short, the value.
fn gguf_value_words(v: &gguf_file::Value) -> String {
    use gguf_file::Value as V;
    match v {
        V::String(s) if s.chars().count() <= 40 => format!("the string {s:?}"),
        V::String(_) => "a long string".into(),
        V::Bool(b) => format!("the boolean {b}"),
        V::F32(x) => format!("the float {x}"),
        V::F64(x) => format!("the float {x}"),
        V::Array(a) => format!("an array of {} values", a.len()),
        other => format!("{other:?}"),
    }
}
