//! The prompt cache: finished chat conversations kept with their KV cache, so that a stateless
//! client resending the whole conversation plus a new turn prefills only the new turn.
//!
//! Invariants: a cached session is idle (no request owns it) and holds the cache of exactly its
//! transcript; a session is handed out at most once (taking it removes it); entries are ordered
//! least recently used first, and that is the order in which they are dropped when the pool
//! needs room or the cache is over its size; a session is only continued by a request with the
//! same policy key (the same policy and settings).

use std::collections::VecDeque;

use crate::session::Session;

struct Entry {
    key: String,
    session: Session,
}

/// Idle sessions kept for reuse, least recently used first.
pub(super) struct PromptCache {
    entries: VecDeque<Entry>,
    capacity: usize,
}

impl PromptCache {
    /// A cache of at most `capacity` sessions (0 disables it).
    pub(super) fn new(capacity: usize) -> Self {
        PromptCache {
            entries: VecDeque::new(),
            capacity,
        }
    }

    /// Takes the session with policy key `key` whose transcript is the longest non-empty prefix
    /// of `rendered`, if any.
    pub(super) fn take_longest_prefix(&mut self, key: &str, rendered: &str) -> Option<Session> {
        let best = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.key == key && e.session.tokens_seen() > 0)
            .filter_map(|(i, e)| {
                let rest = e.session.continuation(rendered)?;
                Some((i, rendered.len() - rest.len()))
            })
            .max_by_key(|&(_, matched)| matched)?;
        self.entries.remove(best.0).map(|e| e.session)
    }

    /// Keeps `session` as the most recently used; drops the least recently used beyond the
    /// capacity.
    pub(super) fn insert(&mut self, key: String, session: Session) {
        if self.capacity == 0 {
            return;
        }
        self.entries.push_back(Entry { key, session });
        while self.entries.len() > self.capacity {
            self.entries.pop_front();
        }
    }

    /// Drops the least recently used session (its blocks go back to the pool); false when empty.
    pub(super) fn drop_lru(&mut self) -> bool {
        self.entries.pop_front().is_some()
    }

    /// Sessions kept.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Blocks held by the kept sessions.
    pub(super) fn blocks(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.session.kv().stats().blocks_in_use)
            .sum()
    }
}
