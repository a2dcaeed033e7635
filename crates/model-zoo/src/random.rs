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
use std::path::Path;

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
use crate::weights::{Naming, TensorRole, WeightFormat};

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
                let n = self.element_count()?;
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
        let len = (self.element_count()? / 32)
            .checked_mul(block)
            .ok_or_else(|| self.too_large())?;
        let mut bytes = vec![0u8; len];
        self.rng(seed).fill_bytes(&mut bytes);
        let d = half::f16::from_f32(scale / half_range).to_le_bytes();
        for b in bytes.chunks_exact_mut(block) {
            b[..2].copy_from_slice(&d);
        }
        let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, dtype)?;
        Ok(QTensor::new(storage, self.shape.as_slice())?)
    }

    /// The number of values, or an error naming the tensor when that overflows.
    fn element_count(&self) -> Result<usize> {
        element_count(&self.shape).ok_or_else(|| self.too_large())
    }

    fn too_large(&self) -> ModelError {
        ModelError::Input(format!(
            "random tensor `{}` of shape {:?} is too large to address",
            self.name, self.shape
        ))
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
/// Callers that may face a huge config check [`check_fits`] first: this lists every layer.
pub(crate) fn tensor_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let mut specs = Vec::new();
    let mut model_specs = model_specs(cfg).into_iter();
    specs.extend(model_specs.next());
    for l in 0..cfg.n_layers {
        specs.extend(layer_specs(cfg, l));
    }
    specs.extend(model_specs);
    specs
}

/// The tensors outside the layers: the embedding first, then the output norm and the LM head
/// (absent when tied).
fn model_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let (hf, d) = (Naming::HuggingFace, cfg.hidden_size);
    let mut specs = vec![
        spec(
            TensorRole::Embedding.name(hf, 0),
            vec![cfg.vocab_size, d],
            Init::Uniform(1.0),
        ),
        spec(TensorRole::OutputNorm.name(hf, 0), vec![d], Init::Ones),
    ];
    if !cfg.tie_embeddings {
        specs.push(spec(
            TensorRole::LmHead.name(hf, 0),
            vec![cfg.vocab_size, d],
            Init::Uniform(1.0 / (d as f32).sqrt()),
        ));
    }
    specs
}

/// The tensors of layer `l` (every layer has the same shapes).
fn layer_specs(cfg: &ModelConfig, l: usize) -> Vec<TensorSpec> {
    let (d, hd, f) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let hf = Naming::HuggingFace;
    let w = Init::Uniform(1.0 / (d as f32).sqrt());
    let (q, kv) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
    let down = Init::Uniform(1.0 / (f as f32).sqrt());
    let layer = [
        (TensorRole::Q, vec![q, d], w),
        (TensorRole::K, vec![kv, d], w),
        (TensorRole::V, vec![kv, d], w),
        (TensorRole::O, vec![d, q], w),
        (TensorRole::Gate, vec![f, d], w),
        (TensorRole::Up, vec![f, d], w),
        (TensorRole::Down, vec![d, f], down),
        (TensorRole::AttnNorm, vec![d], Init::Ones),
        (TensorRole::FfnNorm, vec![d], Init::Ones),
    ];
    let mut specs: Vec<TensorSpec> = layer
        .into_iter()
        .map(|(role, shape, init)| spec(role.name(hf, l), shape, init))
        .collect();
    if cfg.architecture.qkv_bias() {
        for (role, n) in [(TensorRole::Q, q), (TensorRole::K, kv), (TensorRole::V, kv)] {
            specs.push(spec(role.bias_name(hf, l), vec![n], Init::Uniform(0.1)));
        }
    }
    specs
}

fn spec(name: String, shape: Vec<usize>, init: Init) -> TensorSpec {
    TensorSpec { name, shape, init }
}

/// The element count of `shape`, or `None` when it overflows a `usize`.
fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Memory assumed available where the machine's cannot be read (no `/proc/meminfo`).
const FALLBACK_MEMORY: u64 = 64 << 30;

