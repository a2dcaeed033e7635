//! Tests of reading configs: field errors in words, a SmolLM2 config.json, the round trip.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde_json::Value;

use super::{gguf_usize, ModelConfig};

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
    let back =
        ModelConfig::from_hf_value(Path::new("c.json"), &cfg.to_hf_value(Some(1), &[2])).unwrap();
    assert_eq!(cfg, back);
}
