//! Loss terms: straight-through keep (exact 0/1 forward, soft gradient), eviction loss and
//! ratios, masked attention weights (rows sum to 1, evicted keys exactly 0, self and protected
//! keys always seen),
//! and a finite-difference gradient check of masked attention + STE in f64.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use candle_core::{DType, Device, Tensor, Var, D};
use gate_core::{
    eviction_loss, eviction_ratios, hard_keep, keep_ste, masked_attention_weights, Protection,
    Visibility,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn tensor(data: Vec<f64>, shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(data, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn rand_vec(rng: &mut StdRng, n: usize, a: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-a..a)).collect()
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn ste_forward_is_exactly_hard_and_gradient_is_the_soft_one() {
    let mut rng = StdRng::seed_from_u64(1);
    let z = Var::from_tensor(&tensor(rand_vec(&mut rng, 24, 4.0), &[2, 4, 3], DType::F32)).unwrap();
    let w = tensor(rand_vec(&mut rng, 24, 1.0), &[2, 4, 3], DType::F32);
    let s = candle_nn::ops::sigmoid(z.as_tensor()).unwrap();
    let hard = hard_keep(&s, 0.5).unwrap();
    let ste = keep_ste(&hard, &s).unwrap();
    let (v_ste, v_hard, v_s) = (to_vec(&ste), to_vec(&hard), to_vec(&s));
    for ((a, h), s) in v_ste.iter().zip(&v_hard).zip(&v_s) {
        assert!(*a == 0.0 || *a == 1.0);
        assert_eq!(a, h);
        assert_eq!(*a == 1.0, *s > 0.5);
    }
    let g_ste = (ste * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g_soft = (s * &w).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(
        to_vec(g_ste.get(z.as_tensor()).unwrap()),
        to_vec(g_soft.get(z.as_tensor()).unwrap())
    );
    assert!(keep_ste(&hard.narrow(0, 0, 1).unwrap(), &z)
        .unwrap_err()
        .to_string()
        .contains("hard_keep"));
}

#[test]
fn eviction_loss_and_ratios_by_hand() {
    // s for 2 sequences x 2 tokens x 2 heads; second token of sequence 1 is padding.
    let s = tensor(
        vec![0.9, 0.2, 0.6, 0.4, 0.8, 0.1, 0.3, 0.3],
        &[2, 2, 2],
        DType::F32,
    );
    let valid = tensor(vec![1.0, 1.0, 1.0, 0.0], &[2, 2], DType::F32);
    // Valid entries: 0.9 0.2 0.6 0.4 0.8 0.1 -> mean(1 - s) = (0.1+0.8+0.4+0.6+0.2+0.9)/6 = 0.5.
    let loss = eviction_loss(&s, &valid, 0.7, 2.0).unwrap();
    assert_eq!(loss.dims(), [] as [usize; 0]);
    let v = loss.to_scalar::<f32>().unwrap();
    assert!((v - 2.0 * 0.2f32 * 0.2).abs() < 1e-6, "{v}");
    let r = eviction_ratios(&s, &valid, 0.5).unwrap();
    assert!((r.soft - 0.5).abs() < 1e-6);
    assert!((r.hard - 0.5).abs() < 1e-12, "{r:?}"); // 0.2, 0.4, 0.1 evicted of 6
                                                    // A per-(token, head) mask works too; no valid entry gives 0.
    let zero = eviction_loss(&s, &s.zeros_like().unwrap(), 0.7, 2.0).unwrap();
    assert_eq!(zero.to_scalar::<f32>().unwrap(), 0.0);
    assert_eq!(
        eviction_ratios(&s, &s.zeros_like().unwrap(), 0.5)
            .unwrap()
            .hard,
        0.0
    );
    // Gradient pushes s down when too little is evicted.
    let z = Var::from_tensor(&tensor(vec![2.0; 8], &[2, 2, 2], DType::F32)).unwrap();
    let s = candle_nn::ops::sigmoid(z.as_tensor()).unwrap();
    let g = eviction_loss(&s, &valid, 0.7, 1.0)
        .unwrap()
        .backward()
        .unwrap();
    let gz = to_vec(g.get(z.as_tensor()).unwrap());
    assert!(
        gz[..6].iter().all(|&x| x > 0.0) && gz[6..].iter().all(|&x| x == 0.0),
        "{gz:?}"
    );
    assert!(eviction_loss(&s, &valid, 1.5, 1.0)
        .unwrap_err()
        .to_string()
        .contains("r_target"));
    assert!(eviction_loss(&s, &valid, 0.5, -1.0)
        .unwrap_err()
        .to_string()
        .contains("lambda"));
    let bad = tensor(vec![1.0; 3], &[3], DType::F32);
    assert!(eviction_loss(&s, &bad, 0.5, 1.0)
        .unwrap_err()
        .to_string()
        .contains("valid_mask"));
}

/// The paper's masked attention: no protections, the f32 bound on invisible exponents.
fn plain_masked_attention(scores: &Tensor, keep: &Tensor) -> gate_core::Result<Tensor> {
    let t = scores.dims().get(2).copied().unwrap_or(0);
    let vis = Visibility::causal(t, &Protection::NONE, scores.dtype(), scores.device())?;
    masked_attention_weights(scores, keep, &vis, 80.0)
}

#[test]
fn protected_keys_stay_visible_when_flagged_out() {
    // One head, 5 tokens, every key flagged out: query 4 sees the sink 0, its window (3) and
    // itself; query 1 sees the sink (also its window) and itself.
    let t = 5;
    let scores = tensor(vec![0.0; t * t], &[1, 1, t, t], DType::F64);
    let keep = tensor(vec![0.0; t], &[1, 1, t], DType::F64);
    let protect = Protection {
        sinks: 1,
        recent: 1,
    };
    let vis = Visibility::causal(t, &protect, DType::F64, &Device::Cpu).unwrap();
    let p = masked_attention_weights(&scores, &keep, &vis, 80.0).unwrap();
    let rows = p.get(0).unwrap().get(0).unwrap().to_vec2::<f64>().unwrap();
    let third = 1.0 / 3.0;
    assert_eq!(rows[1], [0.5, 0.5, 0.0, 0.0, 0.0]);
    for (j, want) in [third, 0.0, 0.0, third, third].iter().enumerate() {
        assert!((rows[4][j] - want).abs() < 1e-12, "{:?}", rows[4]);
    }
    // A visibility of another length is refused, naming it.
    let short = Visibility::causal(4, &protect, DType::F64, &Device::Cpu).unwrap();
    let err = masked_attention_weights(&scores, &keep, &short, 80.0).unwrap_err();
    assert!(err.to_string().contains("`visibility`"), "{err}");
}

/// Shape of [`evicting_case`]: batch, query heads, KV heads, tokens.
const CASE: (usize, usize, usize, usize) = (2, 4, 2, 6);

/// Random f32 scores `[b, hq, t, t]` (shape [`CASE`]) and keep flags `[b, hkv, t]` where batch 0,
/// KV head 1 evicts token 2 and batch 1, KV head 0 evicts tokens 0 and 4.
fn evicting_case() -> (Tensor, Tensor) {
    let (b, hq, hkv, t) = CASE;
    let mut rng = StdRng::seed_from_u64(2);
    let scores = tensor(
        rand_vec(&mut rng, b * hq * t * t, 3.0),
        &[b, hq, t, t],
        DType::F32,
    );
    let mut keep = vec![1.0; b * hkv * t];
    keep[t + 2] = 0.0;
    keep[2 * t] = 0.0;
    keep[2 * t + 4] = 0.0;
    (scores, tensor(keep, &[b, hkv, t], DType::F32))
}

#[test]
fn masked_attention_rows_sum_to_one_and_evicted_keys_vanish() {
    let (b, hq, hkv, t) = CASE;
    let (scores, keep) = evicting_case();
    let p = plain_masked_attention(&scores, &keep).unwrap();
    assert_eq!(p.dims(), [b, hq, t, t]);
    let sums = to_vec(&p.sum(D::Minus1).unwrap());
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-6), "{sums:?}");
    let p4: Vec<Vec<Vec<Vec<f32>>>> = (0..b)
        .map(|bi| p.get(bi).unwrap().to_vec3().unwrap())
        .collect();
    for (bi, batch) in p4.iter().enumerate() {
        for (h, head) in batch.iter().enumerate() {
            let g = h / (hq / hkv);
            for (i, row) in head.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    let evicted =
                        (bi, g, j) == (0, 1, 2) || (bi, g) == (1, 0) && (j == 0 || j == 4);
                    if j > i || (j < i && evicted) {
                        assert_eq!(v, 0.0, "b{bi} h{h} i{i} j{j}");
                    } else {
                        assert!(v > 0.0, "b{bi} h{h} i{i} j{j}: visible key has weight 0");
                    }
                }
            }
        }
    }
    // Equal to a softmax over the physically retained keys: batch 0, query head 2 (KV head 1),
    // query 4 sees keys 0, 1, 3 and itself.
    let sc: Vec<f32> = scores
        .get(0)
        .unwrap()
        .get(2)
        .unwrap()
        .get(4)
        .unwrap()
        .to_vec1()
        .unwrap();
    let vis = [0usize, 1, 3, 4];
    let z: f64 = vis.iter().map(|&j| (sc[j] as f64).exp()).sum();
    for &j in &vis {
        let want = (sc[j] as f64).exp() / z;
        assert!((p4[0][2][4][j] as f64 - want).abs() < 1e-6);
    }
}

