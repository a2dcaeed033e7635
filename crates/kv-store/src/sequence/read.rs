//! What a [`SequenceKv`] tells without changing: retained entries, positions, block ids, copies
//! of a head's contents, key norms, statistics, and attention of new queries over the retained
//! entries (one call, or a batch of several sequences' calls run as one job).

use crate::attention::{attend_calls, attend_heads, HeadsCall};
use crate::{simd, AttendOptions, AttendOutput, KvError, Parallel};

use super::{HeadTable, SequenceKv};

/// A copy of one KV head's retained entries, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeadContents {
    /// Keys `[retained, head_dim]` (converted to f32).
    pub keys: Vec<f32>,
    /// Values `[retained, head_dim]` (converted to f32).
    pub values: Vec<f32>,
    /// Absolute positions `[retained]`.
    pub positions: Vec<u32>,
}

/// One sequence's attention call in a batch ([`SequenceKv::attend_batch`]): the arguments of
/// [`SequenceKv::attend`].
#[derive(Clone)]
pub struct AttendCall<'a> {
    /// The sequence's store.
    pub kv: &'a SequenceKv,
    /// The layer attended.
    pub layer: usize,
    /// Queries, token-major `[n_q, n_q_heads, head_dim]`.
    pub q: &'a [f32],
    /// The queries' absolute positions.
    pub q_positions: &'a [u32],
    /// Masking, probabilities, and the pool that decides the call's split (as alone).
    pub opts: AttendOptions<'a>,
}

/// Accounting of one sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SequenceStats {
    /// Retained entries per `[layer][kv_head]`.
    pub retained: Vec<Vec<usize>>,
    /// Entries ever appended per `[layer][kv_head]` (since creation or the last `clear`).
    pub appended: Vec<Vec<u64>>,
    /// Tokens seen per layer: one past the highest position ever appended to any of its heads.
    pub tokens_seen: Vec<u64>,
    /// Blocks this sequence's tables hold (a block shared with a fork counts here in full).
    pub blocks_in_use: usize,
    /// Bytes of those blocks.
    pub bytes_in_use: usize,
    /// Of `blocks_in_use`, the blocks other sequences hold too (copy-on-write sharing after
    /// [`SequenceKv::fork`]); the pool counts each of them once.
    pub blocks_shared: usize,
    /// Bytes of the shared blocks.
    pub bytes_shared: usize,
}

impl SequenceStats {
    /// Retained entries summed over every layer and head.
    pub fn retained_total(&self) -> usize {
        self.retained.iter().flatten().sum()
    }
}

impl SequenceKv {
    /// Retained entries of (`layer`, `head`); 0 when out of range.
    pub fn retained(&self, layer: usize, head: usize) -> usize {
        self.table(layer, head).map_or(0, HeadTable::len)
    }

    /// Positions of the retained entries, in order; empty when out of range.
    pub fn positions(&self, layer: usize, head: usize) -> Vec<u32> {
        self.retained_positions(layer, head).to_vec()
    }

    /// [`SequenceKv::positions`] borrowed (no copy: for per-token bookkeeping).
    pub fn retained_positions(&self, layer: usize, head: usize) -> &[u32] {
        self.table(layer, head).map_or(&[], HeadTable::positions)
    }

    /// Ids of the pool blocks held by (`layer`, `head`), in order; empty when out of range.
    pub fn block_ids(&self, layer: usize, head: usize) -> Vec<u32> {
        self.table(layer, head)
            .map_or_else(Vec::new, |t| t.blocks.iter().map(|b| b.id).collect())
    }

    /// A copy of the retained keys, values and positions of (`layer`, `head`), keys and values
    /// converted to f32; empty when out of range.
    pub fn read_head(&self, layer: usize, head: usize) -> HeadContents {
        let Some(t) = self.table(layer, head) else {
            return HeadContents::default();
        };
        let d = self.cfg.head_dim;
        let mut out = HeadContents {
            keys: Vec::with_capacity(t.len() * d),
            values: Vec::with_capacity(t.len() * d),
            positions: t.positions().to_vec(),
        };
        let mut scratch = vec![0.0f32; self.cfg.block_size * d];
        for seg in t.segments(&self.cfg) {
            let n = seg.positions.len();
            out.keys
                .extend_from_slice(seg.keys.view(0, n, d, &mut scratch));
            out.values
                .extend_from_slice(seg.values.view(0, n, d, &mut scratch));
        }
        out
    }

