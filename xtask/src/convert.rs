//! `cargo xtask convert`: GGUF → Hugging Face directory (dequantized, q/k permutation undone) or a
//! dtype cast of a safetensors checkpoint, with `--gates FILE` merged in. The work is done by
//! `model_zoo::convert` (streaming) into an `engine::atomic::StagedDir` (a hidden directory
//! renamed onto the output when complete); this file owns the flags, the per-tensor progress
//! bar and cancellation: Ctrl-C stops between tensors and removes the partial output. Gates
//! to merge are first checked against the input model as `agate --gates` checks them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::DType;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use model_zoo::convert::{self, ConvertEvent, ConvertOptions};
use model_zoo::ModelError;

/// Output file layout.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Layout {
    /// A Hugging Face directory: config.json, model.safetensors, tokenizer.json,
    /// tokenizer_config.json.
    Safetensors,
}

/// Output dtype.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OutDType {
    /// 32-bit float (exact dequantization).
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl OutDType {
    fn dtype(self) -> DType {
        match self {
            OutDType::F32 => DType::F32,
            OutDType::F16 => DType::F16,
            OutDType::Bf16 => DType::BF16,
        }
    }
}

/// Flags of `cargo xtask convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Output layout.
    #[arg(long, value_enum, default_value = "safetensors")]
    to: Layout,
    /// Output dtype of floating-point tensors.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: OutDType,
    /// Output directory (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Input: a GGUF file, a .safetensors file or a Hugging Face directory. Default: the default
    /// model (fetched if missing).
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
    /// A gates file trained for the --from model (checked as `agate --gates` checks it: model
    /// identity, shapes, finite values), merged into model.safetensors under `gates.` with its
    /// metadata (keys prefixed `gates.`), for tools that read gates from the checkpoint. agate
    /// itself does not load merged gates, and gates are tied to the weights they were trained
    /// on: `--policy ag` on the converted directory needs a gates file trained for it
    /// (`agate train-gates --model DIR`), passed with --gates.
    #[arg(long, value_name = "FILE")]
    gates: Option<PathBuf>,
    /// Testing only: fail after writing this many tensors (checks that nothing is left behind).
    #[arg(long, hide = true)]
    fail_after_tensors: Option<usize>,
}

/// Runs `cargo xtask convert`.
pub fn run(args: &ConvertArgs) -> anyhow::Result<()> {
    let Layout::Safetensors = args.to;
    let src = match &args.from {
        Some(p) => p.clone(),
        None => engine::model_cache::ensure_default_model(&mut |l| say!("xtask: {l}"))?,
    };
    if !src.exists() {
        bail!("--from {}: no such file or directory", src.display());
    }
    if let Some(g) = &args.gates {
        if !g.is_file() {
            bail!("--gates {}: no such file", g.display());
        }
        check_gates(&src, g)?;
    }
    let opts = ConvertOptions {
        dtype: args.dtype.dtype(),
        gates: args.gates.clone(),
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // Only fails if a handler is already installed, which cannot happen in this process.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} tensors  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut on_event = progress(&bar, &interrupted, args.fail_after_tensors);
    let started = Instant::now();
    say!(
        "xtask: converting {} → {} ({:?})",
        src.display(),
        args.out.display(),
        args.dtype
    );
    let mut out = engine::atomic::StagedDir::new(&args.out)?;
    let summary = convert::convert(&src, &mut out, &opts, &mut on_event);
    bar.finish_and_clear();
    let summary = summary.with_context(|| {
        format!(
            "conversion of {} failed; nothing was written to {}",
            src.display(),
            args.out.display()
        )
    })?;
    out.commit()?;
    report(&summary, started);
    crate::stdout_line(&args.out.display().to_string())
}

/// Refuses gates not trained for the model `src`, with the check and the message of `agate
/// --gates`: the file's model identity against `src`'s (architecture, shape, weights
/// fingerprint). A bare safetensors file has no config to check against.
fn check_gates(src: &Path, gates: &Path) -> anyhow::Result<()> {
    if src.is_file() && src.extension().is_some_and(|x| x == "safetensors") {
        bail!(
            "--gates {}: {} is a bare safetensors file without its config.json, so the gates \
             cannot be checked against it; convert its Hugging Face directory instead",
            gates.display(),
            src.display()
        );
    }
    let cfg = model_zoo::read_config(src)?;
    let identity = cfg.gate_identity(&engine::model_cache::weights_fingerprint(src)?);
    engine::AttentionGate::load(gates, &identity, &candle_core::Device::Cpu)?;
    Ok(())
}

/// The progress callback of a conversion: moves `bar`, and cancels once Ctrl-C has set
/// `interrupted` or after `fail_after` tensors (`--fail-after-tensors`).
fn progress<'a>(
    bar: &'a ProgressBar,
    interrupted: &'a AtomicBool,
    fail_after: Option<usize>,
) -> impl FnMut(ConvertEvent<'_>) -> model_zoo::Result<()> + 'a {
    move |e| {
        match e {
            ConvertEvent::Start { tensors } => bar.set_length(tensors as u64),
            ConvertEvent::Tensor { index, name } => {
                bar.set_position(index as u64);
                bar.set_message(name.to_string());
                if fail_after.is_some_and(|n| index >= n) {
                    return Err(ModelError::Input(format!(
                        "injected failure after {index} tensors (--fail-after-tensors)"
                    )));
                }
            }
        }
        if interrupted.load(Ordering::SeqCst) {
            return Err(ModelError::Input("interrupted".into()));
        }
        Ok(())
    }
}

/// Says what a conversion wrote, and what it left out.
fn report(summary: &convert::ConvertSummary, started: Instant) {
    say!(
        "xtask: wrote {} tensors ({:.1} MB) in {:.1} s: {}",
        summary.tensors,
        summary.tensor_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        summary.files.join(", ")
    );
    if !summary.skipped.is_empty() {
        say!(
            "xtask: not carried over (derived from config.json by loaders): {}",
            summary.skipped.join(", ")
        );
    }
    if summary.gate_tensors > 0 {
        say!(
            "xtask: merged {} gate tensors under `{}`",
            summary.gate_tensors,
            convert::GATES_PREFIX
        );
    }
}
