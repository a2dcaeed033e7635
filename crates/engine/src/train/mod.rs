//! Attention-Gate training on a frozen base model: continual pre-training (CPT) and
//! supervised fine-tuning (SFT), optionally with LoRA adapters, with candle autograd.
//!
//! Owns [`TrainConfig`], [`Trainer`] (the loop), [`StepReport`] and [`HeldOut`]. The loop, per
//! optimiser step: `grad_accum` micro-batches of `batch` sequences, each through
//! `model_zoo::train::TrainableDecoder` with the gates' straight-through hard mask; loss =
//! masked CE + `lambda * (r_target - mean(1 - s))^2` over valid unprotected tokens of every layer and KV
//! head, divided by `grad_accum`; gradients summed, clipped to a global norm, AdamW at the
//! scheduled learning rate (linear warmup, cosine decay to 10%). The masked attention applies
//! the inference policy's protections (`sinks`, local `window`), which the gates file records.
//! With `adapt_lambda`, after each step past the warmup the loss's soft target moves by 2% of
//! the gap between the run's target and the smoothed *hard* eviction ratio, within
//! [`SOFT_TARGET_RANGE`] of the target (the hard ratio is what eviction does; a soft mean on
//! target can leave it far off), and lambda is multiplied by 1.05 while the soft ratio is more
//! than 3 points off that soft target, divided by 1.05 once it is within 1 point (bounded to
//! [1/10, 10] times its initial value). After training,
//! [`Trainer::calibrate_threshold`] sets `tau` so that the hard ratio on training sequences
//! meets the target exactly.
//!
//! Invariants: base weights never receive gradients (they are plain tensors; only gate and LoRA
//! `Var`s are optimised); a run is a function of its config (seeded init, data order from
//! `(seed, step)`), and resuming from a checkpoint continues it exactly; checkpoints and the
//! final gates file are written atomically; the final gates carry the engine's model identity.

pub mod dataset;
pub mod optim;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use gate_core::{AttentionGate, GateFileDtype, Protection};
pub use model_zoo::train::LoraConfig;
use model_zoo::train::{GateMode, Gating, Lora, TrainableDecoder};
use model_zoo::{GgufFile, ModelConfig, WeightFormat, Weights};

use crate::engine::Engine;
use crate::error::{EngineError, Result};
pub use dataset::{Example, Mode};
use optim::{AdamW, LoopState};

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Model(model_zoo::ModelError::from(e))
    }
}

/// Most tokens in one micro-batch (`batch × seq_len`): its logits alone take
/// `tokens × vocab × 4` bytes.
pub const MAX_MICRO_BATCH_TOKENS: usize = 16_384;

/// Most micro-batches per optimiser step (a step must end, and checkpoint, in reasonable time).
pub const MAX_GRAD_ACCUM: usize = 4096;

