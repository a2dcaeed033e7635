//! `agate train-gates`: trains Attention-Gates (and optionally LoRA adapters) on a frozen model
//! by CPT or SFT (`engine::train`), with a progress bar, a JSONL log, atomic checkpoints,
//! `--resume`, a held-out evaluation and a loss/eviction chart at the end.
//!
//! Invariants: the final gates file is written atomically with the model's identity; a
//! checkpoint (checksummed, holding every step's report) is written every `--checkpoint-every`
//! steps and at the end. Ctrl-C stops after the current step, writes a checkpoint and no final
//! outputs, and ends with status 130 naming the checkpoint, so a script can tell an interrupted
//! run from a finished one; `--resume` continues it exactly, its log rebuilt from the
//! checkpoint (never a log with holes). Every flag is checked before the model loads
//! (`flags.rs`).

mod flags;

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use engine::atomic::AppendLog;
use engine::train::{StepReport, Trainables, Trainer};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::load_engine;
use crate::plot;
pub use flags::TrainGatesArgs;
use flags::{check_flags, gate_file_dtype};

/// Quantile rounds of `--calibrate-seqs` (each re-measures with the previous round's tau).
const CALIBRATION_ROUNDS: usize = 3;

/// Keeps freed memory in the process. glibc hands every freed block above its mmap threshold
/// back to the kernel, and the training forward/backward allocates a fresh tensor per op:
/// re-faulting those pages (zeroed by the kernel) took a quarter of a training step (measured
/// with `perf`; with these settings a 256-token step ran about a fifth faster).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; it is called before training
    // starts, and a rejected value leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Runs `agate train-gates`.
pub fn run(args: &TrainGatesArgs) -> anyhow::Result<()> {
    keep_freed_memory();
    let cfg = args.train_config()?;
    check_flags(args)?;
    // The settings' own checks, before the model loads.
    cfg.validate()?;
    let stop = stop_on_interrupt()?;
    let engine = load_engine(&args.model)?;
    let mut trainer = Trainer::new(&engine, cfg)?;
    // Read before training: a bad held-out file is refused before the run, not after it.
    let heldout_examples = if args.heldout.is_empty() {
        None
    } else {
        Some(trainer.load_heldout(&args.heldout)?)
    };
    let ckpt = args
        .checkpoint_dir
        .as_ref()
        .map(|d| d.join("checkpoint.safetensors"));
    // Every step's report: the checkpoint records them, the log and the curve come from them.
    let mut history = if args.resume {
        resume(&mut trainer, ckpt.as_deref(), args.steps)?
    } else {
        Vec::new()
    };
    note_what_is_not_as_asked(args, &trainer);
    say!(
        "agate: training {} on {} sequences of {} tokens ({} steps × {} × {})",
        args.train,
        trainer.n_examples(),
        args.seq_len,
        args.steps,
        args.batch,
        args.grad_accum
    );
    let logged = |r: &StepReport| logged(args, r);
    let mut log = match &args.log {
        Some(p) => Some(start_log(p, &history, &logged, args.resume)?),
        None => None,
    };
    let first_step = trainer.step();
    let train_secs = train(
        args,
        &mut trainer,
        &mut history,
        log.as_mut(),
        ckpt.as_deref(),
        &stop,
    )?;
    if let Some(p) = &ckpt {
        trainer.save_checkpoint(p, &history)?;
        say!(
            "agate: checkpoint at step {} in {}",
            trainer.step(),
            p.display()
        );
    }
    write_outputs(args, &mut trainer, ckpt.as_deref(), &stop)?;
    report_throughput(args, trainer.step() - first_step, train_secs);
    if let Some(examples) = heldout_examples {
        heldout(args, examples, &mut trainer, log.as_mut(), &stop)?;
    }
    if let Some(p) = &args.plot {
        plot::training_curves(p, &history).context("--plot")?;
        say!("agate: wrote {}", p.display());
    }
    Ok(())
}

/// Notes on what the run does not do as asked: a warmup longer than the run, more calibration
/// sequences than the data holds.
fn note_what_is_not_as_asked(args: &TrainGatesArgs, trainer: &Trainer) {
    if args.warmup > args.steps {
        say!(
            "agate: note: --warmup {} is more than --steps {}: the learning rate never reaches its peak --lr (it ends at {:.0}% of it)",
            args.warmup,
            args.steps,
            100.0 * args.steps as f64 / args.warmup as f64
        );
    }
    if args.calibrate_seqs > trainer.n_examples() {
        say!(
            "agate: --calibrate-seqs {}: the data holds {} sequences; calibrating on {}",
            args.calibrate_seqs,
            trainer.n_examples(),
            trainer.n_examples()
        );
    }
}

