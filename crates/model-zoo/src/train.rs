//! The differentiable training forward of the Llama-family decoder, for training Attention-Gates
//! (and optional LoRA adapters) on a frozen base with candle autograd.
//!
//! Owns [`TrainableDecoder`] (dense f32 copies of the base weights), [`FrozenLinear`] (a
//! projection whose backward yields the input gradient only), [`LoraConfig`]/[`Lora`] (low-rank
//! adapters as `Var`s) and [`TrainOutput`].
//!
//! Forward, per layer (the same maths as the decoder in `llama/`, batched `[B, T]`, every op a candle op in
//! f32): RMSNorm → q/k/v (+bias) (+LoRA) → RoPE in the weights' layout (interleaved pairs for
//! GGUF Llama, halves for Hugging Face) at positions `0..T` → gate `s = keep_probs(layer,
//! normed)` (`[B, T, Hkv]`) → `keep = keep_ste(hard_keep(s, tau), s)` → multiplicative masked
//! attention (gate-core's `masked_attention_weights` under the protections' `Visibility`, with
//! a tight cap on the straight-through gradient, see [`STE_EXPONENT_CAP`]: a token always sees
//! itself, a flagged-out key is invisible to every later query, never `log(keep)`) → o, residual → RMSNorm → SwiGLU,
//! residual → final norm → LM head.
//!
//! Invariants:
//! - Base weights are plain tensors, never `Var`s, and [`FrozenLinear`]'s backward computes no
//!   weight gradient (candle's matmul backward would compute both sides: a third of the cost).
//! - Without gates every key is visible (plain causal attention): logits equal
//!   `LlamaModel::forward` with dense f32 weights up to float rounding; with hard flags
//!   (`GateMode::Hard`), they equal the inference decoder under the Attention-Gate policy in
//!   threshold mode with the same protections (sinks, local window).

use candle_core::{CpuStorage, DType, Device, Layout, Shape, Tensor, Var, D};
use gate_core::select::Protection;
use gate_core::{AttentionGate, Visibility};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::rope::{model_rope, Rope, RopeTables};
use crate::weights::{TensorRole, Weights};

/// A frozen projection `y = x W^T` (`x: [n, in]` f32, `W: [out, in]` f32) whose backward
/// returns only `dL/dx = dL/dy W`: no gradient is ever computed for `W`.
#[derive(Clone, Debug)]
pub struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// The candle op behind [`FrozenLinear`] (the weight captured, the input the only argument).
struct FrozenMatmul(Tensor);

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = match storage {
            CpuStorage::F32(v) => v,
            _ => candle_core::bail!("frozen-matmul: f32 input expected"),
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-matmul: non-contiguous input".into()))?;
        let x = Tensor::from_slice(&data[start..end], layout.shape(), &Device::Cpu)?;
        let y = x.matmul(&self.0.t()?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.0)?))
    }
}

impl FrozenLinear {
    /// A frozen projection from a dense `[out, in]` weight (cast to f32, detached).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(FrozenLinear {
            weight: weight.to_dtype(DType::F32)?.detach().contiguous()?,
            bias: bias
                .map(|b| b.to_dtype(DType::F32).map(|b| b.detach()))
                .transpose()?,
        })
    }

    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    /// Applies the projection to `x: [n, in]`. An input that carries no gradient runs the
    /// plain matmul; one that does goes through the custom op.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if x.track_op() {
            x.contiguous()?
                .apply_op1(FrozenMatmul(self.weight.clone()))?
        } else {
            x.matmul(&self.weight.t()?)?
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Which projections get LoRA adapters and their shape.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Rank `r` of every adapter.
    pub rank: usize,
    /// Scale numerator: the update is `(alpha / r) x A^T B^T`.
    pub alpha: f32,
    /// Targets among `q, k, v, o, gate, up, down`.
    pub targets: Vec<String>,
}

/// The projection names LoRA can target.
pub const LORA_TARGETS: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

impl LoraConfig {
    /// Checks the rank (> 0), alpha (finite) and every target name.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(ModelError::Input("LoRA rank must be > 0, got 0".into()));
        }
        if !self.alpha.is_finite() {
            return Err(ModelError::Input(format!(
                "LoRA alpha must be finite, got {}",
                self.alpha
            )));
        }
        if self.targets.is_empty() {
            return Err(ModelError::Input("LoRA needs at least one target".into()));
        }
        if let Some(bad) = self
            .targets
            .iter()
            .find(|t| !LORA_TARGETS.contains(&t.as_str()))
        {
            return Err(ModelError::Input(format!(
                "unknown LoRA target `{bad}` (expected some of {})",
                LORA_TARGETS.join(", ")
            )));
        }
        Ok(())
    }
}

