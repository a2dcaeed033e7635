//! The Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2) over agate's KV store.
//!
//! Data flow per layer: RMSNorm → q/k/v projections (+bias for Qwen2) → RoPE at the tokens'
//! absolute positions → append k/v to the store → hook plan → attention over the store's
//! retained entries → hook after_attention (eviction) → output projection, residual → RMSNorm →
//! SwiGLU FFN, residual. Keys are stored after RoPE. All layers run before any eviction: the
//! hooks' `after_attention` calls come once the logits are finite (see [`LlamaModel::forward`]).
//!
//! Invariants: hidden states are f32 `[n, hidden]`; positions passed in are the true positions
//! (tokens seen so far, evicted or not), which the store keeps for masking. RoPE uses them too,
//! unless the store has cache positions (the cache positions mode): then each KV head's keys are
//! rotated for their position in that head's cache, whose gaps the store closes by shifting
//! keys when asked, so query-key distances stay within what the caller allows.

use candle_core::{Device, Tensor};
use kv_store::{AttendOptions, KeyShift, SequenceKv};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::hook::{AttentionOutcome, LayerHook};
use crate::rope::Rope;
use crate::weights::{Embedding, Linear, TensorRole, Weights};

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
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
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
                    q: weights.linear(TensorRole::Q, l, q_out, d, bias)?,
                    k: weights.linear(TensorRole::K, l, kv_out, d, bias)?,
                    v: weights.linear(TensorRole::V, l, kv_out, d, bias)?,
                    o: weights.linear(TensorRole::O, l, d, q_out, false)?,
                    ffn_norm: weights.vector(TensorRole::FfnNorm, l, d)?,
                    gate: weights.linear(TensorRole::Gate, l, cfg.intermediate_size, d, false)?,
                    up: weights.linear(TensorRole::Up, l, cfg.intermediate_size, d, false)?,
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

    /// Runs `tokens` at positions `start..start+n` through the decoder, appending their keys and
    /// values to `kv` and letting `hook` steer eviction. Returns f32 logits.
    ///
    /// Keys and queries are rotated for their token positions, or, when `kv` has cache
    /// positions (`SequenceKv::with_cache_positions`, the cache positions mode), for their
    /// position in each KV head's cache: the new tokens of KV head `g` take the cache positions
    /// after its last entry, and the query heads of `g`'s group take the same positions (heads
    /// may retain different counts). The pass is all-or-nothing: if anything fails before it commits (including
    /// non-finite logits, [`ModelError::NonFinite`]), the appended entries are removed, the hook
    /// is told to undo its plans, and nothing was evicted; on success every layer's
    /// `after_attention` runs once the logits are known to be finite.
    pub fn forward(
        &self,
        tokens: &[u32],
        start: u32,
        kv: &mut SequenceKv,
        hook: &mut dyn LayerHook,
        logits_for: LogitsFor,
    ) -> Result<Tensor> {
        let positions = self.check_input(tokens, start, kv)?;
        let mut pending = Vec::with_capacity(self.layers.len());
        let logits = match self.run(tokens, &positions, kv, hook, logits_for, &mut pending) {
            Ok(logits) => logits,
            Err(e) => {
                kv.truncate_from(start);
                hook.abort_pass();
                return Err(e);
            }
        };
        let scale = self.attention_scale();
        for (layer, p) in pending.into_iter().enumerate() {
            hook.after_attention(
                layer,
                AttentionOutcome {
                    kv,
                    queries: &p.queries,
                    positions: &positions,
                    prob_sums: p.prob_sums,
                    scale,
                },
            )?;
        }
        Ok(logits)
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

    /// Checks a pass's input against the model and the store before anything changes; returns
    /// the tokens' positions.
    fn check_input(&self, tokens: &[u32], start: u32, kv: &SequenceKv) -> Result<Vec<u32>> {
        let cfg = &self.cfg;
        if tokens.is_empty() {
            return Err(ModelError::Input(
                "forward pass needs at least one token".into(),
            ));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary ({})",
                cfg.vocab_size
            )));
        }
        if kv.n_layers() != cfg.n_layers
            || kv.n_kv_heads() != cfg.n_kv_heads
            || kv.head_dim() != cfg.head_dim
        {
            return Err(ModelError::Input(format!(
                "KV store shape {}x{}x{} does not match the model ({} layers, {} KV heads, head dim {})",
                kv.n_layers(), kv.n_kv_heads(), kv.head_dim(), cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
            )));
        }
        let end = u32::try_from(tokens.len())
            .ok()
            .and_then(|n| start.checked_add(n))
            .ok_or_else(|| {
                ModelError::Input(format!(
                    "{} tokens after position {start} exceed the {} positions a sequence can hold",
                    tokens.len(),
                    u32::MAX
                ))
            })?;
        Ok((start..end).collect())
    }

    /// Phase one of a pass: every layer's append, plan and attention, then the logits, checked
    /// finite. Nothing is evicted; what `after_attention` will need is left in `pending`.
    fn run(
        &self,
        tokens: &[u32],
        positions: &[u32],
        kv: &mut SequenceKv,
        hook: &mut dyn LayerHook,
        logits_for: LogitsFor,
        pending: &mut Vec<Pending>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let n = tokens.len();
        let eps = cfg.rms_norm_eps as f32;
        let scale = self.attention_scale();
        let mut x = self.embedding.forward(tokens)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let mut q = layer.q.forward(&normed)?.flatten_all()?.to_vec1::<f32>()?;
            let mut k = layer.k.forward(&normed)?.flatten_all()?.to_vec1::<f32>()?;
            let v = layer.v.forward(&normed)?.flatten_all()?.to_vec1::<f32>()?;
            self.rotate(l, &mut q, &mut k, positions, kv);
            kv.append(l, &k, &v, positions)?;
            let plan = hook.plan(l, &normed, positions, kv)?;
            let mut opts = AttendOptions::new(scale);
            opts.visible = plan.visible.as_deref();
            opts.window = plan.window;
            opts.prob_sums = plan.prob_rows.clone();
            let attended = kv.attend(l, &q, positions, &opts)?;
            pending.push(Pending {
                queries: if plan.queries { q } else { Vec::new() },
                prob_sums: attended.prob_sums,
            });
            let attn =
                Tensor::from_vec(attended.out, (n, cfg.n_heads * cfg.head_dim), &Device::Cpu)?;
            x = (x + layer.o.forward(&attn)?)?;
            let normed = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gated = (candle_nn::ops::silu(&layer.gate.forward(&normed)?)?
                * layer.up.forward(&normed)?)?;
            x = (x + layer.down.forward(&gated)?)?;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        let x = match logits_for {
            LogitsFor::Last => x.narrow(0, n - 1, 1)?,
            LogitsFor::All => x,
        };
        let logits = self.lm_head.forward(&x)?;
        check_finite(&logits, positions, logits_for)?;
        Ok(match logits_for {
            LogitsFor::Last => logits.squeeze(0)?,
            LogitsFor::All => logits,
        })
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

/// What a layer's `after_attention` needs once the pass commits.
struct Pending {
    queries: Vec<f32>,
    prob_sums: Option<Vec<Vec<f32>>>,
}

/// Fails with [`ModelError::NonFinite`] naming the first position whose logits (`[rows, vocab]`)
/// hold a NaN or an infinity. One reduction when they are all finite.
fn check_finite(logits: &Tensor, positions: &[u32], logits_for: LogitsFor) -> Result<()> {
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
    let position = match logits_for {
        LogitsFor::Last => positions.last(),
        LogitsFor::All => positions.get(row),
    };
    Err(ModelError::NonFinite {
        position: position.copied().unwrap_or(0),
    })
}
