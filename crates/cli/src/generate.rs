//! `agate generate`: one prompt, streamed to stdout, with timings on stderr or as one JSON object
//! (`--json`, a stable contract: text, prompt_tokens, generated_tokens, prefill_tokens_per_s,
//! decode_tokens_per_s, positions, kv{tokens_seen, tokens_retained, eviction_ratio, bytes_in_use,
//! bytes_full}).

use clap::Args;
use engine::{GenerateRequest, Positions, SamplingParams};

use crate::args::{load_engine, ModelArgs, SamplingArgs};
use crate::policy_args::PolicyArgs;

/// Flags of `agate generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The prompt (raw text; with --chat, the user's message).
    pub prompt: String,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Stop when this text is produced (repeatable; not empty).
    #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub stop: Vec<String>,
    /// Apply the model's chat template to the prompt.
    #[arg(long)]
    pub chat: bool,
    /// System prompt (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Draw which tokens each layer and KV head kept to this PNG file.
    #[arg(long, value_name = "PNG")]
    pub eviction_map: Option<std::path::PathBuf>,
}

/// Runs `agate generate`.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let sampling = args.sampling.params(SamplingParams::default())?;
    if args.prompt.is_empty() {
        anyhow::bail!("the prompt is empty");
    }
    if let Some(path) = &args.eviction_map {
        crate::plot::check_output(path, "--eviction-map", &["png"])?;
    }
    let choice = args.policy.single()?;
    let engine = load_engine(&args.model)?;
    let mut session = engine.session_with(choice.resolve(&engine)?)?;
    session.set_positions(args.policy.positions_or(Positions::Original))?;
    let request = GenerateRequest {
        max_tokens: args.max_tokens,
        sampling,
        stop: args.stop.clone(),
        stop_at_eos: true,
    };
    let stream = !args.json;
    let mut write_error = None;
    let mut on_text = |t: &str| {
        if !stream {
            return true;
        }
        match out!("{t}") {
            Ok(()) => true,
            Err(e) => {
                write_error = Some(e);
                false
            }
        }
    };
    let generation = if args.chat {
        session.set_system_prompt(args.system.clone())?;
        session.chat(&args.prompt, &request, &mut on_text)
    } else {
        session.complete(&args.prompt, &request, &mut on_text)
    }
    .map_err(|e| crate::errors::under_policy(e.into(), choice.kind()))?;
    if let Some(e) = write_error {
        return Err(e);
    }
    let kv = session.kv_report();
    if args.json {
        let out = serde_json::json!({
            "text": generation.text,
            "prompt_tokens": generation.prompt_tokens,
            "generated_tokens": generation.tokens.len(),
            "finish_reason": generation.finish_reason,
            "prefill_tokens_per_s": generation.prefill_tokens_per_s(),
            "decode_tokens_per_s": generation.decode_tokens_per_s(),
            "time_to_first_token_s": generation.time_to_first_token_secs,
            "model": engine.model_path().display().to_string(),
            "policy": session.policy().name(),
            "positions": session.positions(),
            "kv": kv.to_json(),
        });
        outln!("{out}")?;
    } else {
        outln!()?;
        say!(
            "[prompt {} tok, {:.1} tok/s | generated {} tok, {:.1} tok/s, {} | KV {} of {} tokens retained, {} bytes]",
            generation.prompt_tokens,
            generation.prefill_tokens_per_s(),
            generation.tokens.len(),
            generation.decode_tokens_per_s(),
            generation.finish_reason.describe(),
            kv.tokens_retained,
            kv.tokens_seen,
            kv.bytes_in_use
        );
    }
    // After the answer and its line: the note that follows is on its own line.
    if let Some(path) = &args.eviction_map {
        draw_eviction_map(path, &session, kv.tokens_seen)?;
    }
    Ok(())
}

/// Draws which tokens each layer and KV head of `session` kept to `path`.
fn draw_eviction_map(
    path: &std::path::Path,
    session: &engine::Session,
    tokens_seen: usize,
) -> anyhow::Result<()> {
    let store = session.kv();
    let kept: Vec<Vec<Vec<u32>>> = (0..store.n_layers())
        .map(|l| {
            (0..store.n_kv_heads())
                .map(|h| store.positions(l, h))
                .collect()
        })
        .collect();
    crate::plot::eviction_map_png(path, tokens_seen, &kept)?;
    say!(
        "eviction map written to {}: one band per layer (layer 0 on top), one row per KV head, one column per token (scaled to at most 2048); dark = kept, light = evicted",
        path.display()
    );
    Ok(())
}
