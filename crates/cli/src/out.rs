//! The `agate` binary's two output streams. Results go to stdout through [`outln!`] and
//! [`out!`], which return an error when stdout cannot be written (a full disk, `/dev/full`): the
//! command then ends with `error: cannot write to standard output: …` and status 1, never a
//! panic (a closed pipe ends the program quietly, as SIGPIPE's default does). Diagnostics go to
//! stderr through [`say!`], which ignores write errors: there is nowhere left to report them.

use std::io::Write;

use anyhow::Context;

/// Writes `args` to stdout and flushes (streamed text must appear at once).
pub fn stdout(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.flush())
        .context("cannot write to standard output")
}

/// Writes `args` to stderr; errors are ignored.
pub fn stderr(args: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `print!` to stdout that returns `anyhow::Result<()>` instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => { $crate::out::stdout(format_args!($($arg)*)) };
}

/// `println!` to stdout that returns `anyhow::Result<()>` instead of panicking.
macro_rules! outln {
    () => { $crate::out::stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out::stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprintln!` that never panics.
macro_rules! say {
    () => { $crate::out::stderr(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out::stderr(format_args!("{}\n", format_args!($($arg)*))) };
}
