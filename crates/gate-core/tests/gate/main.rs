//! Attention-Gate mechanics: shapes, initial keep probability, hard flags, causality,
//! prefill + step decode equal to the full forward, trainable parameters, config validation,
//! RoPE's relativity; the file format in `file.rs` (bit-exact round trip, f16, and every load
//! error naming what is wrong).
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

mod file;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use gate_core::{hard_flags, AttentionGate, GateCache, GateConfig, GateError};

const HIDDEN: usize = 48;

fn cfg() -> GateConfig {
    GateConfig {
        heads: 2,
        head_dim: 8,
        ..GateConfig::new(HIDDEN, 3, 2, 10_000.0)
    }
}

/// Deterministic pseudo-random input (candle's randn is not seeded).
fn det_input(t: usize, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data: Vec<f32> = (0..t * HIDDEN)
        .map(|_| rng.random_range(-1.7f32..1.7))
        .collect();
    Tensor::from_vec(data, (t, HIDDEN), &Device::Cpu).unwrap()
}

/// A random gate (seeded) with each parameter tensor passed through `map(name, tensor)`.
fn mapped_gate(cfg: &GateConfig, seed: u64, map: impl Fn(&str, Tensor) -> Tensor) -> AttentionGate {
    let g = AttentionGate::random(cfg, seed, &Device::Cpu).unwrap();
    let tensors: HashMap<String, Tensor> = g
        .named_tensors()
        .into_iter()
        .map(|(n, t)| {
            let t = map(&n, t);
            (n, t)
        })
        .collect();
    AttentionGate::from_tensors(cfg, tensors).unwrap()
}

