//! The optimiser side of gate training: AdamW with decoupled weight decay over named `Var`s,
//! the learning-rate schedule (linear warmup, cosine decay), global-norm gradient clipping, and
//! the checkpoint file holding parameters, optimiser moments and the loop state.
//!
//! AdamW is ours rather than `candle_nn::AdamW` because a resumable checkpoint needs the first
//! and second moments, which candle-nn keeps private; the update is the same (PyTorch's AdamW:
//! bias-corrected moments, `p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)`).
//!
//! Invariants: the checkpoint is one safetensors file written atomically (`crate::atomic`) whose
//! tensors are f32 copies of every parameter (`param.NAME`), first (`m.NAME`) and second
//! (`v.NAME`) moment, and whose metadata holds `state` (the JSON [`LoopState`]), `adam_t`,
//! `log` (the caller's JSON record of the steps so far) and `checksum`: sha256 over every
//! tensor's name, dtype, shape and bytes and over those three fields, so a flipped byte anywhere
//! is refused on load. Loading also checks that the names and shapes match the run being
//! resumed and that every value is finite.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

/// Learning rate at optimiser step `step` (0-based): linear warmup over `warmup` steps to
/// `lr`, then cosine decay to `lr * min_ratio` at `total`.
pub fn lr_at(step: usize, total: usize, warmup: usize, lr: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = ((step - warmup) as f64 / span).min(1.0);
    lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

/// AdamW over named vars.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimiser steps taken.
    pub t: usize,
    /// `beta1`, `beta2`, `eps`, weight decay.
    pub hyper: (f64, f64, f64, f64),
}

impl AdamW {
    /// Zero moments for `vars`. Names ending in `.bg` (biases) get no weight decay.
    pub fn new(vars: Vec<(String, Var)>, weight_decay: f64) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        Ok(AdamW {
            vars,
            m,
            v,
            t: 0,
            hyper: (0.9, 0.999, 1e-8, weight_decay),
        })
    }

    /// The parameters, by name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The name of the first parameter holding a NaN or an infinity, if any.
    pub fn first_non_finite(&self) -> Result<Option<&str>> {
        for (name, var) in &self.vars {
            let sum = var.as_tensor().abs()?.sum_all()?.to_dtype(DType::F64)?;
            if !sum.to_scalar::<f64>()?.is_finite() {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// One update with `grads` (one per var, same order; `None` = zero gradient) at `lr`.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let (b1, b2, eps, wd) = self.hyper;
        self.t += 1;
        let (c1, c2) = (1.0 - b1.powi(self.t as i32), 1.0 - b2.powi(self.t as i32));
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            self.m[i] = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mhat = (&self.m[i] / c1)?;
            let vhat = (&self.v[i] / c2)?;
            let mut upd = (mhat / (vhat.sqrt()? + eps)?)?;
            if !name.ends_with(".bg") && wd > 0.0 {
                upd = (upd + (var.as_tensor() * wd)?)?;
            }
            var.set(&(var.as_tensor() - (upd * lr)?)?)?;
        }
        Ok(())
    }
}

/// Scales `grads` so that their global L2 norm is at most `max_norm` (`<= 0`: no clipping);
/// returns the norm before clipping.
pub fn clip_grads(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut sq = 0.0;
    for g in grads.iter().flatten() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

/// What a checkpoint records besides tensors.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoopState {
    /// Optimiser steps completed.
    pub step: usize,
    /// The eviction-loss weight at this point (adaptive lambda changes it).
    pub lambda: f64,
    /// Smoothed hard eviction ratio used by the controller.
    pub hard_ema: Option<f64>,
    /// The eviction loss's soft target at this point (the controller shifts it so that the
    /// *hard* ratio meets the run's target).
    pub soft_target: f64,
    /// The run's seed. The data order and every random draw derive from `(seed, step)`, so this
    /// and `step` are the whole RNG state.
    pub seed: u64,
    /// JSON of the run's configuration (resume refuses a different one, except `steps`).
    pub config: serde_json::Value,
}

/// Metadata fields the checksum covers, in order.
const CHECKED_FIELDS: [&str; 3] = ["state", "adam_t", "log"];

