//! The Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2) over agate's KV store.
//!
//! Data flow per layer: RMSNorm → q/k/v projections (+bias for Qwen2) → RoPE → append k/v to the
//! store → hook plan → attention over the store's retained entries → output projection,
//! residual → RMSNorm → SwiGLU FFN, residual. Keys are stored after RoPE. All layers run before
//! any eviction: the hooks' `after_attention` calls come once a sequence's logits are finite
//! (see [`LlamaModel::forward_batch`]).
//!
//! Batching: [`LlamaModel::forward_batch`] runs several sequences' new tokens through each
//! layer's projections at once (rows stacked, one sequence after another) while RoPE, the
//! store, the hook and attention stay per sequence; the sequences' attention calls of a layer
//! run as one job on the pool (`SequenceKv::attend_batch`: one handoff, every thread busy even
//! when each call alone is too short to split). [`LlamaModel::forward`] is its batch of one.
//!
//! Invariants: hidden states are f32 `[rows, hidden]`; positions passed in are the true positions
//! (tokens seen so far, evicted or not), which the store keeps for masking. RoPE uses them too,
//! unless the store has cache positions (the cache positions mode): then each KV head's keys are
//! rotated for their position in that head's cache, whose gaps the store closes by shifting
//! keys when asked, so query-key distances stay within what the caller allows. With quantized
//! weights a sequence's logits do not depend on which other sequences share its pass (float
//! weights: up to rounding).

use candle_core::{Device, Tensor};
use kv_store::{AttendCall, AttendOptions, KeyShift, SequenceKv};

use crate::config::ModelConfig;
use crate::cpu_pool::CpuPool;
use crate::error::{ModelError, Result};
use crate::hook::{AttentionOutcome, LayerHook, LayerPlan};
use crate::rope::Rope;
use crate::weights::{Embedding, FusedLinear, Linear, TensorRole, Weights};

/// Which logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last token's: `[vocab]`.
    Last,
    /// Every new token's: `[n, vocab]`.
    All,
}

struct Layer {
    attn_norm: Tensor,
    /// q, k and v stacked.
    qkv: FusedLinear,
    o: Linear,
    ffn_norm: Tensor,
    /// The FFN's gate and up projections stacked.
    gate_up: FusedLinear,
    down: Linear,
}

/// One sequence's share of a batched forward pass ([`LlamaModel::forward_batch`]).
pub struct SequenceInput<'a> {
    /// The new tokens.
    pub tokens: &'a [u32],
    /// Position of the first of them (tokens seen so far, evicted or not).
    pub start: u32,
    /// The sequence's store; the new keys and values are appended to it.
    pub kv: &'a mut SequenceKv,
    /// The sequence's eviction policy.
    pub hook: &'a mut dyn LayerHook,
    /// Which logits to return.
    pub logits_for: LogitsFor,
}

/// One sequence's slices of a layer's projections.
struct AttentionInput<'a> {
    normed: &'a Tensor,
    q: &'a mut [f32],
    k: &'a mut [f32],
    v: &'a [f32],
    positions: &'a [u32],
}

/// A loaded decoder.
pub struct LlamaModel {
    cfg: ModelConfig,
    embedding: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
}

