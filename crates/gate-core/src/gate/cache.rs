//! Decode for the Attention-Gate: [`GateCache`] (the gate's own `K'`, `V'` of every token seen,
//! per layer) and [`AttentionGate::step`] (one new token's keep probabilities).
//!
//! Invariants: per layer the cache holds, token-major on the host, `K'` (after RoPE at the
//! token's true position) and `V'` of *every* token the gate has seen, retained by the model's
//! cache or not: `2 * heads * head_dim` f32 per token per layer. Entries are only appended
//! (by [`AttentionGate::prefill`] and [`AttentionGate::step`]), never evicted, so a step sees
//! exactly what the full causal forward over the same tokens would see, and gives the same `s`
//! up to float rounding.

use candle_core::{DType, Tensor};

use super::{AttentionGate, GateConfig};
use crate::error::{bad_tensor, invalid, CandleContext, GateError, Result};

/// One layer's cached `K'`, `V'`: `[n_tokens, heads, head_dim]` row-major each.
#[derive(Debug, Clone, Default)]
pub(super) struct LayerCache {
    pub(super) keys: Vec<f32>,
    pub(super) values: Vec<f32>,
}

/// The gate's own per-sequence cache: `K'`, `V'` of every token seen, for every layer.
#[derive(Debug, Clone)]
pub struct GateCache {
    heads: usize,
    head_dim: usize,
    layers: Vec<LayerCache>,
}

impl GateCache {
    /// An empty cache shaped for gates of configuration `cfg`.
    pub fn new(cfg: &GateConfig) -> Self {
        Self {
            heads: cfg.heads,
            head_dim: cfg.head_dim,
            layers: vec![LayerCache::default(); cfg.n_layers],
        }
    }

    /// Number of tokens cached for `layer` (0 for a layer out of range).
    pub fn len(&self, layer: usize) -> usize {
        self.layers
            .get(layer)
            .map_or(0, |l| l.keys.len() / (self.heads * self.head_dim).max(1))
    }

    /// Whether no layer holds any token.
    pub fn is_empty(&self) -> bool {
        self.layers.iter().all(|l| l.keys.is_empty())
    }

    /// Bytes of `K'` and `V'` held, all layers together.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.keys.len() + l.values.len()) * std::mem::size_of::<f32>())
            .sum()
    }

    /// Forgets the tokens of `layer` after its first `tokens` (undoes a failed pass's steps).
    pub fn truncate(&mut self, layer: usize, tokens: usize) {
        let row = self.heads * self.head_dim;
        if let Some(l) = self.layers.get_mut(layer) {
            l.keys.truncate(tokens * row);
            l.values.truncate(tokens * row);
        }
    }

    /// Forgets every token (a new sequence).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| {
            l.keys.clear();
            l.values.clear();
        });
    }

    /// The cache of `layer`, after checking that this cache was built for `cfg`'s shape.
    pub(super) fn layer_mut(&mut self, cfg: &GateConfig, layer: usize) -> Result<&mut LayerCache> {
        if (self.heads, self.head_dim, self.layers.len()) != (cfg.heads, cfg.head_dim, cfg.n_layers)
        {
            return Err(invalid(
                "GateCache (heads, head_dim, n_layers)",
                format!("({}, {}, {})", self.heads, self.head_dim, self.layers.len()),
                format!(
                    "the gate's ({}, {}, {})",
                    cfg.heads, cfg.head_dim, cfg.n_layers
                ),
            ));
        }
        let len = self.layers.len();
        self.layers.get_mut(layer).ok_or(GateError::OutOfRange {
            what: "layer",
            index: layer,
            len,
        })
    }
}

/// One layer's parameters as host f32 rows, for the decode step.
#[derive(Debug, Clone)]
pub(super) struct HostLayer {
    /// `[3 * inner, hidden]`: the rows of `wq`, then `wk`, then `wv`.
    wqkv: Vec<f32>,
    /// `[n_kv_heads, inner]`.
    wg: Vec<f32>,
    /// `[n_kv_heads]`.
    bg: Vec<f32>,
}

