//! Element types stored in KV blocks ([`KvDtype`]) and typed read-only views of stored entries
//! ([`KvSlice`]), with the one encode ([`write_f32`]) and decode ([`KvSlice::view`]) path per dtype
//! that everything reading or writing stored keys and values goes through (attention, reads,
//! key norms, re-rotation).
//!
//! Formats: f32, f16 and bf16 store elements. The block-quantized dtypes store each key or value
//! vector (an *entry* of `head_dim` values) as codes followed by one f16 scale per 32-value block
//! (the last block may be shorter):
//! - [`KvDtype::Q8_0`]: `head_dim` signed 8-bit codes, value = scale × code, scale = max|x| / 127
//!   of the block (rounded to f16), codes rounded to nearest; 64 values take 68 bytes (0.53×
//!   f16);
//! - [`KvDtype::Q4_0`]: 4-bit codes, two per byte (value `2i` in the low nibble), value =
//!   scale × (code − 8) with scale = x_max / −8 where x_max is the block's value of largest
//!   magnitude (llama.cpp's q4_0 rule, so the extreme value is exact); 64 values take 36 bytes
//!   (0.28× f16).
//!
//! Invariants: stored data is converted to f32 on the fly (never stored widened); the byte views
//! handed to [`KvSlice::from_bytes`] and [`write_f32`] are a whole number of entries, aligned for
//! the element type (the pool's 64-byte aligned block buffers and entry sizes guarantee both).

use std::fmt;
use std::str::FromStr;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::{simd, KvError};

/// Element type of the keys and values stored in the pool's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvDtype {
    /// 32-bit IEEE float.
    #[default]
    F32,
    /// 16-bit IEEE half float.
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
    /// 8-bit codes with an f16 scale per 32 values of an entry (see the module docs).
    Q8_0,
    /// 4-bit codes with an f16 scale per 32 values of an entry (see the module docs).
    Q4_0,
}

/// Values per scale of the block-quantized dtypes ([`KvDtype::Q8_0`], [`KvDtype::Q4_0`]).
pub const Q8_BLOCK: usize = 32;

impl KvDtype {
    /// Every dtype, in the order the CLI lists them.
    pub const ALL: [KvDtype; 5] = [
        KvDtype::F32,
        KvDtype::F16,
        KvDtype::BF16,
        KvDtype::Q8_0,
        KvDtype::Q4_0,
    ];

    /// Bytes of one stored entry (a key or a value vector of `head_dim` values).
    pub const fn entry_bytes(self, head_dim: usize) -> usize {
        match self {
            KvDtype::F32 => 4 * head_dim,
            KvDtype::F16 | KvDtype::BF16 => 2 * head_dim,
            KvDtype::Q8_0 => head_dim + 2 * head_dim.div_ceil(Q8_BLOCK),
            KvDtype::Q4_0 => head_dim.div_ceil(2) + 2 * head_dim.div_ceil(Q8_BLOCK),
        }
    }

    /// Lower-case name (`f32`, `f16`, `bf16`, `q8_0`), as accepted by [`FromStr`].
    pub const fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::BF16 => "bf16",
            KvDtype::Q8_0 => "q8_0",
            KvDtype::Q4_0 => "q4_0",
        }
    }

    /// Rounds one entry to this dtype and back in place: the values a stored-then-read entry has
    /// (the same encode and decode as the store).
    pub fn round_entry(self, entry: &mut [f32]) {
        let mut bytes = vec![0u8; self.entry_bytes(entry.len())];
        write_f32(self, entry.len(), &mut bytes, entry);
        let mut out = vec![0.0; entry.len()];
        let view = KvSlice::from_bytes(self, entry.len(), &bytes).view(0, 1, entry.len(), &mut out);
        entry.copy_from_slice(view);
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvDtype {
    type Err = KvError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(KvDtype::F32),
            "f16" | "float16" | "half" => Ok(KvDtype::F16),
            "bf16" | "bfloat16" => Ok(KvDtype::BF16),
            "q8_0" | "q8" => Ok(KvDtype::Q8_0),
            "q4_0" | "q4" => Ok(KvDtype::Q4_0),
            _ => Err(KvError::UnknownDtype(s.to_string())),
        }
    }
}

/// A borrowed run of stored entries of one dtype (keys or values, row-major `[len, head_dim]`).
#[derive(Debug, Clone, Copy)]
pub enum KvSlice<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    BF16(&'a [bf16]),
    /// Block-quantized entries ([`KvDtype::Q8_0`], [`KvDtype::Q4_0`]) of `head_dim` values each.
    Quantized {
        /// [`KvDtype::Q8_0`] or [`KvDtype::Q4_0`].
        dtype: KvDtype,
        /// The entries' bytes (a whole number of entries).
        bytes: &'a [u8],
        /// Values per entry.
        head_dim: usize,
    },
}

