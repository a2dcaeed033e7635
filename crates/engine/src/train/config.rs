//! The settings of a training run: [`TrainConfig`] (with [`Trainables`]), the checks of its
//! values, and the key a checkpoint records to tell a resumed run from another one.
//!
//! Invariants: errors are [`EngineError::Setting`] naming the field (`TrainConfig.seq_len`),
//! never a command-line flag; the resume key is the configuration without `steps`, the
//! held-out settings and unset options, so a run may be resumed for more steps, and a
//! checkpoint written before an optional setting existed still matches.

use std::path::PathBuf;

pub use model_zoo::train::LoraConfig;

use super::dataset::Mode;
use crate::error::{EngineError, Result};

/// Most tokens in one micro-batch (`batch × seq_len`): its logits alone take
/// `tokens × vocab × 4` bytes.
pub const MAX_MICRO_BATCH_TOKENS: usize = 16_384;

/// Most micro-batches per optimiser step (a step must end, and checkpoint, in reasonable time).
pub const MAX_GRAD_ACCUM: usize = 4096;

/// What gets trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trainables {
    /// Only the Attention-Gates (the paper's setting).
    Gates,
    /// Only LoRA adapters (full cache: gates are not used).
    Lora,
    /// Gates and LoRA adapters together.
    Both,
}

impl Trainables {
    /// Parses `gates`, `lora` or `both`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "gates" => Ok(Trainables::Gates),
            "lora" => Ok(Trainables::Lora),
            "both" => Ok(Trainables::Both),
            other => Err(EngineError::Setting {
                setting: "TrainConfig.train",
                problem: format!("unknown `{other}` (expected gates, lora or both)"),
            }),
        }
    }

    /// The name [`Trainables::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Trainables::Gates => "gates",
            Trainables::Lora => "lora",
            Trainables::Both => "both",
        }
    }

    /// Whether the run trains the gates.
    pub(super) fn gates(self) -> bool {
        self != Trainables::Lora
    }
}

/// Every setting of a training run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// CPT or SFT.
    pub mode: Mode,
    /// Data files.
    pub data: Vec<PathBuf>,
    /// Held-out files (same format as `data`, CPT text) evaluated at the end; empty: none.
    pub heldout: Vec<PathBuf>,
    /// Held-out sequences evaluated at the end (at most; at least 1 when `heldout` is set).
    pub heldout_seqs: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warmup steps.
    pub warmup: usize,
    /// Final learning rate as a fraction of the peak (cosine decay).
    pub min_lr_ratio: f64,
    /// AdamW weight decay (not on the gate biases).
    pub weight_decay: f64,
    /// Gradient clipping (global L2 norm; 0 = off).
    pub clip: f64,
    /// Seed of the init and the data order.
    pub seed: u64,
    /// Target eviction ratio `r`.
    pub target_evict: f64,
    /// Eviction-loss weight (initial, when adaptive).
    pub lambda: f64,
    /// Adapt lambda until the hard ratio is within 2 points of the target.
    pub adapt_lambda: bool,
    /// Initial gate bias (keep logit); `None` = the gate default (+3).
    pub gate_bias_init: Option<f32>,
    /// The gate's own attention window (tokens; 0 unbounded); `None` = the gate default.
    #[serde(default)]
    pub gate_attention_window: Option<usize>,
    /// Start from these trained gates (e.g. CPT gates fine-tuned by SFT) instead of a random
    /// init; they must have been made for this model. The threshold is reset to 0.5.
    #[serde(default)]
    pub init_gates: Option<PathBuf>,
    /// Attention sinks always visible during training (recorded in the gates file as the
    /// inference default).
    #[serde(default)]
    pub sinks: usize,
    /// Local window: a flagged-out key stays visible to the next `window` queries during
    /// training (recorded in the gates file as the inference default).
    #[serde(default)]
    pub window: usize,
    /// What is trained.
    pub train: Trainables,
    /// LoRA adapters (required for `train = lora | both`).
    pub lora: Option<LoraConfig>,
}