    /// L2 norm of each retained key of (`layer`, `head`), in order (KNorm policy); empty when out
    /// of range.
    pub fn key_norms(&self, layer: usize, head: usize) -> Vec<f32> {
        let Some(t) = self.table(layer, head) else {
            return Vec::new();
        };
        let d = self.cfg.head_dim;
        let mut scratch = vec![0.0f32; self.cfg.block_size * d];
        let mut norms = Vec::with_capacity(t.len());
        for seg in t.segments(&self.cfg) {
            let keys = seg.keys.view(0, seg.positions.len(), d, &mut scratch);
            norms.extend(keys.chunks_exact(d).map(|k| simd::dot(k, k).sqrt()));
        }
        norms
    }

    /// Attention of new queries over `layer`'s retained entries (which already include the
    /// just-appended chunk). `q`: token-major `[n_q, n_q_heads, head_dim]` f32 with `n_q_heads` a
    /// multiple of `n_kv_heads` (query head `h` uses KV head `h / G`); `q_positions`: the `n_q`
    /// absolute positions. Returns `out` as `[n_q, n_q_heads, head_dim]`, and probability sums
    /// when `opts.prob_sums` asks for them. See [`AttendOptions`] for masking.
    pub fn attend(
        &self,
        layer: usize,
        q: &[f32],
        q_positions: &[u32],
        opts: &AttendOptions<'_>,
    ) -> Result<AttendOutput, KvError> {
        attend_heads(self.heads_call(layer, q, q_positions, opts)?)
    }

    /// Several sequences' attention calls ([`SequenceKv::attend`] each) as one job: the work
    /// units of every call run together on `pool` (rayon's global pool when `None`), so a batch
    /// of decode rows, each too short to split over threads alone, keeps every thread busy at the
    /// cost of one handoff. Each call is validated and split into units as it is alone (by its
    /// own options), so its result is bit for bit what [`SequenceKv::attend`] returns for it.
    /// Returns one result per call, in order; a call's error leaves the others unaffected.
    pub fn attend_batch(
        calls: &[AttendCall<'_>],
        pool: Option<&dyn Parallel>,
    ) -> Vec<Result<AttendOutput, KvError>> {
        let mut results: Vec<Option<Result<AttendOutput, KvError>>> =
            calls.iter().map(|_| None).collect();
        let mut valid = Vec::with_capacity(calls.len());
        let mut heads_calls = Vec::with_capacity(calls.len());
        for (i, c) in calls.iter().enumerate() {
            match c.kv.heads_call(c.layer, c.q, c.q_positions, &c.opts) {
                Ok(call) => {
                    valid.push(i);
                    heads_calls.push(call);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        for (i, r) in valid.into_iter().zip(attend_calls(&heads_calls, pool)) {
            results[i] = Some(r);
        }
        results
            .into_iter()
            .map(|r| r.expect("every call answered"))
            .collect()
    }

    /// The views of `layer`'s KV heads for an attention call.
    fn heads_call<'a>(
        &'a self,
        layer: usize,
        q: &'a [f32],
        q_positions: &'a [u32],
        opts: &'a AttendOptions<'a>,
    ) -> Result<HeadsCall<'a>, KvError> {
        self.check_layer(layer)?;
        let base = layer * self.n_kv_heads;
        Ok(HeadsCall {
            layer,
            heads: self.tables[base..base + self.n_kv_heads]
                .iter()
                .map(|t| t.view(&self.cfg))
                .collect(),
            head_dim: self.cfg.head_dim,
            q,
            q_positions,
            opts,
        })
    }

    /// Accounting of this sequence.
    pub fn stats(&self) -> SequenceStats {
        let h = self.n_kv_heads;
        let layer_tables = |l: usize| &self.tables[l * h..(l + 1) * h];
        let blocks_in_use: usize = self.tables.iter().map(|t| t.blocks.len()).sum();
        let blocks_shared: usize = self
            .tables
            .iter()
            .map(|t| t.shared(0..t.blocks.len()))
            .sum();
        SequenceStats {
            retained: (0..self.n_layers)
                .map(|l| layer_tables(l).iter().map(HeadTable::len).collect())
                .collect(),
            appended: (0..self.n_layers)
                .map(|l| layer_tables(l).iter().map(|t| t.appended).collect())
                .collect(),
            tokens_seen: self.tokens_seen.clone(),
            blocks_in_use,
            bytes_in_use: blocks_in_use * self.cfg.block_bytes(),
            blocks_shared,
            bytes_shared: blocks_shared * self.cfg.block_bytes(),
        }
    }
}