/// LoRA adapters: for each `(layer, target)`, `A: [r, in]` (uniform `±1/sqrt(in)`) and
/// `B: [out, r]` (zeros, so training starts from the base), all `Var`s named
/// `lora.{layer}.{target}.a` / `.b`.
#[derive(Clone, Debug)]
pub struct Lora {
    cfg: LoraConfig,
    adapters: BTreeMap<(usize, String), (Var, Var)>,
}

impl Lora {
    /// The adapters (as named vars) for `decoder`, seeded.
    pub fn new(decoder: &TrainableDecoder, cfg: &LoraConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut adapters = BTreeMap::new();
        for (l, layer) in decoder.layers.iter().enumerate() {
            for target in &cfg.targets {
                let (out, inp) = layer.proj(target)?.dims();
                let a = 1.0 / (inp as f64).sqrt();
                let data: Vec<f32> = (0..cfg.rank * inp)
                    .map(|_| rng.random_range(-a..a) as f32)
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(data, (cfg.rank, inp), &Device::Cpu)?)?;
                let b = Var::zeros((out, cfg.rank), DType::F32, &Device::Cpu)?;
                adapters.insert((l, target.clone()), (a, b));
            }
        }
        Ok(Lora {
            cfg: cfg.clone(),
            adapters,
        })
    }

    /// Every adapter var with its name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.adapters
            .iter()
            .flat_map(|((l, t), (a, b))| {
                [
                    (format!("lora.{l}.{t}.a"), a.clone()),
                    (format!("lora.{l}.{t}.b"), b.clone()),
                ]
            })
            .collect()
    }

    /// The configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.cfg
    }

    /// `base(x) + (alpha/r) (x A^T) B^T` when `(layer, target)` has an adapter.
    fn apply(&self, layer: usize, target: &str, base: &FrozenLinear, x: &Tensor) -> Result<Tensor> {
        let y = base.forward(x)?;
        match self.adapters.get(&(layer, target.to_string())) {
            Some((a, b)) => {
                let scale = f64::from(self.cfg.alpha) / self.cfg.rank as f64;
                let delta = x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)?;
                Ok((y + (delta * scale)?)?)
            }
            None => Ok(y),
        }
    }
}

struct TrainLayer {
    attn_norm: Tensor,
    q: FrozenLinear,
    k: FrozenLinear,
    v: FrozenLinear,
    o: FrozenLinear,
    ffn_norm: Tensor,
    gate: FrozenLinear,
    up: FrozenLinear,
    down: FrozenLinear,
}

impl TrainLayer {
    fn proj(&self, name: &str) -> Result<&FrozenLinear> {
        Ok(match name {
            "q" => &self.q,
            "k" => &self.k,
            "v" => &self.v,
            "o" => &self.o,
            "gate" => &self.gate,
            "up" => &self.up,
            "down" => &self.down,
            other => return Err(ModelError::Input(format!("unknown projection `{other}`"))),
        })
    }
}

/// Cap on `S_ij - m_i` of keys invisible to a query in the training forward's
/// `gate_core::masked_attention_weights` (`e^8 ≈ 3000` times the row's largest visible weight).
/// The forward value does not depend on it (those weights are exactly 0); only the
/// straight-through gradient toward re-admitting an evicted key whose logit dwarfs every visible
/// one is bounded. With the f32 limit of 80, evicting an attention-sink token produced gradients
/// of `e^80` and NaN within a few steps on the default model (measured).
pub const STE_EXPONENT_CAP: f64 = 8.0;

/// How the gates steer the training forward's attention.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GateMode {
    /// Straight-through: hard 0/1 visibility forward (`s > tau`), gradient through `s`.
    Ste,
    /// Hard flags only, no gradient to the gates (evaluation).
    Hard,
    /// Soft visibility `s` (the relaxed mask).
    Soft,
}

/// The gates steering a training forward: which gates, how, and with which protections.
#[derive(Clone, Copy)]
pub struct Gating<'a> {
    /// One gate per layer.
    pub gates: &'a AttentionGate,
    /// Straight-through, hard or soft visibility.
    pub mode: GateMode,
    /// Sinks always visible; a flagged-out key stays visible to the `recent` queries after it
    /// (the inference policy's window). `Protection::NONE`: the paper's setting.
    pub protect: Protection,
}

/// What a training forward returns.
pub struct TrainOutput {
    /// Logits `[B, T, vocab]`, f32.
    pub logits: Tensor,
    /// Per layer, the gate's soft keep probabilities `[B, T, Hkv]` (empty without gates).
    pub keep_probs: Vec<Tensor>,
}