impl TrainConfig {
    /// Checks every value; errors name the setting (`TrainConfig.lr`).
    pub fn validate(&self) -> Result<()> {
        if self.data.is_empty() {
            return refuse("TrainConfig.data", "no data file given".into());
        }
        self.validate_paths()?;
        for (setting, v) in [
            ("TrainConfig.seq_len", self.seq_len),
            ("TrainConfig.batch", self.batch),
            ("TrainConfig.grad_accum", self.grad_accum),
            ("TrainConfig.steps", self.steps),
            // Held-out files are evaluated over at least one sequence.
            (
                "TrainConfig.heldout_seqs",
                if self.heldout.is_empty() {
                    1
                } else {
                    self.heldout_seqs
                },
            ),
        ] {
            if v == 0 {
                return refuse(setting, "must be a positive number, got 0".into());
            }
        }
        self.validate_sizes()?;
        self.validate_rates()?;
        match (&self.lora, self.train) {
            (None, Trainables::Lora | Trainables::Both) => refuse(
                "TrainConfig.lora",
                format!(
                    "needed to train `{}`: no LoRA adapters are set",
                    self.train.name()
                ),
            ),
            (Some(l), _) => validate_lora(l),
            _ => Ok(()),
        }
    }

    /// Every path is text (UTF-8): checkpoints record them in JSON.
    fn validate_paths(&self) -> Result<()> {
        let mut paths = (self.data.iter().map(|p| ("TrainConfig.data", p)))
            .chain(self.heldout.iter().map(|p| ("TrainConfig.heldout", p)))
            .chain(
                self.init_gates
                    .iter()
                    .map(|p| ("TrainConfig.init_gates", p)),
            );
        match paths.find(|(_, p)| p.to_str().is_none()) {
            Some((setting, p)) => refuse(
                setting,
                format!(
                    "{} is not valid UTF-8 (checkpoints record the paths as text)",
                    p.display()
                ),
            ),
            None => Ok(()),
        }
    }

    /// The real-valued settings within their domains.
    fn validate_rates(&self) -> Result<()> {
        let positive: fn(f64) -> bool = |x| x.is_finite() && x > 0.0;
        let non_negative: fn(f64) -> bool = |x| x.is_finite() && x >= 0.0;
        let ratio: fn(f64) -> bool = |x| (0.0..=1.0).contains(&x);
        let rules = [
            (
                "TrainConfig.lr",
                self.lr,
                positive,
                "a positive learning rate",
            ),
            (
                "TrainConfig.target_evict",
                self.target_evict,
                ratio,
                "a ratio in [0, 1]",
            ),
            (
                "TrainConfig.lambda",
                self.lambda,
                non_negative,
                "a non-negative weight",
            ),
            (
                "TrainConfig.clip",
                self.clip,
                non_negative,
                "a non-negative norm",
            ),
            (
                "TrainConfig.weight_decay",
                self.weight_decay,
                non_negative,
                "a non-negative decay",
            ),
            (
                "TrainConfig.min_lr_ratio",
                self.min_lr_ratio,
                ratio,
                "a ratio in [0, 1]",
            ),
        ];
        for (setting, v, accepts, want) in rules {
            if !accepts(v) {
                return refuse(setting, format!("must be {want}, got {v}"));
            }
        }
        Ok(())
    }

