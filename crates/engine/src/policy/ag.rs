//! The Attention-Gate hook. Before attention in every layer, the gate reads the layer's normed
//! hidden states (through its own small cache of the last `attention_window` tokens, so decode
//! costs one row and the state is bounded) and gives each new token a keep probability `s` per
//! KV head.
//!
//! - Threshold mode: a token's flag is `s > threshold`, with the threshold of its layer (one for
//!   every layer, or one per layer: [`Thresholds`]). A flagged-out key is invisible to every
//!   later query (in-context eviction, inside the same forward pass too) and is physically
//!   removed once no future query can see it — unless protected: the first `sinks` tokens are
//!   always visible and stay; a flagged-out key stays visible to the queries at most `recent`
//!   positions after it (the local window, the same rule as the training forward's), and is
//!   removed when it ages out of that window.
//! - Budget mode: each head keeps at most its budget, evicting its worst entry by `s` (sinks and
//!   the `recent` newest protected) whenever an arrival puts it over budget — one arrival at a
//!   time, also inside a prefill pass, where the keys a token-by-token run would have removed
//!   are hidden from the later queries of the pass (`gate_core::select::evict_greedily`), then
//!   removed at its end. So any prefill chunking gives the same cache and the same logits (up
//!   to the kernels' rounding, which varies with a chunk's row count). A
//!   ratio budget smaller than the protected tokens (the first `(sinks + recent) / (1 - ratio)`
//!   tokens of a sequence) keeps them all: the gates never lose their sinks and local window (a
//!   fixed budget must hold them, or the spec is refused).
//!
//! Invariants: the per-entry state (threshold: flags; budget: keep probabilities) is aligned
//! with the store's retained entries of (l, h) after every pass; in threshold mode the sinks
//! (positions `0..sinks`) are never evicted; with `decode = false` generated tokens are always
//! kept; after a pass every retained key is visible to the next query, so a one-token pass needs
//! no mask, and a pass (which starts where the previous one ended) checks only the entries its
//! tokens pushed out of the local window, not every retained one; a pass that fails is undone
//! (`abort_pass` rolls the gate's cache back to its mark at `begin_pass`, in time proportional
//! to the pass, and cuts the per-entry state back), a pass whose gate gives a NaN keep
//! probability from finite inputs among them (gates too large for f32: an error naming layer
//! and position); protections above `u32::MAX` cover every position. `state_bytes` counts the
//! gate cache and the per-entry state.

use std::sync::Arc;

use candle_core::Tensor;
use gate_core::gate::{AttentionGate, GateCache};
use gate_core::select::{self, Budget, Protection};
use kv_store::SequenceKv;
use model_zoo::{AttentionOutcome, LayerHook, LayerPlan, ModelConfig, Pass};

/// How Attention-Gate decides.
#[derive(Clone, Debug, PartialEq)]
pub enum AgMode {
    /// Keep a token iff its keep probability exceeds its layer's threshold.
    Threshold(Thresholds),
    /// Keep each head's top-k tokens by keep probability.
    Budget(Budget),
}

/// Threshold mode's keep thresholds.
#[derive(Clone, Debug, PartialEq)]
pub enum Thresholds {
    /// The same threshold in every layer (`threshold`).
    Uniform(f32),
    /// One threshold per model layer (`layer_thresholds`).
    PerLayer(Vec<f32>),
}

impl Thresholds {
    /// The threshold of `layer` (a per-layer list must hold one per model layer, as
    /// [`crate::Policy::validate`] checks).
    pub fn of_layer(&self, layer: usize) -> f32 {
        match self {
            Thresholds::Uniform(t) => *t,
            Thresholds::PerLayer(list) => list[layer],
        }
    }

    /// The values given: the uniform threshold alone, or the list.
    pub fn values(&self) -> &[f32] {
        match self {
            Thresholds::Uniform(t) => std::slice::from_ref(t),
            Thresholds::PerLayer(list) => list,
        }
    }

    /// The setting that gives them.
    pub fn setting(&self) -> crate::Setting {
        match self {
            Thresholds::Uniform(_) => crate::Setting::Threshold,
            Thresholds::PerLayer(_) => crate::Setting::LayerThresholds,
        }
    }
}

