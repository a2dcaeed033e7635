//! The Attention-Gate hook. Before attention in every layer, the gate reads the layer's normed
//! hidden states (through its own small causal K'/V' cache, so decode costs one row) and gives
//! each new token a keep probability `s` per KV head.
//!
//! - Threshold mode: a token's flag is `s > tau`. A flagged-out key is invisible to every later
//!   query (in-context eviction, inside the same forward pass too) and is physically removed
//!   once no future query can see it — unless protected: the first `sinks` tokens are always
//!   visible and stay; a flagged-out key stays visible to the queries at most `recent` positions
//!   after it (the local window, the same rule as the training forward's), and is removed when
//!   it ages out of that window.
//! - Budget mode: no flags; each head keeps its top-k retained tokens by `s` (sinks and recent
//!   protected), evicting whenever it exceeds the budget.
//!
//! Invariants: `flags[l][h]` and `probs[l][h]` are aligned with the store's retained entries of
//! (l, h) after every pass (a pass that fails is undone: `abort_pass` truncates what its plans
//! appended, to the gate's cache too); in threshold mode the sinks (positions `0..sinks`) are never evicted,
//! so they are a head's first entries; with `decode = false` generated tokens are always kept.

use std::sync::Arc;

use candle_core::Tensor;
use gate_core::gate::{AttentionGate, GateCache};
use gate_core::select::{self, Budget, Protection};
use kv_store::SequenceKv;
use model_zoo::{AttentionOutcome, LayerHook, LayerPlan, ModelConfig, ModelError, Pass};

/// How Attention-Gate decides.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AgMode {
    /// Keep a token iff its keep probability exceeds this threshold.
    Threshold(f32),
    /// Keep each head's top-k tokens by keep probability.
    Budget(Budget),
}

pub(super) struct AgHook {
    gates: Arc<AttentionGate>,
    mode: AgMode,
    decode: bool,
    protect: Protection,
    cache: GateCache,
    pass: Pass,
    /// Keep probability of every retained entry, `[layer][head][entry]`.
    probs: Vec<Vec<Vec<f32>>>,
    /// Hard flag of every retained entry (threshold mode), `[layer][head][entry]`.
    flags: Vec<Vec<Vec<bool>>>,
    /// At the start of the current pass, per layer: the gate cache's tokens and every head's
    /// probability and flag counts (what `abort_pass` restores).
    before_pass: Vec<(usize, Vec<usize>, Vec<usize>)>,
}

impl AgHook {
    pub(super) fn new(
        gates: Arc<AttentionGate>,
        mode: AgMode,
        decode: bool,
        protect: Protection,
        cfg: &ModelConfig,
    ) -> Self {
        let heads = cfg.n_kv_heads;
        AgHook {
            cache: GateCache::new(gates.config()),
            gates,
            mode,
            decode,
            protect,
            pass: Pass::Decode,
            probs: vec![vec![Vec::new(); heads]; cfg.n_layers],
            flags: vec![vec![Vec::new(); heads]; cfg.n_layers],
            before_pass: Vec::new(),
        }
    }

    /// Keep probabilities `[kv_head][t]` of the new tokens, through the gate's cache.
    fn keep_probs(
        &mut self,
        layer: usize,
        normed: &Tensor,
        positions: &[u32],
    ) -> model_zoo::Result<Vec<Vec<f32>>> {
        if let [position] = positions {
            let s = self
                .gates
                .step(layer, normed, *position, &mut self.cache)
                .map_err(gate_error)?;
            return Ok(s.into_iter().map(|p| vec![p]).collect());
        }
        let s = self
            .gates
            .prefill(layer, normed, positions, &mut self.cache)
            .map_err(gate_error)?;
        // [T, heads] → [heads][T]
        Ok(s.t()?.to_vec2::<f32>()?)
    }

    /// Whether the entry at `position` is still protected after `tokens_seen` tokens.
    fn protected(&self, position: u32, tokens_seen: usize) -> bool {
        (position as usize) < self.protect.sinks
            || tokens_seen - (position as usize) <= self.protect.recent
    }
}