/// How far the adaptive controller may move the eviction loss's soft target from the run's
/// target.
pub const SOFT_TARGET_RANGE: f64 = 0.25;

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
            other => Err(EngineError::Invalid(format!(
                "invalid --train `{other}` (expected gates, lora or both)"
            ))),
        }
    }

    fn gates(self) -> bool {
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
    /// Held-out sequences evaluated at the end (at most).
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
    /// Checks every value; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, v: String, want: &str| {
            Err(EngineError::Invalid(format!("{flag} {v}: expected {want}")))
        };
        if self.data.is_empty() {
            return bad("--data", "(none)".into(), "at least one file");
        }
        for (flag, v) in [
            ("--seq-len", self.seq_len),
            ("--batch", self.batch),
            ("--grad-accum", self.grad_accum),
            ("--steps", self.steps),
        ] {
            if v == 0 {
                return bad(flag, v.to_string(), "a positive number");
            }
        }
        if self.grad_accum > MAX_GRAD_ACCUM {
            return bad(
                "--grad-accum",
                self.grad_accum.to_string(),
                &format!("at most {MAX_GRAD_ACCUM} micro-batches per optimiser step"),
            );
        }
        if self.batch.saturating_mul(self.seq_len) > MAX_MICRO_BATCH_TOKENS {
            return bad(
                "--batch",
                format!("{} × --seq-len {}", self.batch, self.seq_len),
                &format!("at most {MAX_MICRO_BATCH_TOKENS} tokens per micro-batch (use --grad-accum for larger batches)"),
            );
        }
        if self
            .steps
            .checked_mul(self.grad_accum)
            .and_then(|m| m.checked_mul(self.batch))
            .is_none()
        {
            return bad(
                "--steps",
                format!(
                    "{} × --grad-accum {} × --batch {}",
                    self.steps, self.grad_accum, self.batch
                ),
                "a run whose sequence count fits in 64 bits",
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("--lr", self.lr.to_string(), "a positive learning rate");
        }
        if !(0.0..=1.0).contains(&self.target_evict) {
            return bad(
                "--target-evict",
                self.target_evict.to_string(),
                "a ratio in [0, 1]",
            );
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return bad("--lambda", self.lambda.to_string(), "a non-negative weight");
        }
        if !(self.clip.is_finite() && self.clip >= 0.0) {
            return bad("--clip", self.clip.to_string(), "a non-negative norm");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "--weight-decay",
                self.weight_decay.to_string(),
                "a non-negative decay",
            );
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(
                "--min-lr-ratio",
                self.min_lr_ratio.to_string(),
                "a ratio in [0, 1]",
            );
        }
        match (&self.lora, self.train) {
            (None, Trainables::Lora | Trainables::Both) => {
                return bad(
                    "--train",
                    format!("{:?}", self.train).to_lowercase(),
                    "--lora-rank R as well",
                )
            }
            (Some(l), _) => l.validate()?,
            _ => {}
        }
        Ok(())
    }
}

/// Figures of one optimiser step (one line of the training log).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StepReport {
    /// 1-based step.
    pub step: usize,
    /// Total loss (CE + eviction term).
    pub loss: f64,
    /// Masked cross-entropy.
    pub ce: f64,
    /// Mean soft eviction `mean(1 - s)` over valid tokens, layers and heads.
    pub soft_evict: f64,
    /// Hard eviction ratio `mean(s <= tau)`.
    pub hard_evict: f64,
    /// Eviction-loss weight used.
    pub lambda: f64,
    /// The eviction loss's soft target used (the run's target unless adapted).
    pub soft_target: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// The update was skipped (non-finite gradient).
    pub skipped: bool,
    /// Input tokens per second of this step.
    pub tokens_per_s: f64,
    /// Seconds since the run (or resume) started.
    pub elapsed_s: f64,
}

/// Held-out evaluation: perplexity (over all tokens in CPT, answer tokens in SFT) of the base
/// model and of the trained model with the full cache and with the gates' hard flags, and the
/// eviction ratios reached.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HeldOut {
    /// Sequences evaluated.
    pub sequences: usize,
    /// Tokens scored.
    pub tokens: usize,
    /// Perplexity of the base model (no LoRA) with the full cache.
    pub ppl_base: f64,
    /// Perplexity of the trained model (with LoRA adapters, if any) with the full cache.
    pub ppl_full: f64,
    /// Perplexity of the trained model with in-context eviction by the gates' hard flags
    /// (`None` when the run trains no gates).
    pub ppl_gates: Option<f64>,
    /// Hard eviction ratio on the held-out data (0 without gates).
    pub hard_evict: f64,
    /// Soft eviction ratio on the held-out data (0 without gates).
    pub soft_evict: f64,
}

/// A JSON object without its null fields: an unset optional setting compares equal to one that
/// a checkpoint written before the setting existed never had.
fn without_nulls(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        o.retain(|_, value| !value.is_null());
    }
    v
}