/// The decoder with dense f32 weights, differentiable with respect to gates and LoRA vars.
pub struct TrainableDecoder {
    cfg: ModelConfig,
    embedding: Tensor,
    layers: Vec<TrainLayer>,
    norm: Tensor,
    lm_head: FrozenLinear,
    rope: Rope,
}

impl TrainableDecoder {
    /// Builds the decoder from `weights` (any format: quantized tensors are dequantized to f32;
    /// load with `WeightFormat::Dense(DType::F32)` to skip the quantized copy), checking every
    /// tensor against `cfg`.
    pub fn load(cfg: &ModelConfig, weights: &Weights) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        let bias = cfg.architecture.qkv_bias();
        let f32v = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.detach()) };
        let lin = |role, l, out, inp, b| -> Result<FrozenLinear> {
            let w = weights.linear(role, l, out, inp, b)?;
            FrozenLinear::new(w.dense_weight()?, w.bias().cloned())
        };
        let layers = (0..cfg.n_layers)
            .map(|l| {
                Ok(TrainLayer {
                    attn_norm: f32v(weights.vector(TensorRole::AttnNorm, l, d)?)?,
                    q: lin(TensorRole::Q, l, q_out, d, bias)?,
                    k: lin(TensorRole::K, l, kv_out, d, bias)?,
                    v: lin(TensorRole::V, l, kv_out, d, bias)?,
                    o: lin(TensorRole::O, l, d, q_out, false)?,
                    ffn_norm: f32v(weights.vector(TensorRole::FfnNorm, l, d)?)?,
                    gate: lin(TensorRole::Gate, l, cfg.intermediate_size, d, false)?,
                    up: lin(TensorRole::Up, l, cfg.intermediate_size, d, false)?,
                    down: lin(TensorRole::Down, l, d, cfg.intermediate_size, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = weights.lm_head(cfg.vocab_size, d, cfg.tie_embeddings)?;
        Ok(TrainableDecoder {
            cfg: cfg.clone(),
            embedding: f32v(weights.embedding(cfg.vocab_size, d)?.dense()?)?,
            layers,
            norm: f32v(weights.vector(TensorRole::OutputNorm, 0, d)?)?,
            lm_head: FrozenLinear::new(head.dense_weight()?, None)?,
            rope: model_rope(cfg, weights.rope_layout(cfg.architecture)),
        })
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// RMSNorm with tensor ops (differentiable): `x / sqrt(mean(x^2) + eps) * w`.
    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (ms + self.cfg.rms_norm_eps)?.sqrt()?.recip()?;
        Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
    }

    /// The training forward of `tokens: [B, T]` (u32) at positions `0..T`. With `gating`, each
    /// layer's attention is masked by the gate's flags as its mode says (threshold from the gate
    /// config) under its protections; without, plain causal attention. `lora` adds adapters.
    /// Returns logits and the per-layer keep probabilities.
    pub fn forward(
        &self,
        tokens: &Tensor,
        gating: Option<Gating<'_>>,
        lora: Option<&Lora>,
    ) -> Result<TrainOutput> {
        let cfg = &self.cfg;
        let (b, t) = self.check_batch(tokens, gating)?;
        let protect = gating.map_or(Protection::NONE, |gt| gt.protect);
        let pass = Pass {
            b,
            t,
            positions: (0..t as u32).collect(),
            rope: self.rope.tables(t, &Device::Cpu)?,
            visibility: Visibility::causal(t, &protect, DType::F32, &Device::Cpu)
                .map_err(gate_err)?,
            gating,
            lora,
        };
        let mut x = self
            .embedding
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b * t, cfg.hidden_size))?;
        let mut keep_probs = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = self.rms_norm(&x, &layer.attn_norm)?;
            let (attn, s) = self.attention(l, layer, &normed, &pass)?;
            keep_probs.extend(s);
            x = (x + attn)?;
            let normed = self.rms_norm(&x, &layer.ffn_norm)?;
            let ffn = |name: &str, p: &FrozenLinear, h: &Tensor| pass.project(l, name, p, h);
            let gated = (candle_nn::ops::silu(&ffn("gate", &layer.gate, &normed)?)?
                * ffn("up", &layer.up, &normed)?)?;
            x = (x + ffn("down", &layer.down, &gated)?)?;
        }
        let x = self.rms_norm(&x, &self.norm)?;
        let logits = self.lm_head.forward(&x)?.reshape((b, t, cfg.vocab_size))?;
        Ok(TrainOutput { logits, keep_probs })
    }

    /// `[B, T]` of `tokens`, checked: non-empty, every id inside the vocabulary, and the gates
    /// (if any) shaped for this model.
    fn check_batch(&self, tokens: &Tensor, gating: Option<Gating<'_>>) -> Result<(usize, usize)> {
        let (b, t) = tokens.dims2()?;
        if t == 0 || b == 0 {
            return Err(ModelError::Input(
                "training forward needs a non-empty [B, T] batch".into(),
            ));
        }
        if let Some(Gating { gates: g, .. }) = gating {
            if let Some(why) = self.cfg.gate_shape_mismatch(g.config()) {
                return Err(ModelError::Input(why));
            }
        }
        let max = tokens.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
        if max as usize >= self.cfg.vocab_size {
            return Err(ModelError::Input(format!(
                "token id {max} is outside the vocabulary ({})",
                self.cfg.vocab_size
            )));
        }
        Ok((b, t))
    }

    /// Layer `l`'s attention block on `normed: [B*T, hidden]`: its output after `o`
    /// (`[B*T, hidden]`), and the gate's soft keep probabilities `[B, T, Hkv]` when gated.
    fn attention(
        &self,
        l: usize,
        layer: &TrainLayer,
        normed: &Tensor,
        pass: &Pass<'_>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t) = (pass.b, pass.t);
        let (hq, hkv, hd) = (self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim);
        let g = hq / hkv;
        let heads = |name: &str, p: &FrozenLinear, n: usize| -> Result<Tensor> {
            let y = pass.project(l, name, p, normed)?;
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = self
            .rope
            .rotate_tensor(&heads("q", &layer.q, hq)?, &pass.rope)?;
        let k = self
            .rope
            .rotate_tensor(&heads("k", &layer.k, hkv)?, &pass.rope)?;
        let v = heads("v", &layer.v, hkv)?;
        let (keep, s) = match pass.gating {
            Some(gating) => {
                let normed = normed.reshape((b, t, self.cfg.hidden_size))?;
                let (keep, s) = gate_keep(l, &normed, &pass.positions, gating)?;
                (keep.transpose(1, 2)?.contiguous()?, Some(s))
            }
            None => (Tensor::ones((b, hkv, t), DType::F32, &Device::Cpu)?, None),
        };
        let repeat = |x: Tensor| -> Result<Tensor> {
            Ok(x.unsqueeze(2)?
                .broadcast_as((b, hkv, g, t, hd))?
                .reshape((b, hq, t, hd))?)
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&repeat(k)?.t()?)? * scale)?;
        let p =
            gate_core::masked_attention_weights(&scores, &keep, &pass.visibility, STE_EXPONENT_CAP)
                .map_err(gate_err)?;
        let attn = p
            .matmul(&repeat(v)?)?
            .transpose(1, 2)?
            .reshape((b * t, hq * hd))?;
        Ok((pass.project(l, "o", &layer.o, &attn)?, s))
    }
}

