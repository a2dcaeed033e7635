//! `cargo xtask dist`: a release build (`--profile dist`: fat LTO, one codegen unit, symbols
//! stripped) for an explicit CPU level (`-C target-cpu=x86-64-v3`, never `native`), packaged as
//! DIR/agate-VERSION-TARGET[-cuda].tar.gz holding the binary, README.md, the licence files and
//! docs/, plus DIR/SHA256SUMS (`sha256sum -c` format) covering every agate tarball in DIR.
//!
//! Invariants: the tarball and SHA256SUMS are written through `engine::atomic` (temporary
//! names and renames); entries are sorted with owner 0 and a fixed mtime, so the same inputs
//! give the same archive.
//! `--binary PATH` packages an already-built binary (tests use it; a fat-LTO build takes minutes).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

/// The CPU level releases are built for (AVX2/FMA: every x86-64 machine of the last decade).
const TARGET_CPU: &str = "x86-64-v3";

/// Flags of `cargo xtask dist`.
#[derive(Args, Debug)]
pub struct DistArgs {
    /// Output directory (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Cargo features of the build (`cuda` for a GPU build; see `cargo xtask kernels`).
    #[arg(long)]
    features: Option<String>,
    /// Package this already-built `agate` binary instead of building one.
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
}

/// Runs `cargo xtask dist`.
pub fn run(args: &DistArgs) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let cuda = args
        .features
        .as_deref()
        .is_some_and(|f| f.split([',', ' ']).any(|x| x == "cuda" || x == "cli/cuda"));
    let binary = match &args.binary {
        Some(b) => {
            if !b.is_file() {
                bail!("--binary {}: no such file", b.display());
            }
            b.clone()
        }
        None => build(&root, args.features.as_deref())?,
    };
    let target = host_target()?;
    let name = format!(
        "agate-{}-{target}{}",
        env!("CARGO_PKG_VERSION"),
        if cuda { "-cuda" } else { "" }
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let tarball = package(&root, &binary, &name, &args.out)?;
    let sums = write_sha256sums(&args.out)?;
    let size = std::fs::metadata(&tarball).map(|m| m.len()).unwrap_or(0);
    say!(
        "xtask: {} ({:.1} MB), {}",
        tarball.display(),
        size as f64 / 1e6,
        sums.display()
    );
    crate::stdout_line(&tarball.display().to_string())?;
    Ok(())
}

/// `cargo build --profile dist -p cli` for x86-64-v3; returns the binary's path.
fn build(root: &Path, features: Option<&str>) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--profile", "dist", "-p", "cli"])
        .current_dir(root)
        // RUSTFLAGS replaces `build.rustflags` (target-cpu=native) of .cargo/config.toml.
        .env("RUSTFLAGS", format!("-C target-cpu={TARGET_CPU}"))
        .env("CARGO_PROFILE_DIST_STRIP", "symbols");
    if let Some(f) = features {
        cmd.args(["--features", &prefixed_features(f)]);
    }
    say!(
        "xtask: RUSTFLAGS='-C target-cpu={TARGET_CPU}' cargo build --profile dist -p cli{}",
        features
            .map(|f| format!(" --features {f}"))
            .unwrap_or_default()
    );
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("the dist build failed ({status})");
    }
    say!(
        "xtask: dist build took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target_dir.join("dist").join("agate"))
}

/// Features of the cli package, written for `-p cli`.
fn prefixed_features(f: &str) -> String {
    f.split([',', ' '])
        .filter(|x| !x.is_empty())
        .map(|x| x.trim_start_matches("cli/").to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The host target triple (`rustc -vV`).
fn host_target() -> anyhow::Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .with_context(|| format!("cannot run {rustc} -vV"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .with_context(|| format!("`{rustc} -vV` printed no host line"))
}

/// Stages `name/` (binary, README.md, licences, docs/) and writes `out/name.tar.gz` atomically.
fn package(root: &Path, binary: &Path, name: &str, out: &Path) -> anyhow::Result<PathBuf> {
    let stage = tempfile::tempdir().context("cannot create a staging directory")?;
    let top = stage.path().join(name);
    std::fs::create_dir_all(&top).with_context(|| format!("cannot create {}", top.display()))?;
    copy(binary, &top.join("agate"))?;
    for f in ["README.md", "LICENSE-MIT", "LICENSE-APACHE"] {
        copy(&root.join(f), &top.join(f))?;
    }
    copy_dir(&root.join("docs"), &top.join("docs"))?;
    let tarball = out.join(format!("{name}.tar.gz"));
    let mut tar = Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-czf",
            "-",
        ])
        .arg("-C")
        .arg(stage.path())
        .arg(name)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run tar")?;
    let mut archive = tar.stdout.take().context("tar has no stdout")?;
    engine::atomic::write_atomically(&tarball, |w| -> anyhow::Result<()> {
        std::io::copy(&mut archive, w)?;
        let status = tar.wait().context("cannot wait for tar")?;
        if !status.success() {
            bail!("tar failed ({status}) writing {}", tarball.display());
        }
        Ok(())
    })?;
    Ok(tarball)
}

/// Writes DIR/SHA256SUMS for every `agate-*.tar.gz` / `.tar.xz` in DIR.
fn write_sha256sums(out: &Path) -> anyhow::Result<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(out)
        .with_context(|| format!("cannot read {}", out.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("agate-") && (n.ends_with(".tar.gz") || n.ends_with(".tar.xz")))
        .collect();
    names.sort();
    let mut text = String::new();
    for n in &names {
        let digest = engine::model_cache::sha256_file(&out.join(n))?;
        text.push_str(&format!("{digest}  {n}\n"));
    }
    let path = out.join("SHA256SUMS");
    engine::atomic::write_atomically(&path, |w| w.write_all(text.as_bytes()))?;
    Ok(path)
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .map(|_| ())
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let entry = entry.with_context(|| format!("cannot read {}", from.display()))?;
        let path = entry.path();
        let dest = to.join(entry.file_name());
        if path.is_dir() {
            copy_dir(&path, &dest)?;
        } else {
            copy(&path, &dest)?;
        }
    }
    Ok(())
}
