//! `gate-core`: the Attention-Gate module, the eviction scorers and selectors, the training loss
//! terms of agate (`docs/algorithms.md` is the spec), and agate's one rotary position embedding
//! ([`rope`]: the gate's, and the decoder's through model-zoo).
//!
//! Owns no model, cache or tokenizer: everything here works on slices in entry order (oldest
//! first) for one (layer, KV head), or on candle tensors. Invariants shared by all modules: no
//! public function panics on bad input (errors are [`GateError`]); every top-k selection uses
//! the one ranking rule documented in [`select`] (protected first, higher score, then more
//! recent; NaN last), so policies are deterministic and comparable.

#![warn(missing_docs)]

pub mod error;
pub mod gate;
pub mod loss;
pub mod rope;
pub mod score;
pub mod select;

pub use error::{GateError, Result};
pub use gate::{
    hard_flags, model_identity, AttentionGate, GateCache, GateConfig, GateFileDtype, ModelIdentity,
};
pub use loss::{
    eviction_loss, eviction_ratios, hard_keep, keep_ste, masked_attention_weights, EvictionRatios,
    Visibility,
};
pub use select::{
    evict_greedily, pyramid_budgets, select_threshold, select_top_k, Budget, Protection,
};

/// Helpers for the tests of agate's crates (not part of the API).
#[doc(hidden)]
pub mod testing {
    use candle_core::Tensor;

    /// The largest `|a - b|` over two tensors of one shape, as f32.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
        (a - b)?
            .abs()?
            .max_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()
    }
}