/// The checkpoint checksum: sha256 over each tensor (sorted by name: name, dtype, shape, bytes)
/// and the [`CHECKED_FIELDS`] of `meta`, every part length-prefixed.
fn checksum<'a>(
    tensors: impl Iterator<Item = (&'a str, String, Vec<usize>, &'a [u8])>,
    meta: &BTreeMap<String, String>,
) -> String {
    let mut h = Sha256::new();
    let mut part = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    let mut sorted: Vec<_> = tensors.collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (name, dtype, shape, data) in sorted {
        part(name.as_bytes());
        part(dtype.as_bytes());
        part(format!("{shape:?}").as_bytes());
        part(data);
    }
    for field in CHECKED_FIELDS {
        part(meta.get(field).map_or(&b""[..], |v| v.as_bytes()));
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes parameters, moments, `state` and `log` (JSON) to `path` atomically, with a checksum.
pub fn save_checkpoint(path: &Path, opt: &AdamW, state: &LoopState, log: &str) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (i, (name, var)) in opt.vars.iter().enumerate() {
        tensors.push((format!("param.{name}"), var.as_tensor().detach()));
        tensors.push((format!("m.{name}"), opt.m[i].clone()));
        tensors.push((format!("v.{name}"), opt.v[i].clone()));
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "agate-train-checkpoint".to_string());
    let state = serde_json::to_string(state)
        .map_err(|e| checkpoint_err(path, "cannot record the loop state", Some(Box::new(e))))?;
    meta.insert("state".to_string(), state);
    meta.insert("adam_t".to_string(), opt.t.to_string());
    meta.insert("log".to_string(), log.to_string());
    let bytes: Vec<(String, String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| -> Result<_> {
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            let raw: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok((n.clone(), "F32".to_string(), t.dims().to_vec(), raw))
        })
        .collect::<Result<_>>()?;
    let sum = checksum(
        bytes
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), d.clone(), s.clone(), b.as_slice())),
        &meta,
    );
    meta.insert("checksum".to_string(), sum);
    let serialized =
        safetensors::serialize(tensors, Some(meta.into_iter().collect::<HashMap<_, _>>()))
            .map_err(|e| checkpoint_err(path, "cannot serialise", Some(Box::new(e))))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::atomic::ensure_dir(dir)?;
    }
    crate::atomic::write_atomically(path, |w| w.write_all(&serialized))?;
    Ok(())
}

/// Restores parameters and moments from `path` into `opt`; returns the loop state and the
/// `log` stored with them.
pub fn load_checkpoint(path: &Path, opt: &mut AdamW) -> Result<(LoopState, String)> {
    let bad = |problem: String| checkpoint_err(path, problem, None);
    let caused = |problem: &str, e: Box<dyn std::error::Error + Send + Sync>| {
        checkpoint_err(path, problem, Some(e))
    };
    let bytes = std::fs::read(path).map_err(|e| caused("cannot read", Box::new(e)))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        caused(
            "not a safetensors file (truncated or corrupt?)",
            Box::new(e),
        )
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| caused("not a safetensors file", Box::new(e)))?;
    let meta: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    if meta.get("format").map(String::as_str) != Some("agate-train-checkpoint") {
        return Err(bad(
            "not an agate training checkpoint (metadata `format`)".into()
        ));
    }
    let stored = meta.get("checksum").ok_or_else(|| {
        bad("metadata `checksum` is missing: the checkpoint cannot be verified".into())
    })?;
    let names = st.names();
    let actual = checksum(
        names.iter().filter_map(|&n| {
            let v = st.tensor(n).ok()?;
            Some((n, format!("{:?}", v.dtype()), v.shape().to_vec(), v.data()))
        }),
        &meta,
    );
    if *stored != actual {
        return Err(bad(format!(
            "checksum mismatch (stored {stored}, content {actual}): the checkpoint is corrupt; resume from another one or start again"
        )));
    }
    let state: LoopState = serde_json::from_str(meta.get("state").map_or("", String::as_str))
        .map_err(|e| caused("metadata `state`", Box::new(e)))?;
    opt.t = meta
        .get("adam_t")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("metadata `adam_t` missing or not a number".into()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| caused("cannot load the tensors", Box::new(e)))?;
    let get = |key: String, like: &Tensor| -> Result<Tensor> {
        let t = tensors.get(&key).ok_or_else(|| {
            bad(format!(
                "tensor `{key}` missing (a checkpoint of another run?)"
            ))
        })?;
        if t.dims() != like.dims() {
            return Err(bad(format!(
                "tensor `{key}` has shape {:?}, this run expects {:?}",
                t.dims(),
                like.dims()
            )));
        }
        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(bad(format!(
                "tensor `{key}` holds non-finite values: the run had diverged when it was saved"
            )));
        }
        Ok(t.to_dtype(like.dtype())?)
    };
    for i in 0..opt.vars.len() {
        let (name, var) = (&opt.vars[i].0, &opt.vars[i].1);
        var.set(&get(format!("param.{name}"), var.as_tensor())?)?;
        let m = get(format!("m.{name}"), &opt.m[i])?;
        let v = get(format!("v.{name}"), &opt.v[i])?;
        opt.m[i] = m;
        opt.v[i] = v;
    }
    Ok((state, meta.get("log").cloned().unwrap_or_default()))
}

/// The error of checkpoint `path`: `problem`, caused by `source`.
pub(super) fn checkpoint_err(
    path: &Path,
    problem: impl Into<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
) -> EngineError {
    EngineError::Checkpoint {
        file: path.to_path_buf(),
        problem: problem.into(),
        source,
    }
}
