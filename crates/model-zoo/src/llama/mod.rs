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
//!
//! Files: this one holds the model, its loading and the pass's protocol (checks, commit,
//! rollback); `pass.rs` the layers' computation.

use candle_core::Tensor;
use kv_store::{KeyShift, SequenceKv};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::hook::{AttentionOutcome, LayerHook};
use crate::rope::{model_rope, Rope};
use crate::weights::{Embedding, FusedLinear, Linear, TensorRole, Weights};

mod pass;
use pass::Pending;

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
            rope: model_rope(cfg, weights.rope_layout(cfg.architecture)),
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
}

impl SequenceInput<'_> {
    /// Undoes this sequence's part of a pass that will not commit: its appended entries go,
    /// its hook forgets its plans.
    fn rollback(&mut self) {
        self.kv.truncate_from(self.start);
        self.hook.abort_pass();
    }
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
