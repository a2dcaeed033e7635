//! `cargo xtask kernels`: checks every prerequisite of a CUDA build first — nvcc (on PATH or in
//! $CUDA_HOME/bin) and its release, the compute capability (CUDA_COMPUTE_CAP, default 90 for
//! H100/H200), the CUDA libraries the link needs, and for `--flash-attn` the CUTLASS headers that
//! must be pre-seeded for an offline build — and lists *every* missing item with how to get it
//! (the pip recipe of the GPU notes) before exiting non-zero. With everything present it builds
//! `agate` with `--features cuda` into target/cuda/ (never over target/release/agate) and reports
//! the time taken.
//!
//! Invariant: a plain (non-CUDA) build of the workspace never needs any of this.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

/// The CUDA release the GPU machines' driver (580) runs; PTX from a newer nvcc fails there.
const CUDA_RELEASE: &str = "13.0";
/// The commit of CUTLASS that candle-flash-attn pins.
const CUTLASS_COMMIT: &str = "7d49e6c7e2f8896c47f586706e67e1fb215529dc";
/// Its checkout directory under $CUDAFORGE_HOME.
const CUTLASS_CHECKOUT: &str = "git/checkouts/cutlass-7d49e6c7e2f8896c";

/// How to get a CUDA 13.0 toolchain without a system install.
const RECIPE: &str = "\
how to get a CUDA 13.0 toolchain (no root needed, ~1.2 GB):
  python3 -m pip install \"cuda-toolkit[nvcc,cudart,cublas,curand,nvrtc,cccl,crt,nvvm]==13.0.2\"
  # it lands in site-packages/nvidia/cu13/{bin,include,lib,nvvm}; shape it like a CUDA install:
  scripts/cuda/make_cuda_home.sh \"$HOME/cuda-13.0\"   # links, unversioned libX.so, libcuda.so stub
  export CUDA_HOME=$HOME/cuda-13.0 PATH=$HOME/cuda-13.0/bin:$PATH CUDA_COMPUTE_CAP=90
  export LIBRARY_PATH=$CUDA_HOME/lib64:$CUDA_HOME/lib64/stubs
  cargo xtask kernels