/// With every key kept, masked attention is the plain causal softmax.
#[test]
fn masked_attention_keeping_everything_is_the_causal_softmax() {
    let t = CASE.3;
    let (scores, keep) = evicting_case();
    let full = plain_masked_attention(&scores, &keep.ones_like().unwrap()).unwrap();
    let causal = Tensor::from_vec(
        (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0f32 } else { f32::NEG_INFINITY }))
            .collect::<Vec<_>>(),
        (t, t),
        &Device::Cpu,
    )
    .unwrap();
    let reference =
        candle_nn::ops::softmax(&scores.broadcast_add(&causal).unwrap(), D::Minus1).unwrap();
    let d = gate_core::testing::max_abs_diff(&full, &reference).unwrap();
    assert!(d < 1e-6);
}

/// A huge score on an evicted key neither overflows nor leaks into the row.
#[test]
fn a_huge_score_on_an_evicted_key_neither_overflows_nor_leaks() {
    let t = CASE.3;
    let mut s = vec![0.0; t * t];
    s[3 * t + 1] = 500.0;
    let mut k = vec![1.0; t];
    k[1] = 0.0;
    let p = plain_masked_attention(
        &tensor(s, &[1, 1, t, t], DType::F32),
        &tensor(k, &[1, 1, t], DType::F32),
    )
    .unwrap();
    let row3 = to_vec(&p.get(0).unwrap().get(0).unwrap().get(3).unwrap());
    assert!(
        row3.iter().all(|v| v.is_finite())
            && row3[1] == 0.0
            && (row3.iter().sum::<f64>() - 1.0).abs() < 1e-6,
        "{row3:?}"
    );
}

