//! `agate train-gates`: trains Attention-Gates (and optionally LoRA adapters) on a frozen model
//! by CPT or SFT (`engine::train`), with a progress bar, a JSONL log, atomic checkpoints,
//! `--resume`, a held-out evaluation and a loss/eviction chart at the end.
//!
//! Invariants: the final gates file is written atomically with the model's identity; a
//! checkpoint (checksummed, holding every step's report) is written every `--checkpoint-every`
//! steps and at the end. Ctrl-C stops after the current step, writes a checkpoint and no final
//! outputs, and ends with status 130 naming the checkpoint, so a script can tell an interrupted
//! run from a finished one; `--resume` continues it exactly, its log rebuilt from the
//! checkpoint (never a log with holes).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use engine::atomic::AppendLog;
use engine::train::{Mode, StepReport, TrainConfig, Trainables, Trainer};
use engine::GateFileDtype;
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{load_engine, ModelArgs};
use crate::plot;

/// Default of `--heldout-seqs`.
const DEFAULT_HELDOUT_SEQS: usize = 16;

/// Quantile rounds of `--calibrate-seqs` (each re-measures with the previous round's tau).
const CALIBRATION_ROUNDS: usize = 3;

/// Flags of `agate train-gates`.
#[derive(Args, Debug)]
pub struct TrainGatesArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// cpt (CE on all tokens; text or JSONL {"text"}), sft (JSONL {"prompt","answer"} or
    /// {"messages"}, CE on answer tokens) or mix (each file CPT or SFT by its content).
    #[arg(long, default_value = "cpt", value_parser = ["cpt", "sft", "mix"])]
    pub mode: String,
    /// Training data files. Steps draw uniformly from the sequences of all files, so a file
    /// listed k times weighs k times as much in the mixture.
    #[arg(long, value_name = "FILE", num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Held-out files in the --mode's formats (CPT text, or SFT items scored on their answers)
    /// evaluated at the end: perplexity of the base model, of the trained model with the full
    /// cache, and with the gates.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub heldout: Vec<PathBuf>,
    /// Held-out sequences evaluated at the end.
    #[arg(long, default_value_t = DEFAULT_HELDOUT_SEQS)]
    pub heldout_seqs: usize,
    /// Target eviction ratio r.
    #[arg(long, default_value_t = 0.5)]
    pub target_evict: f64,
    /// Eviction-loss weight lambda (initial value with --adapt-lambda).
    #[arg(long, default_value_t = 10.0)]
    pub lambda: f64,
    /// Adapt lambda until the measured hard eviction ratio is within 2 points of the target.
    #[arg(long)]
    pub adapt_lambda: bool,
    /// Attention sinks kept visible during training; stored in the gates as the default of
    /// `--policy ag`.
    #[arg(long, default_value_t = 0)]
    pub sinks: usize,
    /// Local window during training: a flagged-out token stays visible to the next N queries;
    /// stored in the gates as the default of `--policy ag`.
    #[arg(long, default_value_t = 0)]
    pub window: usize,
    /// Before writing the gates, set the threshold tau so that the hard eviction ratio over
    /// N training sequences spread evenly over the data meets --target-evict (0 = keep tau = 0.5).
    #[arg(long, default_value_t = 0)]
    pub calibrate_seqs: usize,
    /// Optimiser steps.
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Micro-batches per optimiser step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 5e-3)]
    pub lr: f64,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// Final learning rate as a fraction of the peak (cosine decay).
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f64,
    /// AdamW weight decay (not applied to gate biases).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Gradient clipping, global L2 norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Seed of the initialisation and data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Initial gate bias (keep logit). Default: 1.0 (s ≈ 0.73: everything kept, close enough
    /// to the threshold that a short CPU run reaches the target). Not with --init-gates.
    #[arg(long, allow_negative_numbers = true)]
    pub gate_bias_init: Option<f32>,
    /// The gate's own attention window in tokens: the gate of a token attends to at most this
    /// many tokens (itself included), which bounds its per-session cache (0: unbounded).
    /// Default: 64. Not with --init-gates (those gates keep their own window).
    #[arg(long, value_name = "TOKENS")]
    pub gate_attention_window: Option<usize>,
    /// Start from these gates (e.g. fine-tune CPT gates by SFT) instead of a random init.
    #[arg(long, value_name = "FILE")]
    pub init_gates: Option<PathBuf>,
    /// What to train: gates, lora or both.
    #[arg(long, default_value = "gates", value_parser = ["gates", "lora", "both"])]
    pub train: String,
    /// LoRA rank (enables LoRA adapters).
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha (scale alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f32,
    /// LoRA targets, comma-separated among q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,v", value_delimiter = ',')]
    pub lora_targets: Vec<String>,
    /// Where to write LoRA adapters at the end (safetensors), when LoRA is trained.
    #[arg(long, value_name = "FILE")]
    pub lora_out: Option<PathBuf>,
    /// Final gates file (safetensors, with the model identity).
    #[arg(long, value_name = "FILE", default_value = "gates.safetensors")]
    pub out: PathBuf,
    /// Storage dtype of the final gates: f16, bf16 or f32.
    #[arg(long, default_value = "f16", value_parser = ["f16", "bf16", "f32"])]
    pub out_dtype: String,
    /// Directory of the checkpoint (`checkpoint.safetensors`).
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every N steps (with --checkpoint-dir).
    #[arg(long, default_value_t = 25)]
    pub checkpoint_every: usize,
    /// Resume from the checkpoint in --checkpoint-dir.
    #[arg(long)]
    pub resume: bool,
    /// JSONL log, one line per logged step (on --resume: kept up to the checkpoint's step,
    /// then continued; the curve of --plot covers the whole run).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Log every N steps.
    #[arg(long, default_value_t = 1)]
    pub log_every: usize,
    /// Loss and eviction curves at the end: .svg (loss, CE, eviction) or .png (eviction and
    /// the 10-step mean CE relative to its maximum, in [0, 1]).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

impl TrainGatesArgs {
    /// Whether `--heldout-seqs` was moved off its default with no held-out file to use it on.
    fn heldout_given_without_files(&self) -> bool {
        self.heldout.is_empty() && self.heldout_seqs != DEFAULT_HELDOUT_SEQS
    }

    fn train_config(&self) -> anyhow::Result<TrainConfig> {
        let train = Trainables::parse(&self.train)?;
        Ok(TrainConfig {
            mode: Mode::parse(&self.mode)?,
            data: self.data.clone(),
            heldout: self.heldout.clone(),
            heldout_seqs: self.heldout_seqs,
            seq_len: self.seq_len,
            batch: self.batch,
            grad_accum: self.grad_accum,
            steps: self.steps,
            lr: self.lr,
            warmup: self.warmup,
            min_lr_ratio: self.min_lr_ratio,
            weight_decay: self.weight_decay,
            clip: self.clip,
            seed: self.seed,
            target_evict: self.target_evict,
            lambda: self.lambda,
            adapt_lambda: self.adapt_lambda,
            gate_bias_init: Some(self.gate_bias_init.unwrap_or(DEFAULT_GATE_BIAS_INIT)),
            gate_attention_window: Some(
                self.gate_attention_window
                    .unwrap_or(engine::DEFAULT_GATE_ATTENTION_WINDOW),
            ),
            init_gates: self.init_gates.clone(),
            sinks: self.sinks,
            window: self.window,
            train,
            lora: self
                .lora_rank
                .map(|rank| lora_config(rank, self.lora_alpha, &self.lora_targets)),
        })
    }
}

fn lora_config(rank: usize, alpha: f32, targets: &[String]) -> engine::train::LoraConfig {
    engine::train::LoraConfig {
        rank,
        alpha,
        targets: targets.to_vec(),
    }
}

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

/// Every output of the run is checked before training starts: each can be written (its folder
/// exists and takes a file; `--plot`'s extension names a format), the checkpoint folder exists
/// or is created, and no output is one of the run's inputs or another output (training would
/// overwrite its own data, or one result another).
fn check_outputs(args: &TrainGatesArgs) -> anyhow::Result<()> {
    let mut outputs: Vec<(&str, &Path)> = vec![("--out", &args.out)];
    outputs.extend(args.lora_out.as_deref().map(|p| ("--lora-out", p)));
    outputs.extend(args.log.as_deref().map(|p| ("--log", p)));
    outputs.extend(args.plot.as_deref().map(|p| ("--plot", p)));
    let mut inputs: Vec<(&str, &Path)> = Vec::new();
    inputs.extend(args.data.iter().map(|p| ("--data", p.as_path())));
    inputs.extend(args.heldout.iter().map(|p| ("--heldout", p.as_path())));
    inputs.extend(args.init_gates.as_deref().map(|p| ("--init-gates", p)));
    // The file a path names, whether it exists yet or not: its folder resolved, then its name.
    let resolved = |p: &Path| {
        std::fs::canonicalize(p).ok().or_else(|| {
            let folder = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            Some(std::fs::canonicalize(folder).ok()?.join(p.file_name()?))
        })
    };
    let same = |a: &Path, b: &Path| {
        a == b || matches!((resolved(a), resolved(b)), (Some(x), Some(y)) if x == y)
    };
    for (i, &(flag, out)) in outputs.iter().enumerate() {
        let mut others = inputs.iter().chain(&outputs[..i]);
        if let Some((other, _)) = others.find(|(_, p)| same(out, p)) {
            anyhow::bail!(
                "{flag} {} is also {other}: it would be overwritten; choose another path",
                out.display()
            );
        }
        match flag {
            "--plot" => plot::check_output(out, flag, &["svg", "png"])?,
            _ => plot::check_writable(out, flag)?,
        }
    }
    if let Some(dir) = &args.checkpoint_dir {
        engine::atomic::ensure_dir(dir).map_err(|e| anyhow::anyhow!("--checkpoint-dir: {e}"))?;
        plot::check_writable(&dir.join("checkpoint.safetensors"), "--checkpoint-dir")?;
    }
    Ok(())
}

/// The initial gate bias when `--gate-bias-init` is not given.
const DEFAULT_GATE_BIAS_INIT: f32 = 1.0;

/// Runs `agate train-gates`.
pub fn run(args: &TrainGatesArgs) -> anyhow::Result<()> {
    keep_freed_memory();
    let cfg = args.train_config()?;
    check_flags(args)?;
    let dtype = match args.out_dtype.as_str() {
        "f32" => GateFileDtype::F32,
        "bf16" => GateFileDtype::BF16,
        _ => GateFileDtype::F16,
    };
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
    let mut history: Vec<StepReport> = Vec::new();
    if args.resume {
        let path = ckpt.as_ref().context("--resume needs --checkpoint-dir")?;
        history = trainer.resume(path)?;
        say!(
            "agate: resumed from {} at step {}",
            path.display(),
            trainer.step()
        );
    }
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
    write_outputs(args, &mut trainer, ckpt.as_deref(), &stop, dtype)?;
    let steps_run = trainer.step() - first_step;
    if steps_run > 0 {
        let per_step = (args.seq_len * args.batch * args.grad_accum) as f64;
        say!(
            "agate: {steps_run} steps in {train_secs:.0} s, mean {:.1} tokens/s",
            per_step * steps_run as f64 / train_secs
        );
    }
    if let Some(examples) = heldout_examples {
        heldout(args, examples, &mut trainer, log.as_mut(), &stop)?;
    }
    if let Some(p) = &args.plot {
        plot::training_curves(p, &history)?;
        say!("agate: wrote {}", p.display());
    }
    Ok(())
}

/// Refuses, before any work, flag values that are out of range and flags this run would ignore
/// (or fail on only after training); checks that every output can be written.
fn check_flags(args: &TrainGatesArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.resume || args.checkpoint_dir.is_some(),
        "--resume needs --checkpoint-dir DIR"
    );
    anyhow::ensure!(
        args.checkpoint_every > 0,
        "--checkpoint-every 0: expected a positive number"
    );
    anyhow::ensure!(
        args.log_every > 0,
        "--log-every 0: expected a positive number"
    );
    check_outputs(args)?;
    // Flags this run would ignore (or fail on only after training) are refused now.
    let lora = args.train != "gates";
    anyhow::ensure!(
        lora || args.lora_rank.is_none(),
        "--lora-rank does nothing with --train gates; use --train lora or both"
    );
    anyhow::ensure!(
        lora || args.lora_out.is_none(),
        "--lora-out does nothing with --train gates (no adapters are trained)"
    );
    anyhow::ensure!(
        args.train != "lora" || args.calibrate_seqs == 0,
        "--calibrate-seqs does nothing with --train lora (no gates are trained)"
    );
    if let Some(b) = args.gate_bias_init {
        anyhow::ensure!(
            b.is_finite(),
            "--gate-bias-init must be a finite number, got {b}"
        );
    }
    if args.init_gates.is_some() {
        for (flag, given) in [
            ("--gate-bias-init", args.gate_bias_init.is_some()),
            (
                "--gate-attention-window",
                args.gate_attention_window.is_some(),
            ),
        ] {
            anyhow::ensure!(
                !given,
                "{flag} does nothing with --init-gates (training starts from those gates, with their own bias and window)"
            );
        }
    }
    anyhow::ensure!(
        !args.heldout_given_without_files(),
        "--heldout-seqs does nothing without --heldout FILE"
    );
    Ok(())
}