(Debian's nvidia-cuda-toolkit is CUDA 11.8: unusable; see the GPU notes.)";

/// Flags of `cargo xtask kernels`.
#[derive(Args, Debug)]
pub struct KernelsArgs {
    /// Also check for the flash-attn prerequisites (CUTLASS headers for an offline build).
    #[arg(long)]
    flash_attn: bool,
    /// Only check; do not build.
    #[arg(long)]
    check_only: bool,
}

/// Runs `cargo xtask kernels`.
pub fn run(args: &KernelsArgs) -> anyhow::Result<()> {
    let mut missing: Vec<String> = Vec::new();
    let cuda_home = std::env::var_os("CUDA_HOME")
        .or_else(|| std::env::var_os("CUDA_PATH"))
        .map(PathBuf::from);
    check_nvcc(cuda_home.as_deref(), &mut missing);
    let cap = check_compute_cap(&mut missing);
    check_libraries(cuda_home.as_deref(), &mut missing);
    if args.flash_attn {
        check_flash_attn(&mut missing);
    }
    if !missing.is_empty() {
        let mut msg = String::from("cannot build the CUDA kernels; missing:\n");
        for m in &missing {
            msg.push_str(&format!("  - {m}\n"));
        }
        msg.push_str(RECIPE);
        bail!("{msg}");
    }
    if args.check_only {
        say!("xtask: every CUDA prerequisite is present");
        return Ok(());
    }
    build(&cap)
}

/// nvcc, found (on PATH or in `cuda_home/bin`) and of release [`CUDA_RELEASE`]; else what is
/// wrong goes into `missing`.
fn check_nvcc(cuda_home: Option<&Path>, missing: &mut Vec<String>) {
    let nvcc = find_nvcc(cuda_home);
    match &nvcc {
        None => missing.push(format!(
            "nvcc: not on PATH{}",
            match cuda_home {
                Some(h) => format!(" nor in {}/bin", h.display()),
                None => " and CUDA_HOME is not set".into(),
            }
        )),
        Some(path) => match nvcc_release(path) {
            Some(r) if r == CUDA_RELEASE => say!("xtask: nvcc {} (release {r})", path.display()),
            Some(r) => missing.push(format!(
                "nvcc {} is release {r}; build with CUDA {CUDA_RELEASE} exactly (the GPU machines' driver is CUDA {CUDA_RELEASE}; newer PTX fails to load)",
                path.display()
            )),
            None => missing.push(format!(
                "nvcc {} did not report its release (`nvcc --version` failed)",
                path.display()
            )),
        },
    }
}

/// The compute capability to build for (CUDA_COMPUTE_CAP, default 90); one that is not a
/// capability goes into `missing`.
fn check_compute_cap(missing: &mut Vec<String>) -> String {
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    match cap.parse::<u32>() {
        Ok(c) if (50..=130).contains(&c) => say!(
            "xtask: compute capability {c}{}",
            if std::env::var_os("CUDA_COMPUTE_CAP").is_none() {
                " (default: H100/H200)"
            } else {
                ""
            }
        ),
        _ => missing.push(format!(
            "CUDA_COMPUTE_CAP={cap:?} is not a compute capability like 80, 89 or 90 (unset = 90, H100/H200)"
        )),
    }
    cap
}

/// The CUDA libraries the link needs; each one not found goes into `missing`.
fn check_libraries(cuda_home: Option<&Path>, missing: &mut Vec<String>) {
    let lib_dirs = library_dirs(cuda_home);
    for lib in [
        "libcudart.so",
        "libcublas.so",
        "libcublasLt.so",
        "libcurand.so",
        "libcuda.so",
    ] {
        if !lib_dirs.iter().any(|d| d.join(lib).exists()) {
            missing.push(format!(
                "{lib}: not found in {} (LIBRARY_PATH, $CUDA_HOME/lib64, $CUDA_HOME/lib64/stubs){}",
                if lib_dirs.is_empty() {
                    "any library directory".to_string()
                } else {
                    lib_dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                if lib == "libcuda.so" {
                    "; on a machine without a GPU driver, link against a stub"
                } else {
                    ""
                }
            ));
        }
    }
}

/// The flash-attn prerequisites (an offline CUTLASS checkout) and the missing feature, into
/// `missing`.
fn check_flash_attn(missing: &mut Vec<String>) {
    match std::env::var_os("CUDAFORGE_HOME").map(PathBuf::from) {
        None => missing.push(format!(
            "CUTLASS for flash-attn: CUDAFORGE_HOME is not set; pre-seed an offline checkout: \
             pip download nvidia-cutlass==3.5.0.0 (headers identical to commit {CUTLASS_COMMIT}), \
             unpack its include/ into $CUDAFORGE_HOME/{CUTLASS_CHECKOUT}/include and write the commit \
             to $CUDAFORGE_HOME/{CUTLASS_CHECKOUT}/.git/HEAD"
        )),
        Some(home) => {
            let checkout = home.join(CUTLASS_CHECKOUT);
            let head = std::fs::read_to_string(checkout.join(".git/HEAD")).unwrap_or_default();
            if head.trim() != CUTLASS_COMMIT {
                missing.push(format!(
                    "CUTLASS for flash-attn: {} must hold {CUTLASS_COMMIT} (found {:?})",
                    checkout.join(".git/HEAD").display(),
                    head.trim()
                ));
            }
            if !checkout.join("include/cutlass/cutlass.h").exists() {
                missing.push(format!(
                    "CUTLASS for flash-attn: {} is missing; unpack the headers of the nvidia-cutlass==3.5.0.0 wheel there",
                    checkout.join("include/cutlass/cutlass.h").display()
                ));
            }
        }
    }
    missing.push(
        "flash-attn: the workspace has no `flash-attn` feature yet (candle-flash-attn's 53 kernels take \
         ~4-5 h on 2 cores); the cuda build uses candle's matmul attention"
            .into(),
    );
}

/// Builds `agate` with `--features cuda` for compute capability `cap` into target/cuda/.
fn build(cap: &str) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // A separate target directory: the CUDA binary must never replace target/release/agate,
    // which does not start on a machine without libcuda.so.1.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"))
        .join("cuda");
    let started = Instant::now();
    say!(
        "xtask: cargo build --release -p cli --features cuda --target-dir {} (CUDA_COMPUTE_CAP={cap})",
        target_dir.display()
    );
    let status = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "-p",
            "cli",
            "--features",
            "cuda",
            "--target-dir",
        ])
        .arg(&target_dir)
        .env("CUDA_COMPUTE_CAP", cap)
        .current_dir(crate::workspace_root())
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    if !status.success() {
        bail!("cargo build --features cuda failed ({status})");
    }
    say!(
        "xtask: CUDA build done in {:.0} s: {} (carry it to the GPU machine)",
        started.elapsed().as_secs_f64(),
        target_dir.join("release/agate").display()
    );
    Ok(())
}

/// nvcc on PATH, else in `cuda_home/bin`.
fn find_nvcc(cuda_home: Option<&Path>) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(cuda_home.map(|h| h.join("bin")))
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file())
}

/// The `release X.Y` that `nvcc --version` reports.
fn nvcc_release(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let after = text.split("release ").nth(1)?;
    Some(after.split(',').next()?.trim().to_string())
}

/// Directories the linker searches for the CUDA libraries.
fn library_dirs(cuda_home: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(h) = cuda_home {
        dirs.push(h.join("lib64"));
        dirs.push(h.join("lib64/stubs"));
    }
    dirs.retain(|d| !d.as_os_str().is_empty());
    dirs
}