/// Continues the run in the checkpoint `ckpt` (`--resume`); returns every step's report so far.
/// A checkpoint already at (or past) `steps` leaves nothing to train: a note says so.
fn resume(
    trainer: &mut Trainer,
    ckpt: Option<&Path>,
    steps: usize,
) -> anyhow::Result<Vec<StepReport>> {
    let path = ckpt.context("--resume needs --checkpoint-dir")?;
    let history = trainer.resume(path)?;
    say!(
        "agate: resumed from {} at step {}",
        path.display(),
        trainer.step()
    );
    if trainer.step() >= steps {
        say!(
            "agate: note: the checkpoint is at step {}, not below --steps {steps}: nothing is trained; the outputs are the checkpoint's (raise --steps to train further)",
            trainer.step()
        );
    }
    Ok(history)
}

/// Says how many tokens a second the `steps_run` steps of this run trained on.
fn report_throughput(args: &TrainGatesArgs, steps_run: usize, train_secs: f64) {
    if steps_run > 0 {
        let per_step = (args.seq_len * args.batch * args.grad_accum) as f64;
        say!(
            "agate: {steps_run} steps in {train_secs:.0} s, mean {:.1} tokens/s",
            per_step * steps_run as f64 / train_secs
        );
    }
}

/// Writes the final outputs (the gates, calibrated first if asked; the LoRA adapters), unless
/// `stop` was set: then an interruption error that names the last checkpoint.
fn write_outputs(
    args: &TrainGatesArgs,
    trainer: &mut Trainer,
    ckpt: Option<&Path>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let checkpoint_note = match ckpt {
        Some(p) => format!(
            "the last checkpoint (step {}) is {}: continue with --resume",
            trainer.step(),
            p.display()
        ),
        None => "no checkpoint was written (--checkpoint-dir DIR keeps one)".into(),
    };
    let (stopped_at, steps) = (trainer.step(), args.steps);
    let interrupted = || -> anyhow::Result<()> {
        if !stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        Err(crate::Interrupted(format!(
            "train-gates was interrupted at step {stopped_at} of {steps}; no final outputs were written; {checkpoint_note}"
        ))
        .into())
    };
    interrupted()?;
    if trainer.config().train != Trainables::Lora {
        if args.calibrate_seqs > 0 {
            let bar = phase_bar("calibrating the threshold");
            let calibrated = trainer.calibrate_threshold(
                args.calibrate_seqs,
                CALIBRATION_ROUNDS,
                &mut |done, total| {
                    show(&bar, done, total);
                    go_on(stop)
                },
            );
            bar.finish_and_clear();
            interrupted()?;
            let ratio = calibrated?;
            say!(
                "agate: threshold calibrated on {} training sequences: tau {:.4}, hard eviction {:.3}",
                args.calibrate_seqs.min(trainer.n_examples()),
                trainer.gates().config().threshold,
                ratio
            );
        }
        trainer
            .save_gates(&args.out, gate_file_dtype(&args.out_dtype))
            .context("--out")?;
        say!("agate: wrote gates to {}", args.out.display());
    }
    if let Some(p) = &args.lora_out {
        trainer.save_lora(p).context("--lora-out")?;
        say!("agate: wrote LoRA adapters to {}", p.display());
    }
    Ok(())
}

/// Whether step report `r` goes into the `--log` (every `--log-every` steps and the last).
fn logged(args: &TrainGatesArgs, r: &StepReport) -> bool {
    r.step.is_multiple_of(args.log_every) || r.step == args.steps
}

/// Runs the training steps up to `--steps` (or until `stop`) with a progress bar, appending
/// each report to `history` (and the logged ones to `log`), checkpointing every
/// `--checkpoint-every` steps to `ckpt`; returns the seconds spent.
fn train(
    args: &TrainGatesArgs,
    trainer: &mut Trainer,
    history: &mut Vec<StepReport>,
    mut log: Option<&mut AppendLog>,
    ckpt: Option<&Path>,
    stop: &AtomicBool,
) -> anyhow::Result<f64> {
    let bar = phase_bar("training");
    show(&bar, trainer.step(), args.steps);
    let started = Instant::now();
    while trainer.step() < args.steps && !stop.load(Ordering::SeqCst) {
        let mut r = trainer.train_step()?;
        r.elapsed_s = started.elapsed().as_secs_f64();
        show(&bar, r.step, args.steps);
        bar.set_message(format!(
            "loss {:.3} ce {:.3} evict soft {:.3} (target {:.3}) hard {:.3} λ {:.2} {:.0} tok/s",
            r.loss, r.ce, r.soft_evict, r.soft_target, r.hard_evict, r.lambda, r.tokens_per_s
        ));
        if let Some(log) = log.as_mut().filter(|_| logged(args, &r)) {
            log.line(&serde_json::to_string(&r)?).context("--log")?;
        }
        history.push(r);
        if let Some(p) = ckpt {
            if trainer.step().is_multiple_of(args.checkpoint_every) {
                trainer.save_checkpoint(p, history)?;
            }
        }
    }
    bar.finish();
    Ok(started.elapsed().as_secs_f64())
}