/// Opens the decoder of `path` (GGUF file or Hugging Face directory) with dense f32 weights.
pub fn open_trainable(path: &std::path::Path, cfg: &ModelConfig) -> Result<TrainableDecoder> {
    let format = WeightFormat::Dense(DType::F32);
    let weights = if path.is_dir() {
        Weights::from_safetensors_dir(path, format)?
    } else {
        Weights::from_gguf(GgufFile::open(path)?, format)
    };
    Ok(TrainableDecoder::load(cfg, &weights)?)
}

/// A training run.
pub struct Trainer {
    engine: Engine,
    cfg: TrainConfig,
    decoder: TrainableDecoder,
    gates: AttentionGate,
    lora: Option<Lora>,
    opt: AdamW,
    examples: Vec<Example>,
    state: LoopState,
}

impl Trainer {
    /// Loads the dense decoder, the data, and initialises gates (`init_gates`, else seeded
    /// with bias `gate_bias_init`), LoRA and the optimiser.
    pub fn new(engine: &Engine, cfg: TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let model = engine.model_config();
        if cfg.seq_len > model.max_position {
            return Err(EngineError::Invalid(format!(
                "--seq-len {}: longer than the model's context of {} tokens",
                cfg.seq_len, model.max_position
            )));
        }
        if let Some(l) = &cfg.lora {
            if l.rank > model.hidden_size {
                return Err(EngineError::Invalid(format!(
                    "--lora-rank {}: larger than the model's hidden size {} (a rank above it adds nothing)",
                    l.rank, model.hidden_size
                )));
            }
        }
        let examples = dataset::load(cfg.mode, &cfg.data, engine.tokenizer(), cfg.seq_len)?;
        let decoder = open_trainable(engine.model_path(), engine.model_config())?;
        let mut gates = match &cfg.init_gates {
            Some(path) => {
                let mut g = AttentionGate::load(path, &engine.model_identity()?, &Device::Cpu)?;
                g.set_threshold(0.5)?;
                g
            }
            None => {
                let mut gate_cfg = engine.gate_config();
                gate_cfg.bias_init = cfg.gate_bias_init.unwrap_or(gate_cfg.bias_init);
                gate_cfg.attention_window = cfg
                    .gate_attention_window
                    .unwrap_or(gate_cfg.attention_window);
                engine.random_gates(&gate_cfg, cfg.seed)?
            }
        };
        gates.set_protection(Protection {
            sinks: cfg.sinks,
            recent: cfg.window,
        });
        let (gates, gate_vars) = gates.into_trainable()?;
        let lora = match &cfg.lora {
            Some(l) if cfg.train != Trainables::Gates => {
                Some(Lora::new(&decoder, l, cfg.seed ^ 0x10ba)?)
            }
            _ => None,
        };
        let mut vars: Vec<(String, Var)> = Vec::new();
        if cfg.train.gates() {
            let data = gate_vars
                .data()
                .lock()
                .map_err(|_| EngineError::Invalid("poisoned gate VarMap".into()))?;
            let mut named: Vec<(String, Var)> =
                data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            vars.extend(named.into_iter().map(|(k, v)| (format!("gate.{k}"), v)));
        }
        if let Some(l) = &lora {
            vars.extend(l.named_vars());
        }
        let opt = AdamW::new(vars, cfg.weight_decay)?;
        let state = LoopState {
            step: 0,
            lambda: cfg.lambda,
            hard_ema: None,
            soft_target: cfg.target_evict,
            seed: cfg.seed,
            config: Self::config_key(&cfg)?,
        };
        Ok(Trainer {
            engine: engine.clone(),
            cfg,
            decoder,
            gates,
            lora,
            opt,
            examples,
            state,
        })
    }