    /// The sizes of a step: micro-batches per step and tokens per micro-batch within their
    /// limits, and the run's sequence count within 64 bits.
    fn validate_sizes(&self) -> Result<()> {
        if self.grad_accum > MAX_GRAD_ACCUM {
            return refuse(
                "TrainConfig.grad_accum",
                format!(
                    "{}: at most {MAX_GRAD_ACCUM} micro-batches per optimiser step",
                    self.grad_accum
                ),
            );
        }
        if self.batch.saturating_mul(self.seq_len) > MAX_MICRO_BATCH_TOKENS {
            // One sequence alone too long is the sequence length's fault, not the batch's.
            if self.batch == 1 {
                return refuse(
                    "TrainConfig.seq_len",
                    format!(
                        "{} tokens: at most {MAX_MICRO_BATCH_TOKENS} tokens fit in a micro-batch",
                        self.seq_len
                    ),
                );
            }
            return refuse(
                "TrainConfig.batch",
                format!(
                    "{} sequences of {} tokens: at most {MAX_MICRO_BATCH_TOKENS} tokens fit in a micro-batch (larger batches accumulate several micro-batches per step)",
                    self.batch, self.seq_len
                ),
            );
        }
        let sequences = self
            .steps
            .checked_mul(self.grad_accum)
            .and_then(|m| m.checked_mul(self.batch));
        if sequences.is_none() {
            return refuse(
                "TrainConfig.steps",
                format!(
                    "{} steps of {} micro-batches of {} sequences: the run's sequence count must fit in 64 bits",
                    self.steps, self.grad_accum, self.batch
                ),
            );
        }
        Ok(())
    }

    /// The configuration as a checkpoint records it and a resume compares it: everything but
    /// `steps`, `heldout*` and unset options.
    pub(super) fn resume_key(&self) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(self).map_err(|e| EngineError::Setting {
            setting: "TrainConfig",
            problem: format!("cannot be recorded for checkpoints: {e}"),
        })?;
        if let Some(o) = v.as_object_mut() {
            o.remove("steps");
            o.remove("heldout");
            o.remove("heldout_seqs");
        }
        Ok(without_nulls(v))
    }
}

/// The LoRA settings within their domains: a positive rank, a finite alpha, known targets;
/// each error names its field (`TrainConfig.lora.rank`).
fn validate_lora(l: &LoraConfig) -> Result<()> {
    if l.rank == 0 {
        return refuse(
            "TrainConfig.lora.rank",
            "must be a positive number, got 0".into(),
        );
    }
    if !l.alpha.is_finite() {
        return refuse(
            "TrainConfig.lora.alpha",
            format!("must be a finite number, got {}", l.alpha),
        );
    }
    let known = model_zoo::train::LORA_TARGETS;
    if l.targets.is_empty() {
        let problem = format!("no target given (expected some of {})", known.join(", "));
        return refuse("TrainConfig.lora.targets", problem);
    }
    match l.targets.iter().find(|t| !known.contains(&t.as_str())) {
        Some(bad) => refuse(
            "TrainConfig.lora.targets",
            format!("unknown `{bad}` (expected some of {})", known.join(", ")),
        ),
        None => Ok(()),
    }
}

/// The error of a setting outside its domain.
fn refuse(setting: &'static str, problem: String) -> Result<()> {
    Err(EngineError::Setting { setting, problem })
}

/// A JSON object without its null fields: an unset optional setting compares equal to one that
/// a checkpoint written before the setting existed never had.
pub(super) fn without_nulls(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        o.retain(|_, value| !value.is_null());
    }
    v
}

/// The settings two resume keys disagree on, each as its field in backticks and its two values
/// ("`lr` 0.005 in the checkpoint, 0.001 now"), separated by `; `.
pub(super) fn differences(recorded: &serde_json::Value, now: &serde_json::Value) -> String {
    let (empty, none) = (serde_json::Map::new(), serde_json::Value::Null);
    let (recorded, now) = (
        recorded.as_object().unwrap_or(&empty),
        now.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = recorded.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    let shown = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "unset".to_string(),
        v => v.to_string(),
    };
    keys.into_iter()
        .filter_map(|k| {
            let (was, is) = (
                recorded.get(k).unwrap_or(&none),
                now.get(k).unwrap_or(&none),
            );
            (was != is)
                .then(|| format!("`{k}` {} in the checkpoint, {} now", shown(was), shown(is)))
        })
        .collect::<Vec<_>>()
        .join("; ")
}
