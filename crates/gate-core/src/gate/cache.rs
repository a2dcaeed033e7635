//! Decode for the Attention-Gate: [`GateCache`] (the gate's own `K'`, `V'` of the tokens its
//! attention can still see, per layer) and [`AttentionGate::step`] (one new token's keep
//! probabilities).
//!
//! Invariants: per layer the cache holds, token-major on the host, `K'` (after RoPE at the
//! token's true position), `V'` and the position of the most recent tokens the gate has seen,
//! retained by the model's cache or not: at most `attention_window` of them (a ring: the oldest
//! is overwritten), every one when the window is 0 (unbounded, older gates). A query's
//! attention window never reaches further back than that, so a step sees exactly what the full
//! forward over the same tokens would see, and gives the same `s` up to float rounding; the
//! cache's memory is bounded by `2 * attention_window * heads * head_dim` f32 per layer.
//! Between [`GateCache::mark`] and [`GateCache::commit`] each layer journals what a push
//! overwrites (at most one saved row per slot), so [`GateCache::rollback`] restores the cache
//! as it was at the mark in time proportional to the rows pushed since, however long the
//! sequence.

use candle_core::{DType, Tensor};

use super::{AttentionGate, GateConfig};
use crate::error::{bad_tensor, invalid, CandleContext, GateError, Result};

/// One layer's cached rows: `K'`, `V'` (`[slots, heads * head_dim]` each) and positions, a ring
/// of `capacity` slots when bounded (`next` is the slot the next token overwrites once full).
#[derive(Debug, Clone, Default)]
pub(super) struct LayerCache {
    keys: Vec<f32>,
    values: Vec<f32>,
    positions: Vec<u32>,
    capacity: usize,
    next: usize,
    /// Since the last [`GateCache::mark`], when one is open.
    journal: Option<Journal>,
}

/// What a layer held at a mark: its row count, ring cursor, and the first row each overwritten
/// slot held (a slot's later overwrites need nothing more: the first save restores it).
#[derive(Debug, Clone, Default)]
struct Journal {
    len: usize,
    next: usize,
    slots: Vec<usize>,
    keys: Vec<f32>,
    values: Vec<f32>,
    positions: Vec<u32>,
}

/// Past rows in position order, for a prefill chunk's attention.
pub(super) struct PastRows {
    pub(super) keys: Vec<f32>,
    pub(super) values: Vec<f32>,
    pub(super) positions: Vec<u32>,
}

impl LayerCache {
    /// Appends one token's `K'`, `V'` (`[heads * head_dim]` each), overwriting the oldest when
    /// the ring is full.
    pub(super) fn push(&mut self, k: &[f32], v: &[f32], position: u32) {
        let row = k.len();
        if self.capacity == 0 || self.positions.len() < self.capacity {
            self.keys.extend_from_slice(k);
            self.values.extend_from_slice(v);
            self.positions.push(position);
            return;
        }
        let at = self.next * row;
        if let Some(j) = self
            .journal
            .as_mut()
            .filter(|j| j.slots.len() < self.capacity)
        {
            // Overwrites go round the ring from the mark's cursor: the first `capacity` of them
            // are distinct slots, every later one hits a slot already saved.
            j.slots.push(self.next);
            j.keys.extend_from_slice(&self.keys[at..at + row]);
            j.values.extend_from_slice(&self.values[at..at + row]);
            j.positions.push(self.positions[self.next]);
        }
        self.keys[at..at + row].copy_from_slice(k);
        self.values[at..at + row].copy_from_slice(v);
        self.positions[self.next] = position;
        self.next = (self.next + 1) % self.capacity;
    }

    /// The cached rows, oldest first.
    pub(super) fn past(&self) -> PastRows {
        let n = self.positions.len();
        let row = self.keys.len().checked_div(n).unwrap_or(0);
        let order = (0..n).map(|i| (self.next + i) % n.max(1));
        let mut past = PastRows {
            keys: Vec::with_capacity(self.keys.len()),
            values: Vec::with_capacity(self.values.len()),
            positions: Vec::with_capacity(n),
        };
        for slot in order {
            past.keys
                .extend_from_slice(&self.keys[slot * row..(slot + 1) * row]);
            past.values
                .extend_from_slice(&self.values[slot * row..(slot + 1) * row]);
            past.positions.push(self.positions[slot]);
        }
        past
    }

    /// Back to the mark: saved rows restored, rows pushed since removed, cursor reset.
    fn rollback(&mut self) {
        let Some(j) = self.journal.take() else {
            return;
        };
        let row = j.keys.len().checked_div(j.slots.len()).unwrap_or(0);
        for (i, &slot) in j.slots.iter().enumerate() {
            self.keys[slot * row..(slot + 1) * row]
                .copy_from_slice(&j.keys[i * row..(i + 1) * row]);
            self.values[slot * row..(slot + 1) * row]
                .copy_from_slice(&j.values[i * row..(i + 1) * row]);
            self.positions[slot] = j.positions[i];
        }
        let row = self
            .keys
            .len()
            .checked_div(self.positions.len())
            .unwrap_or(0);
        self.keys.truncate(j.len * row);
        self.values.truncate(j.len * row);
        self.positions.truncate(j.len);
        self.next = j.next;
    }