/// Refuses, before anything is allocated, random weights of `cfg`'s shapes (read from `config`)
/// that would not fit in the memory this machine has available: [`weight_bytes`] against
/// `MemAvailable` of `/proc/meminfo` (or [`FALLBACK_MEMORY`] where that cannot be read).
pub(crate) fn check_fits(config: &Path, cfg: &ModelConfig, format: WeightFormat) -> Result<()> {
    let needed = weight_bytes(cfg, format);
    let (available, measured) = match available_memory() {
        Some(bytes) => (bytes, true),
        None => (FALLBACK_MEMORY, false),
    };
    if needed.is_some_and(|n| n <= u128::from(available)) {
        return Ok(());
    }
    Err(ModelError::WeightsTooLarge {
        path: config.to_path_buf(),
        needed,
        available,
        measured,
    })
}

/// Bytes the random weights of `cfg`'s shapes take while loaded as `format` asks (see
/// [`crate::Weights::random`]): projections (and a tied LM head's copy of the embedding) in the
/// format's quantized or dense type, the embedding dense (f16 unless the format is dense), norms
/// and biases f32, plus one f32 copy of the largest matrix while it is drawn. `None` when the
/// count overflows.
pub(crate) fn weight_bytes(cfg: &ModelConfig, format: WeightFormat) -> Option<u128> {
    let (per_block, block) = match format {
        WeightFormat::Auto | WeightFormat::AsStored => (GgmlDType::Q4_0.type_size(), 32),
        WeightFormat::Quantize(t) => (t.type_size(), t.block_size()),
        WeightFormat::Dense(dt) => (dt.size_in_bytes(), 1),
    };
    let embedding_elem = match format {
        WeightFormat::Dense(dt) => dt.size_in_bytes(),
        _ => 2,
    };
    let embedding = TensorRole::Embedding.name(Naming::HuggingFace, 0);
    let mut largest = 0u128;
    let mut bytes_of = |s: &TensorSpec| -> Option<u128> {
        let n = s
            .shape
            .iter()
            .try_fold(1u128, |n, &d| n.checked_mul(d as u128))?;
        if s.shape.len() == 1 {
            return n.checked_mul(4);
        }
        largest = largest.max(n);
        if s.name == embedding {
            n.checked_mul(embedding_elem as u128)
        } else {
            n.div_ceil(block as u128).checked_mul(per_block as u128)
        }
    };
    let sum = |specs: Vec<TensorSpec>, bytes_of: &mut dyn FnMut(&TensorSpec) -> Option<u128>| {
        specs
            .iter()
            .try_fold(0u128, |total, s| total.checked_add(bytes_of(s)?))
    };
    let mut total = sum(model_specs(cfg), &mut bytes_of)?;
    if cfg.tie_embeddings {
        // The LM head is a quantized copy of the embedding.
        let head = spec(
            String::new(),
            vec![cfg.vocab_size, cfg.hidden_size],
            Init::Ones,
        );
        total = total.checked_add(bytes_of(&head)?)?;
    }
    let layer = sum(layer_specs(cfg, 0), &mut bytes_of)?;
    total = total.checked_add(layer.checked_mul(cfg.n_layers as u128)?)?;
    total.checked_add(largest.checked_mul(4)?)
}