impl<'a> KvSlice<'a> {
    /// The stored bytes of the run.
    fn bytes(&self) -> &'a [u8] {
        match *self {
            KvSlice::F32(s) => bytemuck::cast_slice(s),
            KvSlice::F16(s) => bytemuck::cast_slice(s),
            KvSlice::BF16(s) => bytemuck::cast_slice(s),
            KvSlice::Quantized { bytes, .. } => bytes,
        }
    }

    /// Asks the CPU to start loading the run into its L2 cache (a hint: no effect on results).
    pub(crate) fn prefetch(&self) {
        simd::prefetch_l2(self.bytes());
    }

    /// Number of values (entries × head_dim).
    pub fn len(&self) -> usize {
        match self {
            KvSlice::F32(s) => s.len(),
            KvSlice::F16(s) => s.len(),
            KvSlice::BF16(s) => s.len(),
            KvSlice::Quantized {
                dtype,
                bytes,
                head_dim,
            } => bytes.len() / dtype.entry_bytes(*head_dim).max(1) * head_dim,
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> KvDtype {
        match self {
            KvSlice::F32(_) => KvDtype::F32,
            KvSlice::F16(_) => KvDtype::F16,
            KvSlice::BF16(_) => KvDtype::BF16,
            KvSlice::Quantized { dtype, .. } => *dtype,
        }
    }

    /// Views aligned bytes as entries of `dtype` (internal: block buffers are 64-byte aligned).
    pub(crate) fn from_bytes(dtype: KvDtype, head_dim: usize, bytes: &'a [u8]) -> Self {
        match dtype {
            KvDtype::F32 => KvSlice::F32(bytemuck::cast_slice(bytes)),
            KvDtype::F16 => KvSlice::F16(bytemuck::cast_slice(bytes)),
            KvDtype::BF16 => KvSlice::BF16(bytemuck::cast_slice(bytes)),
            KvDtype::Q8_0 | KvDtype::Q4_0 => KvSlice::Quantized {
                dtype,
                bytes,
                head_dim,
            },
        }
    }

    /// f32 view of rows `start..end` (each `d` elements): borrowed in place for f32, converted
    /// into `scratch` (at least `(end - start) * d` elements) otherwise.
    pub(crate) fn view<'s>(
        &self,
        start: usize,
        end: usize,
        d: usize,
        scratch: &'s mut [f32],
    ) -> &'s [f32]
    where
        'a: 's,
    {
        let (lo, hi) = (start * d, end * d);
        match self {
            KvSlice::F32(s) => &s[lo..hi],
            KvSlice::F16(s) => {
                let dst = &mut scratch[..hi - lo];
                s[lo..hi].convert_to_f32_slice(dst);
                dst
            }
            KvSlice::BF16(s) => {
                let dst = &mut scratch[..hi - lo];
                s[lo..hi].convert_to_f32_slice(dst);
                dst
            }
            KvSlice::Quantized {
                dtype,
                bytes,
                head_dim,
            } => {
                let eb = dtype.entry_bytes(*head_dim);
                let dst = &mut scratch[..hi - lo];
                let entries = dst
                    .chunks_exact_mut(d)
                    .zip(bytes[start * eb..end * eb].chunks_exact(eb));
                match dtype {
                    KvDtype::Q4_0 => entries.for_each(|(out, e)| decode_q4_0(e, out)),
                    _ => entries.for_each(|(out, e)| decode_q8_0(e, out)),
                }
                dst
            }
        }
    }
}

impl KvSlice<'_> {
    /// Key rows `start..start + n` (`n <= CHUNK`, each `d` elements) as f32, transposed into `kt`
    /// (`[d, CHUNK]`, lanes past `n` zero): converted in registers where the CPU allows, through
    /// `scratch` (`CHUNK * d` floats) otherwise.
    pub(crate) fn keys_transposed(
        &self,
        start: usize,
        n: usize,
        d: usize,
        scratch: &mut [f32],
        kt: &mut [f32],
    ) {
        match self {
            KvSlice::F16(s) => {
                simd::transpose_chunk_f16(&s[start * d..(start + n) * d], n, d, scratch, kt)
            }
            _ => {
                let rows = self.view(start, start + n, d, scratch);
                simd::transpose_chunk(rows, n, d, kt);
            }
        }
    }

    /// `acc[q * d..] += sum_j p[q * CHUNK + j] * row_j` over value rows `start..start + n` (see
    /// [`simd::weighted_values`]); `scratch` as in [`KvSlice::keys_transposed`].
    pub(crate) fn add_weighted(
        &self,
        start: usize,
        n: usize,
        d: usize,
        p: &[f32],
        scratch: &mut [f32],
        acc: &mut [f32],
    ) {
        match self {
            KvSlice::F16(s) => {
                simd::weighted_values_f16(p, &s[start * d..(start + n) * d], n, d, scratch, acc)
            }
            _ => {
                let rows = self.view(start, start + n, d, scratch);
                simd::weighted_values(p, rows, n, d, acc);
            }
        }
    }
}

