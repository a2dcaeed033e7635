//! Every file agate writes is written here: reports, plots, task files, training logs,
//! checkpoints, gates and adapters ([`write_atomically`], [`AppendLog`]), the default model and
//! its stamp, training data, and directories of files such as converted or random models
//! ([`StagedDir`], which is model-zoo's [`FileSink`]: model-zoo and gate-core produce bytes and
//! never open a file for writing).
//!
//! What a destination path gets:
//! - a new path or a regular file: the content goes to a temporary file beside it
//!   (`.NAME.agate-tmp.PID.XXXXXX`), flushed and synced, then renamed over it, so a reader never
//!   sees half a file and a failed write leaves the old file untouched. An existing file keeps
//!   its permissions (a new one is 0644); one the user may not write is refused, as a shell
//!   redirection refuses it;
//! - a symbolic link (to a link, ...): followed, and its final target is written as above, so
//!   the link stays a link; a dangling link creates its target;
//! - a FIFO or a character device (`/dev/null`, `/dev/stdout`, a terminal, `/dev/full`): written
//!   through in place, where no rename could be right; a write error is an error naming the path;
//!   a FIFO that no process reads is refused at once rather than waited on forever;
//! - a directory, a socket or a block device: refused, with the reason.
//!
//! Temporary files and staging directories that a killed process left beside a destination
//! (their PID runs no more) are removed the next time that destination is written. I/O errors
//! name the path. Single files are written here; directories written as a whole (staged, then
//! renamed) in the `dir` submodule.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

mod dir;

pub use dir::{ensure_dir, scratch_dir, write_dir, StagedDir};

/// Most symbolic links followed from one destination.
const MAX_LINKS: usize = 40;

/// An I/O error whose message starts with the path it concerns.
fn named(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn refused(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: {why}", path.display()),
    )
}

/// How a destination is written.
enum Target {
    /// A regular file (the final target of any links), replaced by a rename.
    Replace(PathBuf, std::fs::Permissions),
    /// Nothing there yet: created by a rename.
    Create(PathBuf),
    /// A FIFO or character device: written in place.
    Through(PathBuf),
}

/// Decides how `path` is written (see the module header).
fn resolve(path: &Path) -> io::Result<Target> {
    let named = named(path);
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {
            let real = std::fs::canonicalize(path).map_err(&named)?;
            // Refuse what a shell redirection would refuse, without touching the file.
            OpenOptions::new().write(true).open(&real).map_err(&named)?;
            Ok(Target::Replace(real, m.permissions()))
        }
        Ok(m) if m.is_dir() => Err(refused(path, "is a directory")),
        Ok(m) => special(path, &m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Target::Create(link_target(path)?)),
        Err(e) => Err(named(e)),
    }
}

#[cfg(unix)]
fn special(path: &Path, m: &std::fs::Metadata) -> io::Result<Target> {
    use std::os::unix::fs::FileTypeExt;
    let ft = m.file_type();
    if ft.is_fifo() || ft.is_char_device() {
        Ok(Target::Through(path.to_path_buf()))
    } else if ft.is_block_device() {
        Err(refused(
            path,
            "is a block device; agate does not write to disks",
        ))
    } else if ft.is_socket() {
        Err(refused(path, "is a socket"))
    } else {
        Err(refused(path, "is not a regular file"))
    }
}

#[cfg(not(unix))]
fn special(path: &Path, _: &std::fs::Metadata) -> io::Result<Target> {
    Err(refused(path, "is not a regular file"))
}

/// Checks, before any work, that [`write_atomically`] could write `path`: what it refuses is
/// refused now (a folder, a socket, a file the user may not write), and for a new path or a
/// regular file a temporary file is created in its folder (and removed), so a missing or
/// read-only folder is found before hours of work rather than after. FIFOs and devices are
/// not opened (opening may block or consume).
pub fn check_writable(path: &Path) -> io::Result<()> {
    let target = match resolve(path)? {
        Target::Through(_) => return Ok(()),
        Target::Create(p) | Target::Replace(p, _) => p,
    };
    let (dir, prefix) = temp_place(&target)?;
    if !dir.is_dir() {
        return Err(refused(
            path,
            &format!("the directory {} does not exist", dir.display()),
        ));
    }
    tempfile::Builder::new()
        .prefix(&format!("{prefix}{}.", std::process::id()))
        .tempfile_in(&dir)
        .map(drop)
        .map_err(temp_error(path))
}

