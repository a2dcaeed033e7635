//! What a trained [`Trainer`] does, measured: the threshold `tau` calibrated to the target
//! eviction ratio on training sequences, and the held-out evaluation ([`HeldOut`]: perplexity
//! of the base model, of the trained model with the full cache and with the gates' hard flags,
//! and the eviction ratios reached).
//!
//! Invariants: nothing here trains (no gradients, no optimiser state changes); calibration
//! changes only the gates' threshold.

use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::Tensor;
use model_zoo::train::GateMode;

use super::{dataset, Trainer};
use crate::error::{EngineError, Result};

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

impl Trainer {
    /// Sets the threshold `tau` so that the hard eviction ratio over `seqs` training sequences
    /// spread evenly over the training set (valid tokens, every layer and KV head) equals the
    /// target: `tau` becomes the target quantile of the keep probabilities. The probabilities
    /// of later layers depend on the flags of earlier ones, so this repeats `rounds` times from
    /// the new `tau`. `seqs` is capped at the training sequences there are
    /// ([`Trainer::n_examples`]). `progress(done, total)` is called after each of the
    /// `(rounds + 1) * seqs` forward passes; when it breaks, the call stops there with
    /// [`EngineError::Stopped`] and `tau` is left as it was. Returns the hard ratio measured
    /// with the final `tau` (the fixed point is approached, not exact).
    pub fn calibrate_threshold(
        &mut self,
        seqs: usize,
        rounds: usize,
        progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<f64> {
        let total = self.examples.len();
        let n = seqs.clamp(1, total);
        let passes = (rounds + 1) * n;
        // Evenly spaced over the training set, so that every kind of text in a mixture (files
        // in the order given: prose, retrieval prompts, chats) weighs in as it does in training:
        // the ratio a threshold gives depends on the kind of text.
        let idx: Vec<usize> = (0..n).map(|k| k * total / n).collect();
        let mut measured = 0.0;
        let tau_before = self.gates.config().threshold;
        for round in 0..=rounds {
            let mut probs: Vec<f32> = Vec::new();
            let (mut hard, mut count) = (0.0, 0.0);
            let tau = self.gates.config().threshold;
            for (k, &i) in idx.iter().enumerate() {
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
                if progress(round * n + k + 1, passes).is_break() {
                    self.gates.set_threshold(tau_before)?;
                    return Err(EngineError::Stopped("threshold calibration"));
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
    /// A problem of the files together (too little text) names `TrainConfig.heldout`.
    pub fn load_heldout(&self, files: &[PathBuf]) -> Result<Vec<dataset::Example>> {
        let tok = self.engine.tokenizer();
        dataset::load(self.cfg.mode, files, tok, self.cfg.seq_len).map_err(|e| match e {
            EngineError::Setting {
                setting: "TrainConfig.data",
                problem,
            } => EngineError::Setting {
                setting: "TrainConfig.heldout",
                problem,
            },
            other => other,
        })
    }

    /// Evaluates on held-out examples ([`Trainer::load_heldout`]), over at most `max_seqs`
    /// (> 0) sequences (the first ones, in file order): perplexity of the base model with the
    /// full cache, of the trained model (LoRA adapters, if any) with the full cache and with the
    /// gates' hard flags, and the eviction ratios. `progress(done, total)` is called after each
    /// sequence; when it breaks, the call stops there with [`EngineError::Stopped`].
    pub fn evaluate(
        &self,
        mut ex: Vec<dataset::Example>,
        max_seqs: usize,
        progress: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
    ) -> Result<HeldOut> {
        if max_seqs == 0 {
            return Err(EngineError::Setting {
                setting: "TrainConfig.heldout_seqs",
                problem: "must be a positive number, got 0".into(),
            });
        }
        ex.truncate(max_seqs);
        let lora = self.lora.as_ref();
        let (mut nll_base, mut nll_full, mut nll_gate, mut n_tok) = (0.0, 0.0, 0.0, 0.0);
        let (mut soft, mut hard) = (0.0, 0.0);
        for (k, e) in ex.iter().enumerate() {
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
            if progress(k + 1, ex.len()).is_break() {
                return Err(EngineError::Stopped("held-out evaluation"));
            }
        }
        if !nll_base.is_finite() {
            // The base model alone, before any update: the model is broken.
            return Err(self.broken_model(self.state.step));
        }
        if !(nll_full.is_finite() && nll_gate.is_finite()) {
            return Err(self.non_finite_loss(self.state.step));
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
}
