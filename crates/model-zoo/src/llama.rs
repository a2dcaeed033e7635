//! The Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2) over agate's KV store.
//!
//! Data flow per layer: RMSNorm → q/k/v projections (+bias for Qwen2) → RoPE at the tokens'
//! absolute positions → append k/v to the store → hook plan → attention over the store's
//! retained entries → hook after_attention (eviction) → output projection, residual → RMSNorm →
//! SwiGLU FFN, residual. Keys are stored after RoPE and never re-rotated.
//!
//! Invariant: hidden states are f32 `[n, hidden]`; positions passed in are the true positions
//! (tokens seen so far, evicted or not), so eviction never shifts RoPE.

use candle_core::{Device, Tensor};
use kv_store::{AttendOptions, SequenceKv};

use crate::config::ModelConfig;
use crate::cpu_pool::CpuPool;
use crate::error::{ModelError, Result};
use crate::hook::{AttentionOutcome, LayerHook};
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
    /// values to `kv` and letting `hook` steer eviction. Returns f32 logits.
    pub fn forward(
        &self,
        tokens: &[u32],
        start: u32,
        kv: &mut SequenceKv,
        hook: &mut dyn LayerHook,
        logits_for: LogitsFor,
    ) -> Result<Tensor> {
        let x = self.hidden_states(tokens, start, kv, hook)?;
        let x = match logits_for {
            LogitsFor::Last => x.narrow(0, tokens.len() - 1, 1)?,
            LogitsFor::All => x,
        };
        let logits = self.lm_head.forward(&x)?;
        Ok(match logits_for {
            LogitsFor::Last => logits.squeeze(0)?,
            LogitsFor::All => logits,
        })
    }

    /// The final normed hidden states `[n, hidden]` (before the LM head).
    pub fn hidden_states(
        &self,
        tokens: &[u32],
        start: u32,
        kv: &mut SequenceKv,
        hook: &mut dyn LayerHook,
    ) -> Result<Tensor> {
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
        let n = tokens.len();
        let positions: Vec<u32> = (start..start + n as u32).collect();
        let eps = cfg.rms_norm_eps as f32;
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        let mut x = self.embedding.forward(tokens)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let [mut q, mut k, v] = layer.qkv.forward_parts(&normed)?;
            self.rope.apply(&mut q, cfg.n_heads, &positions);
            self.rope.apply(&mut k, cfg.n_kv_heads, &positions);
            kv.append(l, &k, &v, &positions)?;
            let plan = hook.plan(l, &normed, &positions, kv)?;
            let mut opts = AttendOptions::new(scale);
            opts.visible = plan.visible.as_deref();
            opts.window = plan.window;
            opts.prob_sums = plan.prob_rows.clone();
            opts.parallel = Some(&CpuPool);
            let attended = kv.attend(l, &q, &positions, &opts)?;
            hook.after_attention(
                l,
                AttentionOutcome {
                    kv,
                    queries: &q,
                    positions: &positions,
                    prob_sums: attended.prob_sums,
                    scale,
                },
            )?;
            let attn =
                Tensor::from_vec(attended.out, (n, cfg.n_heads * cfg.head_dim), &Device::Cpu)?;
            x = (x + layer.o.forward(&attn)?)?;
            let normed = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let [gate, up] = layer.gate_up.forward_parts(&normed)?;
            let gated = swiglu(gate, &up);
            let gated = Tensor::from_vec(gated, (n, cfg.intermediate_size), &Device::Cpu)?;
            x = (x + layer.down.forward(&gated)?)?;
        }
        Ok(candle_nn::ops::rms_norm(&x, &self.norm, eps)?)
    }
}

/// `silu(gate) * up` elementwise, in place of `gate`.
fn swiglu(mut gate: Vec<f32>, up: &[f32]) -> Vec<f32> {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
    gate
}
