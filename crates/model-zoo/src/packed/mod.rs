//! Quantized projection weights repacked for AVX-512 VNNI ([`PackedMatrix`]): GGUF's Q4_0, Q4_1
//! and Q8_0 rows regrouped into 16-row tiles, multiplied by 8-bit quantized activations with
//! `vpdpbusd` (16 rows × 4 values per instruction), one pass over the weights for every
//! activation row of the call (decode: one row; prefill: register blocks of four rows).
//!
//! Why: candle 0.11 has no SIMD kernel for Q4_1 (the default model's type) and its Q8_0 dot runs
//! one row at a time with a horizontal sum per row; re-quantizing Q4_1 to Q8_0 also made decode
//! read 1.7× the bytes the file holds. Packing keeps the file's codes exactly (no re-quantization)
//! and runs about a fifth of the instructions per weight (see docs/benchmarks.md).
//!
//! Layout: tiles of 16 rows × `cols` columns (`blocks = cols / 32` quantization blocks), one
//! after the other; a tile is a run of 64-byte aligned groups, each a header line and codes: for
//! [`PackedKind::Q4`] the header holds one block's 16 scales `d` and 16 offsets `m` (f16) and the
//! codes `[4][16 rows][4 bytes]` follow; for [`PackedKind::Q8`] it holds the scales of two blocks
//! and their codes `[2][8][16 rows][4 bytes]` follow. A pass over a matrix is thus one sequential
//! stream. Q4 codes are unsigned nibbles `u` (value `d·u + m`; Q4_0 stores `m = -8d`), a byte holding
//! values `8g + j` (low nibble) and `8g + 4 + j` (high nibble) for `j < 4`; Q8 codes are the
//! signed values plus 128 (value `d·(u - 128)`).
//!
//! Activations ([`QuantizedRows`]) are quantized per row and 32-value block to `i8` with scale
//! `amax / 127` (rounded to nearest even), and their code sums kept in `i32`. Invariants: the
//! packed codes and scales are exactly the file's; rows past `rows` in the last tile are zero
//! and never written out; the SIMD kernel and the portable one compute the same integer dot
//! products and differ only in f32 summation order.
//!
//! Files: this one holds the layout, packing and the portable kernel; `vnni.rs` the AVX-512
//! kernel; `tests.rs` the tests.

use candle_core::quantized::GgmlDType;

use crate::cpu_pool::CpuPool;
use half::f16;

/// Rows per tile (one 512-bit register of i32/f32 lanes).
pub const TILE_ROWS: usize = 16;
/// Values per quantization block.
pub const BLOCK: usize = 32;

/// The code format of a [`PackedMatrix`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackedKind {
    /// 4-bit unsigned codes with a scale and an offset per (row, block): Q4_1, and Q4_0.
    Q4,
    /// 8-bit codes with a scale per (row, block), stored offset by +128: Q8_0.
    Q8,
}

impl PackedKind {
    /// Bytes of the codes of one tile and block.
    const fn code_bytes(self) -> usize {
        match self {
            PackedKind::Q4 => TILE_ROWS * BLOCK / 2,
            PackedKind::Q8 => TILE_ROWS * BLOCK,
        }
    }

    /// The kind GGUF blocks of `dtype` pack into without loss, if any.
    pub fn for_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 | GgmlDType::Q4_1 => Some(PackedKind::Q4),
            GgmlDType::Q8_0 => Some(PackedKind::Q8),
            _ => None,
        }
    }
}