/// The mode's decision rule and what it remembers per retained entry, `[layer][head][entry]`.
enum Entries {
    /// Threshold mode: the thresholds and each entry's hard keep flag.
    Flags {
        thresholds: Thresholds,
        flags: Vec<Vec<Vec<bool>>>,
    },
    /// Budget mode: the budget, each entry's keep probability (`+inf` for a generated token
    /// with decode flags off), and the keep masks of the pass in flight, `[layer][head]`
    /// (decided in `plan`, applied when the pass commits).
    Probs {
        budget: Budget,
        probs: Vec<Vec<Vec<f32>>>,
        pending: Vec<Vec<Vec<bool>>>,
    },
}

pub(super) struct AgHook {
    gates: Arc<AttentionGate>,
    decode: bool,
    protect: Protection,
    cache: GateCache,
    pass: Pass,
    entries: Entries,
    /// Each (layer, head)'s count of per-entry state at the start of the pass in flight (what
    /// `abort_pass` cuts back to; the gate's cache keeps its own undo journal from its mark);
    /// dropped once the pass commits.
    before_pass: Option<Vec<Vec<usize>>>,
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
        let entries = match mode {
            AgMode::Threshold(thresholds) => Entries::Flags {
                thresholds,
                flags: vec![vec![Vec::new(); heads]; cfg.n_layers],
            },
            AgMode::Budget(budget) => Entries::Probs {
                budget,
                probs: vec![vec![Vec::new(); heads]; cfg.n_layers],
                pending: vec![Vec::new(); cfg.n_layers],
            },
        };
        AgHook {
            cache: GateCache::new(gates.config()),
            gates,
            decode,
            protect,
            pass: Pass::Decode,
            entries,
            before_pass: None,
        }
    }

    /// Keep probabilities `[kv_head][t]` of the new tokens, through the gate's cache. A NaN
    /// among them from finite inputs (gates whose finite weights overflow f32 arithmetic) is an
    /// error, not a silent "evict"; from a non-finite input the model's own check of its logits
    /// fails the pass (and names the cause: the model, not the gates).
    fn keep_probs(
        &mut self,
        layer: usize,
        normed: &Tensor,
        positions: &[u32],
    ) -> model_zoo::Result<Vec<Vec<f32>>> {
        let probs = if let [position] = positions {
            let s = self.gates.step(layer, normed, *position, &mut self.cache)?;
            s.into_iter().map(|p| vec![p]).collect()
        } else {
            let s = self
                .gates
                .prefill(layer, normed, positions, &mut self.cache)?;
            // [T, heads] → [heads][T]
            s.t()?.to_vec2::<f32>()?
        };
        let first_nan = probs
            .iter()
            .filter_map(|head| head.iter().position(|s| s.is_nan()))
            .min();
        let finite_input = || -> model_zoo::Result<bool> {
            let values = normed.flatten_all()?.to_dtype(candle_core::DType::F32)?;
            Ok(values.to_vec1::<f32>()?.iter().all(|v| v.is_finite()))
        };
        match first_nan {
            Some(t) if finite_input()? => Err(gate_core::GateError::NonFiniteKeepProb {
                layer,
                position: positions[t],
            }
            .into()),
            _ => Ok(probs),
        }
    }
}

impl Entries {
    /// Per-entry state counts, `[layer][head]`.
    fn lens(&self) -> Vec<Vec<usize>> {
        fn lens<T>(v: &[Vec<Vec<T>>]) -> Vec<Vec<usize>> {
            v.iter().map(|l| l.iter().map(Vec::len).collect()).collect()
        }
        match self {
            Entries::Flags { flags, .. } => lens(flags),
            Entries::Probs { probs, .. } => lens(probs),
        }
    }

    /// Cuts the per-entry state back to `lens`.
    fn truncate(&mut self, lens: &[Vec<usize>]) {
        fn cut<T>(v: &mut [Vec<Vec<T>>], lens: &[Vec<usize>]) {
            for (layer, lens) in v.iter_mut().zip(lens) {
                for (head, &n) in layer.iter_mut().zip(lens) {
                    head.truncate(n);
                }
            }
        }
        match self {
            Entries::Flags { flags, .. } => cut(flags, lens),
            Entries::Probs { probs, pending, .. } => {
                cut(probs, lens);
                pending.iter_mut().for_each(Vec::clear);
            }
        }
    }
}

/// One head's new entries in budget mode, played one arrival at a time.
struct Arrivals<'a> {
    budget: Budget,
    protect: &'a Protection,
    /// The new entries' positions.
    positions: &'a [u32],
    /// Generated tokens are all kept (decode flags off).
    keep_all: bool,
}

