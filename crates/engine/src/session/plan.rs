//! Planning a session's step before it changes anything: a prefill is cut into the chunks of a
//! [`PrefillPlan`], the new tokens are checked against the model's context, and the KV blocks the
//! step may need at most (each head's peak under the policy's cap) are reserved in the pool.
//!
//! Invariants: a check that fails leaves the session as it was; the blocks reserved bound what
//! the step's passes can take, so a planned step never runs out of pool memory half-way; in
//! cache positions, a head's span is closed down to what it retains once it passes
//! [`Session::repack_span`], and the peak span of a step stays within the model's context.

use model_zoo::{Pass, PrefillChunk, PrefillKind};

use super::{Positions, Session};
use crate::error::{EngineError, Result};

impl Session {
    /// Cuts the pending token (if any) and `tokens` into the passes of one prefill of `kind`,
    /// checking that they fit in the model's context (on error the session is unchanged).
    pub(crate) fn plan_prefill(
        &mut self,
        tokens: &[u32],
        kind: PrefillKind,
    ) -> Result<PrefillPlan> {
        let mut run: Vec<u32> = self.pending.into_iter().collect();
        run.extend_from_slice(tokens);
        self.check_fits(&[run.len()])?;
        self.pending = None;
        Ok(PrefillPlan::new(
            run,
            kind,
            self.engine.config().prefill_chunk,
        ))
    }

    /// Empties the cache and returns the passes that rebuild it: every token seen, the pending
    /// one (so that afterwards the session holds the logits after it, as after a decode pass),
    /// then `unfed` (the rest of an interrupted prefill). The transcript is kept. This is the
    /// scheduler's preemption: the blocks go back to the pool now, and the conversation resumes
    /// later by recomputing its cache, as one context prefill.
    pub(crate) fn reset_for_replay(&mut self, unfed: &[u32]) -> Result<PrefillPlan> {
        let mut run = std::mem::take(&mut self.seen);
        run.extend(self.pending.take());
        run.extend_from_slice(unfed);
        self.kv.clear();
        self.hook = self.policy.hook(self.engine.model_config())?;
        self.logits = None;
        Ok(PrefillPlan::new(
            run,
            PrefillKind::Context,
            self.engine.config().prefill_chunk,
        ))
    }

    /// Plans a step of a `prompt`-token prefill (after a pending token) and up to `decode`
    /// generated tokens, then runs `body` with its KV blocks reserved. The prefill counts as one
    /// pass however it is chunked: no policy evicts between its chunks.
    pub(super) fn step<T>(
        &mut self,
        prompt: usize,
        decode: usize,
        body: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let run = prompt + usize::from(self.pending.is_some());
        let passes: Vec<usize> = if run == 0 { Vec::new() } else { vec![run] };
        self.step_with(&passes, decode, body)
    }

    /// [`Session::step`] with the prefill passes given by length.
    pub(super) fn step_with<T>(
        &mut self,
        passes: &[usize],
        decode: usize,
        body: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        self.check_fits(passes)?;
        let ceiling = self.blocks_needed(passes, decode);
        self.kv.reserve_blocks(ceiling)?;
        let out = body(self);
        self.kv.release_reservation();
        out
    }

    /// Fails with a context error, before anything changes, when the prefill passes would take
    /// positions beyond the model's context.
    fn check_fits(&self, passes: &[usize]) -> Result<()> {
        let context = self.engine.model_config().max_position;
        let new: usize = passes.iter().sum();
        let seen = self.seen.len();
        // Stored positions are u32 in both modes.
        if seen.saturating_add(new) > u32::MAX as usize {
            return Err(EngineError::ContextOverflow {
                new,
                seen,
                context: u32::MAX as usize,
            });
        }
        match self.positions {
            Positions::Original if seen + new > context => {
                Err(EngineError::ContextOverflow { new, seen, context })
            }
            Positions::Cache => {
                let cap = self.policy.retained_cap(seen + new);
                let span = self.kv.widest_cache_span() as usize;
                if peak_span(span, passes, cap, self.repack_span()) > context {
                    return Err(EngineError::CacheOverflow { new, span, context });
                }
                Ok(())
            }
            Positions::Original => Ok(()),
        }
    }

    /// In cache positions, closes the gaps of every head whose span exceeds
    /// [`Session::repack_span`] (after every pass, and after a shared context's eviction).
    pub(crate) fn close_cache_gaps(&mut self) -> Result<()> {
        let span = self.repack_span() as u32;
        Ok(self.kv.repack_cache_positions(span)?)
    }

    /// In cache positions, the span of cache positions beyond which a head's gaps are closed
    /// after a pass: the model's context less room for one prefill chunk (at most half the
    /// context), so that rotations are rare and by whole gaps at once.
    fn repack_span(&self) -> usize {
        let context = self.engine.model_config().max_position;
        context - self.engine.config().prefill_chunk.min(context / 2)
    }