/// What every layer of one training forward shares.
struct Pass<'a> {
    b: usize,
    t: usize,
    positions: Vec<u32>,
    rope: RopeTables,
    visibility: Visibility,
    gating: Option<Gating<'a>>,
    lora: Option<&'a Lora>,
}

impl Pass<'_> {
    /// `x` through projection `name` of layer `l`, with its LoRA adapter if any.
    fn project(&self, l: usize, name: &str, p: &FrozenLinear, x: &Tensor) -> Result<Tensor> {
        match self.lora {
            Some(lo) => lo.apply(l, name, p, x),
            None => p.forward(x),
        }
    }
}

/// The keep values layer `l`'s attention uses (`[B, T, Hkv]`, as the gating's mode says), and
/// the gate's soft keep probabilities `s` they come from.
fn gate_keep(
    l: usize,
    normed: &Tensor,
    positions: &[u32],
    gating: Gating<'_>,
) -> Result<(Tensor, Tensor)> {
    let Gating { gates, mode, .. } = gating;
    let s = gates.keep_probs(l, normed, positions).map_err(gate_err)?;
    let tau = gates.config().threshold;
    let keep = match mode {
        GateMode::Ste => {
            let hard = gate_core::hard_keep(&s, tau).map_err(gate_err)?;
            gate_core::keep_ste(&hard, &s).map_err(gate_err)?
        }
        GateMode::Hard => gate_core::hard_keep(&s.detach(), tau).map_err(gate_err)?,
        GateMode::Soft => s.clone(),
    };
    Ok((keep, s))
}

/// A gate-core error inside the training forward.
fn gate_err(e: gate_core::GateError) -> ModelError {
    ModelError::Gates(Box::new(e))
}