/// Where a missing destination is created: itself, or the final target of a dangling link.
fn link_target(path: &Path) -> io::Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = std::fs::read_link(&p).map_err(named(&p))?;
                p = match p.parent() {
                    Some(dir) if link.is_relative() => dir.join(link),
                    _ => link,
                };
            }
            _ => return Ok(p),
        }
    }
    Err(refused(path, "too many levels of symbolic links"))
}

/// The directory a temporary file for `path` goes in, and the prefix of its name.
fn temp_place(path: &Path) -> io::Result<(PathBuf, String)> {
    let name = path
        .file_name()
        .ok_or_else(|| refused(path, "does not name a file"))?
        .to_string_lossy()
        .into_owned();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, format!(".{name}.agate-tmp.")))
}

/// Removes what earlier, killed processes left in `dir` under `prefix` (`prefix` + PID + `.`).
fn clean_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || process_runs(pid) {
            continue;
        }
        let path = entry.path();
        // Best effort: another process may be cleaning the same entry.
        let _ = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
    }
}

/// Whether a process with this PID runs (where that cannot be known, it is assumed to).
fn process_runs(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// A writer whose errors name the destination they were writing.
struct NamedWriter<'a, W> {
    inner: W,
    path: &'a Path,
}

impl<W: Write> Write for NamedWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).map_err(named(self.path))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().map_err(named(self.path))
    }
}

/// Writes `path` with `write` as the module header describes: atomically for new paths and
/// regular files (through symbolic links), in place for FIFOs and character devices. On any
/// error the destination is as it was (a FIFO or device may have received part of the output).
/// Errors of the file system, the writer's included, name the path.
pub fn write_atomically<E: From<io::Error>>(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<(), E>,
) -> Result<(), E> {
    match resolve(path)? {
        Target::Through(p) => {
            let file = open_through(&p)?;
            let mut w = NamedWriter {
                inner: BufWriter::new(file),
                path,
            };
            write(&mut w)?;
            w.flush()?;
            Ok(())
        }
        Target::Create(p) => replace(&p, None, write),
        Target::Replace(p, perms) => replace(&p, Some(perms), write),
    }
}

/// Opens a FIFO or character device for writing. A FIFO without a reader is refused (a plain
/// open would wait for one forever); the file is blocking once open.
#[cfg(unix)]
fn open_through(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let file = match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            return Err(refused(
                path,
                "is a FIFO that no process is reading; start its reader first",
            ))
        }
        other => other.map_err(named(path))?,
    };
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is a valid descriptor owned by `file` for the duration of both calls, and
    // F_GETFL/F_SETFL only read and set its status flags.
    let cleared = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) >= 0
    };
    if !cleared {
        return Err(named(path)(io::Error::last_os_error()));
    }
    Ok(file)
}

#[cfg(not(unix))]
fn open_through(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(named(path))
}

/// The temporary-file-and-rename write of a regular destination `path`.
fn replace<E: From<io::Error>>(
    path: &Path,
    perms: Option<std::fs::Permissions>,
    write: impl FnOnce(&mut dyn Write) -> Result<(), E>,
) -> Result<(), E> {
    let named = named(path);
    let (dir, prefix) = temp_place(path)?;
    if !dir.is_dir() {
        return Err(refused(
            path,
            &format!("the directory {} does not exist", dir.display()),
        )
        .into());
    }
    clean_stale(&dir, &prefix);
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!("{prefix}{}.", std::process::id()))
        .tempfile_in(&dir)
        .map_err(temp_error(path))?;
    {
        let mut w = NamedWriter {
            inner: BufWriter::new(tmp.as_file_mut()),
            path,
        };
        write(&mut w)?;
        w.flush()?;
    }
    tmp.as_file().sync_all().map_err(&named)?;
    let perms = match perms {
        Some(p) => p,
        None => new_file_permissions(tmp.as_file()).map_err(&named)?,
    };
    tmp.as_file().set_permissions(perms).map_err(&named)?;
    tmp.persist(path).map_err(|e| temp_error(path)(e.error))?;
    // The rename is durable once the directory is synced; a failure here loses nothing.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// 0644 on Unix: temporary files start private, results are ordinary readable files. Elsewhere
