//! Flag groups shared by several `agate` commands: which model and how to hold it, and how to
//! sample. Every value is validated before any work starts; errors name the flag and the value.

use std::path::PathBuf;

use clap::Args;
use engine::{EngineConfig, KvDtype, SamplingParams, WeightFormat};

/// Which model to load and how.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face directory (config.json, *.safetensors, tokenizer.json).
    /// Default: SmolLM2-135M-Instruct, fetched into $AGATE_HOME on first use.
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Weights in memory: auto (quantized; slow GGUF types re-quantized to q8_0), stored, q8_0,
    /// q4_0, f32, f16, bf16.
    #[arg(long, default_value = "auto", value_parser = WeightFormat::parse)]
    pub weights: WeightFormat,
    /// KV cache element type: f32, f16, bf16, q8_0 (8-bit codes with an f16 scale per 32
    /// values: 0.53x the bytes of f16) or q4_0 (4-bit codes: 0.28x).
    #[arg(long, default_value = "f16", value_parser = parse_kv_dtype)]
    pub kv_dtype: KvDtype,
    /// KV memory budget shared by all sessions, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_memory_mb: u64,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub block_size: u64,
    /// Random weights of a Hugging Face config.json's shapes instead of a model's files, held as
    /// --weights asks (auto: Q4_0): for measuring the speed of a model you do not have (agate
    /// bench); the text it produces means nothing. Shapes whose weights would not fit in the
    /// memory available are refused before anything is allocated.
    #[arg(long, value_name = "CONFIG", conflicts_with = "model")]
    pub dummy_weights: Option<PathBuf>,
}

impl ModelArgs {
    /// The engine settings these flags describe.
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            model: self.model.clone(),
            weights: self.weights,
            kv_dtype: self.kv_dtype,
            block_size: self.block_size as usize,
            kv_memory_mb: self.kv_memory_mb as usize,
            dummy_weights: self.dummy_weights.clone(),
            ..EngineConfig::default()
        }
    }
}

fn parse_kv_dtype(s: &str) -> Result<KvDtype, String> {
    s.parse::<KvDtype>().map_err(|e| e.to_string())
}

/// Sampling flags. Unset values fall back to the command's defaults.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Temperature; 0 = greedy.
    #[arg(long = "temp", allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Drop tokens below min-p × the top probability, in [0, 1).
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// Repetition penalty (> 0; 1 = off).
    #[arg(long, allow_negative_numbers = true)]
    pub repeat_penalty: Option<f32>,
    /// Tokens the repetition penalty looks back over.
    #[arg(long)]
    pub repeat_last_n: Option<usize>,
    /// Random seed.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The parameters, over `defaults`, validated.
    pub fn params(&self, defaults: SamplingParams) -> anyhow::Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repetition_penalty: self.repeat_penalty.unwrap_or(defaults.repetition_penalty),
            repeat_last_n: self.repeat_last_n.unwrap_or(defaults.repeat_last_n),
            seed: self.seed.unwrap_or(defaults.seed),
        };
        if let Some((field, why)) = p.invalid_field() {
            let flag = match field {
                "temperature" => "--temp",
                "top_p" => "--top-p",
                "min_p" => "--min-p",
                _ => "--repeat-penalty",
            };
            anyhow::bail!("{flag}: {why}");
        }
        Ok(p)
    }
}

/// Loads the engine, telling the user on stderr when the default model is being fetched.
pub fn load_engine(args: &ModelArgs) -> anyhow::Result<engine::Engine> {
    Ok(engine::Engine::builder()
        .config(args.engine_config())
        .on_progress(|line| say!("agate: {line}"))
        .build()?)
}
