//! The Attention-Gate (AG): a small causal attention module per decoder layer that turns the
//! layer's normed hidden states into a soft keep probability per token and KV head.
//!
//! Owns [`AttentionGate`] (parameters, full causal forward, prefill into a [`GateCache`],
//! constructors) and [`hard_flags`]. The configuration lives in `config.rs`, decode in
//! `cache.rs`, the file format in `file.rs`.
//!
//! Forward, layer `l` (docs/policies.md): `Q' = X Wq'^T`, `K' = X Wk'^T`, `V' = X Wv'^T`
//! (`[B, T, heads, head_dim]`, no bias); non-interleaved ("HF", rotate-half) RoPE
//! ([`crate::rope`]) on `Q'`, `K'` at the true positions;
//! `O' = softmax(Q'K'^T / sqrt(head_dim) + mask) V'` where the mask
//! is causal and, with an `attention_window` `W > 0`, banded: the query at position `p` sees
//! the keys at positions `p - W < q <= p`; `z = O' Wg^T + bg` (`[B, T, n_kv_heads]`);
//! `s = sigmoid(z)`; hard `keep = s > threshold`. The window bounds what a session must keep
//! for the gate ([`GateCache`]: the last `W` tokens per layer), and training uses the same mask.
//!
//! Invariants:
//! - Weights use the PyTorch `Linear` layout `[out, in]`: `wq`, `wk`, `wv` are
//!   `[heads*head_dim, hidden]`, `wg` is `[n_kv_heads, heads*head_dim]`, `bg` is `[n_kv_heads]`.
//! - Compute runs in the parameters' dtype (f32 unless built otherwise); inputs are cast to it
//!   and `s` is returned as f32. Every op is differentiable, so gradients reach `Var`s built by
//!   [`AttentionGate::into_trainable`].
//! - The gate's attention is causal: `s` at token `i` depends only on tokens `<= i` (and on
//!   what a [`GateCache`] holds before them), and with a window only on the last `W` of them.

mod cache;
mod config;
mod file;
mod project;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use cache::GateCache;
pub use config::{GateConfig, DEFAULT_ATTENTION_WINDOW};
pub use file::{model_identity, GateFileDtype, ModelIdentity};

use crate::error::{bad_tensor, invalid, CandleContext, GateError, Result};
use crate::rope::{Rope, RopeLayout};
use crate::select::Protection;

/// Initial half-width of `wg`'s uniform init, relative to `1/sqrt(inner)`: small, so that
/// `z` starts within a few hundredths of `bias_init`.
const GATE_OUT_INIT: f64 = 0.1;

/// One layer's parameters (layout in the module header).
#[derive(Debug, Clone)]
struct GateLayer {
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wg: Tensor,
    bg: Tensor,
}

impl GateLayer {
    fn tensors(&self) -> [&Tensor; 5] {
        [&self.wq, &self.wk, &self.wv, &self.wg, &self.bg]
    }
}

/// The Attention-Gate of every layer of one base model.
#[derive(Debug, Clone)]
pub struct AttentionGate {
    cfg: GateConfig,
    layers: Vec<GateLayer>,
    /// Host copies of the parameters for [`AttentionGate::step`], made at the first decode
    /// step (a gate being trained is never decoded with, so the copies cannot go stale), or by
    /// [`AttentionGate::round_projections_to_int4`] with the codes it rounded to.
    host: std::sync::OnceLock<Vec<cache::HostLayer>>,
    /// The rotate-half RoPE of `Q'` and `K'` (unscaled frequencies of `rope_theta`).
    rope: Rope,
    identity: ModelIdentity,
}

impl AttentionGate {
    /// A randomly initialised gate (seeded, reproducible) in f32 on `device`: `wq`, `wk`, `wv`
    /// uniform in `±1/sqrt(hidden)`, `wg` uniform in `±0.1/sqrt(inner)`, `bg = bias_init`, so
    /// `s` starts near `sigmoid(bias_init)`.
    pub fn random(cfg: &GateConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let proj = 1.0 / (cfg.hidden_size as f64).sqrt();
        let out = GATE_OUT_INIT / (cfg.inner() as f64).sqrt();
        let mut tensors = HashMap::new();
        for (name, shape) in cfg.param_shapes() {
            let numel: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with(".bg") {
                vec![cfg.bias_init; numel]
            } else {
                let a = if name.ends_with(".wg") { out } else { proj };
                (0..numel).map(|_| rng.random_range(-a..a) as f32).collect()
            };
            let t = Tensor::from_vec(data, shape, device).ctx("initialising gate parameters")?;
            tensors.insert(name, t);
        }
        Self::from_tensors(cfg, tensors)
    }

