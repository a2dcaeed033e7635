//! Decode for the Attention-Gate: [`GateCache`] (the gate's own `K'`, `V'` of the tokens its
//! attention can still see, per layer), [`AttentionGate::step`] (one new token's keep
//! probabilities) and the host copies of the parameters it reads
//! ([`AttentionGate::round_projections_to_int4`] makes them 4-bit,
//! [`AttentionGate::decode_weight_bytes`] counts them).
//!
//! Invariants: per layer the cache holds, token-major on the host, `K'` (after RoPE at the
//! token's true position), `V'` and the position of the most recent tokens the gate has seen,
//! retained by the model's cache or not: at most `attention_window` of them (a ring: the oldest
//! is overwritten), every one when the window is 0 (unbounded, older gates). A query's
//! attention window never reaches further back than that, so a step sees exactly what the full
//! forward over the same tokens would see, and gives the same `s` up to float rounding; the
//! cache's memory is bounded by `2 * attention_window * heads * head_dim` f32 per layer (plus
//! the RoPE factors of the last position stepped, a memo keyed by position and RoPE base).
//! Between [`GateCache::mark`] and [`GateCache::commit`] each layer journals what a push
//! overwrites (at most one saved row per slot), so [`GateCache::rollback`] restores the cache
//! as it was at the mark in time proportional to the rows pushed since, however long the
//! sequence.

use candle_core::{DType, Tensor};

use super::project::{dot, HostMatrix, Int4Rows};
use super::{AttentionGate, GateConfig, GateLayer};
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
    /// The RoPE factors of the last position stepped (a few dozen floats, not per token).
    rope: RopeRow,
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
            rope: RopeRow::default(),
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

/// One layer's parameters as host rows, for the decode step.
#[derive(Debug, Clone)]
pub(super) struct HostLayer {
    /// `[3 * inner, hidden]`: the rows of `wq`, then `wk`, then `wv` (4-bit when rounded,
    /// else f16 when exact).
    wqkv: HostMatrix,
    /// `[n_kv_heads, inner]`.
    wg: Vec<f32>,
    /// `[n_kv_heads]`.
    bg: Vec<f32>,
}

impl HostLayer {
    /// Layer `p` on the host: its projection `wqkv` (made from [`projection_rows`]) and its
    /// read-out.
    fn new(p: &GateLayer, wqkv: HostMatrix) -> candle_core::Result<HostLayer> {
        Ok(HostLayer {
            wqkv,
            wg: flat(&p.wg)?,
            bg: flat(&p.bg)?,
        })
    }

    /// Bytes of parameters one decode step of the layer reads.
    fn bytes(&self) -> usize {
        self.wqkv.bytes()
            + std::mem::size_of_val(&self.wg[..])
            + std::mem::size_of_val(&self.bg[..])
    }
}

/// The rows of layer `p`'s `wq`, then `wk`, then `wv`, as f32, row-major.
fn projection_rows(p: &GateLayer) -> candle_core::Result<Vec<f32>> {
    let mut rows = flat(&p.wq)?;
    rows.extend(flat(&p.wk)?);
    rows.extend(flat(&p.wv)?);
    Ok(rows)
}