/// A gate whose `wg` is scaled up so that `s` varies a lot across tokens and heads.
fn spread_gate(cfg: &GateConfig) -> AttentionGate {
    mapped_gate(cfg, 5, |n, t| {
        if n.ends_with(".wg") {
            (t * 300.0).unwrap()
        } else {
            t
        }
    })
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

#[test]
fn output_shapes() {
    let g = AttentionGate::random(&cfg(), 1, &Device::Cpu).unwrap();
    let pos: Vec<u32> = (0..7).collect();
    assert_eq!(
        g.keep_probs(1, &det_input(7, 1), &pos).unwrap().dims(),
        [7, 3]
    );
    let xb = Tensor::stack(&[det_input(7, 1), det_input(7, 2)], 0).unwrap();
    let s = g.keep_probs(0, &xb, &pos).unwrap();
    assert_eq!(s.dims(), [2, 7, 3]);
    assert_eq!(s.dtype(), DType::F32);
    // Batch rows are independent: row 0 equals the unbatched forward.
    let s0 = g.keep_probs(0, &det_input(7, 1), &pos).unwrap();
    let d = gate_core::testing::max_abs_diff(&s.get(0).unwrap(), &s0).unwrap();
    assert!(d < 1e-6);
    let flags = g.keep_flags(0, &det_input(7, 1), &pos).unwrap();
    assert_eq!((flags.len(), flags[0].len()), (3, 7));
    // Shape errors name the argument.
    let err = g
        .keep_probs(0, &det_input(7, 1), &pos[..5])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`x`") && err.contains("[7, 48]"), "{err}");
    let err = g
        .keep_probs(2, &det_input(7, 1), &pos)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer index 2"), "{err}");
}

#[test]
fn starts_near_sigmoid_of_the_bias() {
    let g =
        AttentionGate::random(&GateConfig::new(HIDDEN, 3, 2, 10_000.0), 1, &Device::Cpu).unwrap();
    let pos: Vec<u32> = (100..164).collect();
    let s = g.keep_probs(0, &det_input(64, 3), &pos).unwrap();
    let target = 1.0 / (1.0 + (-3.0f32).exp());
    for r in rows(&s) {
        for v in r {
            assert!((v - target).abs() < 0.01, "{v} vs {target}");
        }
    }
}

#[test]
fn hard_flags_are_s_above_tau() {
    let tau = 0.6;
    let c = GateConfig {
        threshold: tau,
        ..cfg()
    };
    let g = spread_gate(&c);
    let pos: Vec<u32> = (0..20).collect();
    let x = det_input(20, 4);
    let s = rows(&g.keep_probs(1, &x, &pos).unwrap());
    let flags = g.keep_flags(1, &x, &pos).unwrap();
    let (mut kept, mut dropped) = (0, 0);
    for (t, row) in s.iter().enumerate() {
        for (h, &v) in row.iter().enumerate() {
            assert_eq!(flags[h][t], v > tau);
            if flags[h][t] {
                kept += 1
            } else {
                dropped += 1
            }
        }
    }
    assert!(
        kept > 0 && dropped > 0,
        "the test gate should mix keep and evict: {s:?}"
    );
    let s_t = Tensor::from_vec(vec![0.4f32, 0.6, 0.5, 0.7], (1, 2, 2), &Device::Cpu).unwrap();
    assert_eq!(
        hard_flags(&s_t, 0.5).unwrap(),
        [[false, false], [true, true]]
    );
}

#[test]
fn causal_future_tokens_do_not_change_earlier_s() {
    let g = spread_gate(&cfg());
    let pos: Vec<u32> = (0..16).collect();
    let x = det_input(16, 5);
    let mut data = x.to_vec2::<f32>().unwrap();
    data[9].iter_mut().for_each(|v| *v = -*v * 2.0);
    let x2 = Tensor::new(data, &Device::Cpu).unwrap();
    let (a, b) = (
        rows(&g.keep_probs(0, &x, &pos).unwrap()),
        rows(&g.keep_probs(0, &x2, &pos).unwrap()),
    );
    assert_eq!(a[..9], b[..9]);
    assert_ne!(a[9], b[9]);
}

/// With an attention window `W`, a token's `s` depends only on the last `W` tokens: it equals
/// the last row of a forward over just those tokens (at their positions), and a change further
/// back changes nothing.
#[test]
fn the_attention_window_bounds_what_a_token_sees() {
    let c = GateConfig {
        attention_window: 6,
        ..cfg()
    };
    let g = spread_gate(&c);
    let (t, w) = (20, 6);
    let pos: Vec<u32> = (300..300 + t as u32).collect();
    let x = det_input(t, 11);
    let full = rows(&g.keep_probs(1, &x, &pos).unwrap());
    for i in w..t {
        let alone = rows(
            &g.keep_probs(1, &x.narrow(0, i + 1 - w, w).unwrap(), &pos[i + 1 - w..=i])
                .unwrap(),
        );
        for (a, b) in full[i].iter().zip(&alone[w - 1]) {
            assert!(
                (a - b).abs() < 1e-5,
                "token {i}: {:?} vs {:?}",
                full[i],
                alone[w - 1]
            );
        }
    }
    // Unbounded, the same tokens do see further back.
    let unbounded = spread_gate(&GateConfig {
        attention_window: 0,
        ..cfg()
    });
    let far = rows(&unbounded.keep_probs(1, &x, &pos).unwrap());
    assert!(full[t - 1]
        .iter()
        .zip(&far[t - 1])
        .any(|(a, b)| (a - b).abs() > 1e-4));
    // A window wider than the positions reach (2^32 + 1, which cut to 32 bits would be 1)
    // sees every earlier token, as the unbounded one does.
    if let Ok(wide) = usize::try_from((1u64 << 32) + 1) {
        let wide = spread_gate(&GateConfig {
            attention_window: wide,
            ..cfg()
        });
        assert_eq!(rows(&wide.keep_probs(1, &x, &pos).unwrap()), far);
    }
}

/// Rounds `g`'s projections to 4 bits, checking that they are what changes: `wq`, `wk` and
/// `wv` of every layer, nothing else.
fn round_projections(g: &mut AttentionGate) {
    let before = g.named_tensors();
    g.round_projections_to_int4().unwrap();
    let changed: Vec<&str> = before
        .iter()
        .zip(g.named_tensors())
        .filter(|((_, a), (_, b))| {
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            diff.to_scalar::<f32>().unwrap() > 0.0
        })
        .map(|((name, _), _)| name.as_str())
        .collect();
    let projections: Vec<&str> = before
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|n| [".wq", ".wk", ".wv"].iter().any(|p| n.ends_with(p)))
        .collect();
    assert_eq!(changed, projections);
}

