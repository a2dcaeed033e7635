//! Rotary position embedding applied in place to token-major `[n, heads, head_dim]` buffers.
//!
//! Two layouts exist in the wild: llama.cpp's GGUF files permute the q/k rows so that rotation
//! pairs are adjacent (`Interleaved`: pairs `(2i, 2i+1)`), while Hugging Face checkpoints rotate
//! the two halves (`Halves`: pairs `(i, i + d/2)`). Both give identical attention when paired with
//! their weights. Angles are computed in f64 so that large positions stay exact.
//!
//! The same rotation exists twice here, never elsewhere: in place on f32 slices for the decoder
//! ([`Rope::apply`]), and with candle tensor ops for the differentiable training forward
//! ([`Rope::rotate_tensor`], positions `0..T` from [`Rope::tables`]); a test holds them equal.

use candle_core::{Device, Tensor, D};

use crate::config::{ModelConfig, RopeScaling};

/// Which elements of a head vector form a rotation pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(2i, 2i+1)` (GGUF Llama/Mistral weights).
    Interleaved,
    /// Pairs `(i, i + d/2)` (Hugging Face weights, GGUF Qwen2).
    Halves,
}

/// Precomputed inverse frequencies for one head dimension.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f64>,
    layout: RopeLayout,
}

impl Rope {
    /// Frequencies for `cfg` (with its scaling) in the given layout.
    pub fn new(cfg: &ModelConfig, layout: RopeLayout) -> Self {
        Self::with_dims(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.rope_scaling.as_ref(),
            layout,
        )
    }

    /// Frequencies for an arbitrary head dimension and base.
    pub fn with_dims(
        head_dim: usize,
        theta: f32,
        scaling: Option<&RopeScaling>,
        layout: RopeLayout,
    ) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| {
                let f = 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64);
                match scaling {
                    None => f,
                    Some(RopeScaling::Linear { factor }) => f / *factor as f64,
                    Some(RopeScaling::Llama3(s)) => {
                        let (factor, low, high) = (
                            s.factor as f64,
                            s.low_freq_factor as f64,
                            s.high_freq_factor as f64,
                        );
                        let orig = s.original_max_position as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let (low_wavelen, high_wavelen) = (orig / low, orig / high);
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (orig / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                }
            })
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
                for head in part.chunks_exact_mut(head_dim) {
                    self.rotate(head, &cos_sin);
                }
            }
        }
    }

    /// Rotates every `[head_dim]` vector of `x` by `delta` positions (rotations compose: a key
    /// rotated for position `p` becomes the key for `p + delta`).
    pub fn rotate_by(&self, x: &mut [f32], delta: i64) {
        let head_dim = 2 * self.inv_freq.len();
        if head_dim == 0 {
            return;
        }
        let mut cos_sin = vec![(0f32, 0f32); self.inv_freq.len()];
        self.angles(delta as f64, &mut cos_sin);
        for head in x.chunks_exact_mut(head_dim) {
            self.rotate(head, &cos_sin);
        }
    }

    /// `(cos, sin)` of `position × inv_freq`, computed in f64.
    fn angles(&self, position: f64, cos_sin: &mut [(f32, f32)]) {
        for (cs, f) in cos_sin.iter_mut().zip(&self.inv_freq) {
            let (s, c) = (position * f).sin_cos();
            *cs = (c as f32, s as f32);
        }
    }

    /// Rotates one head vector by precomputed angles.
    fn rotate(&self, head: &mut [f32], cos_sin: &[(f32, f32)]) {
        let half = cos_sin.len();
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

/// `cos` and `sin` of positions `0..T` times each inverse frequency, `[T, head_dim / 2]` f32
/// each: built once per training forward and shared by every layer's queries and keys.
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The tables of positions `0..t` (angles in f64, like [`Rope::apply`]).
    pub fn tables(&self, t: usize, device: &Device) -> candle_core::Result<RopeTables> {
        let freqs = &self.inv_freq;
        let angles: Vec<f64> = (0..t)
            .flat_map(|p| freqs.iter().map(move |&f| p as f64 * f))
            .collect();
        let table = |f: fn(f64) -> f64| -> candle_core::Result<Tensor> {
            let v: Vec<f32> = angles.iter().map(|&a| f(a) as f32).collect();
            Tensor::from_vec(v, (t, freqs.len()), device)
        };
        Ok(RopeTables {
            cos: table(f64::cos)?,
            sin: table(f64::sin)?,
        })
    }

    /// RoPE of `x: [B, H, T, head_dim]` at positions `0..T` (`tables` of the same `T`) in this
    /// layout, with differentiable tensor ops.
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
        let rope_h = Rope::with_dims(d, 10_000.0, None, RopeLayout::Halves);
        let rope_i = Rope::with_dims(d, 10_000.0, None, RopeLayout::Interleaved);
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
        let rope = Rope::with_dims(d, 10_000.0, None, RopeLayout::Halves);
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
            let rope = Rope::with_dims(8, 10_000.0, None, layout);
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

    #[test]
    fn tensor_rotation_equals_the_in_place_one() {
        for layout in [RopeLayout::Halves, RopeLayout::Interleaved] {
            let rope = Rope::with_dims(8, 10_000.0, None, layout);
            let (heads, t) = (3, 5);
            let x: Vec<f32> = (0..heads * t * 8)
                .map(|i| (i as f32 * 0.37).sin())
                .collect();
            // `x` is `[1, H, T, d]`; the in-place rotation takes token-major `[T, H, d]`.
            let tensor = Tensor::from_vec(x.clone(), (1, heads, t, 8), &Device::Cpu).unwrap();
            let tables = rope.tables(t, &Device::Cpu).unwrap();
            let rotated = rope.rotate_tensor(&tensor, &tables).unwrap();
            let to_token_major = |x: &Tensor| -> Vec<f32> {
                let x = x.transpose(1, 2).and_then(|x| x.flatten_all());
                x.and_then(|x| x.to_vec1()).unwrap()
            };
            let mut token_major = to_token_major(&tensor);
            let positions: Vec<u32> = (0..t as u32).collect();
            rope.apply(&mut token_major, heads, &positions);
            let got = to_token_major(&rotated);
            for (a, b) in got.iter().zip(&token_major) {
                assert!((a - b).abs() < 1e-6, "{layout:?}: {a} vs {b}");
            }
        }
    }
}
