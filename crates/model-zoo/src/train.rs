//! The differentiable training forward of the Llama-family decoder, for training Attention-Gates
//! (and optional LoRA adapters) on a frozen base with candle autograd.
//!
//! Owns [`TrainableDecoder`] (dense f32 copies of the base weights), [`FrozenLinear`] (a
//! projection whose backward yields the input gradient only), [`LoraConfig`]/[`Lora`] (low-rank
//! adapters as `Var`s) and [`TrainOutput`].
//!
//! Forward, per layer (the same maths as `llama.rs`, batched `[B, T]`, every op a candle op in
//! f32): RMSNorm → q/k/v (+bias) (+LoRA) → RoPE in the weights' layout (interleaved pairs for
//! GGUF Llama, halves for Hugging Face) at positions `0..T` → gate `s = keep_probs(layer,
//! normed)` (`[B, T, Hkv]`) → `keep = keep_ste(hard_keep(s, tau), s)` → multiplicative masked
//! attention (gate-core's `masked_attention_weights` with a tighter cap on the straight-through
//! gradient, see [`STE_EXPONENT_CAP`]: a token always sees itself, a flagged-out key is
//! invisible to every later query, never `log(keep)`) → o, residual → RMSNorm → SwiGLU,
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
use gate_core::AttentionGate;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::rope::{Rope, RopeLayout};
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

/// Cap on `S_ij - m_i` of keys invisible to query `i` in [`masked_attention`] (`e^8 ≈ 3000`
/// times the row's largest visible weight).
pub const STE_EXPONENT_CAP: f64 = 8.0;

/// The multiplicative masked softmax of `gate_core::masked_attention_weights` (same forward:
/// `e_ij = exp(S_ij - m_i) * vis_ij`, `m_i` the detached maximum over visible keys, a token
/// always sees itself; `masks` add the inference policy's protections: sinks always visible, a
/// flagged-out key visible to the `recent` queries after it), with invisible keys' exponents
/// capped at [`STE_EXPONENT_CAP`] instead of gate-core's 80. The forward value is identical (those weights are exactly 0); only the
/// straight-through gradient toward re-admitting an evicted key whose logit dwarfs every visible
/// one is bounded. With gate-core's cap, evicting an attention-sink token produced gradients of
/// `e^80` and NaN within a few steps on the default model (measured).
fn masked_attention(
    scores: &Tensor,
    keep: &Tensor,
    g: usize,
    masks: &VisibilityMasks,
) -> Result<Tensor> {
    let (b, hq, t, _) = scores.dims4()?;
    let hkv = hq / g;
    let vis = keep
        .reshape((b, hkv, 1, 1, t))?
        .broadcast_mul(&masks.gated)?
        .broadcast_add(&masks.shown)?;
    let s5 = scores.reshape((b, hkv, g, t, t))?;
    let visible = vis.gt(0.0)?.broadcast_as(s5.shape())?;
    let hidden = (s5.zeros_like()? - f64::INFINITY)?;
    let m = visible
        .where_cond(&s5.detach(), &hidden)?
        .max_keepdim(D::Minus1)?;
    let e = s5
        .broadcast_sub(&m)?
        .minimum(STE_EXPONENT_CAP)?
        .exp()?
        .broadcast_mul(&vis)?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .reshape((b, hq, t, t))?)
}

/// The causal visibility of one forward's `T` positions under a protection, `[1, 1, 1, T, T]`
/// 0/1 each, built once per forward and shared by every layer.
struct VisibilityMasks {
    /// Past keys that query `i` sees only when kept (not itself, not a sink, not in its window).
    gated: Tensor,
    /// Keys query `i` always sees: itself, the sinks, its local window.
    shown: Tensor,
}

impl VisibilityMasks {
    fn new(t: usize, protect: &Protection, device: &Device) -> Result<Self> {
        let tri = |f: &dyn Fn(usize, usize) -> bool| -> candle_core::Result<Tensor> {
            let v: Vec<f32> = (0..t)
                .flat_map(|i| (0..t).map(move |j| (i, j)))
                .map(|(i, j)| f32::from(u8::from(f(i, j))))
                .collect();
            Tensor::from_vec(v, (1, 1, 1, t, t), device)
        };
        let always = |i: usize, j: usize| j < protect.sinks || i - j <= protect.recent;
        Ok(VisibilityMasks {
            gated: tri(&|i, j| j < i && !always(i, j))?,
            shown: tri(&|i, j| j <= i && always(i, j))?,
        })
    }
}

