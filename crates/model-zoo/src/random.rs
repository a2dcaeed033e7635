//! Small random models written to disk as a Hugging Face directory (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`), so tests and benchmarks that
//! need no real weights still exercise the real loading path.
//!
//! Invariants: the same config and seed always write the same bytes; the tokenizer is byte-level
//! BPE over the 256 byte symbols plus three control tokens, so `vocab_size` must be at least 259;
//! files are written to temporary names and renamed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::{Naming, TensorRole};

/// Control tokens of the random models' tokenizer, after the 256 byte symbols.
pub const RANDOM_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A small Llama config for tests (`layers` layers, GQA `heads`/`kv_heads`, head dim 16).
pub fn tiny_config(layers: usize, heads: usize, kv_heads: usize) -> ModelConfig {
    ModelConfig {
        architecture: crate::config::Architecture::Llama,
        vocab_size: 256 + RANDOM_SPECIALS.len(),
        hidden_size: heads * 16,
        intermediate_size: heads * 32,
        n_layers: layers,
        n_heads: heads,
        n_kv_heads: kv_heads,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position: 2048,
        tie_embeddings: false,
    }
}

/// How a random tensor is initialised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Init {
    /// All ones (norm weights).
    Ones,
    /// Uniform in `[-scale, scale)`.
    Uniform(f32),
}

/// One tensor of a random model: its Hugging Face name, shape and initialisation.
pub(crate) struct TensorSpec {
    pub(crate) name: String,
    pub(crate) shape: Vec<usize>,
    pub(crate) init: Init,
}

/// Every tensor of a Llama-family model of `cfg`'s shape, in a fixed order: projections scaled by
/// 1/sqrt(fan-in) (the hidden size; the FFN size for `down`), the embedding by 1, biases by 0.1.
pub(crate) fn tensor_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let (d, hd, f) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let hf = Naming::HuggingFace;
    let w = 1.0 / (d as f32).sqrt();
    let spec = |name: String, shape: Vec<usize>, init: Init| TensorSpec { name, shape, init };
    let mut specs = vec![spec(
        TensorRole::Embedding.name(hf, 0),
        vec![cfg.vocab_size, d],
        Init::Uniform(1.0),
    )];
    for l in 0..cfg.n_layers {
        let (q, kv) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        specs.push(spec(
            TensorRole::Q.name(hf, l),
            vec![q, d],
            Init::Uniform(w),
        ));
        specs.push(spec(
            TensorRole::K.name(hf, l),
            vec![kv, d],
            Init::Uniform(w),
        ));
        specs.push(spec(
            TensorRole::V.name(hf, l),
            vec![kv, d],
            Init::Uniform(w),
        ));
        specs.push(spec(
            TensorRole::O.name(hf, l),
            vec![d, q],
            Init::Uniform(w),
        ));
        specs.push(spec(
            TensorRole::Gate.name(hf, l),
            vec![f, d],
            Init::Uniform(w),
        ));
        specs.push(spec(
            TensorRole::Up.name(hf, l),
            vec![f, d],
            Init::Uniform(w),
        ));
        let down = Init::Uniform(1.0 / (f as f32).sqrt());
        specs.push(spec(TensorRole::Down.name(hf, l), vec![d, f], down));
        specs.push(spec(TensorRole::AttnNorm.name(hf, l), vec![d], Init::Ones));
        specs.push(spec(TensorRole::FfnNorm.name(hf, l), vec![d], Init::Ones));
        if cfg.architecture.qkv_bias() {
            for (role, n) in [(TensorRole::Q, q), (TensorRole::K, kv), (TensorRole::V, kv)] {
                specs.push(spec(role.bias_name(hf, l), vec![n], Init::Uniform(0.1)));
            }
        }
    }
    specs.push(spec(
        TensorRole::OutputNorm.name(hf, 0),
        vec![d],
        Init::Ones,
    ));
    if !cfg.tie_embeddings {
        specs.push(spec(
            TensorRole::LmHead.name(hf, 0),
            vec![cfg.vocab_size, d],
            Init::Uniform(w),
        ));
    }
    specs
}

/// Writes a random model with `cfg`'s shape into `dir` (created if missing).
pub fn write_random_model(dir: &Path, cfg: &ModelConfig, seed: u64) -> Result<()> {
    if cfg.vocab_size < 256 + RANDOM_SPECIALS.len() {
        return Err(ModelError::Input(format!(
            "random models need vocab_size >= {}, got {}",
            256 + RANDOM_SPECIALS.len(),
            cfg.vocab_size
        )));
    }
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    for spec in tensor_specs(cfg) {
        let t = match spec.init {
            Init::Ones => {
                Tensor::ones(spec.shape.as_slice(), candle_core::DType::F32, &Device::Cpu)?
            }
            Init::Uniform(scale) => {
                let n: usize = spec.shape.iter().product();
                let data: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
                Tensor::from_vec(data, spec.shape.as_slice(), &Device::Cpu)?
            }
        };
        tensors.insert(spec.name, t);
    }
    let weights = dir.join("model.safetensors");
    let tmp = dir.join("model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    rename(&tmp, &weights)?;
    let eos = 256 + 2; // <|im_end|>
    write_atomic(
        &dir.join("config.json"),
        &serde_json::to_string_pretty(&cfg.to_hf_value(None, &[eos]))?,
    )?;
    write_tokenizer(dir)?;
    Ok(())
}

/// The random models' byte-level tokenizer (256 byte symbols and [`RANDOM_SPECIALS`]), built in a
/// temporary folder; for models with random weights ids past it decode to nothing.
pub fn byte_tokenizer() -> Result<crate::Tokenizer> {
    let dir = tempfile::tempdir().map_err(|source| ModelError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    write_tokenizer(dir.path())?;
    crate::Tokenizer::from_file(&dir.path().join("tokenizer.json"))
}

fn write_tokenizer(dir: &Path) -> Result<()> {
    let err = |e: String| ModelError::Tokenizer {
        source_name: dir.display().to_string(),
        reason: e,
    };
    let mut symbols: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    symbols.sort_unstable();
    let vocab: tokenizers::models::bpe::Vocab = symbols
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    let specials: Vec<AddedToken> = RANDOM_SPECIALS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| err(e.to_string()))?;
    let json = tok.to_string(true).map_err(|e| err(e.to_string()))?;
    write_atomic(&dir.join("tokenizer.json"), &json)?;
    let config = serde_json::json!({
        "eos_token": "<|im_end|>",
        "bos_token": null,
        "add_bos_token": false,
        "chat_template": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    });
    write_atomic(
        &dir.join("tokenizer_config.json"),
        &serde_json::to_string_pretty(&config)?,
    )
}

/// Writes `text` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, text).map_err(|source| ModelError::Io {
        path: tmp.clone(),
        source,
    })?;
    rename(&tmp, path)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|source| ModelError::Io {
        path: to.to_path_buf(),
        source,
    })
}
