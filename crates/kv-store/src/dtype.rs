//! Element types stored in KV blocks ([`KvDtype`]) and typed read-only views of stored elements
//! ([`KvSlice`]), with the f32 conversions the kernels use.
//!
//! Invariants: f16/bf16 are converted to f32 on the fly (never stored widened); the byte views
//! handed to [`KvSlice::from_bytes`] and [`write_f32`] are aligned for the element type and a whole
//! number of elements long (the pool's 64-byte aligned block buffers guarantee both).

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
}

impl KvDtype {
    /// Bytes of one element.
    pub const fn size_bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::BF16 => 2,
        }
    }

    /// Lower-case name (`f32`, `f16`, `bf16`), as accepted by [`FromStr`].
    pub const fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::BF16 => "bf16",
        }
    }

    /// Rounds `x` to this dtype and back: the value a stored-then-read element will have.
    pub fn round(self, x: f32) -> f32 {
        match self {
            KvDtype::F32 => x,
            KvDtype::F16 => f16::from_f32(x).to_f32(),
            KvDtype::BF16 => bf16::from_f32(x).to_f32(),
        }
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
            _ => Err(KvError::UnknownDtype(s.to_string())),
        }
    }
}

/// A borrowed run of stored elements of one dtype (keys or values, row-major `[len, head_dim]`).
#[derive(Debug, Clone, Copy)]
pub enum KvSlice<'a> {
    /// f32 elements.
    F32(&'a [f32]),
    /// f16 elements.
    F16(&'a [f16]),
    /// bf16 elements.
    BF16(&'a [bf16]),
}

impl<'a> KvSlice<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            KvSlice::F32(s) => s.len(),
            KvSlice::F16(s) => s.len(),
            KvSlice::BF16(s) => s.len(),
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
        }
    }

    /// Views aligned bytes as elements of `dtype` (internal: block buffers are 64-byte aligned).
    pub(crate) fn from_bytes(dtype: KvDtype, bytes: &'a [u8]) -> Self {
        match dtype {
            KvDtype::F32 => KvSlice::F32(bytemuck::cast_slice(bytes)),
            KvDtype::F16 => KvSlice::F16(bytemuck::cast_slice(bytes)),
            KvDtype::BF16 => KvSlice::BF16(bytemuck::cast_slice(bytes)),
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

/// Writes `src` converted to `dtype` into `dst`, which holds exactly `src.len()` elements' bytes.
pub(crate) fn write_f32(dtype: KvDtype, dst: &mut [u8], src: &[f32]) {
    match dtype {
        KvDtype::F32 => bytemuck::cast_slice_mut::<u8, f32>(dst).copy_from_slice(src),
        KvDtype::F16 => bytemuck::cast_slice_mut::<u8, f16>(dst).convert_from_f32_slice(src),
        KvDtype::BF16 => bytemuck::cast_slice_mut::<u8, bf16>(dst).convert_from_f32_slice(src),
    }
}
