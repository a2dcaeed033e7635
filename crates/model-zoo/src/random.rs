//! Small random models: written to disk as a Hugging Face directory (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`), so tests and benchmarks that
//! need no real weights still exercise the real loading path, or generated in memory tensor by
//! tensor for `--dummy-weights` ([`TensorSpec::dense`], [`TensorSpec::quantized`]).
//!
//! Invariants: the same config and seed always write the same bytes, and a tensor generated in
//! memory depends only on the seed and its name; the tokenizer is byte-level
//! BPE over the 256 byte symbols plus three control tokens, so `vocab_size` must be at least 259;
//! the files go into a [`FileSink`] (engine's `StagedDir` writes them as one directory).

use std::collections::BTreeMap;
use std::io::Write;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::config::ModelConfig;
use crate::convert::{write_json, write_safetensors, FileSink, TensorPlan};
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

impl TensorSpec {
    /// The tensor's values drawn from `rng` (f32; ones for a norm weight, which draws nothing).
    fn values(&self, rng: &mut StdRng) -> Result<Tensor> {
        let shape = self.shape.as_slice();
        Ok(match self.init {
            Init::Ones => Tensor::ones(shape, DType::F32, &Device::Cpu)?,
            Init::Uniform(scale) => {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
                Tensor::from_vec(data, shape, &Device::Cpu)?
            }
        })
    }

    /// The tensor's value seeded by `seed` and its name (the same whatever else is generated).
    pub(crate) fn dense(&self, seed: u64) -> Result<Tensor> {
        self.values(&mut self.rng(seed))
    }

    /// Random GGUF blocks of `dtype` (Q4_0 or Q8_0) for a `[rows, cols]` spec: random codes with
    /// the scale that gives the spec's magnitude, written directly (no f32 copy of a large
    /// matrix), seeded by `seed` and the name.
    pub(crate) fn quantized(&self, dtype: GgmlDType, seed: u64) -> Result<QTensor> {
        let scale = match self.init {
            Init::Uniform(s) => s,
            Init::Ones => 1.0,
        };
        let (block, half_range) = match dtype {
            GgmlDType::Q4_0 => (18, 8.0),
            _ => (34, 127.0),
        };
        let n: usize = self.shape.iter().product();
        let mut bytes = vec![0u8; n / 32 * block];
        self.rng(seed).fill_bytes(&mut bytes);
        let d = half::f16::from_f32(scale / half_range).to_le_bytes();
        for b in bytes.chunks_exact_mut(block) {
            b[..2].copy_from_slice(&d);
        }
        let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, dtype)?;
        Ok(QTensor::new(storage, self.shape.as_slice())?)
    }

    /// The generator of this tensor's values: `seed` mixed with a stable hash of its name
    /// (FNV-1a).
    fn rng(&self, seed: u64) -> StdRng {
        let hash = self.name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        });
        StdRng::seed_from_u64(seed ^ hash)
    }
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
        let down = Init::Uniform(1.0 / (f as f32).sqrt());
        let layer = [
            (TensorRole::Q, vec![q, d], Init::Uniform(w)),
            (TensorRole::K, vec![kv, d], Init::Uniform(w)),
            (TensorRole::V, vec![kv, d], Init::Uniform(w)),
            (TensorRole::O, vec![d, q], Init::Uniform(w)),
            (TensorRole::Gate, vec![f, d], Init::Uniform(w)),
            (TensorRole::Up, vec![f, d], Init::Uniform(w)),
            (TensorRole::Down, vec![d, f], down),
            (TensorRole::AttnNorm, vec![d], Init::Ones),
            (TensorRole::FfnNorm, vec![d], Init::Ones),
        ];
        for (role, shape, init) in layer {
            specs.push(spec(role.name(hf, l), shape, init));
        }
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

/// Writes a random model with `cfg`'s shape (`config.json`, `model.safetensors`,
/// `tokenizer.json`, `tokenizer_config.json`) into `out`.
pub fn write_random_model(out: &mut dyn FileSink, cfg: &ModelConfig, seed: u64) -> Result<()> {
    if cfg.vocab_size < 256 + RANDOM_SPECIALS.len() {
        return Err(ModelError::Input(format!(
            "random models need vocab_size >= {}, got {}",
            256 + RANDOM_SPECIALS.len(),
            cfg.vocab_size
        )));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    for spec in tensor_specs(cfg) {
        let t = spec.values(&mut rng)?;
        tensors.insert(spec.name, t);
    }
    let plan: Vec<TensorPlan> = tensors
        .iter()
        .map(|(name, t)| TensorPlan {
            name: name.clone(),
            dtype: t.dtype(),
            shape: t.dims().to_vec(),
        })
        .collect();
    let values: Vec<&Tensor> = tensors.values().collect();
    out.file("model.safetensors", &mut |w| {
        let no_meta = BTreeMap::new();
        write_safetensors(w, &plan, &no_meta, &mut |_| Ok(()), |i| {
            Ok(values[i].clone())
        })?;
        Ok(())
    })?;
    let eos = 256 + 2; // <|im_end|>
    write_json(out, "config.json", &cfg.to_hf_value(None, &[eos]))?;
    write_tokenizer(out)
}

/// The random models' byte-level tokenizer (256 byte symbols and [`RANDOM_SPECIALS`]), built
/// in memory; for models with random weights ids past it decode to nothing.
pub fn byte_tokenizer() -> Result<crate::Tokenizer> {
    let mut files = MemoryFiles::default();
    write_tokenizer(&mut files)?;
    let text = |name: &str| String::from_utf8_lossy(&files.0[name]).into_owned();
    let config = serde_json::from_str(&text("tokenizer_config.json"))
        .map_err(|e| ModelError::tokenizer_failed("random model", "", e))?;
    crate::Tokenizer::from_json("random model", &text("tokenizer.json"), &config)
}

/// Files kept in memory, by name.
#[derive(Default)]
struct MemoryFiles(BTreeMap<String, Vec<u8>>);

impl FileSink for MemoryFiles {
    fn file(
        &mut self,
        name: &str,
        body: &mut dyn FnMut(&mut dyn Write) -> Result<()>,
    ) -> Result<()> {
        let mut bytes = Vec::new();
        body(&mut bytes)?;
        self.0.insert(name.to_string(), bytes);
        Ok(())
    }
}

fn write_tokenizer(out: &mut dyn FileSink) -> Result<()> {
    let err = |e| ModelError::tokenizer_failed("random model", "", e);
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
        .map_err(err)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    let specials: Vec<AddedToken> = RANDOM_SPECIALS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    tok.add_special_tokens(specials).map_err(err)?;
    let json = tok.to_string(true).map_err(err)?;
    out.file("tokenizer.json", &mut |w| Ok(w.write_all(json.as_bytes())?))?;
    let config = serde_json::json!({
        "eos_token": "<|im_end|>",
        "bos_token": null,
        "add_bos_token": false,
        "chat_template": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    });
    write_json(out, "tokenizer_config.json", &config)
}