/// `t`'s values as f32, row-major.
fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl AttentionGate {
    fn host_layers(&self) -> Result<&[HostLayer]> {
        if let Some(h) = self.host.get() {
            return Ok(h);
        }
        let hidden = self.cfg.hidden_size;
        let layers = self
            .layers
            .iter()
            .map(|p| HostLayer::new(p, HostMatrix::new(&projection_rows(p)?, hidden)))
            .collect::<candle_core::Result<Vec<_>>>()
            .ctx("copying gate parameters to the host")?;
        Ok(self.host.get_or_init(|| layers))
    }

    /// Rounds every layer's projections `wq`, `wk`, `wv` to 4 bits per row and 32 columns
    /// (`d = max|w| / 7`, `q = round(w / d)`, value `d·q`; project.rs), the form sessions run
    /// them in: the forwards (prefill, [`AttentionGate::keep_probs`]) use the rounded values,
    /// the decode step reads the codes (0.625 bytes a weight with its scale, under a third of
    /// f16), so both compute the same function up to f32 rounding. For inference: the
    /// parameters are no longer a training run's `Var`s. Needs f32 parameters (a loaded
    /// gate's).
    pub fn round_projections_to_int4(&mut self) -> Result<()> {
        if self.dtype() != DType::F32 {
            return Err(invalid(
                "AttentionGate::round_projections_to_int4",
                format!("parameters in {:?}", self.dtype()),
                "f32 parameters",
            ));
        }
        let hidden = self.cfg.hidden_size;
        let mut host = Vec::with_capacity(self.layers.len());
        for p in &mut self.layers {
            let rounded = projection_rows(p)
                .map(|rows| Int4Rows::round(&rows, hidden))
                .ctx("copying gate parameters to the host")?;
            // The rounded values, in the order of `projection_rows`.
            let values = rounded.values();
            let mut rest = values.as_slice();
            for w in [&mut p.wq, &mut p.wk, &mut p.wv] {
                let (mine, after) = rest.split_at(w.elem_count());
                *w = Tensor::from_slice(mine, w.shape(), w.device())
                    .ctx("rounding the gate's projections")?;
                rest = after;
            }
            let layer = HostLayer::new(p, HostMatrix::from_int4(&rounded));
            host.push(layer.ctx("copying gate parameters to the host")?);
        }
        self.host = std::sync::OnceLock::from(host);
        Ok(())
    }

    /// Bytes of parameters one decode step reads over every layer (projections as held: f32,
    /// f16 or 4-bit after [`AttentionGate::round_projections_to_int4`]).
    pub fn decode_weight_bytes(&self) -> Result<usize> {
        Ok(self.host_layers()?.iter().map(HostLayer::bytes).sum())
    }

    /// Decode step of layer `layer` for one new token `x_row` (`[hidden]` or `[1, hidden]`)
    /// at absolute `position`: appends its `K'`, `V'` to `cache`, attends over the cached
    /// tokens its window sees (itself included) and returns `s` per KV head (f32). Runs on host
    /// copies of the parameters, no tensor dispatch: the projection (`HostMatrix::matvec`, on
    /// the f16 weights when they are exact) is shared out over candle's CPU thread pool,
    /// the RoPE angles are computed once per position for every layer, and the attention is
    /// one pass over the window's rows.
    pub fn step(
        &self,
        layer: usize,
        x_row: &Tensor,
        position: u32,
        cache: &mut GateCache,
    ) -> Result<Vec<f32>> {
        self.layer(layer)?;
        let hidden = self.cfg.hidden_size;
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
        let inner = self.cfg.inner();
        let mut qkv = hl.wqkv.matvec(&x);
        let (q, kv) = qkv.split_at_mut(inner);
        let (k, v) = kv.split_at_mut(inner);
        cache.layer_mut(&self.cfg, layer)?; // the shape check, before the RoPE factors
        let cos_sin = &cache.rope_at(self, position).cos_sin;
        self.rope.rotate_heads(q, cos_sin);
        self.rope.rotate_heads(k, cos_sin);
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
}

/// The RoPE factors of one position ([`Rope::angles`](crate::rope::Rope::angles)), kept for
/// every layer's step of the token.
#[derive(Debug, Clone, Default)]
struct RopeRow {
    /// The position and the RoPE base (f32 bits) the factors are for.
    key: Option<(u32, u32)>,
    /// `(cos, sin)` per rotation pair.
    cos_sin: Vec<(f32, f32)>,
}

impl GateCache {
    /// The RoPE factors at `position`, computed at most once per position (every layer's step
    /// of a token uses the same).
    fn rope_at(&mut self, gate: &AttentionGate, position: u32) -> &RopeRow {
        let key = Some((position, gate.cfg.rope_theta.to_bits()));
        if self.rope.key != key {
            let pairs = gate.rope.inv_freq().len();
            self.rope.cos_sin.resize(pairs, (0.0, 0.0));
            gate.rope
                .angles(f64::from(position), &mut self.rope.cos_sin);
            self.rope.key = key;
        }
        &self.rope
    }
}

/// Softmax attention of one query `q: [ha, da]` at `position` over the cached rows it sees
/// ([`GateConfig::sees`]), per head, scaled by `1/sqrt(da)`; returns `[ha * da]`. One pass over
/// the rows (each `K'` and `V'` row read once, for every head) with an online softmax per head:
/// a running maximum, the sum of `exp(logit - max)` and the output rescaled when the maximum
/// grows. Slot order does not matter (a softmax is a sum).
fn attend_one(q: &[f32], cache: &LayerCache, position: u32, cfg: &GateConfig) -> Vec<f32> {
    let (ha, da) = (cfg.heads, cfg.head_dim);
    let scale = 1.0 / (da as f32).sqrt();
    let row = ha * da;
    let mut out = vec![0f32; row];
    let mut max = vec![f32::NEG_INFINITY; ha];
    let mut sum = vec![0f32; ha];
    let rows = cache
        .keys
        .chunks_exact(row)
        .zip(cache.values.chunks_exact(row));
    for ((k, v), &p) in rows.zip(&cache.positions) {
        if !cfg.sees(position, p) {
            continue;
        }
        let heads = k.chunks_exact(da).zip(v.chunks_exact(da));
        let state = q.chunks_exact(da).zip(out.chunks_exact_mut(da));
        for (((k, v), (q, o)), (max, sum)) in heads.zip(state).zip(max.iter_mut().zip(&mut sum)) {
            let logit = dot(k, q) * scale;
            if logit > *max {
                let shrink = (*max - logit).exp();
                *sum *= shrink;
                o.iter_mut().for_each(|o| *o *= shrink);
                *max = logit;
            }
            let e = (logit - *max).exp();
            *sum += e;
            o.iter_mut().zip(v).for_each(|(o, &x)| *o += e * x);
        }
    }
    for (o, sum) in out.chunks_exact_mut(da).zip(&sum) {
        o.iter_mut().for_each(|o| *o /= sum);
    }
    out
}
