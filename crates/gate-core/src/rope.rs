//! Rotary position embedding (RoPE): agate's one implementation of the rotation, used by the
//! Attention-Gate here and by model-zoo's decoder and training forward (which add the model's
//! frequency scaling through [`Rope::scaled`]). It lives in gate-core, the lowest crate that
//! rotates, so that both layers share it without a back edge.
//!
//! Two layouts exist in the wild: llama.cpp's GGUF files permute the q/k rows so that rotation
//! pairs are adjacent (`Interleaved`: pairs `(2i, 2i+1)`), while Hugging Face checkpoints and the
//! gate rotate the two halves (`Halves`: pairs `(i, i + d/2)`). Both give identical attention
//! when paired with their weights.
//!
//! Invariants: angles are `position × inv_freq[i]` computed in f64 (large positions stay exact),
//! their `cos`/`sin` rounded once to the compute dtype; the rotation exists twice, in place on
//! f32 slices ([`Rope::apply`] and its variants, for decoding) and with candle tensor ops
//! ([`Rope::rotate_tensor`], differentiable, for prefill and training), and a test holds them
//! equal.

use candle_core::{DType, Device, Tensor, D};

/// Which elements of a head vector form a rotation pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(2i, 2i+1)` (GGUF Llama/Mistral weights).
    Interleaved,
    /// Pairs `(i, i + d/2)` (Hugging Face weights, GGUF Qwen2, the Attention-Gate).
    Halves,
}

/// Precomputed inverse frequencies for one head dimension, and the layout they rotate.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f64>,
    layout: RopeLayout,
}

impl Rope {
    /// The unscaled frequencies `theta^(-2i/head_dim)`, `i < head_dim / 2`.
    pub fn new(head_dim: usize, theta: f32, layout: RopeLayout) -> Self {
        Self::scaled(head_dim, theta, layout, |f| f)
    }