    /// The most KV blocks this session can hold during the prefill `passes` and `decode`
    /// one-token passes: per head, its peak entry count under the policy's cap (at most the
    /// model's context), in whole blocks.
    fn blocks_needed(&self, passes: &[usize], decode: usize) -> usize {
        let cfg = self.engine.model_config();
        let block = self.kv.pool().config().block_size;
        let total = self.seen.len() + passes.iter().sum::<usize>();
        let cap = self.policy.retained_cap(total.saturating_add(decode));
        let mut blocks = 0usize;
        for l in 0..cfg.n_layers {
            for h in 0..cfg.n_kv_heads {
                let peak = peak_entries(self.kv.retained(l, h), passes, decode, cap);
                blocks = blocks.saturating_add(peak.min(cfg.max_position).div_ceil(block));
            }
        }
        blocks
    }

    /// How many more tokens one pass may add before positions leave the model's context.
    pub(crate) fn room(&self) -> usize {
        let context = self.engine.model_config().max_position;
        let room = match self.positions {
            Positions::Original => context.saturating_sub(self.seen.len()),
            Positions::Cache => context.saturating_sub(self.kv.widest_cache_span() as usize),
        };
        room.min((u32::MAX as usize).saturating_sub(self.seen.len()))
    }
}

/// The forward passes of one prefill of `kind`, run one by one (by `Session::prefill_as`, by
/// the scheduler between decode steps, or by [`run_prefill`]): chunks of at most the engine's
/// prefill chunk, each announced with where it sits in the prefill.
#[derive(Debug)]
pub(crate) struct PrefillPlan {
    run: Vec<u32>,
    kind: PrefillKind,
    chunk: usize,
    next_start: usize,
}

impl PrefillPlan {
    /// The passes of `run` in chunks of at most `chunk` tokens.
    pub(crate) fn new(run: Vec<u32>, kind: PrefillKind, chunk: usize) -> Self {
        PrefillPlan {
            run,
            kind,
            chunk: chunk.max(1),
            next_start: 0,
        }
    }

    /// The next chunk and how to announce it, or `None` when the prefill is done.
    pub(crate) fn next_chunk(&self) -> Option<(&[u32], Pass)> {
        let start = self.next_start;
        let len = self.run.len();
        if start >= len {
            return None;
        }
        let end = (start + self.chunk).min(len);
        let chunk = PrefillChunk {
            start,
            end,
            len,
            kind: self.kind,
        };
        Some((&self.run[start..end], Pass::Prefill(chunk)))
    }

    /// Marks the next chunk as done.
    pub(crate) fn advance(&mut self) {
        self.next_start = (self.next_start + self.chunk).min(self.run.len());
    }

    /// The tokens not fed yet, in order.
    pub(crate) fn unfed(&self) -> &[u32] {
        &self.run[self.next_start..]
    }
}

/// The widest span of cache positions (the largest query-key distance) a head reaches over
/// prefill passes of lengths `passes`, starting from `span`: after a pass its span is closed
/// down to what it retains (at most `cap`) once it exceeds `repack`.
fn peak_span(span: usize, passes: &[usize], cap: Option<usize>, repack: usize) -> usize {
    let (mut span, mut peak) = (span, span);
    for &n in passes {
        let after = span.saturating_add(n);
        peak = peak.max(after);
        span = match cap {
            Some(k) if after > repack => after.min(k),
            _ => after,
        };
    }
    peak
}

/// The most entries a KV head holding `held` reaches over prefill passes of lengths `passes`
/// then `decode` one-token passes, when the policy caps every head at `cap` after each pass
/// (`None`: no cap). Saturates instead of overflowing.
fn peak_entries(held: usize, passes: &[usize], decode: usize, cap: Option<usize>) -> usize {
    let (mut held, mut peak) = (held, held);
    for &n in passes {
        let after = held.saturating_add(n);
        peak = peak.max(after);
        held = cap.map_or(after, |k| after.min(k));
    }
    if decode > 0 {
        let after = held.saturating_add(decode);
        peak = peak.max(match cap {
            // Grows to the cap, then every pass holds one entry above it until evicting.
            Some(k) if after > k => held.max(k).saturating_add(1),
            _ => after,
        });
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::PrefillPlan;
    use model_zoo::{Pass, PrefillKind};

    #[test]
    fn a_plan_covers_everything_in_order_in_announced_chunks() {
        for n in 0..70usize {
            for chunk in [1, 4, 16] {
                let run: Vec<u32> = (0..n as u32).collect();
                let mut plan = PrefillPlan::new(run.clone(), PrefillKind::Continuation, chunk);
                let mut fed = Vec::new();
                while let Some((tokens, pass)) = plan.next_chunk() {
                    let Pass::Prefill(c) = pass else {
                        panic!("a prefill announced {pass:?}")
                    };
                    assert_eq!(
                        (c.start, c.len, c.kind),
                        (fed.len(), n, PrefillKind::Continuation)
                    );
                    assert_eq!(c.end - c.start, tokens.len());
                    assert!(!tokens.is_empty() && tokens.len() <= chunk);
                    fed.extend_from_slice(tokens);
                    plan.advance();
                    assert_eq!(plan.unfed(), &run[fed.len()..]);
                }
                assert_eq!(fed, run);
                assert!(plan.unfed().is_empty());
            }
        }
    }
}
