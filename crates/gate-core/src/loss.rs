//! Training terms for the Attention-Gate: the straight-through hard gate, the eviction-rate
//! loss, the soft/hard eviction ratios to report, and the multiplicative masked softmax that
//! lets the language-model loss reach the gate through in-context eviction.
//!
//! Shapes: the gate yields `s: [B, T, Hkv]`; the masked attention takes per-head keep values
//! `keep: [B, Hkv, T]` (`s.transpose(1, 2)` after [`keep_ste`]) and pre-softmax scores
//! `S: [B, Hq, T, T]` (already scaled by `1/sqrt(d)`), query heads `g*G .. g*G+G-1` sharing
//! KV head `g`, `G = Hq / Hkv`. Queries and keys are the same `T` tokens (query `i` is key `i`).
//!
//! Invariants: every op is a differentiable candle op in the inputs' dtype (f32 for training,
//! f64 for gradient checks); `log(keep)` is never taken (keep is exactly 0 for evicted
//! tokens); an evicted key's weight is exactly 0 for every later query, while each token always
//! sees itself and the keys its [`Visibility`] protects (sinks, local window).

use candle_core::{DType, Device, Tensor, D};

use crate::error::{bad_tensor, invalid, CandleContext, Result};
use crate::select::Protection;

/// Hard keep values `1[s > tau]` in `s`'s dtype and shape (no gradient).
pub fn hard_keep(s: &Tensor, tau: f32) -> Result<Tensor> {
    s.gt(f64::from(tau))
        .and_then(|k| k.to_dtype(s.dtype()))
        .ctx("thresholding keep probabilities")
}

/// Straight-through keep: `hard + s - stopgrad(s)`. The forward value is exactly `hard`
/// (for finite `s`, `s - s == 0`); the gradient flows to `s` as if the output were `s`.
///
/// Errors: shapes differ, or `soft` is not a float tensor.
pub fn keep_ste(hard_keep: &Tensor, soft: &Tensor) -> Result<Tensor> {
    if hard_keep.dims() != soft.dims() || !soft.dtype().is_float() {
        return Err(bad_tensor(
            "hard_keep",
            hard_keep,
            format!("the float `soft` tensor's shape {:?}", soft.dims()),
        ));
    }
    let hard = hard_keep.to_dtype(soft.dtype()).ctx("casting hard keep")?;
    (soft - soft.detach())
        .and_then(|d| hard + d)
        .ctx("building the straight-through keep")
}

/// `valid_mask` as a `{0,1}` tensor of `s`'s shape and dtype; it may have `s`'s shape or lack
/// its last (head) dimension (a per-token mask).
fn expand_valid(s: &Tensor, valid_mask: &Tensor) -> Result<Tensor> {
    let dims = s.dims();
    let v = if valid_mask.dims() == dims {
        valid_mask.clone()
    } else if !dims.is_empty() && valid_mask.dims() == &dims[..dims.len() - 1] {
        valid_mask
            .unsqueeze(D::Minus1)
            .and_then(|v| v.broadcast_as(dims))
            .ctx("broadcasting the valid mask")?
    } else {
        return Err(bad_tensor(
            "valid_mask",
            valid_mask,
            format!("s's shape {dims:?} or {dims:?} without its last dim"),
        ));
    };
    v.ne(0.0)
        .and_then(|v| v.to_dtype(s.dtype()))
        .ctx("converting the valid mask")
}

/// Number of valid entries in a `{0,1}` mask (host sync).
fn count(valid: &Tensor) -> Result<f64> {
    valid
        .to_dtype(DType::F64)
        .and_then(|v| v.sum_all()?.to_scalar::<f64>())
        .ctx("counting valid tokens")
}