    /// The configuration as compared on resume (everything but `steps`, `heldout*` and unset
    /// options).
    fn config_key(cfg: &TrainConfig) -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(cfg).map_err(|e| EngineError::Invalid(e.to_string()))?;
        if let Some(o) = v.as_object_mut() {
            o.remove("steps");
            o.remove("heldout");
            o.remove("heldout_seqs");
        }
        Ok(without_nulls(v))
    }

    /// Sequences available for training.
    pub fn n_examples(&self) -> usize {
        self.examples.len()
    }

    /// Optimiser steps completed.
    pub fn step(&self) -> usize {
        self.state.step
    }

    /// The gates being trained (identity of the engine's model).
    pub fn gates(&self) -> &AttentionGate {
        &self.gates
    }

    /// Restores a checkpoint written by this configuration; returns the step reports it
    /// records (every step up to it).
    pub fn resume(&mut self, path: &std::path::Path) -> Result<Vec<StepReport>> {
        let (state, log) = optim::load_checkpoint(path, &mut self.opt)?;
        if without_nulls(state.config.clone()) != self.state.config {
            return Err(EngineError::Invalid(format!(
                "{}: the checkpoint was written by a different configuration ({}); only --steps may change on resume",
                path.display(),
                state.config
            )));
        }
        let steps: Vec<StepReport> = serde_json::from_str(&log).map_err(|e| {
            EngineError::Invalid(format!("{}: metadata `log`: {e}", path.display()))
        })?;
        if steps.len() != state.step || steps.iter().enumerate().any(|(i, r)| r.step != i + 1) {
            return Err(EngineError::Invalid(format!(
                "{}: the checkpoint records {} step reports for {} steps",
                path.display(),
                steps.len(),
                state.step
            )));
        }
        self.state = state;
        Ok(steps)
    }

    /// Writes a checkpoint of the current state and of `steps` (the report of every step so
    /// far) to `path` (atomic, checksummed).
    pub fn save_checkpoint(&self, path: &std::path::Path, steps: &[StepReport]) -> Result<()> {
        let log = serde_json::to_string(steps).map_err(|e| EngineError::Invalid(e.to_string()))?;
        optim::save_checkpoint(path, &self.opt, &self.state, &log)
    }

    /// Writes the gates (with the model identity) to `path` atomically in `dtype`; a run whose
    /// parameters are no longer finite (it diverged) writes nothing.
    pub fn save_gates(&self, path: &std::path::Path, dtype: GateFileDtype) -> Result<()> {
        if let Some(name) = self.opt.first_non_finite()? {
            return Err(EngineError::Invalid(format!(
                "{}: not written: parameter `{name}` is no longer finite, the run diverged (lower --lr or --lambda)",
                path.display()
            )));
        }
        let mut g = self.gates.clone();
        g.set_identity(self.engine.model_identity()?);
        crate::policy::write_gates(&g, path, dtype)
    }

    /// Writes the LoRA adapters (if any) as safetensors with their config in the metadata.
    pub fn save_lora(&self, path: &std::path::Path) -> Result<()> {
        let Some(l) = &self.lora else {
            return Err(EngineError::Invalid(
                "no LoRA adapters in this run (--lora-rank)".into(),
            ));
        };
        let tensors: Vec<(String, Tensor)> = l
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        let meta = std::collections::HashMap::from([
            ("format".to_string(), "agate-lora".to_string()),
            (
                "lora_config".to_string(),
                serde_json::to_string(l.config())
                    .map_err(|e| EngineError::Invalid(e.to_string()))?,
            ),
        ]);
        let bytes = safetensors::serialize(tensors, Some(meta))
            .map_err(|e| EngineError::Invalid(format!("{}: {e}", path.display())))?;
        crate::atomic::write_atomically(path, |w| w.write_all(&bytes))?;
        Ok(())
    }

    /// Builds `[B, T]` inputs, `[B, T]` targets, the CE mask and the mask of the tokens the
    /// eviction loss counts (valid, not padding, and not a protected sink) for examples.
    fn batch_tensors(&self, idx: &[usize]) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let examples: Vec<&Example> = idx.iter().map(|&i| &self.examples[i]).collect();
        Self::example_tensors(&examples, self.cfg.sinks)
    }

    /// [`Trainer::batch_tensors`] of given examples (all of one length), the first `sinks`
    /// positions not counted by the eviction loss.
    fn example_tensors(
        examples: &[&Example],
        sinks: usize,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let b = examples.len();
        let t = examples
            .first()
            .map_or(0, |e| e.tokens.len().saturating_sub(1));
        let (mut inp, mut tgt, mut cem, mut val) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for e in examples {
            inp.extend_from_slice(&e.tokens[..t]);
            tgt.extend_from_slice(&e.tokens[1..]);
            cem.extend(e.target_mask.iter().map(|&m| f32::from(u8::from(m))));
            let counted = |(i, &m): (usize, &bool)| f32::from(u8::from(m && i >= sinks));
            val.extend(e.valid.iter().enumerate().map(counted));
        }
        let dev = Device::Cpu;
        Ok((
            Tensor::from_vec(inp, (b, t), &dev)?,
            Tensor::from_vec(tgt, (b, t), &dev)?,
            Tensor::from_vec(cem, (b, t), &dev)?,
            Tensor::from_vec(val, (b, t), &dev)?,
        ))
    }

    /// Masked mean CE of `logits [B, T, V]` against `targets [B, T]` under `mask [B, T]`.
    fn masked_ce(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<(Tensor, f64)> {
        let lsm = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let picked = lsm
            .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
            .squeeze(D::Minus1)?;
        let n = mask.sum_all()?.to_scalar::<f32>()? as f64;
        let nll = (picked * mask)?.sum_all()?.neg()?;
        let ce = (nll / n.max(1.0))?;
        Ok((ce, n))
    }

    /// One optimiser step (all micro-batches); returns its report.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        let cfg = &self.cfg;
        let step = self.state.step;
        let lr = optim::lr_at(step, cfg.steps, cfg.warmup, cfg.lr, cfg.min_lr_ratio);
        let use_gates = cfg.train.gates();
        let tau = self.gates.config().threshold;
        let mut grads: Vec<Option<Tensor>> = vec![None; self.opt.vars().len()];
        let (mut loss_sum, mut ce_sum, mut soft_sum, mut hard_sum) = (0.0, 0.0, 0.0, 0.0);
        let mut tokens = 0usize;
        for k in 0..cfg.grad_accum {
            let micro = (step * cfg.grad_accum + k) as u64;
            let idx = dataset::batch_indices(self.examples.len(), cfg.batch, cfg.seed, micro);
            let (inp, tgt, cem, valid) = self.batch_tensors(&idx)?;
            tokens += inp.elem_count();
            let out = self.decoder.forward(
                &inp,
                use_gates.then(|| self.gating(GateMode::Ste)),
                self.lora.as_ref(),
            )?;
            let (ce, _) = Self::masked_ce(&out.logits, &tgt, &cem)?;
            let mut loss = ce.clone();
            if use_gates {
                let s = Tensor::stack(&out.keep_probs, 0)?; // [L, B, T, Hkv]
                let l = s.dim(0)?;
                let vmask = valid
                    .unsqueeze(0)?
                    .broadcast_as((l, cfg.batch, cfg.seq_len))?
                    .contiguous()?;
                let ev = gate_core::eviction_loss(
                    &s,
                    &vmask,
                    self.state.soft_target as f32,
                    self.state.lambda as f32,
                )?;
                let r = gate_core::eviction_ratios(&s.detach(), &vmask, tau)?;
                soft_sum += r.soft;
                hard_sum += r.hard;
                loss = (loss + ev)?;
            }
            let scaled = (&loss / cfg.grad_accum as f64)?;
            let gs = scaled.backward()?;
            for (i, (_, var)) in self.opt.vars().iter().enumerate() {
                if let Some(g) = gs.get(var.as_tensor()) {
                    grads[i] = Some(match grads[i].take() {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    });
                }
            }
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let ce = ce.to_scalar::<f32>()? as f64;
            if !ce.is_finite() {
                return Err(self.broken_model(step + 1));
            }
            ce_sum += ce;
        }
        let grad_norm = optim::clip_grads(&mut grads, cfg.clip)?;
        // A non-finite gradient (overflow in a straight-through path) would poison every
        // parameter: the step is skipped (reported as `skipped`).
        let skipped = !grad_norm.is_finite();
        if !skipped {
            self.opt.step(&grads, lr)?;
        }
        let n = cfg.grad_accum as f64;
        let (soft, hard) = (soft_sum / n, hard_sum / n);
        let (lambda_used, soft_target_used) = (self.state.lambda, self.state.soft_target);
        if cfg.adapt_lambda && use_gates {
            self.adapt(soft, hard);
        }
        self.state.step += 1;
        let secs = started.elapsed().as_secs_f64();
        Ok(StepReport {
            step: self.state.step,
            loss: loss_sum / n,
            ce: ce_sum / n,
            soft_evict: soft,
            hard_evict: hard,
            lambda: lambda_used,
            soft_target: soft_target_used,
            lr,
            grad_norm,
            skipped,
            tokens_per_s: tokens as f64 / secs.max(1e-9),
            elapsed_s: 0.0,
        })
    }

    /// The error of a non-finite cross-entropy: the frozen base model's weights (or metadata)
    /// are broken, no training can help.
    fn broken_model(&self, step: usize) -> EngineError {
        EngineError::NonFiniteLoss {
            model: self.engine.model_path().to_path_buf(),
            step,
        }
    }

    /// The controller of `adapt_lambda` (see the module header), after a step with these
    /// soft and hard eviction ratios.
    fn adapt(&mut self, soft: f64, hard: f64) {
        let cfg = &self.cfg;
        let st = &mut self.state;
        let ema = st.hard_ema.map_or(hard, |e| 0.8 * e + 0.2 * hard);
        st.hard_ema = Some(ema);
        if st.step < cfg.warmup {
            return; // the gates start above the threshold: no wind-up while they come down
        }
        let r = cfg.target_evict;
        st.soft_target = (st.soft_target + 0.02 * (r - ema)).clamp(
            (r - SOFT_TARGET_RANGE).max(0.0),
            (r + SOFT_TARGET_RANGE).min(1.0),
        );
        let gap = (soft - st.soft_target).abs();
        if gap > 0.03 {
            st.lambda = (st.lambda * 1.05).min(cfg.lambda * 10.0);
        } else if gap < 0.01 {
            st.lambda = (st.lambda / 1.05).max(cfg.lambda / 10.0);
        }
    }

    /// How the gates steer a forward of this run.
    fn gating(&self, mode: GateMode) -> Gating<'_> {
        Gating {
            gates: &self.gates,
            mode,
            protect: self.gates.config().protection(),
        }
    }

    /// Sets the threshold `tau` so that the hard eviction ratio over `seqs` training sequences
    /// spread evenly over the training set (valid tokens, every layer and KV head) equals the
    /// target: `tau` becomes the target quantile of the keep probabilities. The probabilities of later layers depend on
    /// the flags of earlier ones, so this repeats `rounds` times from the new `tau`. Returns the
    /// hard ratio measured with the final `tau` (the fixed point is approached, not exact).
    pub fn calibrate_threshold(&mut self, seqs: usize, rounds: usize) -> Result<f64> {
        let total = self.examples.len();
        let n = seqs.clamp(1, total);
        // Evenly spaced over the training set, so that every kind of text in a mixture (files
        // in the order given: prose, retrieval prompts, chats) weighs in as it does in training:
        // the ratio a threshold gives depends on the kind of text.
        let idx: Vec<usize> = (0..n).map(|k| k * total / n).collect();
        let mut measured = 0.0;
        for round in 0..=rounds {
            let mut probs: Vec<f32> = Vec::new();
            let (mut hard, mut count) = (0.0, 0.0);
            let tau = self.gates.config().threshold;
            for &i in &idx {
                let (inp, _, _, valid) = self.batch_tensors(&[i])?;
                let out = self.decoder.forward(
                    &inp,
                    Some(self.gating(GateMode::Hard)),
                    self.lora.as_ref(),
                )?;
                let valid = valid.flatten_all()?.to_vec1::<f32>()?;
                for s in &out.keep_probs {
                    // [1, T, Hkv]
                    for (t, row) in s.squeeze(0)?.to_vec2::<f32>()?.iter().enumerate() {
                        if valid[t] > 0.0 {
                            probs.extend(row);
                            hard += row.iter().filter(|&&p| p <= tau).count() as f64;
                            count += row.len() as f64;
                        }
                    }
                }
            }
            measured = hard / count.max(1.0);
            if round == rounds || probs.is_empty() {
                break;
            }
            probs.sort_by(f32::total_cmp);
            let k = ((self.cfg.target_evict * probs.len() as f64).round() as usize)
                .clamp(1, probs.len());
            // Evicted iff s <= tau: the k smallest probabilities.
            let above = probs.get(k).copied().unwrap_or(1.0);
            self.gates.set_threshold(0.5 * (probs[k - 1] + above))?;
        }
        Ok(measured)
    }

    /// Reads held-out files in the run's format (CPT text packed at `seq_len`, or SFT items
    /// scored on their answer tokens), for [`Trainer::evaluate`]: a caller reads them before
    /// training, so that a bad or empty file is refused before the run rather than after it.
    pub fn load_heldout(&self, files: &[PathBuf]) -> Result<Vec<dataset::Example>> {
        dataset::load(
            self.cfg.mode,
            files,
            self.engine.tokenizer(),
            self.cfg.seq_len,
        )
    }

    /// Evaluates on held-out examples ([`Trainer::load_heldout`]), over at most `max_seqs`
    /// sequences (the first ones, in file order): perplexity of the base model with the full
    /// cache, of the trained model (LoRA adapters, if any) with the full cache and with the
    /// gates' hard flags, and the eviction ratios.
    pub fn evaluate(&self, mut ex: Vec<dataset::Example>, max_seqs: usize) -> Result<HeldOut> {
        ex.truncate(max_seqs.max(1));
        let lora = self.lora.as_ref();
        let (mut nll_base, mut nll_full, mut nll_gate, mut n_tok) = (0.0, 0.0, 0.0, 0.0);
        let (mut soft, mut hard) = (0.0, 0.0);
        for e in &ex {
            let (inp, tgt, cem, valid) = Self::example_tensors(&[e], self.cfg.sinks)?;
            let nll = |logits: &Tensor| -> Result<f64> {
                let (ce, n) = Self::masked_ce(&logits.detach(), &tgt, &cem)?;
                Ok(ce.to_scalar::<f32>()? as f64 * n)
            };
            let n = cem.sum_all()?.to_scalar::<f32>()? as f64;
            if self.cfg.train.gates() {
                let gated = self
                    .decoder
                    .forward(&inp, Some(self.gating(GateMode::Hard)), lora)?;
                nll_gate += nll(&gated.logits)?;
                let s = Tensor::stack(&gated.keep_probs, 0)?.detach();
                let l = s.dim(0)?;
                let vmask = valid.broadcast_as((l, 1, self.cfg.seq_len))?.contiguous()?;
                let r = gate_core::eviction_ratios(&s, &vmask, self.gates.config().threshold)?;
                soft += r.soft;
                hard += r.hard;
            }
            let full = nll(&self.decoder.forward(&inp, None, lora)?.logits)?;
            nll_full += full;
            nll_base += match lora {
                Some(_) => nll(&self.decoder.forward(&inp, None, None)?.logits)?,
                None => full,
            };
            n_tok += n;
        }
        if !(nll_base.is_finite() && nll_full.is_finite() && nll_gate.is_finite()) {
            return Err(self.broken_model(self.state.step));
        }
        let n = ex.len() as f64;
        let ppl = |nll: f64| (nll / n_tok.max(1.0)).exp();
        Ok(HeldOut {
            sequences: ex.len(),
            tokens: n_tok as usize,
            ppl_base: ppl(nll_base),
            ppl_full: ppl(nll_full),
            ppl_gates: self.cfg.train.gates().then(|| ppl(nll_gate)),
            hard_evict: hard / n,
            soft_evict: soft / n,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }
}
