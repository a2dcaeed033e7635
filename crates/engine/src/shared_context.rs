//! `SharedContext`: a context prefilled once, under a full cache, together with what the
//! baseline policies need to evict it at the end of that prefill — so that sessions under many
//! policies (an evaluation sweep, one question asked of several policies, each choice of a
//! multiple-choice task) start from it without prefilling it again. Each session gets a
//! copy-on-write fork of the context's KV blocks ([`kv_store::SequenceKv::fork`]) and then makes
//! its policy's end-of-prefill eviction on its own fork.
//!
//! Invariant (tested in `tests/shared_context.rs`): for every policy with
//! [`Policy::shares_context`], `shared.session(&p)` is in exactly the state that
//! `engine.session_with(p)` followed by `prefill(context)` reaches: the same tokens, the same
//! retained entries in every head, the same logits, the same policy state. It holds because such
//! a policy's prefill is a full-cache prefill (no policy evicts between chunks, and asking for
//! attention statistics does not change attention's output), chunked identically
//! ([`crate::session::run_prefill`]), followed by one eviction per layer that depends only on the
//! layer's store, the prefill's last queries and H2O's sums — which the recorder gathers with the
//! same kernel calls a session would make.
//!
//! Memory: the context's blocks are held once in the pool while forks share them; a fork's
//! [`crate::KvReport`] counts every block it holds (as it would alone) and reports the shared
//! part as `bytes_shared`. A context prefilled in cache positions
//! ([`SharedContext::prefill_in`]) hands them to every fork, so its sessions run in that mode.

use kv_store::SequenceKv;

use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::policy::scored::{ContextRecorder, ScoredHook};
use crate::policy::Policy;
use crate::policy::PrefillStats;
use crate::report::KvReport;
use crate::session::{empty_store, run_prefill, Positions, Session};
use model_zoo::PrefillKind;

/// A context prefilled once and shared, copy-on-write, by sessions under different policies.
pub struct SharedContext {
    engine: Engine,
    kv: SequenceKv,
    tokens: Vec<u32>,
    logits: Vec<f32>,
    stats: PrefillStats,
}

impl SharedContext {
    /// Prefills `tokens` (the start of a conversation) under a full cache, recording what the
    /// eviction of each of `policies` at the end of the prefill needs.
    ///
    /// Errors: no tokens, a context longer than the model's, a policy that cannot share a
    /// context (Attention-Gate), or a model failure.
    pub fn prefill(engine: &Engine, tokens: &[u32], policies: &[Policy]) -> Result<Self> {
        Self::prefill_in(engine, tokens, policies, Positions::Original)
    }

    /// [`SharedContext::prefill`] with keys placed by `positions`: in cache positions the forks
    /// carry the context's cache positions, and their sessions are in that mode too.
    pub fn prefill_in(
        engine: &Engine,
        tokens: &[u32],
        policies: &[Policy],
        positions: Positions,
    ) -> Result<Self> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput {
                what: "the shared context",
            });
        }
        let context = engine.model_config().max_position;
        if tokens.len() > context {
            return Err(EngineError::ContextOverflow {
                new: tokens.len(),
                seen: 0,
                context,
            });
        }
        if let Some(p) = policies.iter().find(|p| !p.shares_context()) {
            return Err(EngineError::NotShareable { policy: p.name() });
        }
        let cfg = engine.model_config();
        let mut kv = empty_store(engine, positions);
        let mut recorder = ContextRecorder::new(policies, cfg)?;
        let mut seen = Vec::with_capacity(tokens.len());
        let logits = run_prefill(
            engine,
            &mut kv,
            &mut recorder,
            &mut seen,
            tokens,
            PrefillKind::Context,
        )?;
        Ok(SharedContext {
            engine: engine.clone(),
            kv,
            tokens: seen,
            logits,
            stats: recorder.into_stats(),
        })
    }

    /// A session under `policy` that has prefilled the context as a fresh session would: its
    /// cache forks the shared one and the policy evicts from its fork. `policy` must be one of
    /// those given to [`SharedContext::prefill`] (or need no more than they did).
    pub fn session(&self, policy: &Policy) -> Result<Session> {
        policy.validate(self.engine.model_config())?;
        let mut kv = self.kv.fork();
        let hook: Box<dyn model_zoo::LayerHook + Send> = match policy {
            Policy::Full => Box::new(model_zoo::KeepAll),
            Policy::Ag { .. } => {
                return Err(EngineError::NotShareable {
                    policy: policy.name(),
                })
            }
            _ => Box::new(ScoredHook::after_shared_context(
                policy,
                self.engine.model_config(),
                &mut kv,
                &self.stats,
                self.tokens.len(),
            )?),
        };
        let mut session = Session::resumed(
            self.engine.clone(),
            policy.clone(),
            hook,
            kv,
            self.tokens.clone(),
            Some(self.logits.clone()),
        );
        // As after a fresh session's last prefill pass: its eviction's gaps close if wide.
        session.close_cache_gaps()?;
        Ok(session)
    }

    /// The context's tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The shared full cache.
    pub fn kv_report(&self) -> KvReport {
        KvReport::new(&self.kv, self.tokens.len(), 0)
    }
}