impl AttentionGate {
    fn host_layers(&self) -> Result<&[HostLayer]> {
        if let Some(h) = self.host.get() {
            return Ok(h);
        }
        let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let layers = self
            .layers
            .iter()
            .map(|p| -> candle_core::Result<HostLayer> {
                let mut wqkv = flat(&p.wq)?;
                wqkv.extend(flat(&p.wk)?);
                wqkv.extend(flat(&p.wv)?);
                Ok(HostLayer {
                    wqkv,
                    wg: flat(&p.wg)?,
                    bg: flat(&p.bg)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .ctx("copying gate parameters to the host")?;
        Ok(self.host.get_or_init(|| layers))
    }

    /// Decode step of layer `layer` for one new token `x_row` (`[hidden]` or `[1, hidden]`)
    /// at absolute `position`: appends its `K'`, `V'` to `cache`, attends over every cached
    /// token (itself included) and returns `s` per KV head (f32). Runs on host copies of the
    /// parameters: a few hundred thousand multiply-adds, no tensor dispatch.
    pub fn step(
        &self,
        layer: usize,
        x_row: &Tensor,
        position: u32,
        cache: &mut GateCache,
    ) -> Result<Vec<f32>> {
        self.layer(layer)?;
        let hidden = self.cfg.hidden;
        if !matches!(*x_row.dims(), [h] | [1, h] if h == hidden) {
            return Err(bad_tensor(
                "x_row",
                x_row,
                format!("[{hidden}] or [1, {hidden}]"),
            ));
        }
        let x = x_row
            .to_dtype(DType::F32)
            .and_then(|x| x.flatten_all()?.to_vec1::<f32>())
            .ctx("reading the decode row")?;
        let hl = &self.host_layers()?[layer];
        let (ha, da) = (self.cfg.heads, self.cfg.head_dim);
        let inner = ha * da;
        let mut qkv: Vec<f32> = hl.wqkv.chunks_exact(hidden).map(|w| dot(w, &x)).collect();
        let (q, kv) = qkv.split_at_mut(inner);
        let (k, v) = kv.split_at_mut(inner);
        self.rope_row(q, position);
        self.rope_row(k, position);
        let entry = cache.layer_mut(&self.cfg, layer)?;
        entry.keys.extend_from_slice(k);
        entry.values.extend_from_slice(v);
        let o = attend_one(q, &entry.keys, &entry.values, ha, da);
        Ok(hl
            .wg
            .chunks_exact(inner)
            .zip(&hl.bg)
            .map(|(w, b)| 1.0 / (1.0 + (-(dot(w, &o) + b)).exp()))
            .collect())
    }

    /// Rotate-half RoPE of one token's heads `[heads, head_dim]` in place, with the same f64
    /// angles as the tensor path.
    fn rope_row(&self, x: &mut [f32], position: u32) {
        let half = self.cfg.head_dim / 2;
        for head in x.chunks_exact_mut(self.cfg.head_dim) {
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let a = f64::from(position) * f;
                let (sin, cos) = (a.sin() as f32, a.cos() as f32);
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * cos - x2 * sin;
                head[i + half] = x2 * cos + x1 * sin;
            }
        }
    }
}

/// Dot product with 8 independent accumulators, so the compiler can keep them in one SIMD
/// register (a plain `sum()` is a strict sequential chain).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Softmax attention of one query `q: [ha, da]` over token-major `keys`, `values`
/// (`[n, ha, da]`), per head, scaled by `1/sqrt(da)`; returns `[ha * da]`.
fn attend_one(q: &[f32], keys: &[f32], values: &[f32], ha: usize, da: usize) -> Vec<f32> {
    let scale = 1.0 / (da as f32).sqrt();
    let row = ha * da;
    let mut out = vec![0f32; row];
    let mut logits = Vec::with_capacity(keys.len() / row.max(1));
    for h in 0..ha {
        let qh = &q[h * da..(h + 1) * da];
        logits.clear();
        logits.extend(keys.chunks_exact(row).map(|k| {
            k[h * da..(h + 1) * da]
                .iter()
                .zip(qh)
                .map(|(a, b)| a * b)
                .sum::<f32>()
                * scale
        }));
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut z = 0f32;
        let oh = &mut out[h * da..(h + 1) * da];
        for (l, v) in logits.iter().zip(values.chunks_exact(row)) {
            let e = (l - max).exp();
            z += e;
            oh.iter_mut()
                .zip(&v[h * da..(h + 1) * da])
                .for_each(|(o, &x)| *o += e * x);
        }
        oh.iter_mut().for_each(|o| *o /= z);
    }
    out
}
