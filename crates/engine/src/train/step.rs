//! One optimiser step of a [`Trainer`] (the loop of the module header of `train`): its
//! micro-batches' forward and backward, the gradient clip and AdamW update, the `adapt_lambda`
//! controller, and the [`StepReport`] of the step.
//!
//! Invariants: micro-batch `k` of step `s` reads the examples of `(seed, s * grad_accum + k)`
//! and the step's figures are means over its micro-batches in that order; a non-finite
//! gradient skips the update (the step is reported `skipped`); a non-finite cross-entropy ends
//! the run: before any update the frozen model is broken ([`crate::EngineError::NonFiniteLoss`]),
//! after one the run diverged ([`crate::EngineError::TrainingDiverged`]).

use std::time::Instant;

use candle_core::Tensor;
use model_zoo::train::GateMode;

use super::{dataset, optim, Trainer};
use crate::error::Result;

/// How far the adaptive controller may move the eviction loss's soft target from the run's
/// target.
pub const SOFT_TARGET_RANGE: f64 = 0.25;

/// What one micro-batch adds to its step's figures.
struct MicroBatch {
    /// Total loss (CE + eviction term), unscaled.
    loss: f64,
    /// Masked cross-entropy.
    ce: f64,
    /// Soft eviction ratio (0 without gates).
    soft: f64,
    /// Hard eviction ratio (0 without gates).
    hard: f64,
    /// Input tokens.
    tokens: usize,
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

impl Trainer {
    /// One optimiser step (all micro-batches); returns its report.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let started = Instant::now();
        let cfg = &self.cfg;
        let lr = optim::lr_at(
            self.state.step,
            cfg.steps,
            cfg.warmup,
            cfg.lr,
            cfg.min_lr_ratio,
        );
        let mut grads: Vec<Option<Tensor>> = vec![None; self.opt.vars().len()];
        let (mut loss_sum, mut ce_sum, mut soft_sum, mut hard_sum) = (0.0, 0.0, 0.0, 0.0);
        let mut tokens = 0usize;
        for k in 0..cfg.grad_accum {
            let micro = self.micro_batch(k, &mut grads)?;
            tokens += micro.tokens;
            soft_sum += micro.soft;
            hard_sum += micro.hard;
            loss_sum += micro.loss;
            ce_sum += micro.ce;
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
        if cfg.adapt_lambda && cfg.train.gates() {
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

    /// Forward and backward of micro-batch `k` of the current step: its gradients, scaled by
    /// `1 / grad_accum`, are added to `grads` (in the optimiser's order of variables).
    fn micro_batch(&self, k: usize, grads: &mut [Option<Tensor>]) -> Result<MicroBatch> {
        let cfg = &self.cfg;
        let step = self.state.step;
        let use_gates = cfg.train.gates();
        let micro = (step * cfg.grad_accum + k) as u64;
        let idx = dataset::batch_indices(self.examples.len(), cfg.batch, cfg.seed, micro);
        let (inp, tgt, cem, valid) = self.batch_tensors(&idx)?;
        let out = self.decoder.forward(
            &inp,
            use_gates.then(|| self.gating(GateMode::Ste)),
            self.lora.as_ref(),
        )?;
        let (ce, _) = Self::masked_ce(&out.logits, &tgt, &cem)?;
        let mut loss = ce.clone();
        let (mut soft, mut hard) = (0.0, 0.0);
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
            let tau = self.gates.config().threshold;
            let r = gate_core::eviction_ratios(&s.detach(), &vmask, tau)?;
            (soft, hard) = (r.soft, r.hard);
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
        let loss = loss.to_scalar::<f32>()? as f64;
        let ce = ce.to_scalar::<f32>()? as f64;
        if !ce.is_finite() {
            return Err(self.non_finite_loss(step + 1));
        }
        Ok(MicroBatch {
            loss,
            ce,
            soft,
            hard,
            tokens: inp.elem_count(),
        })
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
}
