//! The hidden `agate docs` command: renders the long help of `agate` and of every (non-hidden)
//! subcommand, recursively, as Markdown — the text of docs/cli.md. `cargo xtask docs` writes it;
//! a test fails when docs/cli.md differs from a fresh rendering.
//!
//! Invariant: the output depends only on the clap definitions (fixed width 100, no colours, no
//! terminal queries, trailing spaces trimmed), so it is the same on every machine.

use clap::Command;

/// The Markdown reference of `cmd` and its subcommands.
pub fn render(mut cmd: Command) -> String {
    cmd = cmd.term_width(100);
    cmd.build();
    let mut out = String::from(
        "# `agate` command-line reference\n\n\
         <!-- Generated from the clap definitions by `cargo xtask docs`; do not edit by hand. \
         A test (crates/cli/tests/docs.rs) fails when this file is stale. -->\n",
    );
    section(&cmd, &mut out);
    out
}

fn section(cmd: &Command, out: &mut String) {
    let name = cmd.get_bin_name().unwrap_or_else(|| cmd.get_name());
    let help = cmd.clone().render_long_help().to_string();
    // Trailing spaces (clap pads blank lines) would not survive editors and patches.
    let help: Vec<&str> = help.lines().map(str::trim_end).collect();
    out.push_str(&format!(
        "\n## `{name}`\n\n```text\n{}\n```\n",
        help.join("\n").trim_end()
    ));
    for sub in cmd.get_subcommands() {
        if !sub.is_hide_set() && sub.get_name() != "help" {
            section(sub, out);
        }
    }
}