    /// The frequencies `scale(theta^(-2i/head_dim))`, `i < head_dim / 2`: a model's frequency
    /// scaling (linear, Llama 3) maps each base frequency.
    pub fn scaled(
        head_dim: usize,
        theta: f32,
        layout: RopeLayout,
        scale: impl Fn(f64) -> f64,
    ) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| scale(1.0 / f64::from(theta).powf(2.0 * i as f64 / head_dim as f64)))
            .collect();
        Rope { inv_freq, layout }
    }

    /// The inverse frequencies, one per rotation pair (`head_dim / 2`).
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// Which elements form a rotation pair.
    pub fn layout(&self) -> RopeLayout {
        self.layout
    }

    /// Rotates `x` (`[positions.len(), heads, head_dim]`, token-major) in place.
    pub fn apply(&self, x: &mut [f32], heads: usize, positions: &[u32]) {
        self.apply_grouped(x, heads, heads, |t, _| f64::from(positions[t]));
    }

    /// Rotates `x` (`[n, heads, head_dim]`, token-major) in place, the heads of row `t` in
    /// groups of `group` consecutive heads, group `g` at position `position(t, g)` (the cache
    /// positions mode rotates each KV head's group for its own slot).
    pub fn apply_grouped(
        &self,
        x: &mut [f32],
        heads: usize,
        group: usize,
        position: impl Fn(usize, usize) -> f64,
    ) {
        let head_dim = 2 * self.inv_freq.len();
        let (row_len, group_len) = (heads * head_dim, group.max(1) * head_dim);
        if row_len == 0 {
            return;
        }
        let mut cos_sin = vec![(0f32, 0f32); self.inv_freq.len()];
        for (t, row) in x.chunks_exact_mut(row_len).enumerate() {
            for (g, part) in row.chunks_mut(group_len).enumerate() {
                self.angles(position(t, g), &mut cos_sin);
                self.rotate_heads(part, &cos_sin);
            }
        }
    }

    /// Rotates every `[head_dim]` vector of `x` by `delta` positions (rotations compose: a key
    /// rotated for position `p` becomes the key for `p + delta`).
    pub fn rotate_by(&self, x: &mut [f32], delta: i64) {
        let mut cos_sin = vec![(0f32, 0f32); self.inv_freq.len()];
        self.angles(delta as f64, &mut cos_sin);
        self.rotate_heads(x, &cos_sin);
    }

    /// `(cos, sin)` of `position × inv_freq[i]` for each pair `i` of `cos_sin` (computed in
    /// f64, rounded to f32): the factors [`Rope::rotate_heads`] applies, worth keeping when
    /// several calls rotate for one position.
    pub fn angles(&self, position: f64, cos_sin: &mut [(f32, f32)]) {
        for (cs, f) in cos_sin.iter_mut().zip(&self.inv_freq) {
            let (s, c) = (position * f).sin_cos();
            *cs = (c as f32, s as f32);
        }
    }

    /// Rotates every `[head_dim]` vector of `x` in place by the factors of [`Rope::angles`].
    pub fn rotate_heads(&self, x: &mut [f32], cos_sin: &[(f32, f32)]) {
        let half = cos_sin.len();
        if half == 0 {
            return;
        }
        for head in x.chunks_exact_mut(2 * half) {
            for (i, &(c, s)) in cos_sin.iter().enumerate() {
                let (a, b) = match self.layout {
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                    RopeLayout::Halves => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }
}

/// `cos` and `sin` of a run of positions times each inverse frequency, `[T, head_dim / 2]` each
/// in one dtype: built once per forward and shared by every query and key rotated in it.
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The f32 tables of positions `0..t`.
    pub fn tables(&self, t: usize, device: &Device) -> candle_core::Result<RopeTables> {
        let positions: Vec<u32> = (0..t as u32).collect();
        self.tables_at(&positions, DType::F32, device)
    }

    /// The tables of `positions` in `dtype` (angles, `cos` and `sin` in f64, then cast once).
    pub fn tables_at(
        &self,
        positions: &[u32],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<RopeTables> {
        let freqs = &self.inv_freq;
        let angles: Vec<f64> = positions
            .iter()
            .flat_map(|&p| freqs.iter().map(move |&f| f64::from(p) * f))
            .collect();
        let table = |f: fn(f64) -> f64| -> candle_core::Result<Tensor> {
            let v: Vec<f64> = angles.iter().map(|&a| f(a)).collect();
            Tensor::from_vec(v, (positions.len(), freqs.len()), device)?.to_dtype(dtype)
        };
        Ok(RopeTables {
            cos: table(f64::cos)?,
            sin: table(f64::sin)?,
        })
    }

    /// RoPE of `x: [B, H, T, head_dim]` at the `T` positions of `tables`, in this layout, with
    /// differentiable tensor ops (in the tables' dtype, which must be `x`'s).
    pub fn rotate_tensor(&self, x: &Tensor, tables: &RopeTables) -> candle_core::Result<Tensor> {
        let (b, h, t, hd) = x.dims4()?;
        let half = hd / 2;
        let (cos, sin) = (&tables.cos, &tables.sin);
        match self.layout {
            RopeLayout::Halves => {
                let (cos, sin) = (cos.reshape((1, 1, t, half))?, sin.reshape((1, 1, t, half))?);
                let x1 = x.narrow(D::Minus1, 0, half)?;
                let x2 = x.narrow(D::Minus1, half, half)?;
                let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
                let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
                Tensor::cat(&[r1, r2], D::Minus1)
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
                Tensor::cat(&[r0, r1], D::Minus1)?.reshape((b, h, t, hd))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_agree_after_permutation() {
        // Permuting a head from halves to interleaved order and rotating gives the permuted result.
        let d = 8;
        let rope_h = Rope::new(d, 10_000.0, RopeLayout::Halves);
        let rope_i = Rope::new(d, 10_000.0, RopeLayout::Interleaved);
        let x: Vec<f32> = (0..d).map(|i| i as f32 * 0.3 - 1.0).collect();
        let perm =
            |v: &[f32]| -> Vec<f32> { (0..d / 2).flat_map(|i| [v[i], v[i + d / 2]]).collect() };
        let mut h = x.clone();
        rope_h.apply(&mut h, 1, &[37]);
        let mut i = perm(&x);
        rope_i.apply(&mut i, 1, &[37]);
        for (a, b) in perm(&h).iter().zip(&i) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn rotation_preserves_norm_and_relative_positions() {
        let d = 16;
        let rope = Rope::new(d, 10_000.0, RopeLayout::Halves);
        let q: Vec<f32> = (0..d).map(|i| (i as f32).sin()).collect();
        let k: Vec<f32> = (0..d).map(|i| (i as f32 * 0.7).cos()).collect();
        let dot_at = |pq: u32, pk: u32| {
            let (mut a, mut b) = (q.clone(), k.clone());
            rope.apply(&mut a, 1, &[pq]);
            rope.apply(&mut b, 1, &[pk]);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((dot_at(10, 3) - dot_at(107, 100)).abs() < 1e-4);
        let mut r = q.clone();
        rope.apply(&mut r, 1, &[5000]);
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!((n(&r) - n(&q)).abs() < 1e-4);
    }

    #[test]
    fn rotations_compose_and_groups_get_their_own_positions() {
        for layout in [RopeLayout::Halves, RopeLayout::Interleaved] {
            let rope = Rope::new(8, 10_000.0, layout);
            let x: Vec<f32> = (0..8).map(|i| (i as f32 * 0.9).cos()).collect();
            let mut at_30 = x.clone();
            rope.apply(&mut at_30, 1, &[30]);
            // A key rotated for 30, moved back by 12 slots, is the key for 18.
            let mut moved = at_30.clone();
            rope.rotate_by(&mut moved, -12);
            let mut at_18 = x.clone();
            rope.apply(&mut at_18, 1, &[18]);
            for (a, b) in moved.iter().zip(&at_18) {
                assert!((a - b).abs() < 1e-5, "{layout:?}");
            }
            // Two groups of two heads, one row: group g at position 5 + 10 g.
            let mut grouped: Vec<f32> = x.iter().cycle().take(32).copied().collect();
            rope.apply_grouped(&mut grouped, 4, 2, |_, g| 5.0 + 10.0 * g as f64);
            let (mut at_5, mut at_15) = (x.clone(), x.clone());
            rope.apply(&mut at_5, 1, &[5]);
            rope.apply(&mut at_15, 1, &[15]);
            let expected: Vec<f32> = [&at_5, &at_5, &at_15, &at_15]
                .into_iter()
                .flatten()
                .copied()
                .collect();
            assert_eq!(grouped, expected);
        }
    }

    /// The tensor rotation at any positions (the gate's prefill: not `0..T`) equals the in-place
    /// one (the gate's decode step, the decoder) in both layouts.
    #[test]
    fn tensor_rotation_equals_the_in_place_one() {
        for layout in [RopeLayout::Halves, RopeLayout::Interleaved] {
            let rope = Rope::new(8, 10_000.0, layout);
            let heads = 3;
            for positions in [vec![0u32, 1, 2, 3, 4], vec![7, 8, 20, 900, 4096]] {
                let t = positions.len();
                let x: Vec<f32> = (0..heads * t * 8)
                    .map(|i| (i as f32 * 0.37).sin())
                    .collect();
                // `x` is `[1, H, T, d]`; the in-place rotation takes token-major `[T, H, d]`.
                let tensor = Tensor::from_vec(x, (1, heads, t, 8), &Device::Cpu).unwrap();
                let tables = rope
                    .tables_at(&positions, DType::F32, &Device::Cpu)
                    .unwrap();
                let rotated = rope.rotate_tensor(&tensor, &tables).unwrap();
                let to_token_major = |x: &Tensor| -> Vec<f32> {
                    let x = x.transpose(1, 2).and_then(|x| x.flatten_all());
                    x.and_then(|x| x.to_vec1()).unwrap()
                };
                let mut token_major = to_token_major(&tensor);
                rope.apply(&mut token_major, heads, &positions);
                let got = to_token_major(&rotated);
                for (a, b) in got.iter().zip(&token_major) {
                    assert!((a - b).abs() < 1e-6, "{layout:?}: {a} vs {b}");
                }
            }
        }
    }

    /// The rotate-half tensor rotation equals candle's non-interleaved `rope` kernel.
    #[test]
    fn halves_match_the_candle_kernel() {
        let rope = Rope::new(8, 500.0, RopeLayout::Halves);
        let positions = [0u32, 3, 4, 17, 900];
        let n = 2 * positions.len() * 8;
        let x = Tensor::from_vec(
            (0..n).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(),
            (1, 2, 5, 8),
            &Device::Cpu,
        )
        .unwrap();
        let tables = rope
            .tables_at(&positions, DType::F32, &Device::Cpu)
            .unwrap();
        let ours = rope.rotate_tensor(&x, &tables).unwrap();
        let ang: Vec<f32> = positions
            .iter()
            .flat_map(|&p| {
                rope.inv_freq()
                    .iter()
                    .map(move |f| (f64::from(p) * f) as f32)
            })
            .collect();
        let table = |f: fn(f32) -> f32| {
            Tensor::from_vec(
                ang.iter().map(|&a| f(a)).collect::<Vec<_>>(),
                (5, 4),
                &Device::Cpu,
            )
            .unwrap()
        };
        let theirs = candle_nn::rotary_emb::rope(&x, &table(f32::cos), &table(f32::sin)).unwrap();
        let d = crate::testing::max_abs_diff(&ours, &theirs).unwrap();
        // Our angles are computed in f64, the reference ones in f32 (position 900: ~1e-6 apart).
        assert!(d < 1e-5, "max difference {d}");
    }
}