/// Masked attention refuses mismatched shapes, naming the argument.
#[test]
fn masked_attention_shape_errors_name_the_argument() {
    let (scores, keep) = evicting_case();
    let err = plain_masked_attention(&scores, &keep.narrow(2, 0, 5).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("`keep`"), "{err}");
    let err = plain_masked_attention(&scores.narrow(3, 0, 5).unwrap(), &keep)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`scores`"), "{err}");
}

/// Loss of the masked attention under keep values `keep` ([1, Hkv, T]).
fn attn_loss(scores: &Tensor, keep: &Tensor, w: &Tensor) -> Tensor {
    (plain_masked_attention(scores, keep).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn finite_difference_gradient_of_masked_attention_and_ste_wrt_gate_logits() {
    let (hq, hkv, t) = (4, 2, 5);
    let mut rng = StdRng::seed_from_u64(9);
    let scores = tensor(
        rand_vec(&mut rng, hq * t * t, 2.0),
        &[1, hq, t, t],
        DType::F64,
    );
    let w = tensor(
        rand_vec(&mut rng, hq * t * t, 1.0),
        &[1, hq, t, t],
        DType::F64,
    );
    // Gate logits away from 0 so the hard flags are a mix and stay fixed under perturbation.
    let z0: Vec<f64> = (0..hkv * t)
        .map(|i| {
            if i % 3 == 0 {
                -1.5
            } else {
                1.0 + 0.1 * i as f64
            }
        })
        .collect();
    let z = Var::from_tensor(&tensor(z0.clone(), &[1, hkv, t], DType::F64)).unwrap();
    let s = candle_nn::ops::sigmoid(z.as_tensor()).unwrap();
    let hard = hard_keep(&s, 0.5).unwrap();
    let loss = attn_loss(&scores, &keep_ste(&hard, &s).unwrap(), &w);
    let grad = to_vec(loss.backward().unwrap().get(z.as_tensor()).unwrap());
    assert!(
        grad.iter().any(|g| g.abs() > 1e-3),
        "the gradient reaches the gate: {grad:?}"
    );

    // The STE's surrogate: keep = hard0 + s(z) - s(z0), hard0 and s(z0) constants.
    let s0 = s.detach();
    let surrogate = |zv: &[f64]| -> f64 {
        let sz = candle_nn::ops::sigmoid(&tensor(zv.to_vec(), &[1, hkv, t], DType::F64)).unwrap();
        let keep = ((&hard + sz).unwrap() - &s0).unwrap();
        attn_loss(&scores, &keep, &w).to_scalar::<f64>().unwrap()
    };
    assert!((surrogate(&z0) - loss.to_scalar::<f64>().unwrap()).abs() < 1e-12);
    let eps = 1e-6;
    for (k, g) in grad.iter().enumerate() {
        let (mut up, mut down) = (z0.clone(), z0.clone());
        up[k] += eps;
        down[k] -= eps;
        let fd = (surrogate(&up) - surrogate(&down)) / (2.0 * eps);
        assert!(
            (fd - g).abs() <= 1e-7 + 1e-6 * g.abs(),
            "logit {k}: analytic {g}, numeric {fd}"
        );
    }
}
