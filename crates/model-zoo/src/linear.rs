//! The projections and the embedding table the decoder runs ([`Linear`], [`FusedLinear`],
//! [`Embedding`]), whatever the weights' format: VNNI-packed GGUF codes, candle quantized
//! tensors or dense floats. [`crate::weights::Weights`] builds them.
//!
//! Invariants: inputs and outputs are f32 whatever the weight dtype; a row's output does not
//! depend on the other rows of a call with quantized weights (see
//! [`Linear::forward_segments`]).

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{ModelError, Result};
use crate::packed::PackedMatrix;

/// Rows from which a candle-quantized projection (types not packed, see [`PackedMatrix`])
/// dequantizes its weight and runs the dense f32 GEMM instead of quantized dot products
/// (activations then stay f32). Measured on the default model (2 cores, AVX-512): dequantizing
/// costs ~0.15 s per pass, so this wins from ~128 rows (+25% at 128, +45% at 512); decode (one
/// row) stays quantized, where reading 8-bit weights is what matters.
pub const DENSE_GEMM_MIN_ROWS: usize = 128;

/// A projection `y = x W^T (+ b)` with `x: [n, in]` f32 and `y: [n, out]` f32.
#[derive(Clone, Debug)]
pub struct Linear {
    pub(crate) weight: LinearWeight,
    pub(crate) bias: Option<Tensor>,
}

/// How a projection's weight is held.
#[derive(Clone, Debug)]
pub(crate) enum LinearWeight {
    /// GGUF Q4_0/Q4_1/Q8_0 codes in VNNI tiles (CPUs with AVX-512 VNNI).
    Packed(Arc<PackedMatrix>),
    /// A candle quantized weight (or a float one candle's `QMatMul` holds).
    Quantized(QMatMul),
    /// A dense float weight `[out, in]`.
    Dense(Tensor),
}

impl Linear {
    /// Applies the projection.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, self.takes_dense_gemm(x.dim(0)?))
    }

    /// Applies the projection; a quantized weight runs as a dequantized dense GEMM when
    /// `dense_gemm` is set, else with the quantized kernel.
    fn apply(&self, x: &Tensor, dense_gemm: bool) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Packed(p) => {
                let (n, _) = x.dims2()?;
                let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(p.matmul(&xs, n), (n, p.rows()), &Device::Cpu)?
            }
            LinearWeight::Quantized(QMatMul::QTensor(q)) if dense_gemm => {
                x.matmul(&q.dequantize(&Device::Cpu)?.t()?)?
            }
            LinearWeight::Quantized(m) => m.forward(x)?,
            LinearWeight::Dense(w) => {
                let y = x.to_dtype(w.dtype())?.matmul(&w.t()?)?;
                y.to_dtype(DType::F32)?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Applies the projection to the rows of several sequences stacked in `x` (`rows[i]`
    /// consecutive rows for sequence `i`). With quantized weights every row gets bit for bit what
    /// [`Linear::forward`] gives it when its sequence's rows run alone: the quantized kernel quantizes and dots each
    /// row on its own, so rows that take it share one call (the weights are read once for all of
    /// them); a sequence whose row count selects the dense GEMM, whose rounding depends on the row
    /// count, gets a call of its own. Dense float weights take one GEMM for all rows (there,
    /// results equal lone passes to rounding: the GEMM's blocking depends on the row count).
    pub fn forward_segments(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        if !rows.iter().any(|&r| self.takes_dense_gemm(r)) {
            // However many rows there are in all: each one takes the kernel it takes alone.
            return self.apply(x, false);
        }
        let mut parts = Vec::new();
        let (mut start, mut shared) = (0, 0);
        for &r in rows {
            if self.takes_dense_gemm(r) {
                if shared > 0 {
                    parts.push(self.apply(&x.narrow(0, start - shared, shared)?, false)?);
                    shared = 0;
                }
                parts.push(self.apply(&x.narrow(0, start, r)?, true)?);
            } else {
                shared += r;
            }
            start += r;
        }
        if shared > 0 {
            parts.push(self.apply(&x.narrow(0, start - shared, shared)?, false)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Whether `rows` rows of a quantized weight run as a dequantized dense GEMM.
    fn takes_dense_gemm(&self, rows: usize) -> bool {
        matches!(self.weight, LinearWeight::Quantized(QMatMul::QTensor(_)))
            && rows >= DENSE_GEMM_MIN_ROWS
    }

    /// The weight dequantized to a dense f32 `[out, in]` tensor.
    pub fn dense_weight(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            LinearWeight::Packed(p) => {
                Tensor::from_vec(p.dequantize(), (p.rows(), p.cols()), &Device::Cpu)?
            }
            LinearWeight::Quantized(QMatMul::QTensor(q)) => q.dequantize(&Device::Cpu)?,
            LinearWeight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.to_dtype(DType::F32)?
            }
            LinearWeight::Dense(w) => w.to_dtype(DType::F32)?,
        })
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Bytes of the weight as held (what one pass over it reads).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Packed(p) => p.size_bytes(),
            LinearWeight::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            LinearWeight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t))
            | LinearWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }
}

