//! The `agate` binary: argument parsing and dispatch. Every error reaches the user as one line
//! (`error: …`, each cause once) and a non-zero exit status; no panic is expected to escape.

#[macro_use]
mod out;

mod args;
mod bench;
mod bench_serve;
mod chat;
mod docs;
mod errors;
mod eval;
mod generate;
mod init_gates;
mod inspect;
mod plot;
mod policy_args;
mod serve;
mod train_gates;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// agate: LLM inference with a KV cache that learns what to forget.
#[derive(Parser, Debug)]
#[command(name = "agate", version, about, propagate_version = true)]
struct Cli {
    /// CPU threads for the kernels (default: all cores; at most the cores available). On a busy
    /// machine use fewer threads than cores: the kernels' thread pools spin-wait on each other
    /// and slow down sharply when another process holds a core.
    #[arg(long, global = true, value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate a continuation of one prompt.
    Generate(generate::GenerateArgs),
    /// Chat interactively.
    Chat(chat::ChatArgs),
    /// Describe a model: architecture, sizes, KV bytes per token.
    Inspect(inspect::InspectArgs),
    /// Write randomly initialised Attention-Gate parameters for a model.
    InitGates(init_gates::InitGatesArgs),
    /// Serve the model over an OpenAI-compatible HTTP API, batching concurrent requests.
    Serve(serve::ServeArgs),
    /// Measure prompt processing and generation speed (llama-bench style).
    Bench(bench::BenchArgs),
    /// Measure a running server: N concurrent streaming clients (tokens/s, time to first token).
    BenchServe(bench_serve::BenchServeArgs),
    /// Score task files or synthetic long-context tasks; sweep policies × eviction ratios.
    Eval(eval::EvalArgs),
    /// Train Attention-Gates (and optionally LoRA) on a frozen model: CPT or SFT.
    TrainGates(train_gates::TrainGatesArgs),
    /// Print the Markdown command-line reference (docs/cli.md; `cargo xtask docs` writes it).
    #[command(hide = true)]
    Docs,
}

fn main() {
    sigpipe_ends_the_process(true);
    let cli = match command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => plain_number_error(e).exit(),
        Err(e) => {
            // --help and --version are results: a failed write to stdout is an error.
            let text = e.render();
            let text = if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                text.ansi().to_string()
            } else {
                text.to_string()
            };
            if let Err(err) = out!("{text}") {
                say!("error: {}", one_line(&err));
                std::process::exit(1);
            }
            std::process::exit(e.exit_code());
        }
    };
    if matches!(cli.command, Command::Serve(_) | Command::BenchServe(_)) {
        sigpipe_ends_the_process(false);
    }
    if let Some(asked) = cli.threads {
        // The pools spin-wait at every barrier: a thread without a core of its own stalls
        // every kernel (1000 threads on 2 cores run ~100x slower and look like a hang).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let n = asked.min(cores);
        if n < asked {
            say!("agate: --threads {asked} is more than the {cores} cores available; using {n}");
        }
        // candle's quantized kernels run on its own spin-barrier pool, sized from
        // RAYON_NUM_THREADS when it starts; rayon's global pool (gemm, the KV store) is sized
        // here. Nothing has started either pool this early.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n as usize)
            .build_global();
    }
    let result = match &cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchServe(a) => bench_serve::run(a),
        Command::Eval(a) => eval::run(a),
        Command::InitGates(a) => init_gates::run(a),
        Command::TrainGates(a) => train_gates::run(a),
        Command::Docs => out!("{}", docs::render(Cli::command())),
    };
    if let Err(e) = result {
        say!("error: {}{}", one_line(&e), errors::hint(&e));
        // An interrupted run is not a failure of its input: the shell's code for SIGINT.
        let code = if e.downcast_ref::<Interrupted>().is_some() {
            130
        } else {
            1
        };
        std::process::exit(code);
    }
}

/// A command stopped by Ctrl-C before it finished: the program ends with status 130.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}

/// The command line, where a negative number is read as a flag's value, so that `--temp -1` is
/// refused by the flag's own check, naming it, instead of as an unknown argument `-1`.
fn command() -> clap::Command {
    fn negative_values(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| {
            let takes_values = a.get_action().takes_values();
            a.allow_negative_numbers(takes_values)
        })
        .mut_subcommands(negative_values)
    }
    negative_values(Cli::command())
}

/// clap reports a negative number given to a flag that takes a count with Rust's parse message
/// ("invalid digit found in string"); this says what the flag takes instead.
fn plain_number_error(e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        e.get(ContextKind::InvalidArg),
        e.get(ContextKind::InvalidValue),
    ) else {
        return e;
    };
    let negative_count = e.kind() == ErrorKind::ValueValidation
        && value.starts_with('-')
        && e.to_string().contains("invalid digit found in string");
    if !negative_count {
        return e;
    }
    clap::Error::raw(
        ErrorKind::ValueValidation,
        format!("invalid value '{value}' for '{arg}': expected a whole number >= 0\n"),
    )
}

/// The error and its causes on one line, each cause once: a message that already quotes its
/// cause (`cannot read X: No such file`) does not repeat it.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = errors::describe(e.as_ref());
    for cause in e.chain().skip(1) {
        let text = errors::describe(cause);
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

/// Rust ignores SIGPIPE, so printing into a closed pipe (`agate inspect | head -1`) would
/// panic; like other Unix tools, agate ends quietly instead (`true`). The HTTP commands keep it
/// ignored (`false`): a client that hangs up must cost only its own connection's write (EPIPE),
/// never the server and every other client's request — hyper writes streamed chunks with
/// `writev`, which raises SIGPIPE on a reset socket.
fn sigpipe_ends_the_process(ends: bool) {
    #[cfg(unix)]
    // SAFETY: called from main before any thread exists (argument parsing starts none); SIG_DFL
    // and SIG_IGN are valid dispositions.
    unsafe {
        libc::signal(
            libc::SIGPIPE,
            if ends { libc::SIG_DFL } else { libc::SIG_IGN },
        );
    }
    #[cfg(not(unix))]
    let _ = ends;
}
