//! Attention equality: paged `SequenceKv::attend` against dense masked attention computed with
//! candle matmuls, on ragged per-head caches (different evictions per head).
//!
//! Owns: decode (n_q = 1) and prefill chunks (n_q > 1, causal by position), GQA groups 1/3/4,
//! with and without the visibility mask, non-causal, probability sums, f16/bf16 storage against a
//! reference on rounded inputs, the parallel/tiled path, the contiguous baseline, and batches of
//! calls (bit for bit each call alone). Tolerance:
//! max |paged − ref| ≤ 1e-5 × max |ref| per (query row, query head), and the same for probability
//! sums per KV head.
//!
//! The reference and the comparison live in `reference.rs`, the batch tests in `batch.rs` (one
//! test binary).
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

mod batch;
mod reference;

use kv_store::{attend_dense, AttendOptions, DenseHead, KvDtype, KvSlice};

use reference::{assert_close_rows, check, queries, Case};

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
