//! `cargo xtask convert`: GGUF → Hugging Face directory (dequantized, q/k permutation undone) or a
//! dtype cast of a safetensors checkpoint, with `--gates FILE` merged in. The work is done by
//! `model_zoo::convert` (streaming) into an `engine::atomic::StagedDir` (a hidden directory
//! renamed onto the output when complete); this file owns the flags, the per-tensor progress
//! bar and cancellation: Ctrl-C stops between tensors and removes the partial output.

use std::path::PathBuf;
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
    /// A safetensors file of trained gates, merged into model.safetensors under `gates.` with its
    /// metadata (keys prefixed `gates.`).
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