/// One cache line: the alignment unit of packed data.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A `[rows, cols]` weight matrix in 16-row tiles (see the module docs for the layout).
pub struct PackedMatrix {
    kind: PackedKind,
    rows: usize,
    cols: usize,
    data: Vec<Line>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("kind", &self.kind)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// Reads the f16 at byte `at` of `b`.
fn f16_at(b: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([b[at], b[at + 1]])
}

impl PackedMatrix {
    /// Whether this CPU runs the packed kernel (AVX-512 with VNNI); elsewhere weights stay in
    /// candle's formats.
    pub fn supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Packs the raw GGUF blocks of several matrices with the same column count, stacked by
    /// rows in order (e.g. q, k and v into one fused projection). `parts`: (dtype, rows, raw
    /// block bytes). `None` when a dtype does not pack (see [`PackedKind::for_ggml`]), the kinds
    /// differ, `cols` is not a multiple of 32 or a part's byte count does not match its shape.
    pub fn from_ggml_parts(cols: usize, parts: &[(GgmlDType, usize, &[u8])]) -> Option<Self> {
        let kind = PackedKind::for_ggml(parts.first()?.0)?;
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return None;
        }
        let blocks = cols / BLOCK;
        for &(dtype, rows, bytes) in parts {
            if PackedKind::for_ggml(dtype) != Some(kind)
                || bytes.len() != rows * blocks * dtype.type_size()
            {
                return None;
            }
        }
        let rows: usize = parts.iter().map(|p| p.1).sum();
        let mut m = PackedMatrix::zeroed(kind, rows, cols);
        let mut row0 = 0;
        for &(dtype, part_rows, bytes) in parts {
            let bs = dtype.type_size();
            for r in 0..part_rows {
                for b in 0..blocks {
                    let blk = &bytes[(r * blocks + b) * bs..(r * blocks + b + 1) * bs];
                    m.put_block(row0 + r, b, dtype, blk);
                }
            }
            row0 += part_rows;
        }
        Some(m)
    }

    fn zeroed(kind: PackedKind, rows: usize, cols: usize) -> Self {
        let mut m = PackedMatrix {
            kind,
            rows,
            cols,
            data: Vec::new(),
        };
        m.data = vec![Line([0; 64]); m.tiles() * m.tile_lines()];
        m
    }

    /// Stores GGUF block `blk` (of `dtype`) as block `b` of row `row`.
    fn put_block(&mut self, row: usize, b: usize, dtype: GgmlDType, blk: &[u8]) {
        let (t, r) = (row / TILE_ROWS, row % TILE_ROWS);
        let (d_at, m_at, codes_at) = self.offsets(t, b);
        let kind = self.kind;
        let bytes = self.bytes_mut();
        let d = f16_at(blk, 0);
        bytes[d_at + 2 * r..d_at + 2 * r + 2].copy_from_slice(&d.to_le_bytes());
        let mut u = [0u8; BLOCK];
        match dtype {
            GgmlDType::Q4_1 | GgmlDType::Q4_0 => {
                let (m, qs) = if dtype == GgmlDType::Q4_1 {
                    (f16_at(blk, 2), &blk[4..20])
                } else {
                    (f16::from_f32(-8.0 * d.to_f32()), &blk[2..18])
                };
                bytes[m_at + 2 * r..m_at + 2 * r + 2].copy_from_slice(&m.to_le_bytes());
                for j in 0..16 {
                    u[j] = qs[j] & 0x0f;
                    u[j + 16] = qs[j] >> 4;
                }
            }
            _ => {
                for (uj, &q) in u.iter_mut().zip(&blk[2..2 + BLOCK]) {
                    *uj = (q as i8 as i16 + 128) as u8;
                }
            }
        }
        let codes = &mut bytes[codes_at..codes_at + kind.code_bytes()];
        match kind {
            PackedKind::Q4 => {
                for g in 0..BLOCK / 8 {
                    for j in 0..4 {
                        codes[g * 64 + r * 4 + j] = u[8 * g + j] | (u[8 * g + 4 + j] << 4);
                    }
                }
            }
            PackedKind::Q8 => {
                for g in 0..BLOCK / 4 {
                    codes[g * 64 + r * 4..g * 64 + r * 4 + 4].copy_from_slice(&u[4 * g..4 * g + 4]);
                }
            }
        }
    }

