//! Attention-Gate training on a frozen base model: continual pre-training (CPT) and
//! supervised fine-tuning (SFT), optionally with LoRA adapters, with candle autograd.
//!
//! Owns [`Trainer`]: a run built (dense decoder, data, gates, LoRA, optimiser), resumed from
//! and saved to checkpoints, its gates and adapters written. Its parts: `config` (the
//! settings, [`TrainConfig`], and their checks), `step` (one optimiser step, [`StepReport`]),
//! `measure` (threshold calibration and the held-out evaluation, [`HeldOut`]), [`dataset`]
//! (the examples and their order) and [`optim`] (AdamW, the schedule, checkpoint files).
//!
//! The loop, per optimiser step: `grad_accum` micro-batches of `batch` sequences, each through
//! `model_zoo::train::TrainableDecoder` with the gates' straight-through hard mask; loss =
//! masked CE + `lambda * (r_target - mean(1 - s))^2` over valid unprotected tokens of every
//! layer and KV head, divided by `grad_accum`; gradients summed, clipped to a global norm, AdamW at the
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

mod config;
pub mod dataset;
mod measure;
pub mod optim;
mod step;

use std::path::Path;
use std::sync::PoisonError;

use candle_core::{DType, Device, Tensor, Var, D};
use gate_core::{AttentionGate, GateFileDtype, Protection};
use model_zoo::train::{GateMode, Gating, Lora, TrainableDecoder};
use model_zoo::{GgufFile, ModelConfig, WeightFormat, Weights};

use crate::engine::Engine;
use crate::error::{EngineError, Result};
pub use config::{LoraConfig, TrainConfig, Trainables, MAX_GRAD_ACCUM, MAX_MICRO_BATCH_TOKENS};
pub use dataset::{Example, Mode};
pub use measure::HeldOut;
use optim::{AdamW, LoopState};
pub use step::{StepReport, SOFT_TARGET_RANGE};

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Model(model_zoo::ModelError::from(e))
    }
}

/// Opens the decoder of `path` (GGUF file or Hugging Face directory) with dense f32 weights.
pub fn open_trainable(path: &Path, cfg: &ModelConfig) -> Result<TrainableDecoder> {
    let format = WeightFormat::Dense(DType::F32);
    let weights = if path.is_dir() {
        Weights::from_safetensors_dir(path, format)?
    } else {
        Weights::from_gguf(GgufFile::open(path)?, format)
    };
    Ok(TrainableDecoder::load(cfg, &weights)?)
}

/// Checks the settings that depend on the model: sequences within its context, a LoRA rank
/// within its hidden size.
fn check_fits_model(cfg: &TrainConfig, model: &ModelConfig) -> Result<()> {
    if cfg.seq_len > model.max_position {
        return Err(EngineError::Setting {
            setting: "TrainConfig.seq_len",
            problem: format!(
                "{} is longer than the model's context of {} tokens",
                cfg.seq_len, model.max_position
            ),
        });
    }
    match &cfg.lora {
        Some(l) if l.rank > model.hidden_size => Err(EngineError::Setting {
            setting: "TrainConfig.lora.rank",
            problem: format!(
                "{} is larger than the model's hidden size {} (a rank above it adds nothing)",
                l.rank, model.hidden_size
            ),
        }),
        _ => Ok(()),
    }
}

