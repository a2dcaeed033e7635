//! Model configuration: one `ModelConfig` for the Llama family (Llama 2/3, SmolLM/SmolLM2,
//! Mistral, Qwen2), read from GGUF metadata or a Hugging Face `config.json`.
//!
//! Invariants of a returned config: every field was checked against its meaning, and an error
//! names the file, the field as the source spells it and the value: every size is > 0 (vocab and
//! context fit a `u32`; a negative GGUF integer is refused, never read as a huge unsigned one),
//! `n_heads` is a multiple of `n_kv_heads`, `head_dim` is even, `hidden_size == n_heads *
//! head_dim` unless the source gives an explicit head dim, the RMSNorm epsilon is in (0, 1), the
//! rope base is finite and > 1, and rope scaling factors are finite and positive.
//!
//! Files: this one holds the config, its checks and the field names of both sources; `gguf.rs`
//! reads GGUF metadata, `hf.rs` reads and writes `config.json`.

use std::path::Path;

use crate::error::{ModelError, Result};

mod gguf;
mod hf;
#[cfg(test)]
mod tests;

pub(crate) use gguf::gguf_usize;
pub(crate) use hf::read_json;

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

    /// Every architecture, in the order [`SUPPORTED`] lists them.
    const ALL: [Architecture; 3] = [
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
    ];

    /// The architecture whose name (`name_of`: [`Architecture::gguf_name`] or
    /// [`Architecture::hf_class`]) is `name`; an error naming `path` otherwise.
    fn from_name(path: &Path, name: &str, name_of: fn(Self) -> &'static str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|&a| name_of(a) == name)
            .ok_or_else(|| ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                architecture: name.to_string(),
                supported: SUPPORTED,
            })
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
    Llama3(Llama3Scaling),
}

/// The parameters of Llama 3.1's wavelength-dependent RoPE scaling ([`RopeScaling::Llama3`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Llama3Scaling {
    /// Overall factor.
    pub factor: f32,
    /// Low-frequency factor.
    pub low_freq_factor: f32,
    /// High-frequency factor.
    pub high_freq_factor: f32,
    /// The context length the model was pre-trained at.
    pub original_max_position: usize,
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

    /// The identity gates record of the model they are trained for (architecture, shape and
    /// `fingerprint`, the weights' fingerprint): what a gates file is checked against.
    pub fn gate_identity(&self, fingerprint: &str) -> gate_core::ModelIdentity {
        gate_core::model_identity(
            self.architecture.gguf_name(),
            self.n_layers,
            self.hidden_size,
            self.n_kv_heads,
            fingerprint,
        )
    }

    /// Query heads per KV head (`G`).
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Bytes of K and V per token over all layers, stored as `dtype`.
    pub fn kv_bytes_per_token(&self, dtype: kv_store::KvDtype) -> usize {
        2 * self.n_layers * self.n_kv_heads * dtype.entry_bytes(self.head_dim)
    }

    /// Checks every field against its meaning; `key` names a field as the source spells it.
    fn validate(&self, path: &Path, key: &dyn Fn(Field) -> String) -> Result<()> {
        let problem = self
            .size_problem(key)
            .or_else(|| self.norm_or_rope_problem());
        match problem {
            Some((field, problem)) => Err(ModelError::config(path, &key(field), problem)),
            None => Ok(()),
        }
    }

    /// The first size that is out of range (zero, too large for a `u32` token id or position,
    /// heads that do not group, an odd head dim), with what is wrong with it.
    fn size_problem(&self, key: &dyn Fn(Field) -> String) -> Option<(Field, String)> {
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
        if let Some(&(field, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Some((field, "must be > 0, got 0".into()));
        }
        // Token ids and positions are u32.
        for (field, value) in [
            (Field::Vocab, self.vocab_size),
            (Field::Context, self.max_position),
        ] {
            if value > u32::MAX as usize {
                return Some((field, format!("must be at most {}, got {value}", u32::MAX)));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            let problem = format!(
                "({}) must divide {} ({})",
                self.n_kv_heads,
                key(Field::Heads),
                self.n_heads
            );
            return Some((Field::KvHeads, problem));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Some((
                Field::HeadDim,
                format!("must be even, got {}", self.head_dim),
            ));
        }
        if self.n_heads.checked_mul(self.head_dim).is_none() {
            return Some((Field::HeadDim, format!("{} is too large", self.head_dim)));
        }
        None
    }

    /// The first of the RMSNorm epsilon, the rope base and the rope scaling that is out of
    /// range, with what is wrong with it.
    fn norm_or_rope_problem(&self) -> Option<(Field, String)> {
        let eps = self.rms_norm_eps;
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            let problem = format!(
                "must be a small positive number (0 < eps < 1), got {}",
                show(eps)
            );
            return Some((Field::Eps, problem));
        }
        let theta = self.rope_theta;
        if !(theta.is_finite() && theta > 1.0) {
            return Some((
                Field::Theta,
                format!("must be a finite number > 1, got {theta}"),
            ));
        }
        let positive_factor = |field: Field, v: f32| {
            (!(v.is_finite() && v > 0.0)).then(|| {
                let problem = format!("must be a finite number > 0, got {}", show(f64::from(v)));
                (field, problem)
            })
        };
        match &self.rope_scaling {
            None => None,
            Some(RopeScaling::Linear { factor }) => positive_factor(Field::ScalingFactor, *factor),
            Some(RopeScaling::Llama3(s)) => [
                (Field::ScalingFactor, s.factor),
                (Field::LowFreqFactor, s.low_freq_factor),
                (Field::HighFreqFactor, s.high_freq_factor),
            ]
            .into_iter()
            .find_map(|(field, v)| positive_factor(field, v))
            .or_else(|| {
                (s.high_freq_factor <= s.low_freq_factor).then(|| {
                    let problem = format!(
                        "({}) must exceed the low frequency factor ({})",
                        s.high_freq_factor, s.low_freq_factor
                    );
                    (Field::HighFreqFactor, problem)
                })
            })
            .or_else(|| {
                (s.original_max_position == 0)
                    .then(|| (Field::OriginalContext, "must be > 0, got 0".into()))
            }),
        }
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