    /// The code format.
    pub fn kind(&self) -> PackedKind {
        self.kind
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (what one pass over the weights reads).
    pub fn size_bytes(&self) -> usize {
        self.data.len() * 64
    }

    fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    fn tiles(&self) -> usize {
        self.rows.div_ceil(TILE_ROWS)
    }

    /// Blocks sharing one header line: Q4 keeps a block's 16 scales and 16 offsets there, Q8
    /// the scales of two blocks (whose codes follow in order).
    fn blocks_per_group(&self) -> usize {
        match self.kind {
            PackedKind::Q4 => 1,
            PackedKind::Q8 => 2,
        }
    }

    /// Bytes of one group: the header line, then the codes of its blocks.
    fn group_bytes(&self) -> usize {
        64 + self.blocks_per_group() * self.kind.code_bytes()
    }

    /// Header-and-codes groups per tile (the last one padded with zero codes).
    fn groups(&self) -> usize {
        self.blocks().div_ceil(self.blocks_per_group())
    }

    /// Lines per tile: its groups in order, so that a pass over the matrix is one sequential
    /// stream (measured 2× faster than separate scale and code sections, see the bench).
    fn tile_lines(&self) -> usize {
        self.groups() * self.group_bytes() / 64
    }

    /// Byte offsets of tile `t`'s scales, offsets (Q4 only) and codes for block `b`.
    fn offsets(&self, t: usize, b: usize) -> (usize, usize, usize) {
        let per = self.blocks_per_group();
        let (g, i) = (b / per, b % per);
        let at = (t * self.groups() + g) * self.group_bytes();
        (
            at + i * TILE_ROWS * 2,
            at + TILE_ROWS * 2,
            at + 64 + i * self.kind.code_bytes(),
        )
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes without padding.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr().cast::<u8>(), self.data.len() * 64) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.data.as_mut_ptr().cast::<u8>(),
                self.data.len() * 64,
            )
        }
    }

    /// Writes row `row` dequantized into `out` (`cols` values).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let (t, r) = (row / TILE_ROWS, row % TILE_ROWS);
        let bytes = self.bytes();
        for (b, dst) in out.chunks_exact_mut(BLOCK).enumerate() {
            let (d_at, m_at, codes_at) = self.offsets(t, b);
            let d = f16_at(bytes, d_at + 2 * r).to_f32();
            let codes = &bytes[codes_at..];
            match self.kind {
                PackedKind::Q4 => {
                    let m = f16_at(bytes, m_at + 2 * r).to_f32();
                    for (i, x) in dst.iter_mut().enumerate() {
                        let (g, j) = (i / 8, i % 8);
                        let byte = codes[g * 64 + r * 4 + j % 4];
                        let u = if j < 4 { byte & 0x0f } else { byte >> 4 };
                        *x = d * f32::from(u) + m;
                    }
                }
                PackedKind::Q8 => {
                    for (i, x) in dst.iter_mut().enumerate() {
                        let u = codes[(i / 4) * 64 + r * 4 + i % 4];
                        *x = d * (f32::from(u) - 128.0);
                    }
                }
            }
        }
    }

    /// The whole matrix dequantized, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, row);
        }
        out
    }

    /// `y = x Wᵀ` for `x: [m, cols]` row-major f32; returns `[m, rows]`. Runs on candle's CPU
    /// thread pool ([`CpuPool`]), split by tiles; every tile is read once for all `m` rows.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "packed matmul: input shape");
        let acts = QuantizedRows::new(x, m, self.cols);
        let mut out = vec![0f32; m * self.rows];
        let dst = SharedOut(out.as_mut_ptr());
        let tiles = self.tiles();
        let run = |range: std::ops::Range<usize>| {
            // SAFETY: each tile writes only its own 16 columns of every row of `out`, and the
            // pool hands out disjoint tile ranges.
            unsafe { self.tiles_into(range, &acts, dst) }
        };
        if m * self.rows * self.cols < PARALLEL_MIN_MACS {
            run(0..tiles);
        } else {
            CpuPool::run_chunked(tiles, run);
        }
        out
    }

    /// Computes tiles `range` of the output for every activation row.
    ///
    /// # Safety
    /// `dst` points to `acts.m * rows` f32; no other thread writes these tiles' columns.
    unsafe fn tiles_into(
        &self,
        range: std::ops::Range<usize>,
        acts: &QuantizedRows,
        dst: SharedOut,
    ) {
        #[cfg(target_arch = "x86_64")]
        if Self::supported() {
            // SAFETY: the CPU has the features (checked above); the caller's contract.
            unsafe { vnni::tiles_into(self, range, acts, dst) };
            return;
        }
        // SAFETY: the caller's contract.
        unsafe { self.tiles_into_portable(range, acts, dst) }
    }

    /// The portable kernel: the same integer dot products, f32 sums in block order.
    ///
    /// # Safety
    /// As [`PackedMatrix::tiles_into`].
    unsafe fn tiles_into_portable(
        &self,
        range: std::ops::Range<usize>,
        acts: &QuantizedRows,
        dst: SharedOut,
    ) {
        let bytes = self.bytes();
        let blocks = self.blocks();
        for t in range {
            let valid = (self.rows - t * TILE_ROWS).min(TILE_ROWS);
            for row in 0..acts.m {
                let mut acc = [0f32; TILE_ROWS];
                for b in 0..blocks {
                    let (d_at, m_at, codes_at) = self.offsets(t, b);
                    let codes = &bytes[codes_at..codes_at + self.kind.code_bytes()];
                    let (a, da, sa) = acts.block(row, b);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let d = f16_at(bytes, d_at + 2 * r).to_f32();
                        let mut dot = 0i32;
                        match self.kind {
                            PackedKind::Q4 => {
                                for g in 0..BLOCK / 8 {
                                    for j in 0..4 {
                                        let byte = codes[g * 64 + r * 4 + j];
                                        dot += i32::from(byte & 0x0f) * i32::from(a[8 * g + j]);
                                        dot += i32::from(byte >> 4) * i32::from(a[8 * g + 4 + j]);
                                    }
                                }
                                let m = f16_at(bytes, m_at + 2 * r).to_f32();
                                *acc += dot as f32 * (d * da) + m * (da * sa as f32);
                            }
                            PackedKind::Q8 => {
                                for g in 0..BLOCK / 4 {
                                    for j in 0..4 {
                                        let u = codes[g * 64 + r * 4 + j];
                                        dot += i32::from(u) * i32::from(a[4 * g + j]);
                                    }
                                }
                                *acc += (dot - 128 * sa) as f32 * (d * da);
                            }
                        }
                    }
                }
                for (r, &v) in acc.iter().enumerate().take(valid) {
                    // SAFETY: in bounds (row < m, column < rows); see the caller's contract.
                    unsafe { *dst.0.add(row * self.rows + t * TILE_ROWS + r) = v };
                }
            }
        }
    }
}