/// The gates a run starts from: `init_gates` (made for this model; threshold reset to 0.5),
/// else seeded random gates with the run's bias and attention window; with the run's
/// protections either way.
fn initial_gates(engine: &Engine, cfg: &TrainConfig) -> Result<AttentionGate> {
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
    Ok(gates)
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
        check_fits_model(&cfg, engine.model_config())?;
        let examples = dataset::load(cfg.mode, &cfg.data, engine.tokenizer(), cfg.seq_len)?;
        let decoder = open_trainable(engine.model_path(), engine.model_config())?;
        let (gates, gate_vars) = initial_gates(engine, &cfg)?.into_trainable()?;
        let lora = match &cfg.lora {
            Some(l) if cfg.train != Trainables::Gates => {
                Some(Lora::new(&decoder, l, cfg.seed ^ 0x10ba)?)
            }
            _ => None,
        };
        let mut vars: Vec<(String, Var)> = Vec::new();
        if cfg.train.gates() {
            // A lock poisoned by a panic elsewhere still holds the variables as made.
            let data = gate_vars
                .data()
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
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
            config: cfg.resume_key()?,
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
    pub fn resume(&mut self, path: &Path) -> Result<Vec<StepReport>> {
        let (state, log) = optim::load_checkpoint(path, &mut self.opt)?;
        let mismatch = |problem: String| optim::checkpoint_err(path, problem, None);
        let recorded = config::without_nulls(state.config.clone());
        if recorded != self.state.config {
            return Err(mismatch(
                format!(
                    "the checkpoint was written by a different configuration ({}); only the number of steps may change on resume",
                    config::differences(&recorded, &self.state.config)
                ),
            ));
        }
        let steps: Vec<StepReport> = serde_json::from_str(&log)
            .map_err(|e| optim::checkpoint_err(path, "metadata `log`", Some(Box::new(e))))?;
        if steps.len() != state.step || steps.iter().enumerate().any(|(i, r)| r.step != i + 1) {
            return Err(mismatch(format!(
                "the checkpoint records {} step reports for {} steps",
                steps.len(),
                state.step
            )));
        }
        self.state = state;
        Ok(steps)
    }

    /// Writes a checkpoint of the current state and of `steps` (the report of every step so
    /// far) to `path` (atomic, checksummed).
    pub fn save_checkpoint(&self, path: &Path, steps: &[StepReport]) -> Result<()> {
        let log = serde_json::to_string(steps).map_err(|e| {
            optim::checkpoint_err(path, "cannot record the step reports", Some(Box::new(e)))
        })?;
        optim::save_checkpoint(path, &self.opt, &self.state, &log)
    }

    /// Writes the gates (with the model identity) to `path` atomically in `dtype`; a run whose
    /// parameters are no longer finite (it diverged) writes nothing.
    pub fn save_gates(&self, path: &Path, dtype: GateFileDtype) -> Result<()> {
        if let Some(parameter) = self.opt.first_non_finite()? {
            return Err(EngineError::Diverged {
                file: path.to_path_buf(),
                parameter: parameter.to_string(),
            });
        }
        let mut g = self.gates.clone();
        g.set_identity(self.engine.model_identity()?);
        crate::policy::write_gates(&g, path, dtype)
    }

    /// Writes the LoRA adapters (if any) as safetensors with their config in the metadata.
    pub fn save_lora(&self, path: &Path) -> Result<()> {
        let Some(l) = &self.lora else {
            return Err(EngineError::Setting {
                setting: "TrainConfig.lora",
                problem: "no LoRA adapters in this run".into(),
            });
        };
        let tensors: Vec<(String, Tensor)> = l
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        let cannot_write = |source: std::io::Error| {
            EngineError::Model(model_zoo::ModelError::Write {
                path: path.to_path_buf(),
                source,
            })
        };
        let lora_config = serde_json::to_string(l.config())
            .map_err(|e| cannot_write(std::io::Error::other(e)))?;
        let meta = std::collections::HashMap::from([
            ("format".to_string(), "agate-lora".to_string()),
            ("lora_config".to_string(), lora_config),
        ]);
        let bytes = safetensors::serialize(tensors, Some(meta))
            .map_err(|e| cannot_write(std::io::Error::other(e)))?;
        crate::atomic::write_atomically(path, |w| w.write_all(&bytes))?;
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
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

    /// The error of a non-finite cross-entropy at `step`: before any update the frozen base
    /// model's weights (or metadata) are broken, no training can help; after one, the run
    /// diverged.
    fn non_finite_loss(&self, step: usize) -> EngineError {
        if self.opt.t > 0 {
            return EngineError::TrainingDiverged { step };
        }
        self.broken_model(step)
    }

    /// The error of a non-finite cross-entropy of the frozen base model at `step`: its weights
    /// (or metadata) are broken.
    fn broken_model(&self, step: usize) -> EngineError {
        EngineError::NonFiniteLoss {
            model: self.engine.model_path().to_path_buf(),
            step,
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
}