/// Eviction-rate loss `lambda * (r_target - mean(1 - s))^2`, the mean taken over valid
/// entries (`valid_mask` nonzero: non-pad, unprotected tokens), a scalar in `s`'s dtype.
/// With no valid entry the loss is a constant 0.
///
/// Errors: `r_target` outside `[0, 1]`, `lambda` negative or not finite, mask shape (see
/// module header: `s`'s shape, or without the head dimension).
pub fn eviction_loss(
    s: &Tensor,
    valid_mask: &Tensor,
    r_target: f32,
    lambda: f32,
) -> Result<Tensor> {
    if !(0.0..=1.0).contains(&r_target) {
        return Err(invalid(
            "eviction_loss: r_target",
            r_target,
            "an eviction ratio in [0, 1]",
        ));
    }
    if !(lambda.is_finite() && lambda >= 0.0) {
        return Err(invalid(
            "eviction_loss: lambda",
            lambda,
            "a finite, non-negative weight",
        ));
    }
    let valid = expand_valid(s, valid_mask)?;
    let n = count(&valid)?;
    if n == 0.0 {
        return Tensor::zeros((), s.dtype(), s.device()).ctx("building a zero loss");
    }
    let evicted = (s.ones_like().and_then(|o| o - s))
        .and_then(|e| (e * &valid)?.sum_all()? / n)
        .ctx("averaging the soft eviction")?;
    ((evicted.neg().and_then(|e| e + f64::from(r_target)))
        .and_then(|d| d.sqr()? * f64::from(lambda)))
    .ctx("computing the eviction loss")
}

/// Soft and hard eviction ratios over the valid entries, for reporting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvictionRatios {
    /// `mean(1 - s)`.
    pub soft: f64,
    /// `mean(1[s <= tau])`: the fraction the hard gate evicts (tables use this one).
    pub hard: f64,
}

/// Soft and hard eviction ratios of `s` over `valid_mask` (same convention as
/// [`eviction_loss`]); both 0 when nothing is valid.
pub fn eviction_ratios(s: &Tensor, valid_mask: &Tensor, tau: f32) -> Result<EvictionRatios> {
    let valid = expand_valid(s, valid_mask)?;
    let n = count(&valid)?;
    if n == 0.0 {
        return Ok(EvictionRatios {
            soft: 0.0,
            hard: 0.0,
        });
    }
    let keep = hard_keep(s, tau)?;
    let soft = s
        .ones_like()
        .and_then(|o| (o - s)? * &valid)
        .ctx("measuring soft eviction")?;
    let hard = keep
        .ones_like()
        .and_then(|o| (o - keep)? * &valid)
        .ctx("measuring hard eviction")?;
    Ok(EvictionRatios {
        soft: count(&soft)? / n,
        hard: count(&hard)? / n,
    })
}

/// Which keys each of `T` queries sees under in-context eviction: `gated` (past keys visible
/// only while kept) and `shown` (keys always visible: the query itself, the sinks, its local
/// window), `[1, 1, 1, T, T]` 0/1 each in one float dtype. Built once per forward and shared by
/// every layer's [`masked_attention_weights`].
#[derive(Clone, Debug)]
pub struct Visibility {
    gated: Tensor,
    shown: Tensor,
}

impl Visibility {
    /// The causal visibility of positions `0..t` under `protect`: query `i` always sees itself,
    /// the first `protect.sinks` keys and the `protect.recent` keys before it; any other past
    /// key only while kept; no future key. [`Protection::NONE`] is the paper's setting.
    pub fn causal(t: usize, protect: &Protection, dtype: DType, device: &Device) -> Result<Self> {
        if !dtype.is_float() {
            return Err(invalid("dtype", format!("{dtype:?}"), "a float dtype"));
        }
        let always = |i: usize, j: usize| j < protect.sinks || i - j <= protect.recent;
        let table = |f: &dyn Fn(usize, usize) -> bool| {
            let v: Vec<f32> = (0..t)
                .flat_map(|i| (0..t).map(move |j| (i, j)))
                .map(|(i, j)| f32::from(u8::from(f(i, j))))
                .collect();
            Tensor::from_vec(v, (1, 1, 1, t, t), device).and_then(|m| m.to_dtype(dtype))
        };
        Ok(Visibility {
            gated: table(&|i, j| j < i && !always(i, j)).ctx("building the visibility masks")?,
            shown: table(&|i, j| j <= i && always(i, j)).ctx("building the visibility masks")?,
        })
    }
}