/// `MemAvailable` of `/proc/meminfo` in bytes, where the system has one.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_bytes_count_every_tensor_as_loaded() {
        // d 64, head dim 16, 4 heads / 2 KV heads, FFN 128, vocab 259, 2 layers, untied.
        let cfg = tiny_config(2, 4, 2);
        // Q4_0 blocks (18 bytes per 32 values): a layer's q, o 128 blocks, k, v 64, gate, up,
        // down 256, plus two f32 norms of 64 values.
        let layer = (2 * 128 + 2 * 64 + 3 * 256) * 18 + 2 * 64 * 4;
        let embedding = 259 * 64 * 2; // f16
        let head = 259 * 64 / 32 * 18 + 64 * 4; // Q4_0 LM head, f32 output norm
        let drawing = 259 * 64 * 4; // the largest matrix, drawn in f32
        let q4 = embedding + head + 2 * layer + drawing;
        assert_eq!(weight_bytes(&cfg, WeightFormat::Auto), Some(q4));
        let dense_layer = (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64 + 2 * 64) * 4;
        let f32 = 3 * 259 * 64 * 4 + 64 * 4 + 2 * dense_layer;
        let dense = WeightFormat::Dense(DType::F32);
        assert_eq!(weight_bytes(&cfg, dense), Some(f32));
        // A tied head is still a quantized copy of the embedding.
        let tied = ModelConfig {
            tie_embeddings: true,
            ..cfg
        };
        assert_eq!(weight_bytes(&tied, WeightFormat::Auto), Some(q4));
        // Shapes past any count overflow to `None`, never wrap.
        let huge = ModelConfig {
            hidden_size: usize::MAX,
            vocab_size: usize::MAX,
            ..tiny_config(2, 4, 2)
        };
        assert_eq!(weight_bytes(&huge, WeightFormat::Auto), None);
    }

    /// A Hugging Face `config.json` of a Llama model written in `dir`: hidden size, layers,
    /// attention heads, KV heads, FFN size, vocabulary, context, in that order.
    fn config_file(dir: &tempfile::TempDir, sizes: [usize; 7]) -> std::path::PathBuf {
        let fields = [
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        ];
        let mut cfg = serde_json::json!({ "architectures": ["LlamaForCausalLM"] });
        for (field, size) in fields.into_iter().zip(sizes) {
            cfg[field] = size.into();
        }
        let path = dir.path().join("config.json");
        std::fs::write(&path, cfg.to_string()).unwrap();
        path
    }

    #[test]
    fn shapes_too_large_for_memory_are_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let path = config_file(&dir, [1_000_000_000, 1000, 8, 8, 10, 10, 10]);
        let Err(e) = crate::load_random(&path, WeightFormat::Auto, 0) else {
            panic!("a model of 2e21 bytes loaded");
        };
        let msg = e.to_string();
        let want = format!(
            "{}: these shapes need 2.3e21 bytes of weights",
            path.display()
        );
        assert!(msg.starts_with(&want), "{msg}");
        assert!(msg.contains("GiB this machine has available"), "{msg}");
        let unknown = ModelError::WeightsTooLarge {
            path: "c.json".into(),
            needed: None,
            available: 64 << 30,
            measured: false,
        };
        assert_eq!(
            unknown.to_string(),
            "c.json: these shapes need more than 3.4e38 bytes of weights, more than the 64 GiB \
             allowed where the machine's available memory cannot be read"
        );
    }

    /// Rows that are not whole 32-value blocks are refused for the quantized formats, naming the
    /// tensor and its width, and load dense.
    #[test]
    fn rows_that_are_not_whole_blocks_are_refused_for_quantized_formats() {
        let dir = tempfile::tempdir().unwrap();
        let path = config_file(&dir, [40, 1, 2, 1, 64, 300, 64]);
        for (format, name) in [
            (WeightFormat::Auto, "Q4_0"),
            (WeightFormat::Quantize(GgmlDType::Q8_0), "Q8_0"),
        ] {
            let Err(e) = crate::load_random(&path, format, 0) else {
                panic!("rows of 40 values loaded as {name}");
            };
            assert_eq!(
                e.to_string(),
                format!(
                    "tensor `model.layers.0.self_attn.q_proj.weight` has rows of 40 values, not a \
                     multiple of 32: it cannot be held as {name} blocks (use --weights f16 or \
                     f32)"
                )
            );
        }
        assert!(crate::load_random(&path, WeightFormat::Dense(DType::F16), 0).is_ok());
    }
}
