//! The one place per attention layer where an eviction policy plugs into the decoder.
//!
//! Order of a forward pass: `LayerHook::begin_pass`; then, layer by layer, the new tokens' keys
//! and values are appended to the store, `LayerHook::plan` sees the layer's normed hidden states
//! (the gate's input) and the store, and says which retained keys are visible and which
//! attention statistics to compute, and attention runs. Once every layer has run and the logits
//! are finite, the pass commits: `LayerHook::after_attention` is called for every layer in order
//! and may evict from the store. A pass that fails before it commits leaves the store as it
//! found it and calls `LayerHook::abort_pass`, so a hook undoes what its `plan` calls recorded:
//! nothing is evicted before a pass is certain to succeed. The decoder computes nothing a hook
//! did not ask for. A hook reports the bytes of its own per-session state
//! (`LayerHook::state_bytes`), so that a session's memory is counted whole.

use std::ops::Range;

use candle_core::Tensor;
use kv_store::SequenceKv;

use crate::error::Result;

/// What a hook wants for one layer of one forward pass.
#[derive(Clone, Debug, Default)]
pub struct LayerPlan {
    /// In-context eviction: per KV head, one position per retained entry (after the append),
    /// the last query position that still sees the key (`u32::MAX`: all), as
    /// `kv_store::AttendOptions::visible_until`. `None`: all visible.
    pub visible_until: Option<Vec<Vec<u32>>>,
    /// Query rows (indices into this pass's new tokens) whose attention probabilities are summed
    /// per key and returned to `after_attention`.
    pub prob_rows: Option<Range<usize>>,
    /// Hand this layer's queries to `after_attention` (otherwise it gets none: the decoder keeps
    /// every layer's queries until the pass commits only for hooks that read them).
    pub queries: bool,
}

/// What `after_attention` receives.
pub struct AttentionOutcome<'a> {
    /// This sequence's store; the hook may evict from it.
    pub kv: &'a mut SequenceKv,
    /// The new tokens' queries after RoPE, token-major `[n, n_heads, head_dim]`, when the
    /// layer's plan asked for them (`LayerPlan::queries`); empty otherwise.
    pub queries: &'a [f32],
    /// Absolute positions of the new tokens.
    pub positions: &'a [u32],
    /// Per KV head, per retained key: attention mass over `LayerPlan::prob_rows`, averaged over
    /// the head's query group.
    pub prob_sums: Option<Vec<Vec<f32>>>,
    /// Softmax scale used (1/sqrt(head_dim)).
    pub scale: f32,
}

/// What a prefill is to an eviction policy, said by whoever feeds it (kvpress' protocol: the
/// context is compressed, what follows it is not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrefillKind {
    /// Context: a one-shot policy compresses the cache once, at the prefill's end.
    #[default]
    Context,
    /// Tokens that follow a compressed context (a question, the rest of a chat turn, scored
    /// continuations): a one-shot policy keeps them all and does not compress again. Continuous
    /// policies keep every head within budget either way.
    Continuation,
}

/// Where one prefill chunk sits in its prefill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillChunk {
    /// Offset of the chunk's first token in the prefill (0: the prefill's first chunk).
    pub start: usize,
    /// Offset one past the chunk's last token.
    pub end: usize,
    /// Tokens in the whole prefill (all chunks).
    pub len: usize,
    /// What the prefill is.
    pub kind: PrefillKind,
}

impl PrefillChunk {
    /// Whether this chunk opens its prefill.
    pub fn is_first(&self) -> bool {
        self.start == 0
    }

    /// Whether this chunk ends its prefill (where policies evict once, with statistics over the
    /// whole prefill).
    pub fn is_last(&self) -> bool {
        self.end >= self.len
    }
}

/// The kind of forward pass about to run, announced by the caller before each pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// One chunk of a prefill (prompts are fed in chunks of at most the engine's prefill chunk).
    Prefill(PrefillChunk),
    /// One generated token.
    Decode,
}

/// A policy's view of the decoder. Every method defaults to "do nothing" (the full cache).
pub trait LayerHook {
    /// Announces the next forward pass.
    fn begin_pass(&mut self, pass: Pass) {
        let _ = pass;
    }

    /// Called after the append, before attention.
    fn plan(
        &mut self,
        layer: usize,
        normed: &Tensor,
        positions: &[u32],
        kv: &SequenceKv,
    ) -> Result<LayerPlan> {
        let _ = (layer, normed, positions, kv);
        Ok(LayerPlan::default())
    }

    /// Called for every layer, in order, once the pass is certain to succeed; may evict.
    fn after_attention(&mut self, layer: usize, outcome: AttentionOutcome<'_>) -> Result<()> {
        let _ = (layer, outcome);
        Ok(())
    }

    /// The pass announced by the last `begin_pass` failed before committing (no
    /// `after_attention` call was made): undo whatever its `plan` calls recorded, so that the
    /// hook is as it was before the pass.
    fn abort_pass(&mut self) {}

    /// Bytes of the per-session state this hook holds that grows with the tokens seen (scores,
    /// flags, a gate's own cache), counted in the session's memory beside its KV blocks.
    fn state_bytes(&self) -> usize {
        0
    }
}

/// The full cache: keeps everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeepAll;

impl LayerHook for KeepAll {}