    /// A gate from named parameter tensors (names and shapes of [`GateConfig::param_shapes`],
    /// one float dtype for all; extra names are rejected). Compute runs in that dtype.
    pub fn from_tensors(cfg: &GateConfig, mut tensors: HashMap<String, Tensor>) -> Result<Self> {
        cfg.validate()?;
        let mut dtype = None;
        let mut take = |name: String, shape: Vec<usize>| -> Result<Tensor> {
            let t = tensors.remove(&name).ok_or_else(|| {
                invalid(
                    "AttentionGate::from_tensors: tensors",
                    format!("no `{name}`"),
                    format!("a tensor of shape {shape:?}"),
                )
            })?;
            if t.dims() != shape.as_slice()
                || !t.dtype().is_float()
                || dtype.is_some_and(|d| d != t.dtype())
            {
                return Err(bad_tensor(
                    "AttentionGate::from_tensors",
                    &t,
                    format!("`{name}`: {shape:?} in one float dtype"),
                ));
            }
            dtype = Some(t.dtype());
            Ok(t)
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        let mut shapes = cfg.param_shapes().into_iter();
        for _ in 0..cfg.n_layers {
            let mut next = || -> Result<Tensor> {
                let (name, shape) = shapes
                    .next()
                    .ok_or_else(|| invalid("GateConfig", "param_shapes", "5 tensors per layer"))?;
                take(name, shape)
            };
            layers.push(GateLayer {
                wq: next()?,
                wk: next()?,
                wv: next()?,
                wg: next()?,
                bg: next()?,
            });
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(invalid(
                "AttentionGate::from_tensors: tensors",
                format!("`{extra}`"),
                "only the gate's parameter names",
            ));
        }
        Ok(Self {
            cfg: cfg.clone(),
            layers,
            host: std::sync::OnceLock::new(),
            rope: Rope::new(cfg.head_dim, cfg.rope_theta, RopeLayout::Halves),
            identity: ModelIdentity::new(),
        })
    }

    /// Turns every parameter into a candle `Var` registered in a fresh `VarMap` under its
    /// file name (`layers.{l}.wq`, ...), for training: the returned gate's forward is
    /// differentiable with respect to those vars (give `varmap.all_vars()` to an optimiser).
    /// Parameters are promoted to f32 unless already f32 or f64.
    pub fn into_trainable(self) -> Result<(Self, VarMap)> {
        let varmap = VarMap::new();
        let mut tensors = HashMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| invalid("VarMap", "poisoned lock", "an unpoisoned VarMap"))?;
            for (name, t) in self.named_tensors() {
                let t = match t.dtype() {
                    DType::F32 | DType::F64 => t,
                    _ => t
                        .to_dtype(DType::F32)
                        .ctx("promoting gate parameters to f32")?,
                };
                let var = candle_core::Var::from_tensor(&t).ctx("creating a training Var")?;
                tensors.insert(name.clone(), var.as_tensor().clone());
                data.insert(name, var);
            }
        }
        let mut gate = Self::from_tensors(&self.cfg, tensors)?;
        gate.identity = self.identity;
        Ok((gate, varmap))
    }

    /// The configuration.
    pub fn config(&self) -> &GateConfig {
        &self.cfg
    }

    /// Records the protection the gates are trained with (the inference policy's default).
    pub fn set_protection(&mut self, protect: Protection) {
        self.cfg.sinks = protect.sinks;
        self.cfg.recent = protect.recent;
    }

    /// Replaces the hard-mode threshold `tau` (e.g. after calibrating it to a target ratio).
    pub fn set_threshold(&mut self, threshold: f32) -> Result<()> {
        if !(0.0..=1.0).contains(&threshold) {
            return Err(invalid(
                "GateConfig.threshold",
                threshold,
                "a keep-probability threshold in [0, 1]",
            ));
        }
        self.cfg.threshold = threshold;
        Ok(())
    }

    /// The model identity stored with the gate (empty unless set or loaded).
    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    /// Replaces the model identity written by [`AttentionGate::to_bytes`].
    pub fn set_identity(&mut self, identity: ModelIdentity) {
        self.identity = identity;
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        self.layers[0].wq.device()
    }

    /// The compute dtype (the parameters' dtype).
    pub fn dtype(&self) -> DType {
        self.layers[0].wq.dtype()
    }

    /// Every parameter with its name, in [`GateConfig::param_shapes`] order.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.cfg
            .param_shapes()
            .into_iter()
            .zip(self.layers.iter().flat_map(|l| l.tensors()))
            .map(|((name, _), t)| (name, t.clone()))
            .collect()
    }

    fn layer(&self, layer: usize) -> Result<&GateLayer> {
        self.layers.get(layer).ok_or(GateError::OutOfRange {
            what: "layer",
            index: layer,
            len: self.layers.len(),
        })
    }

    /// Validates `x` (`[T, hidden]` or `[B, T, hidden]`) against `positions`, returning it as
    /// `[B, T, hidden]` in the compute dtype, and whether the input was 2-D.
    fn input(&self, x: &Tensor, positions: &[u32]) -> Result<(Tensor, bool)> {
        let expected = format!(
            "[T, {0}] or [B, T, {0}] with T = positions.len() = {1}",
            self.cfg.hidden_size,
            positions.len()
        );
        let (x3, two_d) = match *x.dims() {
            [t, h] if h == self.cfg.hidden_size && t == positions.len() => {
                (x.unsqueeze(0).ctx("reshaping gate input")?, true)
            }
            [_, t, h] if h == self.cfg.hidden_size && t == positions.len() => (x.clone(), false),
            _ => return Err(bad_tensor("x", x, expected)),
        };
        if !x.dtype().is_float() {
            return Err(bad_tensor("x", x, "a float dtype"));
        }
        Ok((x3.to_dtype(self.dtype()).ctx("casting gate input")?, two_d))
    }

    /// Projects `x: [B, T, hidden]` to `(Q', K', V')`, each `[B, Ha, T, da]`, RoPE applied to
    /// `Q'` and `K'`.
    fn project(
        &self,
        p: &GateLayer,
        x: &Tensor,
        positions: &[u32],
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (ha, da) = (self.cfg.heads, self.cfg.head_dim);
        let x2 = x.reshape((b * t, self.cfg.hidden_size))?;
        let heads = |w: &Tensor| {
            x2.matmul(&w.t()?)?
                .reshape((b, t, ha, da))?
                .transpose(1, 2)?
                .contiguous()
        };
        let tables = self.rope.tables_at(positions, x.dtype(), x.device())?;
        let q = self.rope.rotate_tensor(&heads(&p.wq)?, &tables)?;
        let k = self.rope.rotate_tensor(&heads(&p.wk)?, &tables)?;
        Ok((q, k, heads(&p.wv)?))
    }

    /// `s = sigmoid(O' Wg^T + bg)` for `o: [B, T, inner]`, returning `[B, T, n_kv_heads]`.
    fn readout(&self, p: &GateLayer, o: &Tensor) -> candle_core::Result<Tensor> {
        let z = o.broadcast_matmul(&p.wg.t()?)?.broadcast_add(&p.bg)?;
        candle_nn::ops::sigmoid(&z)
    }

    /// Full forward over `x: [B, T, hidden]` at `positions` after `past` (host `K'`, `V'`,
    /// token-major `[n_past, Ha, da]`, and their positions, batch 1): returns `s: [B, T, Hkv]`
    /// and the new tokens' `K'`, `V'` (`[B, Ha, T, da]`). A query sees the past and new keys
    /// [`GateConfig::sees`] allows.
    fn forward(
        &self,
        p: &GateLayer,
        x: &Tensor,
        positions: &[u32],
        past: Option<&cache::PastRows>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (ha, da) = (self.cfg.heads, self.cfg.head_dim);
        let (q, k, v) = self.project(p, x, positions)?;
        let (k_all, v_all, key_positions) = match past {
            Some(past) if !past.positions.is_empty() => {
                let n_past = past.positions.len();
                let host = |d: &[f32]| {
                    Tensor::from_slice(d, (1, n_past, ha, da), x.device())?
                        .to_dtype(x.dtype())?
                        .transpose(1, 2)
                };
                let mut key_positions = past.positions.clone();
                key_positions.extend_from_slice(positions);
                (
                    Tensor::cat(&[host(&past.keys)?, k.clone()], 2)?,
                    Tensor::cat(&[host(&past.values)?, v.clone()], 2)?,
                    key_positions,
                )
            }
            _ => (k.clone(), v.clone(), positions.to_vec()),
        };
        let n_keys = key_positions.len();
        let mask: Vec<f32> = positions
            .iter()
            .flat_map(|&qp| {
                key_positions.iter().map(move |&kp| {
                    if self.cfg.sees(qp, kp) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, n_keys), x.device())?.to_dtype(x.dtype())?;
        let scale = 1.0 / (da as f64).sqrt();
        let att = (q.matmul(&k_all.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let o = att
            .matmul(&v_all.contiguous()?)?
            .transpose(1, 2)?
            .reshape((b, t, ha * da))?;
        Ok((self.readout(p, &o)?, k, v))
    }

    /// Soft keep probabilities `s` of layer `layer` for `x` (`[T, hidden]` or
    /// `[B, T, hidden]`, the normed hidden states fed to q/k/v) at `positions` (length `T`,
    /// shared by the batch): `[T, n_kv_heads]` or `[B, T, n_kv_heads]`, f32, differentiable.
    pub fn keep_probs(&self, layer: usize, x: &Tensor, positions: &[u32]) -> Result<Tensor> {
        let p = self.layer(layer)?;
        let (x3, two_d) = self.input(x, positions)?;
        let (s, _, _) = self
            .forward(p, &x3, positions, None)
            .ctx("running the gate forward")?;
        let s = s.to_dtype(DType::F32).ctx("casting gate output")?;
        if two_d {
            s.squeeze(0).ctx("reshaping gate output")
        } else {
            Ok(s)
        }
    }

    /// Hard keep flags of layer `layer` for one sequence `x` (`[T, hidden]` or
    /// `[1, T, hidden]`): `[kv_head][t]`, `keep = s > threshold`.
    pub fn keep_flags(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &[u32],
    ) -> Result<Vec<Vec<bool>>> {
        hard_flags(&self.keep_probs(layer, x, positions)?, self.cfg.threshold)
    }

    /// Prefill (or a later chunk, e.g. the next chat turn) of one sequence: like
    /// [`AttentionGate::keep_probs`] for `x` (`[T, hidden]` or `[1, T, hidden]`), but the new
    /// tokens also attend to everything `cache` already holds for this layer, and their `K'`,
    /// `V'` are appended to it so that [`AttentionGate::step`] continues from here. Returns
    /// `s: [T, n_kv_heads]` (f32).
    ///
    /// Memory is `heads * T * (n_past + T)` scores (`n_past` at most the attention window when
    /// there is one): feed long prompts in chunks (each chunk a call) to bound it; chunked and
    /// whole prefills give the same `s` up to rounding.
    pub fn prefill(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &[u32],
        cache: &mut GateCache,
    ) -> Result<Tensor> {
        let p = self.layer(layer)?;
        let (x3, _) = self.input(x, positions)?;
        if x3.dim(0).ctx("reading batch size")? != 1 {
            return Err(bad_tensor(
                "x",
                x,
                "a single sequence ([T, hidden] or [1, T, hidden]) when using a GateCache",
            ));
        }
        let entry = cache.layer_mut(&self.cfg, layer)?;
        let past = entry.past();
        let (s, k, v) = self
            .forward(p, &x3, positions, Some(&past))
            .ctx("running the gate prefill")?;
        let host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
            t.squeeze(0)?
                .transpose(0, 1)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()
        };
        let (k, v) = (
            host(&k).ctx("copying K' to the gate cache")?,
            host(&v).ctx("copying V' to the gate cache")?,
        );
        let row = self.cfg.inner();
        for ((k, v), &position) in k.chunks_exact(row).zip(v.chunks_exact(row)).zip(positions) {
            entry.push(k, v, position);
        }
        s.squeeze(0)
            .and_then(|s| s.to_dtype(DType::F32))
            .ctx("reshaping gate output")
    }
}

/// Hard flags from soft probabilities `s` (`[T, n_kv_heads]` or `[1, T, n_kv_heads]`):
/// `[kv_head][t] = s[t, kv_head] > tau` (a NaN probability is not kept).
pub fn hard_flags(s: &Tensor, tau: f32) -> Result<Vec<Vec<bool>>> {
    let s2 = match *s.dims() {
        [_, _] => s.clone(),
        [1, _, _] => s.squeeze(0).ctx("reshaping keep probabilities")?,
        _ => return Err(bad_tensor("s", s, "[T, n_kv_heads] or [1, T, n_kv_heads]")),
    };
    let rows: Vec<Vec<f32>> = s2
        .to_dtype(DType::F32)
        .and_then(|t| t.t()?.to_vec2())
        .ctx("reading keep probabilities")?;
    Ok(rows
        .into_iter()
        .map(|r| r.into_iter().map(|v| v > tau).collect())
        .collect())
}
