//! Attention equality: paged `SequenceKv::attend` against dense masked attention computed with
//! candle matmuls, on ragged per-head caches (different evictions per head).
//!
//! Owns: decode (n_q = 1) and prefill chunks (n_q > 1, causal by position), GQA groups 1/3/4,
//! with and without the visibility mask, non-causal, probability sums, f16/bf16 storage against a
//! reference on rounded inputs, the parallel/tiled path, the contiguous baseline, and batches of
//! calls (bit for bit each call alone). Tolerance:
//! max |paged − ref| ≤ 1e-5 × max |ref| per (query row, query head), and the same for probability
//! sums per KV head.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use candle_core::{Device, Tensor};
use kv_store::{
    attend_dense, AttendCall, AttendOptions, BlockPool, DenseHead, KvDtype, KvSlice, Parallel,
    PoolConfig, SequenceKv,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The reference copy of one KV head: rounded keys/values and positions of retained entries.
#[derive(Clone, Default)]
struct RefHead {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    positions: Vec<u32>,
}

/// A one-layer paged cache and its dense reference, built by prefill + per-head evictions.
struct Case {
    kv: SequenceKv,
    heads: Vec<RefHead>,
    d: usize,
    dtype: KvDtype,
    next_pos: u32,
    rng: StdRng,
}

impl Case {
    fn new(seed: u64, n_kv: usize, d: usize, dtype: KvDtype, block_size: usize) -> Self {
        let pool = BlockPool::new(PoolConfig::from_memory_budget(
            block_size,
            d,
            dtype,
            256 << 20,
        ));
        Case {
            kv: SequenceKv::new(&pool, 1, n_kv),
            heads: vec![RefHead::default(); n_kv],
            d,
            dtype,
            next_pos: 0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn rand_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| self.rng.random_range(-2.0f32..2.0))
            .collect()
    }

    /// Appends `n` tokens to every head; returns their positions.
    fn append(&mut self, n: usize) -> Vec<u32> {
        let (h, d) = (self.heads.len(), self.d);
        let k = self.rand_vec(n * h * d);
        let v = self.rand_vec(n * h * d);
        let pos: Vec<u32> = (self.next_pos..self.next_pos + n as u32).collect();
        self.next_pos += n as u32;
        self.kv.append(0, &k, &v, &pos).unwrap();
        for (g, head) in self.heads.iter_mut().enumerate() {
            for (t, &p) in pos.iter().enumerate() {
                let at = (t * h + g) * d;
                let r = |x: &[f32]| {
                    let mut e = x[at..at + d].to_vec();
                    self.dtype.round_entry(&mut e);
                    e
                };
                head.keys.push(r(&k));
                head.values.push(r(&v));
                head.positions.push(p);
            }
        }
        pos
    }

    /// Evicts a different random fraction from each head.
    fn evict_ragged(&mut self) {
        for g in 0..self.heads.len() {
            let rate = 0.2 + 0.25 * g as f64;
            let keep: Vec<bool> = (0..self.heads[g].positions.len())
                .map(|_| !self.rng.random_bool(rate.min(0.9)))
                .collect();
            self.kv.evict(0, g, &keep).unwrap();
            let old = std::mem::take(&mut self.heads[g]);
            let head = &mut self.heads[g];
            for (i, _) in keep.iter().enumerate().filter(|(_, &k)| k) {
                head.keys.push(old.keys[i].clone());
                head.values.push(old.values[i].clone());
                head.positions.push(old.positions[i]);
            }
        }
    }

    /// A random in-context eviction mask: 60% of the keys visible to every query, the others
    /// to the queries up to 0–7 positions after their own.
    fn random_visibility(&mut self) -> Vec<Vec<u32>> {
        let heads: Vec<Vec<u32>> = self.heads.iter().map(|h| h.positions.clone()).collect();
        heads
            .into_iter()
            .map(|pos| {
                pos.into_iter()
                    .map(|p| {
                        if self.rng.random_bool(0.6) {
                            u32::MAX
                        } else {
                            p + self.rng.random_range(0..8)
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

/// Dense reference: per query head, `softmax(q Kᵀ · scale + mask) V` with candle matmuls.
/// Returns `out [n_q, n_q_heads, d]` and the probabilities `[n_q_heads][n_q][len]`.
fn reference(
    heads: &[RefHead],
    d: usize,
    q: &[f32],
    qpos: &[u32],
    opts: &AttendOptions<'_>,
) -> (Vec<f32>, Vec<Vec<Vec<f32>>>) {
    let dev = Device::Cpu;
    let n_q = qpos.len();
    let hq = q.len() / (n_q * d);
    let g_size = hq / heads.len();
    let mut out = vec![0.0f32; q.len()];
    let mut probs = Vec::new();
    for h in 0..hq {
        let head = &heads[h / g_size];
        let len = head.positions.len();
        let qh: Vec<f32> = (0..n_q)
            .flat_map(|i| q[(i * hq + h) * d..(i * hq + h + 1) * d].to_vec())
            .collect();
        let qt = Tensor::from_vec(qh, (n_q, d), &dev).unwrap();
        let kt = Tensor::from_vec(head.keys.concat(), (len, d), &dev).unwrap();
        let vt = Tensor::from_vec(head.values.concat(), (len, d), &dev).unwrap();
        let mut mask = vec![0.0f32; n_q * len];
        for i in 0..n_q {
            for j in 0..len {
                let (pj, pi) = (head.positions[j], qpos[i]);
                let shown = opts.visible_until.is_none_or(|v| pi <= v[h / g_size][j]);
                if !((!opts.causal || pj <= pi) && shown) {
                    mask[i * len + j] = f32::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (n_q, len), &dev).unwrap();
        let s =
            ((qt.matmul(&kt.t().unwrap()).unwrap() * opts.scale as f64).unwrap() + mask).unwrap();
        let m = s.max_keepdim(1).unwrap();
        let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap();
        let o = p.matmul(&vt).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in o.iter().enumerate() {
            out[(i * hq + h) * d..(i * hq + h + 1) * d].copy_from_slice(row);
        }
        probs.push(p.to_vec2::<f32>().unwrap());
    }
    (out, probs)
}

fn assert_close_rows(got: &[f32], want: &[f32], row: usize, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (r, (g, w)) in got
        .chunks(row.max(1))
        .zip(want.chunks(row.max(1)))
        .enumerate()
    {
        let scale = w.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
        let err = g
            .iter()
            .zip(w)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 1e-5 * scale,
            "{what}: row {r}: max error {err} vs scale {scale}"
        );
    }
}

/// Runs `attend` and checks output and (when requested) probability sums against the reference.
fn check(case: &Case, q: &[f32], qpos: &[u32], opts: &AttendOptions<'_>, what: &str) {
    let got = case.kv.attend(0, q, qpos, opts).unwrap();
    let (want, probs) = reference(&case.heads, case.d, q, qpos, opts);
    assert_close_rows(&got.out, &want, case.d, what);
    match (&opts.prob_sums, got.prob_sums) {
        (None, None) => {}
        (Some(rows), Some(sums)) => {
            let g_size = probs.len() / case.heads.len();
            for (g, s) in sums.iter().enumerate() {
                let mut w = vec![0.0f32; case.heads[g].positions.len()];
                for head_probs in &probs[g * g_size..(g + 1) * g_size] {
                    for i in rows.clone() {
                        for (a, p) in w.iter_mut().zip(&head_probs[i]) {
                            *a += p / g_size as f32;
                        }
                    }
                }
                assert_close_rows(s, &w, w.len(), &format!("{what}: prob_sums of KV head {g}"));
            }
        }
        (want, got) => panic!(
            "{what}: prob_sums requested {want:?}, got {}",
            got.is_some()
        ),
    }
}

fn queries(case: &mut Case, n_q: usize, hq: usize) -> Vec<f32> {
    case.rand_vec(n_q * hq * case.d)
}

/// Decode and prefill chunks over ragged heads, GQA 1/3/4, with and without the mask.
fn scenario(dtype: KvDtype, seed: u64) {
    for (n_kv, group) in [(2usize, 1usize), (3, 3), (2, 4)] {
        let hq = n_kv * group;
        let mut case = Case::new(seed + group as u64, n_kv, 32, dtype, 16);
        let opts = AttendOptions::for_head_dim(case.d);
        case.append(150);
        case.evict_ragged();

        // Decode: append one token, attend with it.
        let pos = case.append(1);
        let q = queries(&mut case, 1, hq);
        check(&case, &q, &pos, &opts, &format!("{dtype} decode G={group}"));
        check(
            &case,
            &q,
            &pos,
            &opts.clone().prob_sums(0..1),
            &format!("{dtype} decode probs G={group}"),
        );
        let vis = case.random_visibility();
        check(
            &case,
            &q,
            &pos,
            &opts.clone().visible_until(&vis).prob_sums(0..1),
            &format!("{dtype} decode masked G={group}"),
        );

        // Prefill chunk: 23 tokens, causal by position, then ragged again and a second chunk.
        let pos = case.append(23);
        let q = queries(&mut case, 23, hq);
        check(
            &case,
            &q,
            &pos,
            &opts,
            &format!("{dtype} prefill G={group}"),
        );
        let vis = case.random_visibility();
        let masked = opts.clone().visible_until(&vis).prob_sums(5..19);
        check(
            &case,
            &q,
            &pos,
            &masked,
            &format!("{dtype} prefill masked G={group}"),
        );
        check(
            &case,
            &q,
            &pos,
            &opts.clone().causal(false).prob_sums(0..23),
            &format!("{dtype} non-causal G={group}"),
        );
        case.evict_ragged();
        let pos = case.append(9);
        let q = queries(&mut case, 9, hq);
        check(
            &case,
            &q,
            &pos,
            &opts.clone().prob_sums(0..9),
            &format!("{dtype} second chunk G={group}"),
        );
    }
}

#[test]
fn paged_equals_dense_f32() {
    scenario(KvDtype::F32, 1);
}

#[test]
fn paged_equals_dense_f16() {
    scenario(KvDtype::F16, 2);
}

#[test]
fn paged_equals_dense_bf16() {
    scenario(KvDtype::BF16, 3);
}

/// q8_0 storage: attention over the stored (dequantized) entries is exact like the other dtypes.
#[test]
fn paged_equals_dense_q8_0() {
    scenario(KvDtype::Q8_0, 4);
}

/// q4_0 storage: exact over the stored entries too.
#[test]
fn paged_equals_dense_q4_0() {
    scenario(KvDtype::Q4_0, 5);
}

/// The quantization error of the block-quantized caches, measured against the same attention
/// over an f32 cache (decode and a 40-row prefill chunk over 700 entries, 3 KV heads, GQA 3):
/// outputs stay within a tolerance of the output's largest magnitude, and the probability sums
/// within it of the largest sum. q8_0: 2% (each stored value is off by at most 1/254 of its
/// block's largest magnitude; measured 0.2–0.8%); q4_0: 25% (1/16; measured 4–17% on these
/// uniform random keys, which are harder than a model's).
#[test]
fn quantized_attention_is_close_to_f32() {
    for (dtype, tol) in [(KvDtype::Q8_0, 0.02f32), (KvDtype::Q4_0, 0.25)] {
        let (n_kv, group, d) = (3, 3, 64);
        let mut exact = Case::new(21, n_kv, d, KvDtype::F32, 16);
        let mut quant = Case::new(21, n_kv, d, dtype, 16);
        for n in [700, 1] {
            exact.append(n);
            quant.append(n);
        }
        let hq = n_kv * group;
        for n_q in [1usize, 40] {
            let pos_e = exact.append(n_q);
            let pos_q = quant.append(n_q);
            assert_eq!(pos_e, pos_q);
            // From a third case, so that both caches keep drawing the same keys and values.
            let q = queries(&mut Case::new(n_q as u64, 1, d, KvDtype::F32, 16), n_q, hq);
            let opts = AttendOptions::for_head_dim(d).prob_sums(0..n_q);
            let a = exact.kv.attend(0, &q, &pos_e, &opts).unwrap();
            let b = quant.kv.attend(0, &q, &pos_q, &opts).unwrap();
            let scale = a.out.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = a
                .out
                .iter()
                .zip(&b.out)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            eprintln!(
                "{dtype} vs f32, {n_q} query rows: output error {:.2e} of scale",
                err / scale
            );
            assert!(
                err <= tol * scale,
                "{dtype} n_q {n_q}: output error {err} vs scale {scale}"
            );
            for (sa, sb) in a.prob_sums.unwrap().iter().zip(b.prob_sums.unwrap().iter()) {
                let scale = sa.iter().fold(0f32, |m, x| m.max(*x));
                let err = sa
                    .iter()
                    .zip(sb)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                eprintln!(
                    "{dtype} probability error {:.2e} of the largest sum",
                    err / scale
                );
                assert!(
                    err <= tol * scale,
                    "{dtype} n_q {n_q}: probability error {err} vs {scale}"
                );
            }
        }
    }
}

/// Big enough to take the rayon path and to tile query rows (several units per KV head).
#[test]
fn parallel_tiled_path_matches() {
    let mut case = Case::new(7, 2, 64, KvDtype::F32, 32);
    case.append(1200);
    case.evict_ragged();
    let pos = case.append(256);
    let q = queries(&mut case, 256, 8);
    let opts = AttendOptions::for_head_dim(64).prob_sums(100..256);
    check(&case, &q, &pos, &opts, "parallel prefill G=4");
}

/// Evicting entries physically and hiding them with the visibility mask give the same output
/// for a query after them.
#[test]
fn eviction_equals_masking() {
    let mut case = Case::new(11, 3, 16, KvDtype::F32, 16);
    case.append(100);
    let keep: Vec<Vec<bool>> = (0..3)
        .map(|g| (0..100).map(|j| (j * (g + 2)) % 5 != 0).collect())
        .collect();
    let pos = case.append(1);
    // Kept keys (and the new token) visible to every query, the others to none.
    let vis: Vec<Vec<u32>> = keep
        .iter()
        .map(|k| {
            k.iter()
                .map(|&kept| if kept { u32::MAX } else { 0 })
                .chain([u32::MAX])
                .collect()
        })
        .collect();
    let q = queries(&mut case, 1, 6);
    let opts = AttendOptions::for_head_dim(16);
    let masked = case
        .kv
        .attend(0, &q, &pos, &opts.clone().visible_until(&vis))
        .unwrap();
    for (g, k) in keep.iter().enumerate() {
        let mask: Vec<bool> = k.iter().copied().chain([true]).collect();
        case.kv.evict(0, g, &mask).unwrap();
    }
    let evicted = case.kv.attend(0, &q, &pos, &opts).unwrap();
    assert_close_rows(&evicted.out, &masked.out, 16, "evicted vs masked");
}

/// The contiguous baseline runs the same kernel: it agrees with the paged store.
#[test]
fn dense_baseline_matches_paged() {
    for dtype in [KvDtype::F32, KvDtype::F16] {
        let mut case = Case::new(5, 2, 64, dtype, 16);
        case.append(300);
        case.evict_ragged();
        let pos = case.append(1);
        let q = queries(&mut case, 1, 6);
        let opts = AttendOptions::for_head_dim(64);
        let paged = case.kv.attend(0, &q, &pos, &opts).unwrap();
        let contents: Vec<_> = (0..2).map(|g| case.kv.read_head(0, g)).collect();
        let (h16k, h16v): (Vec<Vec<half::f16>>, Vec<Vec<half::f16>>) = contents
            .iter()
            .map(|c| {
                let cv = |x: &[f32]| x.iter().map(|&e| half::f16::from_f32(e)).collect();
                (cv(&c.keys), cv(&c.values))
            })
            .unzip();
        let heads: Vec<DenseHead<'_>> = contents
            .iter()
            .enumerate()
            .map(|(g, c)| match dtype {
                KvDtype::F16 => DenseHead {
                    keys: KvSlice::F16(&h16k[g]),
                    values: KvSlice::F16(&h16v[g]),
                    positions: &c.positions,
                },
                _ => DenseHead {
                    keys: KvSlice::F32(&c.keys),
                    values: KvSlice::F32(&c.values),
                    positions: &c.positions,
                },
            })
            .collect();
        let dense = attend_dense(&heads, 64, &q, &pos, &opts).unwrap();
        assert_close_rows(&dense.out, &paged.out, 64, "dense vs paged");
    }
}

/// A query row that sees no key (all hidden, none at its position) gets a zero output.
#[test]
fn row_without_visible_keys_is_zero() {
    let mut case = Case::new(3, 1, 8, KvDtype::F32, 4);
    case.append(10);
    let q = queries(&mut case, 1, 1);
    let vis = vec![vec![0u32; 10]];
    let got = case
        .kv
        .attend(
            0,
            &q,
            &[50],
            &AttendOptions::for_head_dim(8)
                .visible_until(&vis)
                .prob_sums(0..1),
        )
        .unwrap();
    assert!(got.out.iter().all(|&x| x == 0.0));
    assert!(got.prob_sums.unwrap()[0].iter().all(|&x| x == 0.0));
}

/// A long decode takes the split-K path (several key ranges per KV head, merged): it still
/// matches, probabilities included.
#[test]
fn split_k_decode_matches() {
    for dtype in [KvDtype::F32, KvDtype::F16] {
        let mut case = Case::new(13, 3, 64, dtype, 16);
        case.append(6000);
        case.evict_ragged();
        let pos = case.append(1);
        let q = queries(&mut case, 1, 9);
        let opts = AttendOptions::for_head_dim(64).prob_sums(0..1);
        check(&case, &q, &pos, &opts, &format!("{dtype} split-K decode"));
        let vis = case.random_visibility();
        check(
            &case,
            &q,
            &pos,
            &opts.clone().visible_until(&vis),
            &format!("{dtype} split-K masked"),
        );
    }
}

/// A pool of `threads` scoped threads that counts its handoffs.
#[derive(Debug)]
struct CountingPool {
    threads: usize,
    handoffs: std::sync::atomic::AtomicUsize,
}

impl Parallel for CountingPool {
    fn threads(&self) -> usize {
        self.threads
    }

    fn min_work(&self) -> usize {
        1 << 16
    }

    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.handoffs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::thread::scope(|s| {
            for t in 0..self.threads {
                s.spawn(move || (t..n).step_by(self.threads).for_each(f));
            }
        });
    }
}

/// Several sequences' calls in one batch (short and long decodes, a masked prefill chunk with
/// probabilities, an invalid call) give each call bit for bit its lone result, or its lone
/// error, and run as one handoff to the pool.
#[test]
fn a_batch_of_calls_equals_each_call_alone() {
    let pool = CountingPool {
        threads: 3,
        handoffs: Default::default(),
    };
    let mut cases: Vec<Case> = [(1u64, 40usize), (2, 700), (3, 3000), (4, 200)]
        .into_iter()
        .map(|(seed, n)| {
            let mut case = Case::new(seed, 3, 64, KvDtype::F16, 16);
            case.append(n);
            case.evict_ragged();
            case
        })
        .collect();
    let rows = [1usize, 1, 1, 9];
    let new: Vec<Vec<u32>> = cases
        .iter_mut()
        .zip(rows)
        .map(|(c, n)| c.append(n))
        .collect();
    let qs: Vec<Vec<f32>> = cases
        .iter_mut()
        .zip(rows)
        .map(|(c, n)| queries(c, n, 9))
        .collect();
    let vis = cases[3].random_visibility();
    let opts: Vec<AttendOptions<'_>> = (0..4)
        .map(|i| {
            let o = AttendOptions::for_head_dim(64).parallel(&pool);
            match i {
                3 => o.visible_until(&vis).prob_sums(2..9),
                2 => o.prob_sums(0..1),
                _ => o,
            }
        })
        .collect();
    let mut calls: Vec<AttendCall<'_>> = (0..4)
        .map(|i| AttendCall {
            kv: &cases[i].kv,
            layer: 0,
            q: &qs[i],
            q_positions: &new[i],
            opts: opts[i].clone(),
        })
        .collect();
    // An invalid call (a layer the store does not have) in the middle.
    let bad = AttendCall {
        layer: 1,
        ..calls[1].clone()
    };
    calls.insert(2, bad);
    let alone: Vec<_> = calls
        .iter()
        .map(|c| c.kv.attend(c.layer, c.q, c.q_positions, &c.opts))
        .collect();
    let lone_handoffs = pool.handoffs.swap(0, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        lone_handoffs, 3,
        "the three longer calls run on the pool alone"
    );
    for batch_pool in [Some(&pool as &dyn Parallel), None] {
        let batched = SequenceKv::attend_batch(&calls, batch_pool);
        assert_eq!(batched.len(), calls.len());
        for (i, (b, a)) in batched.iter().zip(&alone).enumerate() {
            match (b, a) {
                (Ok(b), Ok(a)) => {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&b.out), bits(&a.out), "call {i}: output");
                    assert_eq!(b.prob_sums, a.prob_sums, "call {i}: probability sums");
                }
                (Err(b), Err(a)) => assert_eq!(b.to_string(), a.to_string(), "call {i}"),
                _ => panic!("call {i}: batched {b:?} vs alone {a:?}"),
            }
        }
    }
    assert_eq!(
        pool.handoffs.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the batch is one handoff"
    );
}