/// Whether a phase goes on: not once Ctrl-C set `stop`.
fn go_on(stop: &AtomicBool) -> ControlFlow<()> {
    if stop.load(Ordering::SeqCst) {
        ControlFlow::Break(())
    } else {
        ControlFlow::Continue(())
    }
}

/// A progress bar of one phase of the run (training, calibration, the held-out evaluation),
/// prefixed by `phase`; its length is set by [`show`].
fn phase_bar(phase: &str) -> ProgressBar {
    let bar = ProgressBar::new(0).with_prefix(phase.to_string());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Shows `done` of `total` on `bar`.
fn show(bar: &ProgressBar, done: usize, total: usize) {
    bar.set_length(total as u64);
    bar.set_position(done as u64);
}

/// The held-out evaluation after training: printed, and added to the log.
fn heldout(
    args: &TrainGatesArgs,
    examples: Vec<engine::train::dataset::Example>,
    trainer: &mut Trainer,
    log: Option<&mut AppendLog>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let interrupted = || {
        anyhow::Error::from(crate::Interrupted(
            "train-gates was interrupted before the end of its held-out evaluation (training finished and its outputs were written)".into(),
        ))
    };
    if stop.load(Ordering::SeqCst) {
        return Err(interrupted());
    }
    let bar = phase_bar("held-out evaluation");
    let evaluated = trainer.evaluate(examples, args.heldout_seqs, &mut |done, total| {
        show(&bar, done, total);
        go_on(stop)
    });
    bar.finish_and_clear();
    if stop.load(Ordering::SeqCst) {
        return Err(interrupted());
    }
    let h = evaluated?;
    let gated = match h.ppl_gates {
        Some(p) => format!(
            ", with gates {p:.3} ({:+.1}%), hard eviction {:.3}, soft {:.3}",
            100.0 * (p / h.ppl_full - 1.0),
            h.hard_evict,
            h.soft_evict
        ),
        None => String::new(),
    };
    say!(
        "agate: held-out ({} seqs, {} scored tokens): PPL base {:.3}, trained with full cache {:.3}{gated}",
        h.sequences, h.tokens, h.ppl_base, h.ppl_full
    );
    if let Some(log) = log {
        log.line(&serde_json::json!({ "heldout": h }).to_string())
            .context("--log")?;
    }
    Ok(())
}

/// Ctrl-C (or SIGTERM) stops the run after the current step (then it checkpoints and ends with
/// status 130); a second one ends the program at once.
fn stop_on_interrupt() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            say!("\nagate: interrupted again: stopping now");
            std::process::exit(130);
        }
        say!("\nagate: interrupted: stopping after this step (Ctrl-C again stops at once)");
    })
    .context("cannot install the Ctrl-C handler")?;
    Ok(stop)
}

/// Starts the JSONL log at `path` with the `logged` reports of `history` (the checkpoint's, on
/// `--resume`). A resumed run's log is rewritten from the checkpoint, so it never has holes;
/// a note says so when the file on disk was missing, truncated or different.
fn start_log(
    path: &std::path::Path,
    history: &[StepReport],
    logged: &dyn Fn(&StepReport) -> bool,
    resumed: bool,
) -> anyhow::Result<AppendLog> {
    let mut text = String::new();
    for r in history.iter().filter(|r| logged(r)) {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    if resumed {
        let on_disk = std::fs::read_to_string(path).ok();
        let steps = on_disk.as_deref().map(|t| step_lines(t, history.len()));
        let expected: Vec<&str> = text.lines().collect();
        match steps {
            None => say!(
                "agate: the log {} is missing: rebuilt from the checkpoint",
                path.display()
            ),
            Some(lines) if lines != expected => say!(
                "agate: the log {} does not match the checkpoint (truncated or edited): rebuilt from it",
                path.display()
            ),
            Some(_) => {}
        }
    }
    AppendLog::start(path, text.as_bytes()).with_context(|| format!("--log {}", path.display()))
}

/// The step lines of a log up to step `last`, as written (other lines, such as a held-out
/// result, are left out).
fn step_lines(text: &str, last: usize) -> Vec<&str> {
    text.lines()
        .filter(|l| serde_json::from_str::<StepReport>(l).is_ok_and(|r| r.step <= last))
        .collect()
}