/// Writes the entries of `src` (`head_dim` values each) encoded as `dtype` into `dst`, which
/// holds exactly their bytes.
pub(crate) fn write_f32(dtype: KvDtype, head_dim: usize, dst: &mut [u8], src: &[f32]) {
    match dtype {
        KvDtype::F32 => bytemuck::cast_slice_mut::<u8, f32>(dst).copy_from_slice(src),
        KvDtype::F16 => bytemuck::cast_slice_mut::<u8, f16>(dst).convert_from_f32_slice(src),
        KvDtype::BF16 => bytemuck::cast_slice_mut::<u8, bf16>(dst).convert_from_f32_slice(src),
        KvDtype::Q8_0 | KvDtype::Q4_0 => {
            let eb = dtype.entry_bytes(head_dim);
            for (entry, x) in dst.chunks_exact_mut(eb).zip(src.chunks_exact(head_dim)) {
                if dtype == KvDtype::Q4_0 {
                    encode_q4_0(x, entry);
                } else {
                    encode_q8_0(x, entry);
                }
            }
        }
    }
}

/// One [`KvDtype::Q4_0`] entry from its values: nibbles, then one f16 scale per block.
fn encode_q4_0(x: &[f32], entry: &mut [u8]) {
    let (codes, scales) = entry.split_at_mut(x.len().div_ceil(2));
    codes.fill(0);
    for (b, (xb, sb)) in x
        .chunks(Q8_BLOCK)
        .zip(scales.chunks_exact_mut(2))
        .enumerate()
    {
        // The value of largest magnitude, with its sign, maps to code 0 (value -8 * scale).
        let extreme = xb
            .iter()
            .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let scale = f16::from_f32(extreme / -8.0);
        let s = scale.to_f32();
        let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
        for (i, &v) in xb.iter().enumerate() {
            // round(v / s) + 8 in [0, 16]; 16 (rounding past +8 scales) clamps to 15, NaN to 8.
            let q = ((v * inv).round() + 8.0).clamp(0.0, 15.0) as u8;
            let at = b * Q8_BLOCK + i;
            codes[at / 2] |= q << (4 * (at % 2));
        }
        sb.copy_from_slice(&scale.to_le_bytes());
    }
}

/// The values of one [`KvDtype::Q4_0`] entry.
#[inline]
fn decode_q4_0(entry: &[u8], out: &mut [f32]) {
    let (codes, scales) = entry.split_at(out.len().div_ceil(2));
    for (b, (ob, sb)) in out
        .chunks_mut(Q8_BLOCK)
        .zip(scales.chunks_exact(2))
        .enumerate()
    {
        let s = f16::from_le_bytes([sb[0], sb[1]]).to_f32();
        for (i, o) in ob.iter_mut().enumerate() {
            let at = b * Q8_BLOCK + i;
            let q = (codes[at / 2] >> (4 * (at % 2))) & 0x0f;
            *o = (f32::from(q) - 8.0) * s;
        }
    }
}

/// One [`KvDtype::Q8_0`] entry from its values: codes, then one f16 scale per block.
fn encode_q8_0(x: &[f32], entry: &mut [u8]) {
    let (codes, scales) = entry.split_at_mut(x.len());
    for ((xb, cb), sb) in x
        .chunks(Q8_BLOCK)
        .zip(codes.chunks_mut(Q8_BLOCK))
        .zip(scales.chunks_exact_mut(2))
    {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = f16::from_f32(amax / 127.0);
        let s = scale.to_f32();
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for (c, &v) in cb.iter_mut().zip(xb) {
            // |v| / s <= 127 up to the f16 rounding of s; the clamp keeps a NaN (0) and an
            // overflow in range.
            *c = (v * inv).round().clamp(-127.0, 127.0) as i8 as u8;
        }
        sb.copy_from_slice(&scale.to_le_bytes());
    }
}

/// The values of one [`KvDtype::Q8_0`] entry.
#[inline]
fn decode_q8_0(entry: &[u8], out: &mut [f32]) {
    let (codes, scales) = entry.split_at(out.len());
    for ((ob, cb), sb) in out
        .chunks_mut(Q8_BLOCK)
        .zip(codes.chunks(Q8_BLOCK))
        .zip(scales.chunks_exact(2))
    {
        let s = f16::from_le_bytes([sb[0], sb[1]]).to_f32();
        for (o, &c) in ob.iter_mut().zip(cb) {
            *o = f32::from(c as i8) * s;
        }
    }
}