/// Multiply-adds below which a product runs on the calling thread (a pool handoff costs more).
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// The output pointer shared by the pool's workers (each writes disjoint columns).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: workers write disjoint elements (see `PackedMatrix::matmul`).
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

/// Activation rows quantized to 8 bits per 32-value block.
pub struct QuantizedRows {
    m: usize,
    blocks: usize,
    codes: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
}

impl QuantizedRows {
    /// Quantizes `x: [m, cols]` (`cols` a multiple of 32): per block, scale `amax / 127` and
    /// codes rounded to nearest even (a zero block gets scale 0 and zero codes; a block holding a
    /// NaN or an infinity gets a NaN scale, so every output it feeds is NaN).
    pub fn new(x: &[f32], m: usize, cols: usize) -> Self {
        let blocks = cols / BLOCK;
        let mut q = QuantizedRows {
            m,
            blocks,
            codes: vec![0; m * cols],
            scales: vec![0.0; m * blocks],
            sums: vec![0; m * blocks],
        };
        #[cfg(target_arch = "x86_64")]
        let simd = PackedMatrix::supported();
        for (i, src) in x.chunks_exact(BLOCK).enumerate() {
            let dst = &mut q.codes[i * BLOCK..(i + 1) * BLOCK];
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: the CPU has AVX-512 (checked above); both blocks hold 32 values.
                (q.scales[i], q.sums[i]) = unsafe { vnni::quantize_block(src, dst) };
            } else {
                (q.scales[i], q.sums[i]) = quantize_block(src, dst);
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                (q.scales[i], q.sums[i]) = quantize_block(src, dst);
            }
            // A NaN or infinite input must reach the outputs (where the decoder's finiteness
            // check names it), not vanish into a zero code.
            if !src.iter().all(|v| v.is_finite()) {
                q.scales[i] = f32::NAN;
            }
        }
        q
    }

    /// Block `b` of row `row`: codes, scale, code sum.
    fn block(&self, row: usize, b: usize) -> (&[i8], f32, i32) {
        let i = row * self.blocks + b;
        (
            &self.codes[i * BLOCK..(i + 1) * BLOCK],
            self.scales[i],
            self.sums[i],
        )
    }
}

/// One 32-value block quantized (portable): scale `amax / 127` (NaNs ignored), codes rounded to
/// nearest even (a NaN becomes 0); returns (scale, code sum).
fn quantize_block(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (c, &v) in dst.iter_mut().zip(src) {
        // |v * inv| <= 127 (NaN saturates to 0): the cast cannot wrap.
        *c = (v * inv).round_ties_even() as i8;
        sum += i32::from(*c);
    }
    (d, sum)
}

#[cfg(target_arch = "x86_64")]
mod vnni;

#[cfg(test)]
mod tests;
