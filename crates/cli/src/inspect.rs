//! `agate inspect`: what a model is — architecture, sizes, context, KV bytes per token — as a
//! table or JSON.

use clap::Args;

use crate::args::{load_engine, ModelArgs};

/// Flags of `agate inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `agate inspect`.
pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let engine = load_engine(&args.model)?;
    let cfg = engine.model_config();
    // Built-in trained gates apply only to the exact model they were trained for.
    let gates = engine::train::default_gates::for_engine(&engine)?.map(|g| {
        let c = g.config();
        format!(
            "built-in Attention-Gate ({} layers × {} heads of dim {}, threshold {:.4}, sinks {}, window {}); --policy ag uses it",
            c.n_layers, c.heads, c.head_dim, c.threshold, c.sinks, c.recent
        )
    });
    let kv_per_token = cfg.kv_bytes_per_token(engine.config().kv_dtype);
    let params = cfg.vocab_size * cfg.hidden_size * if cfg.tie_embeddings { 1 } else { 2 }
        + cfg.n_layers
            * (cfg.hidden_size * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
                + 3 * cfg.hidden_size * cfg.intermediate_size
                + 2 * cfg.hidden_size)
        + cfg.hidden_size;
    let info = serde_json::json!({
        "model": engine.model_path().display().to_string(),
        "format": engine.source_kind(),
        "config": cfg,
        "parameters": params,
        "kv_dtype": engine.config().kv_dtype.name(),
        "kv_bytes_per_token": kv_per_token,
        "kv_bytes_full_context": kv_per_token * cfg.max_position,
        "gates": gates,
    });
    if args.json {
        outln!("{info}")?;
        return Ok(());
    }
    outln!("model          {}", engine.model_path().display())?;
    outln!(
        "architecture   {:?} ({:?})",
        cfg.architecture,
        engine.source_kind()
    )?;
    outln!("parameters     {:.1} M", params as f64 / 1e6)?;
    outln!("layers         {}", cfg.n_layers)?;
    outln!(
        "hidden / ffn   {} / {}",
        cfg.hidden_size,
        cfg.intermediate_size
    )?;
    outln!(
        "heads          {} query, {} KV (group {}), head dim {}",
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.group_size(),
        cfg.head_dim
    )?;
    outln!("vocabulary     {}", cfg.vocab_size)?;
    outln!(
        "context        {} tokens (rope theta {})",
        cfg.max_position,
        cfg.rope_theta
    )?;
    outln!(
        "KV per token   {} bytes ({:?})",
        kv_per_token,
        engine.config().kv_dtype
    )?;
    outln!(
        "KV full ctx    {:.1} MiB",
        (kv_per_token * cfg.max_position) as f64 / (1 << 20) as f64
    )?;
    outln!(
        "gates          {}",
        gates.as_deref().unwrap_or(
            "none for this model (--policy ag needs --gates FILE; see docs/training.md)"
        )
    )?;
    Ok(())
}