impl LlamaModel {
    /// Builds the decoder from weights, checking every tensor against `cfg`.
    pub fn load(cfg: &ModelConfig, weights: &Weights) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        let bias = cfg.architecture.qkv_bias();
        let layers = (0..cfg.n_layers)
            .map(|l| {
                Ok(Layer {
                    attn_norm: weights.vector(TensorRole::AttnNorm, l, d)?,
                    qkv: weights.fused_linear(
                        &[TensorRole::Q, TensorRole::K, TensorRole::V],
                        l,
                        &[q_out, kv_out, kv_out],
                        d,
                        bias,
                    )?,
                    o: weights.linear(TensorRole::O, l, d, q_out, false)?,
                    ffn_norm: weights.vector(TensorRole::FfnNorm, l, d)?,
                    gate_up: weights.fused_linear(
                        &[TensorRole::Gate, TensorRole::Up],
                        l,
                        &[cfg.intermediate_size; 2],
                        d,
                        false,
                    )?,
                    down: weights.linear(TensorRole::Down, l, d, cfg.intermediate_size, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LlamaModel {
            cfg: cfg.clone(),
            embedding: weights.embedding(cfg.vocab_size, d)?,
            layers,
            norm: weights.vector(TensorRole::OutputNorm, 0, d)?,
            lm_head: weights.lm_head(cfg.vocab_size, d, cfg.tie_embeddings)?,
            rope: Rope::new(cfg, weights.rope_layout(cfg.architecture)),
        })
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Bytes of weights one decode step reads: every projection and the LM head as held in
    /// memory, and the norm vectors (the embedding lookup reads one row, not counted).
    pub fn weight_bytes_per_token(&self) -> usize {
        let vector = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.weight_bytes()
                    + l.o.weight_bytes()
                    + l.gate_up.weight_bytes()
                    + l.down.weight_bytes()
                    + vector(&l.attn_norm)
                    + vector(&l.ffn_norm)
            })
            .sum();
        layers + self.lm_head.weight_bytes() + vector(&self.norm)
    }

    /// Runs `tokens` at positions `start..start+n` through the decoder, appending their keys and
    /// values to `kv` and letting `hook` steer eviction. Returns f32 logits. The batch-of-one case
    /// of [`LlamaModel::forward_batch`].
    pub fn forward(
        &self,
        tokens: &[u32],
        start: u32,
        kv: &mut SequenceKv,
        hook: &mut dyn LayerHook,
        logits_for: LogitsFor,
    ) -> Result<Tensor> {
        let mut batch = [SequenceInput {
            tokens,
            start,
            kv,
            hook,
            logits_for,
        }];
        let mut out = self.forward_batch(&mut batch)?;
        out.pop().expect("one result per sequence")
    }

    /// Runs the new tokens of several sequences through the decoder in one pass: every
    /// projection sees all of their rows at once (the weights are read once per layer, whatever
    /// the batch size), while RoPE, the store append, the hook and attention run per sequence
    /// over its own cache at its own positions (the attention calls of a layer as one job on the
    /// pool, each split into the work units it gets alone). Each sequence's logits are bit for
    /// bit those it gets alone with quantized weights ([`Linear::forward_segments`], and the
    /// fused q/k/v and gate/up projections of [`FusedLinear::forward_parts`]; every other
    /// operation is row-wise), and to rounding with float weights.
    ///
    /// Keys and queries are rotated for their token positions, or, when a sequence's store has
    /// cache positions (`SequenceKv::with_cache_positions`, the cache positions mode), for their
    /// position in each KV head's cache: the new tokens of KV head `g` take the cache positions
    /// after its last entry, and the query heads of `g`'s group take the same positions (heads
    /// may retain different counts).
    ///
    /// Each sequence's pass is all-or-nothing. Every layer runs (append, plan, attention) with
    /// nothing evicted; then a sequence whose logits are finite commits (its hook's
    /// `after_attention` for every layer, in order), and one that failed anywhere before that,
    /// non-finite logits included ([`ModelError::NonFinite`]), is rolled back: its appended
    /// entries are removed and its hook is told to undo its plans, so its session is as it was.
    /// Returns one result per sequence, in order; the others carry on unaffected. The outer
    /// `Err` means a shared operation failed: every sequence of the batch is then rolled back.
    /// Only a failing commit (a hook's eviction: an internal error) leaves a sequence part-way.
    pub fn forward_batch(&self, batch: &mut [SequenceInput<'_>]) -> Result<Vec<Result<Tensor>>> {
        let mut failed: Vec<Option<ModelError>> =
            batch.iter().map(|s| self.check_input(s).err()).collect();
        let mut pending: Vec<Vec<Pending>> = batch.iter().map(|_| Vec::new()).collect();
        let run = self.run_batch(batch, &mut failed, &mut pending);
        let logits = match run {
            Ok(logits) => logits,
            Err(e) => {
                // Sequences that had already failed are rolled back too (undoing is idempotent).
                batch.iter_mut().for_each(SequenceInput::rollback);
                return Err(e);
            }
        };
        let scale = self.attention_scale();
        Ok(batch
            .iter_mut()
            .zip(failed)
            .zip(logits)
            .zip(pending)
            .map(|(((seq, error), logits), pending)| {
                let logits = match (error, logits) {
                    (None, Some(l)) => l,
                    (error, _) => {
                        seq.rollback();
                        return Err(error.unwrap_or_else(|| {
                            ModelError::Input("internal: a live sequence got no logits".into())
                        }));
                    }
                };
                if let Err(e) = check_finite(&logits, seq) {
                    seq.rollback();
                    return Err(e);
                }
                let positions: Vec<u32> =
                    (seq.start..seq.start + seq.tokens.len() as u32).collect();
                for (layer, p) in pending.into_iter().enumerate() {
                    seq.hook.after_attention(
                        layer,
                        AttentionOutcome {
                            kv: seq.kv,
                            queries: &p.queries,
                            positions: &positions,
                            prob_sums: p.prob_sums,
                            scale,
                        },
                    )?;
                }
                Ok(match seq.logits_for {
                    LogitsFor::Last => logits.squeeze(0)?,
                    LogitsFor::All => logits,
                })
            })
            .collect())
    }

    /// Phase one of a batched pass: every layer's projections, per live sequence its append
    /// and plan, and the attention of all of them as one job on the pool (nothing evicted;
    /// what `after_attention` will need goes to `pending`). A sequence that fails is marked in
    /// `failed` and drops out. Returns each sequence's logits `[rows, vocab]` (`None` for one
    /// that failed).
    fn run_batch(
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

    /// How a store with cache positions moves a key by `delta` positions: a rotation by `delta`
    /// (for `kv_store::SequenceKv::with_cache_positions`).
    pub fn key_shift(&self) -> KeyShift {
        let rope = self.rope.clone();
        std::sync::Arc::new(move |keys: &mut [f32], delta: i64| rope.rotate_by(keys, delta))
    }

    fn attention_scale(&self) -> f32 {
        1.0 / (self.cfg.head_dim as f32).sqrt()
    }

    /// Checks one sequence's input against the model before anything runs.
    fn check_input(&self, seq: &SequenceInput<'_>) -> Result<()> {
        let cfg = &self.cfg;
        if seq.tokens.is_empty() {
            return Err(ModelError::Input(
                "forward pass needs at least one token".into(),
            ));
        }
        if let Some(&bad) = seq.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary ({})",
                cfg.vocab_size
            )));
        }
        if u32::try_from(seq.tokens.len())
            .ok()
            .and_then(|n| seq.start.checked_add(n))
            .is_none()
        {
            return Err(ModelError::Input(format!(
                "{} tokens after position {} exceed the {} positions a sequence can hold",
                seq.tokens.len(),
                seq.start,
                u32::MAX
            )));
        }
        let kv = &seq.kv;
        if kv.n_layers() != cfg.n_layers
            || kv.n_kv_heads() != cfg.n_kv_heads
            || kv.head_dim() != cfg.head_dim
        {
            return Err(ModelError::Input(format!(
                "KV store shape {}x{}x{} does not match the model ({} layers, {} KV heads, head dim {})",
                kv.n_layers(), kv.n_kv_heads(), kv.head_dim(), cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
            )));
        }
        Ok(())
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

impl SequenceInput<'_> {
    /// Undoes this sequence's part of a pass that will not commit: its appended entries go,
    /// its hook forgets its plans.
    fn rollback(&mut self) {
        self.kv.truncate_from(self.start);
        self.hook.abort_pass();
    }
}

/// What a layer's `after_attention` needs once the pass commits.
struct Pending {
    queries: Vec<f32>,
    prob_sums: Option<Vec<Vec<f32>>>,
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

/// Fails with [`ModelError::NonFinite`] naming the first position whose logits (`[rows, vocab]`)
/// hold a NaN or an infinity. One reduction when they are all finite.
fn check_finite(logits: &Tensor, seq: &SequenceInput<'_>) -> Result<()> {
    if logits.sum_all()?.to_scalar::<f32>()?.is_finite() {
        return Ok(());
    }
    // Not finite: a bad value, or a sum of finite values that overflowed.
    let Some(row) = logits
        .to_vec2::<f32>()?
        .iter()
        .position(|r| r.iter().any(|v| !v.is_finite()))
    else {
        return Ok(());
    };
    let position = match seq.logits_for {
        LogitsFor::Last => seq.start + seq.tokens.len() as u32 - 1,
        LogitsFor::All => seq.start + row as u32,
    };
    Err(ModelError::NonFinite { position })
}