/// Several projections of the same input, stacked into one weight where the format allows (q, k
/// and v; gate and up): one pass over the input and one thread-pool handoff instead of several.
#[derive(Clone, Debug)]
pub struct FusedLinear {
    /// Output width of each part, in order.
    pub(crate) widths: Vec<usize>,
    /// One stacked projection, or one per part.
    pub(crate) parts: Vec<Linear>,
}

impl FusedLinear {
    /// `x: [n, in]` → one row-major `[n, width_i]` f32 buffer per part; `N` must be the number
    /// of parts loaded. `rows` splits `x` into sequences as in [`Linear::forward_segments`]:
    /// every row gets what it gets when its sequence runs alone (a stacked weight is packed,
    /// whose kernel computes each row on its own).
    pub fn forward_parts<const N: usize>(
        &self,
        x: &Tensor,
        rows: &[usize],
    ) -> Result<[Vec<f32>; N]> {
        if N != self.widths.len() {
            return Err(ModelError::Input(format!(
                "a fused projection of {} parts was asked for {N}",
                self.widths.len()
            )));
        }
        if self.parts.len() == N {
            let mut outs: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
            for (out, p) in outs.iter_mut().zip(&self.parts) {
                *out = p
                    .forward_segments(x, rows)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
            }
            return Ok(outs);
        }
        let y = self.parts[0]
            .forward_segments(x, rows)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let total: usize = self.widths.iter().sum();
        let n = y.len() / total.max(1);
        let mut outs: [Vec<f32>; N] =
            std::array::from_fn(|i| Vec::with_capacity(n * self.widths[i]));
        for row in y.chunks_exact(total.max(1)) {
            let mut at = 0;
            for (out, &w) in outs.iter_mut().zip(&self.widths) {
                out.extend_from_slice(&row[at..at + w]);
                at += w;
            }
        }
        Ok(outs)
    }

    /// Bytes of the weights as held.
    pub fn weight_bytes(&self) -> usize {
        self.parts.iter().map(Linear::weight_bytes).sum()
    }
}

/// The token embedding table.
#[derive(Clone, Debug)]
pub enum Embedding {
    /// Rows dequantized on lookup from the stored quantized table.
    Quantized(Arc<QTensor>),
    /// A dense `[vocab, hidden]` table.
    Dense(Tensor),
}

impl Embedding {
    /// Looks up `ids`, giving `[n, hidden]` f32.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, &Device::Cpu)?;
        Ok(match self {
            Embedding::Quantized(q) => q.embedding(&ids)?.to_dtype(DType::F32)?,
            Embedding::Dense(t) => t.embedding(&ids)?.to_dtype(DType::F32)?,
        })
    }

    /// The table as dense f32 `[vocab, hidden]`.
    pub fn dense(&self) -> Result<Tensor> {
        Ok(match self {
            Embedding::Quantized(q) => q.dequantize(&Device::Cpu)?,
            Embedding::Dense(t) => t.to_dtype(DType::F32)?,
        })
    }
}
