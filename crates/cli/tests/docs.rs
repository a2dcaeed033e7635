//! docs/cli.md is generated from the clap definitions (`agate docs`, written by
//! `cargo xtask docs`): this test renders it afresh and fails when the committed file differs, so
//! a new flag or subcommand cannot ship with stale documentation.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use std::process::Command;

#[test]
fn cli_reference_is_up_to_date() {
    let out = Command::new(env!("CARGO_BIN_EXE_agate"))
        .arg("docs")
        .output()
        .expect("run agate docs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fresh = String::from_utf8(out.stdout).expect("UTF-8 help text");
    for sub in ["generate", "chat", "inspect", "bench"] {
        assert!(
            fresh.contains(&format!("## `agate {sub}`")),
            "{sub} missing"
        );
    }
    assert!(
        !fresh.contains("agate docs"),
        "the hidden command is documented"
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/cli.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{} is stale: run `cargo xtask docs` to update it",
        path.display()
    );
}
