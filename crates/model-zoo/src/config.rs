//! Model configuration: one `ModelConfig` for the Llama family (Llama 2/3, SmolLM/SmolLM2,
//! Mistral, Qwen2), read from GGUF metadata or a Hugging Face `config.json`.
//!
//! Invariants of a returned config: every field was checked against its meaning, and an error
//! names the file, the field as the source spells it and the value: every size is > 0 (vocab and
//! context fit a `u32`; a negative GGUF integer is refused, never read as a huge unsigned one),
//! `n_heads` is a multiple of `n_kv_heads`, `head_dim` is even, `hidden_size == n_heads *
//! head_dim` unless the source gives an explicit head dim, the RMSNorm epsilon is in (0, 1), the
//! rope base is finite and > 1, and rope scaling factors are finite and positive.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The decoder families agate implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3, SmolLM, SmolLM2 (and Mistral, which shares the layer shape).
    Llama,
    /// Mistral: a Llama layer; its sliding window is not applied (full attention).
    Mistral,
    /// Qwen2: a Llama layer with biases on the q/k/v projections.
    Qwen2,
}

const SUPPORTED: &str = "llama, mistral, qwen2 (GGUF); LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (config.json)";

impl Architecture {
    /// The name used in GGUF metadata (`general.architecture`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// The Hugging Face class name (`architectures[0]` in `config.json`).
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    fn from_gguf_name(path: &Path, name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Architecture::Llama),
            "mistral" => Ok(Architecture::Mistral),
            "qwen2" => Ok(Architecture::Qwen2),
            other => Err(ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                architecture: other.to_string(),
                supported: SUPPORTED,
            }),
        }
    }

    fn from_hf_class(path: &Path, name: &str) -> Result<Self> {
        match name {
            "LlamaForCausalLM" => Ok(Architecture::Llama),
            "MistralForCausalLM" => Ok(Architecture::Mistral),
            "Qwen2ForCausalLM" => Ok(Architecture::Qwen2),
            other => Err(ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                architecture: other.to_string(),
                supported: SUPPORTED,
            }),
        }
    }

    /// Whether the q/k/v projections carry a bias.
    pub fn qkv_bias(self) -> bool {
        self == Architecture::Qwen2
    }
}

/// Rotary-embedding frequency scaling.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f32,
    },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        /// Overall factor.
        factor: f32,
        /// Low-frequency factor.
        low_freq_factor: f32,
        /// High-frequency factor.
        high_freq_factor: f32,
        /// The context length the model was pre-trained at.
        original_max_position: usize,
    },
}

/// Everything the decoder needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// Decoder family.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Hidden size `D`.
    pub hidden_size: usize,
    /// FFN inner size.
    pub intermediate_size: usize,
    /// Number of decoder layers `L`.
    pub n_layers: usize,
    /// Query heads `Hq`.
    pub n_heads: usize,
    /// KV heads `Hkv`.
    pub n_kv_heads: usize,
    /// Head dimension `d`.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f32,
    /// Optional RoPE scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Maximum context length (positions).
    pub max_position: usize,
    /// Whether the LM head shares the embedding matrix.
    pub tie_embeddings: bool,
}

impl ModelConfig {
    /// Why gates of shape `g` cannot run on this model (layers, hidden size, KV heads), or `None`
    /// when they fit.
    pub fn gate_shape_mismatch(&self, g: &gate_core::GateConfig) -> Option<String> {
        ((g.n_layers, g.hidden_size, g.n_kv_heads) != (self.n_layers, self.hidden_size, self.n_kv_heads))
            .then(|| {
                format!(
                    "gates are for {} layers, hidden size {}, {} KV heads; the model has {}, {}, {}",
                    g.n_layers,
                    g.hidden_size,
                    g.n_kv_heads,
                    self.n_layers,
                    self.hidden_size,
                    self.n_kv_heads
                )
            })
    }

    /// Query heads per KV head (`G`).
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Bytes of K and V per token over all layers, stored as `dtype`.
    pub fn kv_bytes_per_token(&self, dtype: kv_store::KvDtype) -> usize {
        2 * self.n_layers * self.n_kv_heads * dtype.entry_bytes(self.head_dim)
    }