/// the temporary `file`'s own permissions, made writable.
fn new_file_permissions(file: &File) -> io::Result<std::fs::Permissions> {
    #[cfg(unix)]
    {
        let _ = file;
        use std::os::unix::fs::PermissionsExt;
        Ok(std::fs::Permissions::from_mode(0o644))
    }
    #[cfg(not(unix))]
    {
        let mut p = file.metadata()?.permissions();
        p.set_readonly(false);
        Ok(p)
    }
}

/// A temporary file or directory could not be made beside `path` (or renamed onto it): the
/// cause, named by `path`, without the temporary name tempfile adds to its errors.
fn temp_error(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| {
        let cause = e
            .get_ref()
            .and_then(|inner| inner.source())
            .map_or_else(|| e.to_string(), ToString::to_string);
        io::Error::new(e.kind(), format!("{}: {cause}", path.display()))
    }
}

/// A log written line by line: its first content as [`write_atomically`] writes files, then
/// appended to (regular files: the link's final target, opened for appending; FIFOs and
/// devices: the same handle kept open).
pub struct AppendLog {
    file: File,
    path: PathBuf,
}

impl AppendLog {
    /// Writes `initial` to `path` (see the module header) and opens it for appending.
    pub fn start(path: &Path, initial: &[u8]) -> io::Result<Self> {
        let target = resolve(path)?;
        let file = match &target {
            Target::Through(p) => {
                let mut f = open_through(p)?;
                f.write_all(initial).map_err(named(p))?;
                f
            }
            Target::Create(p) | Target::Replace(p, _) => {
                write_atomically(p, |w| w.write_all(initial))?;
                OpenOptions::new().append(true).open(p).map_err(named(p))?
            }
        };
        Ok(AppendLog {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends `line` and a newline, flushed.
    pub fn line(&mut self, line: &str) -> io::Result<()> {
        let named = named(&self.path);
        self.file
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(named)
    }
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
        assert!(
            err.to_string().ends_with("no-such-dir does not exist"),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn links_stay_links_modes_stay_and_stale_temporaries_go() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.txt");
        std::fs::write(&target, "old").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link.txt");
        std::os::unix::fs::symlink("target.txt", &link).unwrap();
        // A temporary file of a process that no longer runs (PIDs stop at 2^22 on Linux).
        let stale = dir.path().join(".target.txt.agate-tmp.4194999.abc");
        std::fs::write(&stale, "x").unwrap();
        write_atomically(&link, |w| w.write_all(b"new")).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!stale.exists(), "stale temporary file kept");
        // A dangling link creates its target.
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink("created.txt", &dangling).unwrap();
        write_atomically(&dangling, |w| w.write_all(b"made")).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("created.txt")).unwrap(),
            "made"
        );
        // A FIFO nobody reads is refused at once, not waited on.
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let err = write_atomically(&fifo, |w| w.write_all(b"x")).unwrap_err();
        assert!(err.to_string().contains("no process is reading"), "{err}");
        // Devices are written through; a directory is refused.
        write_atomically(Path::new("/dev/null"), |w| w.write_all(b"gone")).unwrap();
        assert!(Path::new("/dev/null").exists());
        let err = write_atomically(dir.path(), |w| w.write_all(b"x")).unwrap_err();
        assert!(err.to_string().ends_with("is a directory"), "{err}");
        let full = Path::new("/dev/full");
        if full.exists() {
            let err = write_atomically(full, |w| w.write_all(&[0; 1 << 16])).unwrap_err();
            assert!(err.to_string().starts_with("/dev/full: "), "{err}");
        }
    }
}