    fn bytes(&self) -> usize {
        (self.keys.len() + self.values.len()) * std::mem::size_of::<f32>()
            + self.positions.len() * std::mem::size_of::<u32>()
    }
}

/// The gate's own per-sequence cache: `K'`, `V'` of the tokens the gate's attention can still
/// see, for every layer.
#[derive(Debug, Clone)]
pub struct GateCache {
    heads: usize,
    head_dim: usize,
    attention_window: usize,
    layers: Vec<LayerCache>,
}

impl GateCache {
    /// An empty cache shaped for gates of configuration `cfg`.
    pub fn new(cfg: &GateConfig) -> Self {
        let layer = LayerCache {
            capacity: cfg.attention_window,
            ..LayerCache::default()
        };
        Self {
            heads: cfg.heads,
            head_dim: cfg.head_dim,
            attention_window: cfg.attention_window,
            layers: vec![layer; cfg.n_layers],
        }
    }

    /// Number of tokens cached for `layer` (0 for a layer out of range): every token seen, or
    /// the last `attention_window` of them.
    pub fn len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.positions.len())
    }

    /// Whether no layer holds any token.
    pub fn is_empty(&self) -> bool {
        self.layers.iter().all(|l| l.positions.is_empty())
    }

    /// Bytes of `K'`, `V'` and positions held, all layers together.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }

    /// Starts recording what pushes change (a pass that may fail), dropping any earlier mark.
    pub fn mark(&mut self) {
        for l in &mut self.layers {
            l.journal = Some(Journal {
                len: l.positions.len(),
                next: l.next,
                ..Journal::default()
            });
        }
    }

    /// Keeps everything pushed since the mark (the pass succeeded) and stops recording.
    pub fn commit(&mut self) {
        self.layers.iter_mut().for_each(|l| l.journal = None);
    }

    /// Restores the cache exactly as it was at the last [`GateCache::mark`] (the pass failed)
    /// and stops recording; without a mark, does nothing.
    pub fn rollback(&mut self) {
        self.layers.iter_mut().for_each(LayerCache::rollback);
    }

    /// Forgets every token (a new sequence).
    pub fn clear(&mut self) {
        let capacity = self.attention_window;
        self.layers.iter_mut().for_each(|l| {
            *l = LayerCache {
                capacity,
                ..LayerCache::default()
            }
        });
    }

    /// The cache of `layer`, after checking that this cache was built for `cfg`'s shape.
    pub(super) fn layer_mut(&mut self, cfg: &GateConfig, layer: usize) -> Result<&mut LayerCache> {
        let mine = (
            self.heads,
            self.head_dim,
            self.layers.len(),
            self.attention_window,
        );
        let theirs = (cfg.heads, cfg.head_dim, cfg.n_layers, cfg.attention_window);
        if mine != theirs {
            return Err(invalid(
                "GateCache (heads, head_dim, n_layers, attention_window)",
                format!("{mine:?}"),
                format!("the gate's {theirs:?}"),
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
    /// at absolute `position`: appends its `K'`, `V'` to `cache`, attends over the cached
    /// tokens its window sees (itself included) and returns `s` per KV head (f32). Runs on host copies of the
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
        entry.push(k, v, position);
        let o = attend_one(q, entry, position, &self.cfg);
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

/// Softmax attention of one query `q: [ha, da]` at `position` over the cached rows it sees
/// ([`GateConfig::sees`]), per head, scaled by `1/sqrt(da)`; returns `[ha * da]`. Slot order
/// does not matter (a softmax is a sum).
fn attend_one(q: &[f32], cache: &LayerCache, position: u32, cfg: &GateConfig) -> Vec<f32> {
    let (ha, da) = (cfg.heads, cfg.head_dim);
    let scale = 1.0 / (da as f32).sqrt();
    let row = ha * da;
    let mut out = vec![0f32; row];
    let slots: Vec<usize> = (0..cache.positions.len())
        .filter(|&i| cfg.sees(position, cache.positions[i]))
        .collect();
    let mut logits = Vec::with_capacity(slots.len());
    for h in 0..ha {
        let qh = &q[h * da..(h + 1) * da];
        let at = |i: usize| i * row + h * da..i * row + (h + 1) * da;
        logits.clear();
        logits.extend(slots.iter().map(|&i| dot(&cache.keys[at(i)], qh) * scale));
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut z = 0f32;
        let oh = &mut out[h * da..(h + 1) * da];
        for (l, &i) in logits.iter().zip(&slots) {
            let e = (l - max).exp();
            z += e;
            oh.iter_mut()
                .zip(&cache.values[at(i)])
                .for_each(|(o, &x)| *o += e * x);
        }
        oh.iter_mut().for_each(|o| *o /= z);
    }
    out
}
