//! Atomic file writes. Every file agate writes (training data, checkpoints, gates and adapters
//! through the trainer, reports and plots through the CLI) goes through [`write_atomically`],
//! so a crash never leaves a half-written file at the destination.
//!
//! Invariant: the content goes to a temporary file in the destination's directory, which is
//! flushed, synced, made an ordinary readable file (0644 on Unix; temporary files start 0600)
//! and renamed over the destination; on any error the temporary file is removed and the
//! destination is untouched.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Writes `path` atomically with `write`. Errors of the file system name `path`.
pub fn write_atomically<E: From<std::io::Error>>(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&mut File>) -> Result<(), E>,
) -> Result<(), E> {
    let named =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(named)?;
    {
        let mut buffered = BufWriter::new(tmp.as_file_mut());
        write(&mut buffered)?;
        buffered.flush().map_err(named)?;
    }
    tmp.as_file().sync_all().map_err(named)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(named)?;
    }
    tmp.persist(path).map_err(|e| named(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_files_and_leaves_the_old_one_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.json");
        write_atomically(&path, |w| w.write_all(b"first")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
        let err = write_atomically(&path, |w| {
            w.write_all(b"half of a second")?;
            Err(std::io::Error::other("the writer failed"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "the writer failed");
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "temporary file left behind: {left:?}");
        let missing = dir.path().join("no-such-dir").join("x");
        let err = write_atomically(&missing, |w| w.write_all(b"x")).unwrap_err();
        assert!(err.to_string().contains("no-such-dir"), "{err}");
    }
}