/// Training attention weights under in-context eviction, multiplicative and log-free:
/// `e_ij = exp(S_ij - m_i) * vis_ij`, `P_ij = e_ij / sum_j e_ij`, with `vis_ij = 1` for keys
/// `visibility` always shows (the query itself, protected keys), `keep[g, j]` for the other past
/// keys and 0 for future keys (`g` the query head's KV head).
///
/// `scores: [B, Hq, T, T]`, `keep: [B, Hkv, T]` (normally [`keep_ste`] output, transposed from
/// the gate's `[B, T, Hkv]`), `visibility` of the same `T`, all in one float dtype; returns
/// `P: [B, Hq, T, T]`.
///
/// Stability: `m_i` is the detached maximum of `S_ij` over the *visible* keys (`vis_ij > 0`,
/// the diagonal always among them), so visible exponents are `<= 0`, the row's own maximum
/// contributes `exp(0) * vis`, and no row underflows to 0/0. Invisible keys' exponents are
/// capped at `exponent_cap` before `exp` (at most 80 in f32: `e^80 < 3.4e38`): their forward
/// weight is exactly 0 either way, and the cap only bounds the straight-through gradient toward
/// re-admitting a key whose logit exceeds every visible one by more than that. `m_i` cancels in
/// `P`, so gradients are exact.
///
/// Errors: ranks, `T` mismatches, `Hq` not a multiple of `Hkv`, or dtype mismatch.
pub fn masked_attention_weights(
    scores: &Tensor,
    keep: &Tensor,
    visibility: &Visibility,
    exponent_cap: f64,
) -> Result<Tensor> {
    let (b, hq, t) = match *scores.dims() {
        [b, hq, t, t2] if t == t2 && scores.dtype().is_float() => (b, hq, t),
        _ => {
            return Err(bad_tensor(
                "scores",
                scores,
                "[B, Hq, T, T] in a float dtype",
            ))
        }
    };
    let hkv = match *keep.dims() {
        [kb, hkv, kt]
            if kb == b && kt == t && hkv > 0 && hq % hkv == 0 && keep.dtype() == scores.dtype() =>
        {
            hkv
        }
        _ => {
            return Err(bad_tensor(
                "keep",
                keep,
                format!(
                    "[{b}, Hkv, {t}] with Hkv dividing Hq = {hq}, dtype {:?}",
                    scores.dtype()
                ),
            ))
        }
    };
    let Visibility { gated, shown } = visibility;
    if gated.dims() != [1, 1, 1, t, t] || gated.dtype() != scores.dtype() {
        return Err(bad_tensor(
            "visibility",
            gated,
            format!("[1, 1, 1, {t}, {t}] in {:?}", scores.dtype()),
        ));
    }
    let g = hq / hkv;
    let run = || -> candle_core::Result<Tensor> {
        let vis = keep
            .reshape((b, hkv, 1, 1, t))?
            .broadcast_mul(gated)?
            .broadcast_add(shown)?;
        let s5 = scores.reshape((b, hkv, g, t, t))?;
        let visible = vis.gt(0.0)?.broadcast_as(s5.shape())?;
        let hidden = (s5.zeros_like()? - f64::INFINITY)?;
        let m = visible
            .where_cond(&s5.detach(), &hidden)?
            .max_keepdim(D::Minus1)?;
        let e = s5
            .broadcast_sub(&m)?
            .minimum(exponent_cap)?
            .exp()?
            .broadcast_mul(&vis)?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
            .reshape((b, hq, t, t))
    };
    run().ctx("computing masked attention weights")
}
