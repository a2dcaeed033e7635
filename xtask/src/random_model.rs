//! `cargo xtask random-model`: writes a small random Llama model (a Hugging Face directory:
//! `config.json`, `model.safetensors`, byte-level `tokenizer.json`, `tokenizer_config.json` with
//! a ChatML template) through `engine::atomic`, to try `agate` without the default model: any
//! context length, shape and seed. The same flags always write the same bytes.

use std::path::PathBuf;

use clap::Args;

/// Flags of `cargo xtask random-model`.
#[derive(Args, Debug)]
pub struct RandomModelArgs {
    /// Output directory (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Decoder layers.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    layers: u64,
    /// Query heads (head dim 16).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    heads: u64,
    /// KV heads (must divide --heads).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    kv_heads: u64,
    /// Context length (positions).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    context: u64,
    /// Seed of the weights.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// Runs `cargo xtask random-model`.
pub fn run(args: &RandomModelArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.heads.is_multiple_of(args.kv_heads),
        "--kv-heads {} must divide --heads {}",
        args.kv_heads,
        args.heads
    );
    let mut cfg = model_zoo::random::tiny_config(
        args.layers as usize,
        args.heads as usize,
        args.kv_heads as usize,
    );
    cfg.max_position = args.context as usize;
    let files = engine::atomic::write_dir(&args.out, |sink| {
        model_zoo::random::write_random_model(sink, &cfg, args.seed)
    })?;
    say!(
        "xtask: wrote a random model ({} layers, {} heads / {} KV heads, context {}): {}",
        args.layers,
        args.heads,
        args.kv_heads,
        args.context,
        files.join(", ")
    );
    crate::stdout_line(&args.out.display().to_string())
}