impl Arrivals<'_> {
    /// Appends the new entries' keep probabilities to the head's `scores` and plays their
    /// arrivals ([`select::evict_greedily`]); returns, for every entry, the arrival after which
    /// it is evicted. A ratio budget below the protected tokens (early in a sequence) keeps
    /// them: the gates were trained to see their sinks and local window.
    fn play(&self, scores: &mut Vec<f32>, new: Vec<f32>) -> Vec<Option<usize>> {
        let first_new = scores.len();
        // With decode flags off, generated tokens outrank every prompt token.
        scores.extend(
            new.into_iter()
                .map(|s| if self.keep_all { f32::INFINITY } else { s }),
        );
        let protected = self.protect.sinks.saturating_add(self.protect.recent);
        let keep_after = |arrival: usize| {
            let seen = self.positions[arrival - first_new] as usize + 1;
            self.budget.keep_count(seen).max(protected.min(seen))
        };
        select::evict_greedily(scores, first_new, &keep_after, self.protect)
    }
}

impl LayerHook for AgHook {
    fn begin_pass(&mut self, pass: Pass) {
        self.pass = pass;
        self.cache.mark();
        self.before_pass = Some(self.entries.lens());
    }

    fn abort_pass(&mut self) {
        self.cache.rollback();
        if let Some(lens) = self.before_pass.take() {
            self.entries.truncate(&lens);
        }
    }

    fn plan(
        &mut self,
        layer: usize,
        normed: &Tensor,
        positions: &[u32],
        kv: &SequenceKv,
    ) -> model_zoo::Result<LayerPlan> {
        let probs = self.keep_probs(layer, normed, positions)?;
        let keep_all = self.pass == Pass::Decode && !self.decode;
        let many = positions.len() > 1;
        let mut until = Vec::with_capacity(probs.len());
        match &mut self.entries {
            Entries::Flags { thresholds, flags } => {
                let threshold = thresholds.of_layer(layer);
                // Beyond the positions' range a protection covers every position.
                let (sinks, window) = (saturate(self.protect.sinks), saturate(self.protect.recent));
                for (head, head_probs) in probs.iter().enumerate() {
                    let flags = &mut flags[layer][head];
                    flags.extend(head_probs.iter().map(|&s| keep_all || s > threshold));
                    if many {
                        // Sinks always; a flagged-out key only to the queries of its window.
                        let positions = kv.retained_positions(layer, head);
                        until.push(
                            positions
                                .iter()
                                .zip(flags.iter())
                                .map(|(&p, &keep)| {
                                    if keep || p < sinks {
                                        u32::MAX
                                    } else {
                                        p.saturating_add(window)
                                    }
                                })
                                .collect(),
                        );
                    }
                }
            }
            Entries::Probs {
                budget,
                probs: all,
                pending,
            } => {
                let pending = &mut pending[layer];
                pending.clear();
                let arrivals = Arrivals {
                    budget: *budget,
                    protect: &self.protect,
                    positions,
                    keep_all,
                };
                for (head, head_probs) in probs.into_iter().enumerate() {
                    let scores = &mut all[layer][head];
                    let first_new = scores.len();
                    let evicted = arrivals.play(scores, head_probs);
                    if many {
                        until.push(
                            evicted
                                .iter()
                                .map(|e| e.map_or(u32::MAX, |a| positions[a - first_new]))
                                .collect(),
                        );
                    }
                    pending.push(evicted.iter().map(Option::is_none).collect());
                }
            }
        }
        Ok(LayerPlan {
            visible_until: many.then_some(until),
            ..LayerPlan::default()
        })
    }

    fn after_attention(
        &mut self,
        layer: usize,
        outcome: AttentionOutcome<'_>,
    ) -> model_zoo::Result<()> {
        if layer == 0 {
            // The pass commits (every layer follows, in order): it can no longer be undone.
            self.cache.commit();
            self.before_pass = None;
        }
        let kv = outcome.kv;
        let (Some(&first), Some(&last)) = (outcome.positions.first(), outcome.positions.last())
        else {
            return Ok(());
        };
        for head in 0..kv.n_kv_heads() {
            match &mut self.entries {
                Entries::Flags { flags, .. } => {
                    let flags = &mut flags[layer][head];
                    let positions = kv.retained_positions(layer, head);
                    if let Some((from, mask)) =
                        aged_out(positions, flags, first, last, &self.protect)
                    {
                        kv.evict_tail(layer, head, &mask)?;
                        retain_tail(flags, from, &mask);
                    }
                }
                Entries::Probs { pending, probs, .. } => {
                    let mask = std::mem::take(&mut pending[layer][head]);
                    if !mask.iter().all(|&k| k) {
                        kv.evict(layer, head, &mask)?;
                        retain_tail(&mut probs[layer][head], 0, &mask);
                    }
                }
            }
        }
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        let entries = match &self.entries {
            Entries::Flags { flags, .. } => flags.iter().flatten().map(Vec::len).sum::<usize>(),
            Entries::Probs { probs, .. } => {
                probs.iter().flatten().map(Vec::len).sum::<usize>() * std::mem::size_of::<f32>()
            }
        };
        self.cache.bytes() + entries
    }
}