#[test]
fn rounding_needs_f32_parameters() {
    let mut g = mapped_gate(&cfg(), 1, |_, t| t.to_dtype(DType::F16).unwrap());
    let err = g.round_projections_to_int4().unwrap_err().to_string();
    assert!(
        err.contains("F16") && err.contains("f32 parameters"),
        "{err}"
    );
}

/// The decode step (plain Rust on host copies, the projection shared over the thread pool, one
/// online-softmax pass) equals the tensor path to float rounding at the default gate shape,
/// for random gates and random inputs: a prefill, then steps that wrap the window's ring
/// twice, at positions where RoPE angles are large. The projections the step reads are f32,
/// f16 (seed 3) or 4-bit (seed 4), and its bytes are counted as held.
#[test]
fn decode_steps_equal_the_tensor_path_at_the_default_shape() {
    use rand::{Rng, SeedableRng};
    let c = GateConfig::new(576, 3, 2, 100_000.0);
    let (t, t0) = (2 * c.attention_window + 40, 30);
    let projection = 3 * c.inner() * c.hidden_size;
    let readout = 4 * c.n_layers * (c.n_kv_heads * c.inner() + c.n_kv_heads);
    for seed in [1u64, 2, 3, 4] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // `wg` scaled up and `bg` random, so that `s` spreads over (0, 1) instead of sitting
        // near `sigmoid(bias_init)`, where any difference would vanish. Seed 3's projection
        // weights are f16 values (as loaded from an f16 file), which the step holds as f16;
        // seed 4's are rounded to 4 bits.
        let bias: Vec<f32> = (0..c.n_kv_heads)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let mut g = mapped_gate(&c, seed, |n, t| {
            if n.ends_with(".wg") {
                (t * 200.0).unwrap()
            } else if n.ends_with(".bg") {
                Tensor::new(bias.as_slice(), &Device::Cpu).unwrap()
            } else if seed == 3 {
                t.to_dtype(DType::F16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
            } else {
                t
            }
        });
        let bytes_per_layer = match seed {
            3 => 2 * projection,
            4 => {
                round_projections(&mut g);
                projection / 2 + 4 * projection / 32
            }
            _ => 4 * projection,
        };
        let bytes = g.decode_weight_bytes().unwrap();
        assert_eq!(bytes, c.n_layers * bytes_per_layer + readout, "seed {seed}");
        let data: Vec<f32> = (0..t * c.hidden_size)
            .map(|_| rng.random_range(-3.0f32..3.0))
            .collect();
        let x = Tensor::from_vec(data, (t, c.hidden_size), &Device::Cpu).unwrap();
        let pos: Vec<u32> = (7000..7000 + t as u32).collect();
        for layer in 0..c.n_layers {
            let full = rows(&g.keep_probs(layer, &x, &pos).unwrap());
            let mut cache = GateCache::new(&c);
            let mut got = rows(
                &g.prefill(layer, &x.narrow(0, 0, t0).unwrap(), &pos[..t0], &mut cache)
                    .unwrap(),
            );
            for (i, &p) in pos.iter().enumerate().skip(t0) {
                got.push(g.step(layer, &x.get(i).unwrap(), p, &mut cache).unwrap());
            }
            let spread = full
                .iter()
                .flatten()
                .fold((1f32, 0f32), |(lo, hi), &s| (lo.min(s), hi.max(s)));
            assert!(
                spread.0 < 0.2 && spread.1 > 0.8,
                "s does not spread: {spread:?}"
            );
            for (i, (f, s)) in full.iter().zip(&got).enumerate() {
                for (a, b) in f.iter().zip(s) {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "seed {seed} layer {layer} token {i}: {f:?} vs {s:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn prefill_then_step_equals_the_full_forward() {
    // Unbounded (older gates), and a window of 5 that the ring wraps many times.
    for attention_window in [0, 5] {
        let c = GateConfig {
            attention_window,
            ..cfg()
        };
        let g = spread_gate(&c);
        let (t, t0) = (24, 9);
        let pos: Vec<u32> = (1000..1000 + t as u32).collect();
        let x = det_input(t, 6);
        for layer in 0..c.n_layers {
            let full = rows(&g.keep_probs(layer, &x, &pos).unwrap());
            let mut cache = GateCache::new(&c);
            // Prefill in two chunks (the second attends to the first through the cache), then
            // decode.
            let a = g
                .prefill(layer, &x.narrow(0, 0, 4).unwrap(), &pos[..4], &mut cache)
                .unwrap();
            let b = g
                .prefill(
                    layer,
                    &x.narrow(0, 4, t0 - 4).unwrap(),
                    &pos[4..t0],
                    &mut cache,
                )
                .unwrap();
            let mut got = rows(&a);
            got.extend(rows(&b));
            for (i, &p) in pos.iter().enumerate().skip(t0) {
                got.push(g.step(layer, &x.get(i).unwrap(), p, &mut cache).unwrap());
            }
            let held = if attention_window == 0 {
                t
            } else {
                attention_window
            };
            assert_eq!(cache.len(layer), held);
            for (i, (f, s)) in full.iter().zip(&got).enumerate() {
                for (a, b) in f.iter().zip(s) {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "window {attention_window} layer {layer} token {i}: {f:?} vs {s:?}"
                    );
                }
            }
        }
    }
    let c = cfg();
    let g = spread_gate(&c);
    let x = det_input(2, 6);
    let mut cache = GateCache::new(&c);
    g.step(0, &x.get(0).unwrap(), 0, &mut cache).unwrap();
    // K' and V' in f32 and the position.
    assert_eq!(cache.bytes(), 2 * c.heads * c.head_dim * 4 + 4);
    let err = g
        .step(0, &x.narrow(0, 0, 2).unwrap(), 0, &mut cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("x_row"), "{err}");
    let mut wrong = GateCache::new(&GateConfig {
        heads: 4,
        ..c.clone()
    });
    assert!(g
        .step(0, &x.get(0).unwrap(), 0, &mut wrong)
        .unwrap_err()
        .to_string()
        .contains("GateCache"));
    cache.clear();
    assert!(cache.is_empty());
}

#[test]
fn a_rolled_back_pass_leaves_the_cache_as_at_its_mark() {
    // Unbounded, and a ring of 5 that failed passes of up to 13 tokens wrap more than twice.
    for attention_window in [0, 5] {
        let c = GateConfig {
            attention_window,
            ..cfg()
        };
        let g = spread_gate(&c);
        let x = det_input(40, 8);
        let pos: Vec<u32> = (0..40).collect();
        let feed = |cache: &mut GateCache, from: usize, to: usize| {
            for layer in 0..c.n_layers {
                g.prefill(
                    layer,
                    &x.narrow(0, from, to - from).unwrap(),
                    &pos[from..to],
                    cache,
                )
                .unwrap();
            }
        };
        for (before, failed) in [(3, 1), (3, 13), (7, 4), (9, 6)] {
            let mut clean = GateCache::new(&c);
            feed(&mut clean, 0, before);
            let mut undone = clean.clone();
            undone.mark();
            // The failed pass: a prefill chunk, then decode steps, of other tokens.
            let half = failed / 2;
            feed(&mut undone, 20, 20 + failed - half);
            for i in 0..half {
                g.step(0, &x.get(30 + i).unwrap(), pos[before + i], &mut undone)
                    .unwrap();
            }
            undone.rollback();
            assert_eq!(undone.bytes(), clean.bytes());
            // The next pass sees exactly what it would have seen.
            for layer in 0..c.n_layers {
                assert_eq!(undone.len(layer), clean.len(layer));
                for (i, &p) in pos.iter().enumerate().skip(before).take(3) {
                    let row = x.get(i).unwrap();
                    let a = g.step(layer, &row, p, &mut undone).unwrap();
                    let b = g.step(layer, &row, p, &mut clean).unwrap();
                    assert_eq!(
                        a, b,
                        "window {attention_window}, {before}+{failed}, layer {layer}"
                    );
                }
            }
        }
        // A committed pass stays; a rollback without a mark does nothing.
        let mut cache = GateCache::new(&c);
        cache.mark();
        feed(&mut cache, 0, 8);
        cache.commit();
        let bytes = cache.bytes();
        cache.rollback();
        assert_eq!(cache.bytes(), bytes);
        assert_eq!(cache.len(0), if attention_window == 0 { 8 } else { 5 });
    }
}

#[test]
fn trainable_parameters_receive_gradients() {
    let c = cfg();
    let (g, varmap) = spread_gate(&c).into_trainable().unwrap();
    assert_eq!(varmap.all_vars().len(), 5 * c.n_layers);
    let pos: Vec<u32> = (0..10).collect();
    let s = g.keep_probs(1, &det_input(10, 7), &pos).unwrap();
    let loss = gate_core::eviction_loss(
        &s,
        &Tensor::ones((10, 3), DType::F32, &Device::Cpu).unwrap(),
        0.6,
        1.0,
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    let data = varmap.data().lock().unwrap();
    for p in ["wq", "wk", "wv", "wg", "bg"] {
        let var = &data[&format!("layers.1.{p}")];
        let gr = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {p}"));
        let norm = gr
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "zero gradient for {p}");
        assert!(
            grads.get(data["layers.0.wq"].as_tensor()).is_none(),
            "layer 0 is not on the path"
        );
    }
}

#[test]
fn config_validation_names_the_field() {
    let bad = GateConfig {
        head_dim: 7,
        ..cfg()
    };
    let msg = AttentionGate::random(&bad, 0, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("GateConfig.head_dim") && msg.contains('7'),
        "{msg}"
    );
    let bad = GateConfig {
        n_layers: 0,
        ..cfg()
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("GateConfig.n_layers"));
}

#[test]
fn rope_is_relative_a_shift_of_all_positions_changes_nothing() {
    let g = spread_gate(&cfg());
    let x = det_input(12, 8);
    let at = |start: u32| {
        rows(
            &g.keep_probs(0, &x, &(start..start + 12).collect::<Vec<_>>())
                .unwrap(),
        )
    };
    let (a, b) = (at(0), at(5000));
    for (r, s) in a.iter().zip(&b) {
        for (u, v) in r.iter().zip(s) {
            assert!((u - v).abs() < 1e-4, "{a:?} vs {b:?}");
        }
    }
    // A gap in the positions does change the later tokens.
    let gap: Vec<u32> = (0..6).chain(106..112).collect();
    let c = rows(&g.keep_probs(0, &x, &gap).unwrap());
    assert_eq!(a[..6], c[..6]);
    assert!(a[6..]
        .iter()
        .zip(&c[6..])
        .any(|(r, s)| r.iter().zip(s).any(|(u, v)| (u - v).abs() > 1e-3)));
}

#[test]
fn gate_and_cache_can_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<AttentionGate>();
    send_sync::<GateCache>();
    send_sync::<GateError>();
}
