//! The flags of `agate train-gates` and their checks: values out of range, flags the run would
//! ignore (or fail on only after training), protections that leave nothing to learn, and
//! outputs that cannot be written or would overwrite an input or another output are all refused
//! before the model loads; errors name the flag and the value.

use std::path::{Path, PathBuf};

use clap::Args;
use engine::train::{Mode, TrainConfig, Trainables};
use engine::GateFileDtype;

use crate::args::ModelArgs;
use crate::plot;

/// Default of `--heldout-seqs`.
const DEFAULT_HELDOUT_SEQS: usize = 16;

/// Default of `--checkpoint-every`.
const DEFAULT_CHECKPOINT_EVERY: usize = 25;

/// Flags of `agate train-gates`.
#[derive(Args, Debug)]
pub struct TrainGatesArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// cpt (CE on all tokens; text or JSONL {"text"}), sft (JSONL {"prompt","answer"} or
    /// {"messages"}, CE on answer tokens) or mix (each file CPT or SFT by its content).
    #[arg(long, default_value = "cpt", value_parser = ["cpt", "sft", "mix"])]
    pub mode: String,
    /// Training data files. A file is JSONL when its first non-blank line is a JSON object or
    /// its name ends in .jsonl or .json (any case), otherwise plain text (CPT only): the
    /// content decides, so a pipe or a JSONL file named .txt works. Steps draw uniformly from
    /// the sequences of all files, so a file listed k times weighs k times as much in the
    /// mixture.
    #[arg(long, value_name = "FILE", num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Held-out files in the --mode's formats (CPT text, or SFT items scored on their answers)
    /// evaluated at the end: perplexity of the base model, of the trained model with the full
    /// cache, and with the gates.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub heldout: Vec<PathBuf>,
    /// Held-out sequences evaluated at the end (at least 1).
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
    /// N training sequences spread evenly over the data meets --target-evict (0 = keep tau = 0.5;
    /// more than the data holds: all of them).
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
    #[arg(long, default_value_t = DEFAULT_CHECKPOINT_EVERY)]
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

    pub(super) fn train_config(&self) -> anyhow::Result<TrainConfig> {
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

/// The storage dtype `--out-dtype` names (clap admits only f16, bf16 and f32).
pub(super) fn gate_file_dtype(name: &str) -> GateFileDtype {
    match name {
        "f32" => GateFileDtype::F32,
        "bf16" => GateFileDtype::BF16,
        _ => GateFileDtype::F16,
    }
}

/// Refuses, before any work, flag values that are out of range and flags this run would ignore
/// (or fail on only after training); checks that every output can be written.
pub(super) fn check_flags(args: &TrainGatesArgs) -> anyhow::Result<()> {
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
    check_protections(args)?;
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
    anyhow::ensure!(
        args.checkpoint_dir.is_some() || args.checkpoint_every == DEFAULT_CHECKPOINT_EVERY,
        "--checkpoint-every does nothing without --checkpoint-dir DIR"
    );
    Ok(())
}

/// Refuses protections that leave the gates nothing to learn: a sink is never hidden, and a
/// flagged token stays visible to the next `--window` queries, so some token can be hidden from
/// some query only in a sequence of at least `--sinks + --window + 2` tokens. (`--seq-len 0` is
/// the training configuration's to refuse.)
fn check_protections(args: &TrainGatesArgs) -> anyhow::Result<()> {
    let needed = args.sinks.saturating_add(args.window).saturating_add(2);
    if args.seq_len == 0 || args.seq_len >= needed {
        return Ok(());
    }
    anyhow::ensure!(
        args.sinks < args.seq_len,
        "--sinks {}: not below --seq-len {}: every position would be a sink, leaving nothing to evict",
        args.sinks,
        args.seq_len
    );
    anyhow::bail!(
        "--seq-len {}: too short to train gates with --sinks {} and --window {} (a token is hidden only from queries more than --window positions after it, and never a sink): use --seq-len {needed} or more",
        args.seq_len,
        args.sinks,
        args.window
    )
}