    /// Reads the config from GGUF metadata.
    pub fn from_gguf(path: &Path, content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let arch_name = md
            .get("general.architecture")
            .ok_or_else(|| ModelError::config(path, "general.architecture", "is missing"))?
            .to_string()
            .map_err(|e| ModelError::config(path, "general.architecture", e.to_string()))?
            .clone();
        let architecture = Architecture::from_gguf_name(path, &arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let opt_usize = |k: &str| -> Result<Option<usize>> {
            let full = key(k);
            md.get(&full)
                .map(|v| gguf_usize(v).map_err(|problem| ModelError::config(path, &full, problem)))
                .transpose()
        };
        let get_usize = |k: &str| -> Result<usize> {
            opt_usize(k)?.ok_or_else(|| ModelError::config(path, &key(k), "is missing"))
        };
        let get_f32 = |k: &str| -> Result<Option<f32>> {
            let full = key(k);
            match md.get(&full) {
                None => Ok(None),
                Some(v) => v
                    .to_f32()
                    .or_else(|_| v.to_f64().map(|x| x as f32))
                    .map(Some)
                    .map_err(|_| {
                        ModelError::config(
                            path,
                            &full,
                            format!("must be a float, got {}", gguf_value_words(v)),
                        )
                    }),
            }
        };
        let hidden_size = get_usize("embedding_length")?;
        let n_heads = get_usize("attention.head_count")?;
        let n_kv_heads = opt_usize("attention.head_count_kv")?.unwrap_or(n_heads);
        let head_dim = match opt_usize("attention.key_length")? {
            Some(d) => d,
            None if n_heads > 0 && !hidden_size.is_multiple_of(n_heads) => {
                return Err(ModelError::config(
                    path,
                    &key("embedding_length"),
                    format!(
                        "({hidden_size}) must be a multiple of {} ({n_heads}) when {} is absent",
                        key("attention.head_count"),
                        key("attention.key_length")
                    ),
                ))
            }
            None => hidden_size / n_heads.max(1),
        };
        let vocab_size = match opt_usize("vocab_size")? {
            Some(v) => v,
            None => match md.get("tokenizer.ggml.tokens") {
                Some(gguf_file::Value::Array(tokens)) => tokens.len(),
                _ => content
                    .tensor_infos
                    .get("token_embd.weight")
                    .map(|t| t.shape.dims()[0])
                    .ok_or_else(|| ModelError::config(path, &key("vocab_size"), "is missing"))?,
            },
        };
        let rope_scaling = match md.get(&key("rope.scaling.type")) {
            Some(v) => {
                let kind = v.to_string().map_err(|e| {
                    ModelError::config(path, &key("rope.scaling.type"), e.to_string())
                })?;
                let factor = get_f32("rope.scaling.factor")?.unwrap_or(1.0);
                match kind.as_str() {
                    "none" => None,
                    "linear" => Some(RopeScaling::Linear { factor }),
                    other => {
                        return Err(ModelError::config(
                            path,
                            &key("rope.scaling.type"),
                            format!("has unsupported value `{other}` (supported: none, linear)"),
                        ))
                    }
                }
            }
            None => None,
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: get_usize("feed_forward_length")?,
            n_layers: get_usize("block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps: get_f32("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5) as f64,
            rope_theta: get_f32("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling,
            max_position: get_usize("context_length")?,
            tie_embeddings: !content.tensor_infos.contains_key("output.weight"),
        };
        cfg.validate(path, &|f| f.gguf_key(&arch_name))?;
        // agate rotates the whole head and gives values the keys' width; a file that says
        // otherwise would run with the wrong math.
        for (field, meaning) in [
            ("rope.dimension_count", "rotary dimensions"),
            ("attention.value_length", "value head width"),
        ] {
            let head_dim = cfg.head_dim;
            if let Some(d) = opt_usize(field)? {
                if d != head_dim {
                    return Err(ModelError::config(
                        path,
                        &key(field),
                        format!(
                            "is {d}, but agate supports only {meaning} equal to the key head width ({head_dim})"
                        ),
                    ));
                }
            }
        }
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::config(path, "(file)", format!("is not valid JSON: {e}")))?;
        Self::from_hf_value(path, &json)
    }

    /// Parses an already-read `config.json` value; `path` is used in error messages.
    pub fn from_hf_value(path: &Path, json: &Value) -> Result<Self> {
        let class = json
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::config(path, "architectures", "is missing"))?;
        let architecture = Architecture::from_hf_class(path, class)?;
        let req_usize = |field: &str| -> Result<usize> {
            let v = json
                .get(field)
                .ok_or_else(|| ModelError::config(path, field, "is missing"))?;
            v.as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| {
                    ModelError::config(
                        path,
                        field,
                        format!("must be a non-negative integer, got {v}"),
                    )
                })
        };
        let opt_f64 = |field: &str| -> Result<Option<f64>> {
            match json.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                    ModelError::config(path, field, format!("must be a number, got {v}"))
                }),
            }
        };
        let hidden_size = req_usize("hidden_size")?;
        let n_heads = req_usize("num_attention_heads")?;
        let n_kv_heads = match json.get("num_key_value_heads") {
            None | Some(Value::Null) => n_heads,
            Some(_) => req_usize("num_key_value_heads")?,
        };
        let head_dim = match json.get("head_dim") {
            None | Some(Value::Null) if n_heads > 0 && !hidden_size.is_multiple_of(n_heads) => {
                return Err(ModelError::config(
                    path,
                    "hidden_size",
                    format!("({hidden_size}) must be a multiple of num_attention_heads ({n_heads}) when head_dim is absent"),
                ))
            }
            None | Some(Value::Null) => hidden_size / n_heads.max(1),
            Some(_) => req_usize("head_dim")?,
        };
        let rope_scaling = match json.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(rs) => Some(parse_hf_rope_scaling(path, rs)?),
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: req_usize("intermediate_size")?,
            n_layers: req_usize("num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: opt_f64("rope_theta")?.unwrap_or(10_000.0) as f32,
            rope_scaling,
            max_position: req_usize("max_position_embeddings")?,
            tie_embeddings: match json.get("tie_word_embeddings") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(ModelError::config(
                        path,
                        "tie_word_embeddings",
                        format!("must be true or false, got {v}"),
                    ))
                }
            },
        };
        cfg.validate(path, &|f| f.hf_key().to_string())?;
        Ok(cfg)
    }

    /// The `config.json` a Hugging Face loader expects for this config.
    pub fn to_hf_value(&self, bos: Option<u32>, eos: &[u32]) -> Value {
        let mut v = serde_json::json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.gguf_name(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if let Some(b) = bos {
            v["bos_token_id"] = b.into();
        }
        match eos {
            [] => {}
            [one] => v["eos_token_id"] = (*one).into(),
            many => v["eos_token_id"] = many.to_vec().into(),
        }
        if let Some(RopeScaling::Linear { factor }) = &self.rope_scaling {
            v["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": factor});
        }
        if let Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        }) = &self.rope_scaling
        {
            v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": factor,
                "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position});
        }
        v
    }

    /// Checks every field against its meaning; `key` names a field as the source spells it.
    fn validate(&self, path: &Path, key: &dyn Fn(Field) -> String) -> Result<()> {
        let bad =
            |field: Field, problem: String| Err(ModelError::config(path, &key(field), problem));
        let positive = [
            (Field::Vocab, self.vocab_size),
            (Field::Hidden, self.hidden_size),
            (Field::Ffn, self.intermediate_size),
            (Field::Layers, self.n_layers),
            (Field::Heads, self.n_heads),
            (Field::KvHeads, self.n_kv_heads),
            (Field::HeadDim, self.head_dim),
            (Field::Context, self.max_position),
        ];
        for (field, value) in positive {
            if value == 0 {
                return bad(field, "must be > 0, got 0".into());
            }
        }
        // Token ids and positions are u32.
        for (field, value) in [
            (Field::Vocab, self.vocab_size),
            (Field::Context, self.max_position),
        ] {
            if value > u32::MAX as usize {
                return bad(field, format!("must be at most {}, got {value}", u32::MAX));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(
                Field::KvHeads,
                format!(
                    "({}) must divide {} ({})",
                    self.n_kv_heads,
                    key(Field::Heads),
                    self.n_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(
                Field::HeadDim,
                format!("must be even, got {}", self.head_dim),
            );
        }
        if self.n_heads.checked_mul(self.head_dim).is_none() {
            return bad(Field::HeadDim, format!("{} is too large", self.head_dim));
        }
        let eps = self.rms_norm_eps;
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            return bad(
                Field::Eps,
                format!(
                    "must be a small positive number (0 < eps < 1), got {}",
                    show(eps)
                ),
            );
        }
        let theta = self.rope_theta;
        if !(theta.is_finite() && theta > 1.0) {
            return bad(
                Field::Theta,
                format!("must be a finite number > 1, got {theta}"),
            );
        }
        match &self.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) if !(factor.is_finite() && *factor > 0.0) => {
                return bad(
                    Field::ScalingFactor,
                    format!(
                        "must be a finite number > 0, got {}",
                        show(f64::from(*factor))
                    ),
                );
            }
            Some(RopeScaling::Linear { .. }) => {}
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            }) => {
                for (field, v) in [
                    (Field::ScalingFactor, factor),
                    (Field::LowFreqFactor, low_freq_factor),
                    (Field::HighFreqFactor, high_freq_factor),
                ] {
                    if !(v.is_finite() && *v > 0.0) {
                        return bad(
                            field,
                            format!("must be a finite number > 0, got {}", show(f64::from(*v))),
                        );
                    }
                }
                if high_freq_factor <= low_freq_factor {
                    return bad(
                        Field::HighFreqFactor,
                        format!("({high_freq_factor}) must exceed the low frequency factor ({low_freq_factor})"),
                    );
                }
                if *original_max_position == 0 {
                    return bad(Field::OriginalContext, "must be > 0, got 0".into());
                }
            }
        }
        Ok(())
    }
}

