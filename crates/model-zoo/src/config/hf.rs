//! `config.json`: [`ModelConfig::from_hf_json`] reads a Hugging Face config (keys as
//! transformers writes them, `rope_scaling` of type `linear` or `llama3`), and
//! [`ModelConfig::to_hf_value`] writes the one a Hugging Face loader expects.

use std::path::Path;

use serde_json::Value;

use super::{Architecture, Llama3Scaling, ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};

impl ModelConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        Self::from_hf_value(path, &read_json(path)?)
    }

    /// Parses an already-read `config.json` value; `path` is used in error messages.
    pub fn from_hf_value(path: &Path, json: &Value) -> Result<Self> {
        let class = json
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::config(path, "architectures", "is missing"))?;
        let architecture = Architecture::from_name(path, class, Architecture::hf_class)?;
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
        if let Some(RopeScaling::Llama3(s)) = &self.rope_scaling {
            v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position});
        }
        v
    }
}

/// The JSON value of the file `path` (a `config.json`); errors name the file.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::config_failed(path, "(file)", "is not valid JSON: ", e))
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
        "llama3" => Ok(RopeScaling::Llama3(Llama3Scaling {
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
        })),
        "default" => Ok(RopeScaling::Linear { factor: 1.0 }),
        other => Err(ModelError::config(
            path,
            "rope_scaling.rope_type",
            format!("has unsupported value `{other}` (supported: linear, llama3)"),
        )),
    }
}
