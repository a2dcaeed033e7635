//! `agate init-gates`: writes randomly initialised Attention-Gate parameters for a model, bound
//! to its identity — enough to exercise `--policy ag` before gates are trained.

use std::path::PathBuf;

use clap::Args;
use engine::GateFileDtype;

use crate::args::{load_engine, ModelArgs};

/// Flags of `agate init-gates`.
#[derive(Args, Debug)]
pub struct InitGatesArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output file (safetensors), written atomically.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Initial keep logit (+3 keeps almost everything, as training starts; 0 starts near a
    /// coin flip, to see eviction happen).
    #[arg(long, allow_negative_numbers = true)]
    pub bias: Option<f32>,
    /// The gate's own attention window in tokens (0: unbounded; default 64).
    #[arg(long, value_name = "TOKENS")]
    pub attention_window: Option<usize>,
}

/// Runs `agate init-gates`.
pub fn run(args: &InitGatesArgs) -> anyhow::Result<()> {
    if let Some(b) = args.bias {
        anyhow::ensure!(b.is_finite(), "--bias must be a finite number, got {b}");
    }
    crate::plot::check_writable(&args.out, "--out")?;
    let engine = load_engine(&args.model)?;
    let mut gate_cfg = engine.gate_config();
    gate_cfg.bias_init = args.bias.unwrap_or(gate_cfg.bias_init);
    gate_cfg.attention_window = args.attention_window.unwrap_or(gate_cfg.attention_window);
    let gates = engine.random_gates(&gate_cfg, args.seed)?;
    engine::train::write_gates(&gates, &args.out, GateFileDtype::F32)?;
    let cfg = gates.config();
    say!(
        "wrote random gates ({} layers × {} heads of dim {}, attention window {}, keep bias {}) to {}",
        cfg.n_layers,
        cfg.heads,
        cfg.head_dim,
        cfg.attention_window,
        cfg.bias_init,
        args.out.display()
    );
    Ok(())
}