fn gate_error(e: gate_core::GateError) -> ModelError {
    ModelError::Input(format!("attention gate: {e}"))
}

impl LayerHook for AgHook {
    fn begin_pass(&mut self, pass: Pass) {
        self.pass = pass;
        let lens = |v: &Vec<Vec<f32>>| v.iter().map(Vec::len).collect();
        self.before_pass = (0..self.probs.len())
            .map(|l| {
                let flags = self.flags[l].iter().map(Vec::len).collect();
                (self.cache.len(l), lens(&self.probs[l]), flags)
            })
            .collect();
    }

    fn abort_pass(&mut self) {
        for (l, (tokens, probs, flags)) in std::mem::take(&mut self.before_pass)
            .into_iter()
            .enumerate()
        {
            self.cache.truncate(l, tokens);
            for (h, n) in probs.into_iter().enumerate() {
                self.probs[l][h].truncate(n);
            }
            for (h, n) in flags.into_iter().enumerate() {
                self.flags[l][h].truncate(n);
            }
        }
    }

    fn plan(
        &mut self,
        layer: usize,
        normed: &Tensor,
        positions: &[u32],
        _kv: &SequenceKv,
    ) -> model_zoo::Result<LayerPlan> {
        let probs = self.keep_probs(layer, normed, positions)?;
        let keep_all = self.pass == Pass::Decode && !self.decode;
        let mut visible = None;
        if let AgMode::Threshold(tau) = self.mode {
            let mut vis = Vec::with_capacity(probs.len());
            for (head, head_probs) in probs.iter().enumerate() {
                let flags = &mut self.flags[layer][head];
                flags.extend(head_probs.iter().map(|&s| keep_all || s > tau));
                // Sinks always (they are never evicted, so they are the first entries),
                // flagged-out keys only to the queries of their local window.
                let sinks = self.protect.sinks;
                vis.push(
                    flags
                        .iter()
                        .enumerate()
                        .map(|(entry, &f)| f || entry < sinks)
                        .collect(),
                );
            }
            visible = Some(vis);
        }
        for (head, head_probs) in probs.into_iter().enumerate() {
            // With decode flags off, generated tokens outrank every prompt token in budget mode.
            let head_probs = head_probs
                .into_iter()
                .map(|s| if keep_all { f32::INFINITY } else { s });
            self.probs[layer][head].extend(head_probs);
        }
        Ok(LayerPlan {
            visible,
            window: u32::try_from(self.protect.recent).unwrap_or(u32::MAX),
            prob_rows: None,
            queries: false,
        })
    }

    fn after_attention(
        &mut self,
        layer: usize,
        outcome: AttentionOutcome<'_>,
    ) -> model_zoo::Result<()> {
        let kv = outcome.kv;
        let tokens_seen = outcome.positions.last().map_or(0, |&p| p as usize + 1);
        for head in 0..kv.n_kv_heads() {
            let positions = kv.positions(layer, head);
            let mask: Vec<bool> = match self.mode {
                AgMode::Threshold(_) => positions
                    .iter()
                    .zip(&self.flags[layer][head])
                    .map(|(&p, &flag)| flag || self.protected(p, tokens_seen))
                    .collect(),
                AgMode::Budget(budget) => {
                    let keep = budget.keep_count(tokens_seen);
                    if positions.len() <= keep {
                        continue;
                    }
                    select::select_top_k(&self.probs[layer][head], keep, &self.protect)
                }
            };
            if mask.iter().all(|&k| k) {
                continue;
            }
            kv.evict(layer, head, &mask)?;
            retain(&mut self.probs[layer][head], &mask);
            if matches!(self.mode, AgMode::Threshold(_)) {
                retain(&mut self.flags[layer][head], &mask);
            }
        }
        Ok(())
    }
}

/// Keeps the elements whose mask entry is true, in order.
fn retain<T>(values: &mut Vec<T>, mask: &[bool]) {
    let mut keep = mask.iter();
    values.retain(|_| *keep.next().unwrap_or(&true));
}
