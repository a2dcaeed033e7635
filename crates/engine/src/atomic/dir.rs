//! Directories written as a whole ([`StagedDir`], model-zoo's [`FileSink`], and [`write_dir`]):
//! files go into a hidden staging directory beside the destination, renamed onto it once all
//! are written; and the directories they need ([`ensure_dir`], [`scratch_dir`]).
//!
//! Invariants: the destination is absent or an empty directory until the rename, then holds
//! every file; a staging directory is removed on drop, and those of killed processes are
//! removed before the next one is made beside the same destination.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use model_zoo::convert::FileSink;

use super::{clean_stale, link_target, named, refused, temp_error, temp_place};

/// Creates the directory `path` and its parents unless they exist; a path that exists and is
/// not a directory is refused with that reason.
pub fn ensure_dir(path: &Path) -> io::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(refused(path, "exists and is not a directory")),
        Err(_) => std::fs::create_dir_all(path).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory => {
                refused(path, "a part of it exists and is not a directory")
            }
            _ => named(path)(e),
        }),
    }
}

/// A hidden working directory beside `path` (`.NAME.agate-tmp.PID.XXXXXX`, its parent created
/// if missing), removed when dropped; those of killed processes are removed first.
pub fn scratch_dir(path: &Path) -> io::Result<tempfile::TempDir> {
    let (parent, prefix) = temp_place(path)?;
    ensure_dir(&parent)?;
    clean_stale(&parent, &prefix);
    tempfile::Builder::new()
        .prefix(&format!("{prefix}{}.", std::process::id()))
        .tempdir_in(&parent)
        .map_err(temp_error(path))
}

/// A directory written as a whole: its files go into a hidden staging directory beside it
/// (`.NAME.agate-tmp.PID.XXXXXX`), which [`StagedDir::commit`] renames onto the destination.
/// Dropping it uncommitted removes the staging directory: no half-written directory is ever
/// left at the destination, which must not exist or be an empty directory (a link to one is
/// followed).
pub struct StagedDir {
    staging: Option<tempfile::TempDir>,
    out: PathBuf,
    files: Vec<String>,
}

impl StagedDir {
    /// Prepares to write the directory `out` (its parent is created if missing).
    pub fn new(out: &Path) -> io::Result<Self> {
        let named = named(out);
        let out = match std::fs::metadata(out) {
            Ok(m) if m.is_dir() => {
                let real = std::fs::canonicalize(out).map_err(&named)?;
                if std::fs::read_dir(&real).map_err(&named)?.next().is_some() {
                    return Err(refused(
                        out,
                        "exists and is not empty; choose a new directory or remove it",
                    ));
                }
                real
            }
            Ok(_) => return Err(refused(out, "exists and is not a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => link_target(out)?,
            Err(e) => return Err(named(e)),
        };
        Ok(StagedDir {
            staging: Some(scratch_dir(&out)?),
            out,
            files: Vec::new(),
        })
    }

    /// Renames the staging directory onto the destination; returns the names of the files
    /// written, sorted.
    pub fn commit(mut self) -> io::Result<Vec<String>> {
        let Some(staging) = self.staging.take() else {
            return Ok(Vec::new());
        };
        let named = named(&self.out);
        if self.out.exists() {
            // Checked empty in `new`; an empty directory is replaced.
            std::fs::remove_dir(&self.out).map_err(&named)?;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o755))
                .map_err(&named)?;
        }
        let kept = staging.keep();
        if let Err(e) = std::fs::rename(&kept, &self.out) {
            let _ = std::fs::remove_dir_all(&kept);
            return Err(named(e));
        }
        self.files.sort();
        Ok(std::mem::take(&mut self.files))
    }
}

impl FileSink for StagedDir {
    fn file(
        &mut self,
        name: &str,
        body: &mut dyn FnMut(&mut dyn Write) -> model_zoo::Result<()>,
    ) -> model_zoo::Result<()> {
        let Some(staging) = &self.staging else {
            return Err(model_zoo::ModelError::Input(format!(
                "{}: already committed",
                self.out.display()
            )));
        };
        let dest = self.out.join(name);
        // The body's writer errors carry no path: they get this file's.
        let label = |e: model_zoo::ModelError| e.written_to(&dest);
        let file = File::create(staging.path().join(name)).map_err(|e| label(e.into()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        body(&mut w).map_err(label)?;
        w.flush().map_err(|e| label(e.into()))?;
        self.files.push(name.to_string());
        Ok(())
    }
}

/// Writes the files `fill` produces as the directory `out` (a [`StagedDir`]); returns their
/// names.
pub fn write_dir(
    out: &Path,
    fill: impl FnOnce(&mut dyn FileSink) -> model_zoo::Result<()>,
) -> crate::Result<Vec<String>> {
    let mut dir = StagedDir::new(out)?;
    fill(&mut dir)?;
    Ok(dir.commit()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_directories_appear_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model");
        let files = write_dir(&out, |sink| {
            sink.file("b.json", &mut |w| Ok(w.write_all(b"{}")?))?;
            sink.file("a.txt", &mut |w| Ok(w.write_all(b"a")?))
        })
        .unwrap();
        assert_eq!(files, ["a.txt", "b.json"]);
        assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"a");
        let err = write_dir(&out, |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("exists and is not empty"), "{err}");
        let failed = dir.path().join("failed");
        let err = write_dir(&failed, |sink| {
            sink.file("a", &mut |w| Ok(w.write_all(b"a")?))?;
            Err(model_zoo::ModelError::Input("stop".into()))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "stop");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["model"], "staging left behind");
    }
}
