//! Hostile input through the binary, one test per class and one file per area: broken model
//! and gate files (`models`: corrupt GGUF structure, metadata outside its meaning, NaN weights
//! and gates fail with one line naming the file, field or tensor and value); flags and sizes
//! (`flags`: sizes that overflow are refused before any work, stdout write errors end the
//! program with status 1, flags a policy ignores and absurd values are refused naming the
//! flag); outputs, sessions and training runs (`runs`: output paths that are links, FIFOs or
//! devices are written through, never replaced, and stale temporaries of a killed run are
//! removed; a chat whose pool runs out keeps its state, one given a line that is not UTF-8 goes
//! on, and a bounded chat in cache positions runs past the context; train-gates checkpoints are
//! checksummed, its log is never left with holes, and Ctrl-C ends it with status 130). No
//! output may contain `panicked`.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

#[path = "../common/mod.rs"]
mod common;
mod flags;
mod models;
mod runs;