/// RoPE tables of one forward's positions `0..T`, `[T, head_dim / 2]` each, shared by every
/// layer's queries and keys.
struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

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
            rope: Rope::new(cfg, weights.rope_layout(cfg.architecture)),
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

    /// The RoPE tables of positions `0..t`.
    fn rope_tables(&self, t: usize) -> Result<RopeTables> {
        let freqs = self.rope.inv_freq();
        let angles: Vec<f64> = (0..t)
            .flat_map(|p| freqs.iter().map(move |&f| p as f64 * f))
            .collect();
        let table = |f: fn(f64) -> f64| -> candle_core::Result<Tensor> {
            let v: Vec<f32> = angles.iter().map(|&a| f(a) as f32).collect();
            Tensor::from_vec(v, (t, freqs.len()), &Device::Cpu)
        };
        Ok(RopeTables {
            cos: table(f64::cos)?,
            sin: table(f64::sin)?,
        })
    }

    /// RoPE of `x: [B, H, T, hd]` at positions `0..T` (`tables` of the same `T`), in the
    /// weights' layout, with tensor ops.
    fn rope(&self, x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
        let (b, h, t, hd) = x.dims4()?;
        let half = hd / 2;
        let (cos, sin) = (&tables.cos, &tables.sin);
        Ok(match self.rope.layout() {
            RopeLayout::Halves => {
                let (cos, sin) = (cos.reshape((1, 1, t, half))?, sin.reshape((1, 1, t, half))?);
                let x1 = x.narrow(D::Minus1, 0, half)?;
                let x2 = x.narrow(D::Minus1, half, half)?;
                let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
                let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
                Tensor::cat(&[r1, r2], D::Minus1)?
            }
            RopeLayout::Interleaved => {
                let (cos, sin) = (
                    cos.reshape((1, 1, t, half, 1))?,
                    sin.reshape((1, 1, t, half, 1))?,
                );
                let x5 = x.reshape((b, h, t, half, 2))?;
                let x0 = x5.narrow(D::Minus1, 0, 1)?;
                let x1 = x5.narrow(D::Minus1, 1, 1)?;
                let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
                let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
                Tensor::cat(&[r0, r1], D::Minus1)?.reshape((b, h, t, hd))?
            }
        })
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
        let (b, t) = tokens.dims2()?;
        if t == 0 || b == 0 {
            return Err(ModelError::Input(
                "training forward needs a non-empty [B, T] batch".into(),
            ));
        }
        if let Some(Gating { gates: g, .. }) = gating {
            if let Some(why) = cfg.gate_shape_mismatch(g.config()) {
                return Err(ModelError::Input(why));
            }
        }
        let max = tokens.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
        if max as usize >= cfg.vocab_size {
            return Err(ModelError::Input(format!(
                "token id {max} is outside the vocabulary ({})",
                cfg.vocab_size
            )));
        }
        let (hq, hkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let g = hq / hkv;
        let positions: Vec<u32> = (0..t as u32).collect();
        let rope = self.rope_tables(t)?;
        let protect = gating.map_or(Protection::NONE, |gt| gt.protect);
        let masks = VisibilityMasks::new(t, &protect, &Device::Cpu)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let gate_err = |e: gate_core::GateError| ModelError::Input(e.to_string());
        let mut x = self
            .embedding
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b * t, cfg.hidden_size))?;
        let ones = Tensor::ones((b, hkv, t), DType::F32, &Device::Cpu)?;
        let mut keep_probs = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = self.rms_norm(&x, &layer.attn_norm)?;
            let proj = |name: &str, p: &FrozenLinear| -> Result<Tensor> {
                match lora {
                    Some(lo) => lo.apply(l, name, p, &normed),
                    None => p.forward(&normed),
                }
            };
            let heads = |y: Tensor, n: usize| -> Result<Tensor> {
                Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = self.rope(&heads(proj("q", &layer.q)?, hq)?, &rope)?;
            let k = self.rope(&heads(proj("k", &layer.k)?, hkv)?, &rope)?;
            let v = heads(proj("v", &layer.v)?, hkv)?;
            let keep = match gating {
                Some(Gating { gates, mode, .. }) => {
                    let s = gates
                        .keep_probs(l, &normed.reshape((b, t, cfg.hidden_size))?, &positions)
                        .map_err(gate_err)?;
                    let tau = gates.config().threshold;
                    let keep = match mode {
                        GateMode::Ste => {
                            let hard = gate_core::hard_keep(&s, tau).map_err(gate_err)?;
                            gate_core::keep_ste(&hard, &s).map_err(gate_err)?
                        }
                        GateMode::Hard => {
                            gate_core::hard_keep(&s.detach(), tau).map_err(gate_err)?
                        }
                        GateMode::Soft => s.clone(),
                    };
                    keep_probs.push(s);
                    keep.transpose(1, 2)?.contiguous()?
                }
                None => ones.clone(),
            };
            let k_rep = k
                .unsqueeze(2)?
                .broadcast_as((b, hkv, g, t, hd))?
                .reshape((b, hq, t, hd))?;
            let v_rep = v
                .unsqueeze(2)?
                .broadcast_as((b, hkv, g, t, hd))?
                .reshape((b, hq, t, hd))?;
            let scores = (q.matmul(&k_rep.t()?)? * scale)?;
            let p = masked_attention(&scores, &keep, g, &masks)?;
            let attn = p
                .matmul(&v_rep)?
                .transpose(1, 2)?
                .reshape((b * t, hq * hd))?;
            let o = match lora {
                Some(lo) => lo.apply(l, "o", &layer.o, &attn)?,
                None => layer.o.forward(&attn)?,
            };
            x = (x + o)?;
            let normed = self.rms_norm(&x, &layer.ffn_norm)?;
            let ffn = |name: &str, p: &FrozenLinear, h: &Tensor| -> Result<Tensor> {
                match lora {
                    Some(lo) => lo.apply(l, name, p, h),
                    None => p.forward(h),
                }
            };
            let gated = (candle_nn::ops::silu(&ffn("gate", &layer.gate, &normed)?)?
                * ffn("up", &layer.up, &normed)?)?;
            x = (x + ffn("down", &layer.down, &gated)?)?;
        }
        let x = self.rms_norm(&x, &self.norm)?;
        let logits = self.lm_head.forward(&x)?.reshape((b, t, cfg.vocab_size))?;
        Ok(TrainOutput { logits, keep_probs })
    }
}
