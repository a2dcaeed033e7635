//! `agate chat`: an interactive conversation in the terminal. Answers stream as they are
//! generated; Ctrl-C stops the current answer (not the program); slash commands adjust the
//! session. The session's cache persists across turns, so each turn prefills only its new text.
//! Keys sit at cache positions by default, so a chat whose policy keeps a fixed budget
//! (`--policy streaming --keep 512`) never ends; a failed turn leaves the conversation as it was.

use std::io::BufRead;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;
use engine::{GenerateRequest, Positions, SamplingParams, Session};

use crate::args::{load_engine, ModelArgs, SamplingArgs};
use crate::policy_args::PolicyArgs;

/// Flags of `agate chat`.
#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Maximum tokens per answer.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
}

const HELP: &str = "commands:
  /help            this list
  /clear           forget the conversation (frees its KV cache)
  /system TEXT     set the system prompt (restarts the conversation); /system alone removes it
  /temp X          sampling temperature (0 = greedy)
  /topp X          nucleus sampling threshold in (0, 1]
  /stats           tokens seen and retained, KV memory, last answer's speed
  /exit            quit (Ctrl-D too)
Ctrl-C stops the current answer.";

/// Runs `agate chat`.
pub fn run(args: &ChatArgs) -> anyhow::Result<()> {
    let chat_defaults = SamplingParams {
        temperature: 0.7,
        top_p: 0.9,
        repetition_penalty: 1.1,
        ..Default::default()
    };
    let mut request = GenerateRequest {
        max_tokens: args.max_tokens,
        sampling: args.sampling.params(chat_defaults)?,
        stop: Vec::new(),
        stop_at_eos: true,
    };
    let choice = args.policy.single()?;
    let engine = load_engine(&args.model)?;
    let mut session = engine.session_with(choice.resolve(&engine)?)?;
    session.set_positions(args.policy.positions_or(Positions::Cache))?;
    session.set_system_prompt(args.system.clone())?;
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))?;
    say!(
        "agate chat: {} ({} layers), policy {}, {} positions. /help for commands, Ctrl-C stops an answer, /exit quits.",
        engine.model_path().display(),
        engine.model_config().n_layers,
        session.policy().name(),
        session.positions().name()
    );
    let stdin = std::io::stdin();
    let mut last_speed: Option<String> = None;
    loop {
        crate::out::stderr(format_args!("> "));
        let mut bytes = Vec::new();
        if stdin.lock().read_until(b'\n', &mut bytes)? == 0 {
            break;
        }
        let Ok(line) = std::str::from_utf8(&bytes) else {
            say!("error: that line is not valid UTF-8 text; it was skipped");
            continue;
        };
        let line = line.trim();
        if line.is_empty() {
            interrupted.store(false, Ordering::SeqCst);
            continue;
        }
        if let Some(command) = line.strip_prefix('/') {
            match handle_command(command, &mut session, &mut request, last_speed.as_deref()) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    say!("error: {e}");
                    continue;
                }
            }
        }
        interrupted.store(false, Ordering::SeqCst);
        if let Some(speed) = answer(&mut session, line, &request, &interrupted)? {
            last_speed = Some(speed);
        }
    }
    Ok(())
}

/// Answers one message, streaming the text to stdout until the answer ends or Ctrl-C sets
/// `interrupted`; returns its speed line, or `None` when the turn failed (the error is printed:
/// the chat goes on). A failed write to stdout ends the chat.
fn answer(
    session: &mut Session,
    line: &str,
    request: &GenerateRequest,
    interrupted: &AtomicBool,
) -> anyhow::Result<Option<String>> {
    let mut write_error = None;
    let mut on_text = |t: &str| match out!("{t}") {
        Ok(()) => !interrupted.load(Ordering::SeqCst),
        Err(e) => {
            write_error = Some(e);
            false
        }
    };
    let result = session.chat(line, request, &mut on_text);
    if let Some(e) = write_error {
        return Err(e);
    }
    match result {
        Ok(g) => {
            outln!()?;
            let speed = format!(
                "prefill {} tok at {:.1} tok/s, answer {} tok at {:.1} tok/s ({})",
                g.prompt_tokens,
                g.prefill_tokens_per_s(),
                g.tokens.len(),
                g.decode_tokens_per_s(),
                g.finish_reason.describe()
            );
            say!("[{speed}]");
            Ok(Some(speed))
        }
        Err(e) => {
            let line = crate::errors::describe(&e);
            let e = crate::errors::under_policy(e.into(), session.policy().kind());
            say!("\nerror: {line}{}", crate::errors::hint(&e));
            Ok(None)
        }
    }
}

/// Handles a slash command; returns false to quit.
fn handle_command(
    command: &str,
    session: &mut Session,
    request: &mut GenerateRequest,
    last_speed: Option<&str>,
) -> anyhow::Result<bool> {
    let (name, rest) = command
        .split_once(' ')
        .map_or((command, ""), |(a, b)| (a, b.trim()));
    let number = |what: &str| -> anyhow::Result<f32> {
        rest.parse::<f32>()
            .ok()
            .filter(|v| v.is_finite())
            .map(|v| v + 0.0) // -0 is 0
            .ok_or_else(|| anyhow::anyhow!("/{what} needs a finite number, got `{rest}`"))
    };
    match name {
        "help" => say!("{HELP}"),
        "exit" | "quit" => return Ok(false),
        "clear" => {
            session.clear()?;
            say!("conversation cleared");
        }
        "system" => {
            session.set_system_prompt((!rest.is_empty()).then(|| rest.to_string()))?;
            say!(
                "system prompt {}; conversation restarted",
                if rest.is_empty() { "removed" } else { "set" }
            );
        }
        "temp" => {
            let mut p = request.sampling.clone();
            p.temperature = number("temp")?;
            p.validate().map_err(anyhow::Error::msg)?;
            request.sampling = p;
            say!("temperature {}", request.sampling.temperature);
        }
        "topp" => {
            let mut p = request.sampling.clone();
            p.top_p = number("topp")?;
            p.validate().map_err(anyhow::Error::msg)?;
            request.sampling = p;
            say!("top-p {}", request.sampling.top_p);
        }
        "stats" => {
            let kv = session.kv_report();
            say!(
                "policy {} ({} positions): {} tokens seen, {} retained per head on average (eviction ratio {:.3}); {} bytes in use ({} in {} KV blocks + {} of policy state) of {} for the full cache",
                session.policy().name(),
                session.positions().name(),
                kv.tokens_seen,
                kv.tokens_retained,
                kv.eviction_ratio,
                kv.bytes_in_use,
                kv.kv_block_bytes,
                kv.blocks_in_use,
                kv.policy_state_bytes,
                kv.bytes_full
            );
            if let Some(s) = last_speed {
                say!("last answer: {s}");
            }
        }
        other => anyhow::bail!("unknown command /{other}; /help lists them"),
    }
    Ok(true)
}