/// Threshold mode's keep mask of one head's retained entries (`positions`, `flags`) after a
/// pass over positions `first..=last`, as `(from, keep)`: `keep[i]` for entry `from + i`, every
/// entry before `from` staying; `None` when every entry stays. An entry stays while it is
/// flagged, a sink, or at most `recent` positions older than the pass's last token. Every
/// earlier pass left only such entries and a pass starts where the previous one ended, so the
/// entries more than `recent` positions older than `first` all stay and only the newer tail is
/// read and flagged: a decode step costs O(`recent`), not O(retained).
fn aged_out(
    positions: &[u32],
    flags: &[bool],
    first: u32,
    last: u32,
    protect: &Protection,
) -> Option<(usize, Vec<bool>)> {
    let (sinks, recent) = (protect.sinks as u64, protect.recent as u64);
    let from = positions.partition_point(|&p| u64::from(p) + recent < u64::from(first));
    let stays = |p: u32, flag: bool| {
        flag || u64::from(p) < sinks || u64::from(last.saturating_sub(p)) < recent
    };
    let tail = positions[from..].iter().zip(&flags[from..]);
    if tail.clone().all(|(&p, &flag)| stays(p, flag)) {
        return None;
    }
    Some((from, tail.map(|(&p, &flag)| stays(p, flag)).collect()))
}

/// A protection's size as a position distance: beyond the positions' range (a size above
/// `u32::MAX`) it covers every position, as `u32::MAX` does.
fn saturate(tokens: usize) -> u32 {
    u32::try_from(tokens).unwrap_or(u32::MAX)
}

/// Keeps, of the elements from `from` on, those whose `keep` flag is true (in order; the
/// elements before `from` all stay). Costs O(`keep.len()`).
fn retain_tail<T: Copy>(values: &mut Vec<T>, from: usize, keep: &[bool]) {
    let mut w = from;
    for (r, &k) in keep.iter().enumerate() {
        if k {
            values[w] = values[from + r];
            w += 1;
        }
    }
    values.truncate(w);
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Passes of random lengths with random flags: checking only the tail `aged_out` reads
    /// leaves exactly the entries the rule keeps when every entry is checked after every pass.
    #[test]
    fn checking_the_tail_keeps_what_checking_every_entry_keeps() {
        let mut rng = StdRng::seed_from_u64(7);
        for (sinks, recent) in [(0, 0), (0, 1), (4, 32), (2, 5), (0, 300)] {
            let protect = Protection { sinks, recent };
            let (mut positions, mut flags) = (Vec::<u32>::new(), Vec::<bool>::new());
            let mut next = 0u32;
            while next < 2000 {
                let len = if rng.random_bool(0.8) {
                    1
                } else {
                    rng.random_range(2..90)
                };
                let (first, last) = (next, next + len - 1);
                positions.extend(first..=last);
                flags.extend((0..len).map(|_| rng.random_bool(0.5)));
                next += len;
                let expected: Vec<bool> = positions
                    .iter()
                    .zip(&flags)
                    .map(|(&p, &f)| f || (p as usize) < sinks || ((last - p) as usize) < recent)
                    .collect();
                match aged_out(&positions, &flags, first, last, &protect) {
                    Some((from, mask)) => {
                        assert!(expected[..from].iter().all(|&k| k), "before the tail");
                        assert_eq!(
                            mask,
                            expected[from..],
                            "sinks {sinks} recent {recent} at {last}"
                        );
                        retain_tail(&mut positions, from, &mask);
                        retain_tail(&mut flags, from, &mask);
                    }
                    None => assert!(expected.iter().all(|&k| k), "missed an eviction at {last}"),
                }
            }
        }
    }
}
