//! The reference side of the attention tests: a one-layer paged cache built together with its
//! dense copy ([`Case`]), dense masked attention with candle matmuls ([`reference`]), and the
//! comparison of a call's output and probability sums against it ([`check`]).

use candle_core::{Device, Tensor};
use kv_store::{AttendOptions, BlockPool, KvDtype, PoolConfig, SequenceKv};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The reference copy of one KV head: rounded keys/values and positions of retained entries.
#[derive(Clone, Default)]
pub struct RefHead {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    pub positions: Vec<u32>,
}

/// A one-layer paged cache and its dense reference, built by prefill + per-head evictions.
pub struct Case {
    pub kv: SequenceKv,
    pub heads: Vec<RefHead>,
    pub d: usize,
    dtype: KvDtype,
    next_pos: u32,
    rng: StdRng,
}

impl Case {
    pub fn new(seed: u64, n_kv: usize, d: usize, dtype: KvDtype, block_size: usize) -> Self {
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

    /// `n` uniform values in `[-2, 2)`.
    pub fn rand_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| self.rng.random_range(-2.0f32..2.0))
            .collect()
    }

    /// Appends `n` tokens to every head; returns their positions.
    pub fn append(&mut self, n: usize) -> Vec<u32> {
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
    pub fn evict_ragged(&mut self) {
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
    pub fn random_visibility(&mut self) -> Vec<Vec<u32>> {
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

/// Asserts `got` within 1e-5 of `want`'s largest magnitude, row by row (`row` values each).
pub fn assert_close_rows(got: &[f32], want: &[f32], row: usize, what: &str) {
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
pub fn check(case: &Case, q: &[f32], qpos: &[u32], opts: &AttendOptions<'_>, what: &str) {
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

/// Random queries for `n_q` rows of `hq` query heads.
pub fn queries(case: &mut Case, n_q: usize, hq: usize) -> Vec<f32> {
    case.rand_vec(n_q * hq * case.d)
}