/// Writes the final outputs (the gates, calibrated first if asked; the LoRA adapters), unless
/// `stop` was set: then an interruption error that names the last checkpoint.
fn write_outputs(
    args: &TrainGatesArgs,
    trainer: &mut Trainer,
    ckpt: Option<&Path>,
    stop: &AtomicBool,
    dtype: GateFileDtype,
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
            let ratio = trainer.calibrate_threshold(args.calibrate_seqs, CALIBRATION_ROUNDS)?;
            say!(
                "agate: threshold calibrated on {} training sequences: tau {:.4}, hard eviction {:.3}",
                args.calibrate_seqs.min(trainer.n_examples()),
                trainer.gates().config().threshold,
                ratio
            );
            interrupted()?;
        }
        trainer.save_gates(&args.out, dtype)?;
        say!("agate: wrote gates to {}", args.out.display());
    }
    if let Some(p) = &args.lora_out {
        trainer.save_lora(p)?;
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
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.step() as u64);
    let started = Instant::now();
    while trainer.step() < args.steps && !stop.load(Ordering::SeqCst) {
        let mut r = trainer.train_step()?;
        r.elapsed_s = started.elapsed().as_secs_f64();
        bar.set_position(r.step as u64);
        bar.set_message(format!(
            "loss {:.3} ce {:.3} evict soft {:.3} (target {:.3}) hard {:.3} λ {:.2} {:.0} tok/s",
            r.loss, r.ce, r.soft_evict, r.soft_target, r.hard_evict, r.lambda, r.tokens_per_s
        ));
        if let Some(log) = log.as_mut().filter(|_| logged(args, &r)) {
            log.line(&serde_json::to_string(&r)?)?;
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

/// The held-out evaluation after training: printed, and added to the log.
fn heldout(
    args: &TrainGatesArgs,
    examples: Vec<engine::train::dataset::Example>,
    trainer: &mut Trainer,
    log: Option<&mut AppendLog>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    if stop.load(Ordering::SeqCst) {
        return Err(crate::Interrupted(
            "train-gates was interrupted before its held-out evaluation (training finished and its outputs were written)".into(),
        )
        .into());
    }
    let h = trainer.evaluate(examples, args.heldout_seqs)?;
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
        log.line(&serde_json::json!({ "heldout": h }).to_string())?;
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
