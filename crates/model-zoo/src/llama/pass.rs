//! Phase one of a batched pass ([`LlamaModel::forward_batch`]): the layers' computation. Each
//! layer runs its projections over the stacked rows of every live sequence, then per sequence
//! RoPE, the store append and the hook's plan, the attention of all of them as one job on the
//! pool, and the FFN; last, the LM head over the rows that want logits. Nothing is evicted
//! here: what each layer's `after_attention` will need is kept as [`Pending`] for the commit.
//!
//! Invariant: a sequence that fails is marked in `failed` and drops out of the later layers;
//! the others carry on unaffected.

use candle_core::{Device, Tensor};
use kv_store::{AttendCall, AttendOptions, SequenceKv};

use super::{LlamaModel, LogitsFor, SequenceInput};
use crate::cpu_pool::CpuPool;
use crate::error::{ModelError, Result};
use crate::hook::LayerPlan;

impl LlamaModel {
    /// Phase one of a batched pass: every layer's projections, per live sequence its append
    /// and plan, and the attention of all of them as one job on the pool (nothing evicted;
    /// what `after_attention` will need goes to `pending`). A sequence that fails is marked in
    /// `failed` and drops out. Returns each sequence's logits `[rows, vocab]` (`None` for one
    /// that failed).
    pub(super) fn run_batch(
        &self,
        batch: &mut [SequenceInput<'_>],
        failed: &mut [Option<ModelError>],
        pending: &mut [Vec<Pending>],
    ) -> Result<Vec<Option<Tensor>>> {
        let rows = BatchRows::new(batch, failed);
        if rows.live.is_empty() {
            return Ok(batch.iter().map(|_| None).collect());
        }
        let tokens: Vec<u32> = rows
            .live
            .iter()
            .flat_map(|&i| batch[i].tokens.iter().copied())
            .collect();
        let mut pass = BatchPass {
            batch,
            failed,
            pending,
            rows,
        };
        let mut x = self.embedding.forward(&tokens)?;
        for l in 0..self.layers.len() {
            x = self.run_layer(l, x, &mut pass)?;
        }
        self.head_logits(&x, &pass)
    }

    /// Layer `l` of a batched pass on the stacked hidden states `x`: projections over all rows,
    /// per sequence RoPE, append, plan and attention, then the FFN; returns the new `x`.
    fn run_layer(&self, l: usize, x: Tensor, pass: &mut BatchPass<'_, '_>) -> Result<Tensor> {
        let (layer, eps) = (&self.layers[l], self.cfg.rms_norm_eps as f32);
        let normed = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
        let [mut q, mut k, v] = layer.qkv.forward_parts(&normed, &pass.rows.rows)?;
        let planned = self.plan_layer(l, &normed, (&mut q, &mut k, &v), pass)?;
        let attn = self.attend_layer(l, &q, planned, pass)?;
        let rows = &pass.rows.rows;
        let x = (x + layer.o.forward_segments(&attn, rows)?)?;
        let normed = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
        let [gate, up] = layer.gate_up.forward_parts(&normed, rows)?;
        let gated = swiglu(gate, &up);
        let shape = (pass.rows.total, self.cfg.intermediate_size);
        let gated = Tensor::from_vec(gated, shape, &Device::Cpu)?;
        Ok((x + layer.down.forward_segments(&gated, rows)?)?)
    }

    /// Per live sequence of a pass, its share of layer `l` before attention (RoPE in place on
    /// its rows of `q` and `k`, the store append, the hook's plan); returns the plans of those
    /// that did not fail, with their indices (live, batch).
    fn plan_layer(
        &self,
        l: usize,
        normed: &Tensor,
        (q, k, v): (&mut [f32], &mut [f32], &[f32]),
        pass: &mut BatchPass<'_, '_>,
    ) -> Result<Vec<(usize, usize, LayerPlan)>> {
        let (q_width, kv_width) = self.widths();
        let rows = &pass.rows;
        let mut planned = Vec::with_capacity(rows.live.len());
        for (j, &i) in rows.live.iter().enumerate() {
            if pass.failed[i].is_some() {
                continue;
            }
            let step = self.prepare_attention(
                l,
                &mut pass.batch[i],
                AttentionInput {
                    normed: &normed.narrow(0, rows.firsts[j], rows.rows[j])?,
                    q: &mut q[rows.span(j, q_width)],
                    k: &mut k[rows.span(j, kv_width)],
                    v: &v[rows.span(j, kv_width)],
                    positions: &rows.positions[j],
                },
            );
            match step {
                Ok(plan) => planned.push((j, i, plan)),
                Err(e) => pass.failed[i] = Some(e),
            }
        }
        Ok(planned)
    }

    /// The attention of layer `l` for every planned sequence over its own store, as one job on
    /// the pool; records what `after_attention` will need in `pending`. Returns the attention
    /// output of all rows `[total, q_width]` (zero for sequences that failed).
    fn attend_layer(
        &self,
        l: usize,
        q: &[f32],
        planned: Vec<(usize, usize, LayerPlan)>,
        pass: &mut BatchPass<'_, '_>,
    ) -> Result<Tensor> {
        let (q_width, _) = self.widths();
        let scale = self.attention_scale();
        let rows = &pass.rows;
        let calls: Vec<AttendCall<'_>> = planned
            .iter()
            .map(|(j, i, plan)| {
                let mut opts = AttendOptions::new(scale);
                opts.visible_until = plan.visible_until.as_deref();
                opts.prob_sums = plan.prob_rows.clone();
                opts.parallel = Some(&CpuPool);
                AttendCall {
                    kv: &*pass.batch[*i].kv,
                    layer: l,
                    q: &q[rows.span(*j, q_width)],
                    q_positions: &rows.positions[*j],
                    opts,
                }
            })
            .collect();
        let attended = SequenceKv::attend_batch(&calls, Some(&CpuPool));
        let mut attn = vec![0f32; rows.total * q_width];
        for ((j, i, plan), result) in planned.into_iter().zip(attended) {
            match result {
                Ok(out) => {
                    attn[rows.span(j, q_width)].copy_from_slice(&out.out);
                    pass.pending[i].push(Pending {
                        queries: if plan.queries {
                            q[rows.span(j, q_width)].to_vec()
                        } else {
                            Vec::new()
                        },
                        prob_sums: out.prob_sums,
                    });
                }
                Err(e) => pass.failed[i] = Some(e.into()),
            }
        }
        Ok(Tensor::from_vec(attn, (rows.total, q_width), &Device::Cpu)?)
    }

    /// The final norm and the LM head over the rows each sequence wants logits for; returns
    /// each sequence's logits (`None` for one that failed).
    fn head_logits(&self, x: &Tensor, pass: &BatchPass<'_, '_>) -> Result<Vec<Option<Tensor>>> {
        let x = candle_nn::ops::rms_norm(x, &self.norm, self.cfg.rms_norm_eps as f32)?;
        let (mut picks, mut head_rows, mut first) = (Vec::new(), Vec::new(), 0u32);
        let mut head_range = vec![0..0; pass.batch.len()];
        for (j, &i) in pass.rows.live.iter().enumerate() {
            let n = pass.rows.rows[j] as u32;
            let range = match pass.batch[i].logits_for {
                LogitsFor::Last => first + n - 1..first + n,
                LogitsFor::All => first..first + n,
            };
            head_range[i] = picks.len()..picks.len() + range.len();
            head_rows.push(range.len());
            picks.extend(range);
            first += n;
        }
        let picked = x.index_select(&Tensor::new(picks.as_slice(), &Device::Cpu)?, 0)?;
        let logits = self.lm_head.forward_segments(&picked, &head_rows)?;
        (0..pass.batch.len())
            .map(|i| {
                if pass.failed[i].is_some() {
                    return Ok(None);
                }
                let r = &head_range[i];
                Ok(Some(logits.narrow(0, r.start, r.len())?))
            })
            .collect()
    }

    /// Row widths of the queries and of the keys (values): `[n_heads | n_kv_heads] * head_dim`.
    fn widths(&self) -> (usize, usize) {
        let cfg = &self.cfg;
        (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
    }

    /// One sequence's share of layer `layer` before attention: RoPE (in place on `q` and `k`),
    /// the store append and the hook's plan.
    fn prepare_attention(
        &self,
        layer: usize,
        seq: &mut SequenceInput<'_>,
        input: AttentionInput<'_>,
    ) -> Result<LayerPlan> {
        let AttentionInput {
            normed,
            q,
            k,
            v,
            positions,
        } = input;
        self.rotate(layer, q, k, positions, seq.kv);
        seq.kv.append(layer, k, v, positions)?;
        seq.hook.plan(layer, normed, positions, seq.kv)
    }

    /// RoPE for one layer's new queries and keys: at their token positions, or (cache
    /// positions) at each KV head's next cache positions, its query group with it.
    fn rotate(
        &self,
        layer: usize,
        q: &mut [f32],
        k: &mut [f32],
        positions: &[u32],
        kv: &SequenceKv,
    ) {
        let cfg = &self.cfg;
        if !kv.has_cache_positions() {
            self.rope.apply(q, cfg.n_heads, positions);
            self.rope.apply(k, cfg.n_kv_heads, positions);
            return;
        }
        let next: Vec<f64> = (0..cfg.n_kv_heads)
            .map(|g| f64::from(kv.next_cache_position(layer, g).unwrap_or(0)))
            .collect();
        let at = |t: usize, g: usize| next[g] + t as f64;
        self.rope
            .apply_grouped(q, cfg.n_heads, cfg.group_size(), at);
        self.rope.apply_grouped(k, cfg.n_kv_heads, 1, at);
    }
}

/// One sequence's slices of a layer's projections.
struct AttentionInput<'a> {
    normed: &'a Tensor,
    q: &'a mut [f32],
    k: &'a mut [f32],
    v: &'a [f32],
    positions: &'a [u32],
}

/// Values of [`swiglu`] per piece of work on the pool; calls of fewer than four pieces (a few
/// decode rows of a small model: microseconds of work) stay on the calling thread.
const SWIGLU_PIECE: usize = 1 << 12;

/// `silu(gate) * up` elementwise, in place of `gate`; large calls (a batch of decode rows, a
/// prefill chunk) are split over the pool (each value is computed alike wherever it runs).
fn swiglu(mut gate: Vec<f32>, up: &[f32]) -> Vec<f32> {
    let run = |gate: &mut [f32], up: &[f32]| {
        for (g, u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    };
    if gate.len() < 4 * SWIGLU_PIECE {
        run(&mut gate, up);
        return gate;
    }
    let pieces: Vec<std::sync::Mutex<(&mut [f32], &[f32])>> = gate
        .chunks_mut(SWIGLU_PIECE)
        .zip(up.chunks(SWIGLU_PIECE))
        .map(std::sync::Mutex::new)
        .collect();
    CpuPool::run_chunked(pieces.len(), |range| {
        for piece in &pieces[range] {
            let mut piece = piece.lock().unwrap_or_else(|e| e.into_inner());
            let (gate, up) = &mut *piece;
            run(gate, up);
        }
    });
    drop(pieces);
    gate
}

/// What a layer's `after_attention` needs once the pass commits.
pub(super) struct Pending {
    pub(super) queries: Vec<f32>,
    pub(super) prob_sums: Option<Vec<Vec<f32>>>,
}

/// Where each live sequence's rows sit in the stacked hidden states of a batched pass.
struct BatchRows {
    /// The batch indices of the sequences that run (had not failed before the pass).
    live: Vec<usize>,
    /// Rows (new tokens) of each live sequence.
    rows: Vec<usize>,
    /// Each live sequence's first row: its rows are `firsts[j]..firsts[j] + rows[j]`.
    firsts: Vec<usize>,
    /// The positions of each live sequence's new tokens.
    positions: Vec<Vec<u32>>,
    /// Rows in all.
    total: usize,
}

impl BatchRows {
    fn new(batch: &[SequenceInput<'_>], failed: &[Option<ModelError>]) -> Self {
        let live: Vec<usize> = (0..batch.len()).filter(|&i| failed[i].is_none()).collect();
        let rows: Vec<usize> = live.iter().map(|&i| batch[i].tokens.len()).collect();
        let firsts = rows
            .iter()
            .scan(0, |first, &n| {
                *first += n;
                Some(*first - n)
            })
            .collect();
        let positions = live
            .iter()
            .map(|&i| (batch[i].start..batch[i].start + batch[i].tokens.len() as u32).collect())
            .collect();
        BatchRows {
            total: rows.iter().sum(),
            live,
            rows,
            firsts,
            positions,
        }
    }

    /// Live sequence `j`'s part of a row-major buffer of `width` values per row.
    fn span(&self, j: usize, width: usize) -> std::ops::Range<usize> {
        self.firsts[j] * width..(self.firsts[j] + self.rows[j]) * width
    }
}

/// A batched pass in progress: its sequences, the error of each that failed, what each one's
/// commit will need, and where their rows are.
struct BatchPass<'p, 'a> {
    batch: &'p mut [SequenceInput<'a>],
    failed: &'p mut [Option<ModelError>],
    pending: &'p mut [Vec<Pending>],
    rows: BatchRows,
}