/// A value as its source most likely wrote it: the shortest f32 form when it is an f32 (GGUF
/// stores f32), else the f64 one.
fn show(v: f64) -> String {
    let f = v as f32;
    if f64::from(f) == v {
        f.to_string()
    } else {
        v.to_string()
    }
}

/// The config fields [`ModelConfig::validate`] checks, named per source.
#[derive(Clone, Copy, Debug)]
enum Field {
    Vocab,
    Hidden,
    Ffn,
    Layers,
    Heads,
    KvHeads,
    HeadDim,
    Context,
    Eps,
    Theta,
    ScalingFactor,
    LowFreqFactor,
    HighFreqFactor,
    OriginalContext,
}

impl Field {
    /// The `config.json` key.
    fn hf_key(self) -> &'static str {
        match self {
            Field::Vocab => "vocab_size",
            Field::Hidden => "hidden_size",
            Field::Ffn => "intermediate_size",
            Field::Layers => "num_hidden_layers",
            Field::Heads => "num_attention_heads",
            Field::KvHeads => "num_key_value_heads",
            Field::HeadDim => "head_dim",
            Field::Context => "max_position_embeddings",
            Field::Eps => "rms_norm_eps",
            Field::Theta => "rope_theta",
            Field::ScalingFactor => "rope_scaling.factor",
            Field::LowFreqFactor => "rope_scaling.low_freq_factor",
            Field::HighFreqFactor => "rope_scaling.high_freq_factor",
            Field::OriginalContext => "rope_scaling.original_max_position_embeddings",
        }
    }

    /// The GGUF metadata key for architecture `arch`.
    fn gguf_key(self, arch: &str) -> String {
        let k = match self {
            Field::Vocab => "vocab_size",
            Field::Hidden => "embedding_length",
            Field::Ffn => "feed_forward_length",
            Field::Layers => "block_count",
            Field::Heads => "attention.head_count",
            Field::KvHeads => "attention.head_count_kv",
            Field::HeadDim => "attention.key_length",
            Field::Context => "context_length",
            Field::Eps => "attention.layer_norm_rms_epsilon",
            Field::Theta => "rope.freq_base",
            Field::ScalingFactor => "rope.scaling.factor",
            Field::LowFreqFactor => "rope.scaling.low_freq_factor",
            Field::HighFreqFactor => "rope.scaling.high_freq_factor",
            Field::OriginalContext => "rope.scaling.original_context_length",
        };
        format!("{arch}.{k}")
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

fn parse_hf_rope_scaling(path: &Path, rs: &Value) -> Result<RopeScaling> {
    let kind = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(Value::as_str)
        .ok_or_else(|| ModelError::config(path, "rope_scaling.rope_type", "is missing"))?;
    let num = |field: &str| -> Result<f32> {
        rs.get(field)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .ok_or_else(|| ModelError::config(path, &format!("rope_scaling.{field}"), "is missing"))
    };
    match kind {
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position: {
                let v = num("original_max_position_embeddings")?;
                if !(v.is_finite() && v >= 1.0 && v.fract() == 0.0) {
                    return Err(ModelError::config(
                        path,
                        "rope_scaling.original_max_position_embeddings",
                        format!("must be a positive integer, got {v}"),
                    ));
                }
                v as usize
            },
        }),
        "default" => Ok(RopeScaling::Linear { factor: 1.0 }),
        other => Err(ModelError::config(
            path,
            "rope_scaling.rope_type",
            format!("has unsupported value `{other}` (supported: linear, llama3)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm_json() -> Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": true
        })
    }

    #[test]
    fn gguf_integers_of_the_wrong_kind_are_named_in_words() {
        use gguf_file::Value as V;
        assert_eq!(
            gguf_usize(&V::String("thirty".into())).unwrap_err(),
            "must be an integer, got the string \"thirty\""
        );
        assert_eq!(
            gguf_usize(&V::F32(30.0)).unwrap_err(),
            "must be an integer, got the float 30"
        );
        assert_eq!(
            gguf_usize(&V::I32(-1)).unwrap_err(),
            "must be a non-negative integer, got -1"
        );
        assert_eq!(gguf_usize(&V::U32(30)), Ok(30));
    }

    #[test]
    fn parses_a_smollm2_config() {
        let cfg = ModelConfig::from_hf_value(Path::new("config.json"), &smollm_json()).unwrap();
        assert_eq!(cfg.head_dim, 64);
        assert_eq!(cfg.group_size(), 3);
        assert_eq!(
            cfg.kv_bytes_per_token(kv_store::KvDtype::F16),
            2 * 30 * 3 * 64 * 2
        );
        assert_eq!(
            cfg.kv_bytes_per_token(kv_store::KvDtype::Q8_0),
            2 * 30 * 3 * 68
        );
        assert!(cfg.tie_embeddings);
    }

    #[test]
    fn missing_field_is_named() {
        let mut json = smollm_json();
        json.as_object_mut().unwrap().remove("intermediate_size");
        let err = ModelConfig::from_hf_value(Path::new("/m/config.json"), &json).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/m/config.json: field `intermediate_size` is missing"
        );
    }

    #[test]
    fn unknown_architecture_is_named() {
        let mut json = smollm_json();
        json["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
        let err = ModelConfig::from_hf_value(Path::new("c.json"), &json).unwrap_err();
        assert!(
            err.to_string()
                .contains("unsupported architecture `GPTNeoXForCausalLM`"),
            "{err}"
        );
    }

    #[test]
    fn heads_must_divide() {
        let mut json = smollm_json();
        json["num_key_value_heads"] = 4.into();
        let err = ModelConfig::from_hf_value(Path::new("c.json"), &json).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn hf_round_trip() {
        let cfg = ModelConfig::from_hf_value(Path::new("c.json"), &smollm_json()).unwrap();
        let back = ModelConfig::from_hf_value(Path::new("c.json"), &cfg.to_hf_value(Some(1), &[2]))
            .unwrap();
        assert_eq!(cfg, back);
    }
}
