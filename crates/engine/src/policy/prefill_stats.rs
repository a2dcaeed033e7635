//! What the score-based policies gather during a prefill for the eviction at its end
//! ([`PrefillStats`]): each layer's last queries ([`QueryTail`], rolling over the chunks), the
//! prefill's length, and H2O's accumulated attention, which lives on across prefills.
//!
//! Invariants: a tail holds at most the rows asked for, the newest; a pass that fails before it
//! commits leaves the statistics as they were (the first chunk of a prefill keeps what it
//! replaced until `commit`; `abort` puts it back).

use std::ops::Range;

use gate_core::score::H2oAccumulator;
use kv_store::{AttendOptions, SequenceKv};
use model_zoo::{AttentionOutcome, ModelConfig, ModelError, Pass};

/// The last queries of the current prefill in one layer: a rolling window over its chunks.
#[derive(Clone, Debug, Default)]
pub(crate) struct QueryTail {
    /// Token-major `[rows, n_heads * head_dim]`, after RoPE.
    queries: Vec<f32>,
    /// Their absolute positions.
    positions: Vec<u32>,
    /// The layer's softmax scale.
    scale: f32,
}

impl QueryTail {
    /// Bytes held (queries and positions).
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of_val(self.queries.as_slice())
            + std::mem::size_of_val(self.positions.as_slice())
    }

    /// Appends one pass's queries, keeping the last `rows`.
    pub(crate) fn push(&mut self, queries: &[f32], positions: &[u32], scale: f32, rows: usize) {
        let n = positions.len();
        if rows == 0 || n == 0 {
            return;
        }
        let width = queries.len() / n;
        let take = n.min(rows);
        self.queries
            .extend_from_slice(&queries[(n - take) * width..]);
        self.positions.extend_from_slice(&positions[n - take..]);
        let excess = self.positions.len().saturating_sub(rows);
        self.queries.drain(..excess * width);
        self.positions.drain(..excess);
        self.scale = scale;
    }

    /// Attention of the last `rows` queries (fewer if the prefill had fewer) over `layer`'s
    /// retained entries: per KV head, per entry, summed over those queries, group mean.
    pub(crate) fn attention(
        &self,
        kv: &SequenceKv,
        layer: usize,
        rows: usize,
        causal: bool,
    ) -> model_zoo::Result<Vec<Vec<f32>>> {
        let held = self.positions.len();
        let k = rows.min(held);
        if k == 0 {
            return Err(ModelError::Input(
                "eviction: no queries of the prefill were recorded".into(),
            ));
        }
        let width = self.queries.len() / held;
        let opts = AttendOptions::new(self.scale)
            .causal(causal)
            .prob_sums(0..k);
        kv.attend(
            layer,
            &self.queries[(held - k) * width..],
            &self.positions[held - k..],
            &opts,
        )?
        .prob_sums
        .ok_or_else(|| ModelError::Input("eviction: no attention statistics".into()))
    }
}

/// What a prefill gathers for the eviction at its end (and H2O's sums, which live on).
#[derive(Clone, Debug)]
pub(crate) struct PrefillStats {
    /// Per layer: the current prefill's last queries.
    pub(crate) tails: Vec<QueryTail>,
    /// Rows each tail keeps in the current prefill.
    pub(crate) tail_rows: usize,
    /// Tokens in the current prefill, all chunks.
    pub(crate) prefill_len: usize,
    /// H2O: the attention each retained entry has received from every query so far.
    pub(crate) h2o: Option<H2oAccumulator>,
    /// What the first chunk of a prefill replaced, until its pass commits (`commit`) or fails
    /// (`abort` puts it back): a failed pass leaves the statistics as they were.
    undo: Option<PrefillStart>,
}

/// The prefill state a new prefill's first chunk replaces.
#[derive(Clone, Debug)]
struct PrefillStart {
    tails: Vec<QueryTail>,
    tail_rows: usize,
    prefill_len: usize,
}

impl PrefillStats {
    pub(crate) fn new(cfg: &ModelConfig, h2o: bool) -> model_zoo::Result<Self> {
        Ok(PrefillStats {
            tails: vec![QueryTail::default(); cfg.n_layers],
            tail_rows: 0,
            prefill_len: 0,
            h2o: if h2o {
                Some(H2oAccumulator::new(cfg.n_layers, cfg.n_kv_heads, false)?)
            } else {
                None
            },
            undo: None,
        })
    }

    /// A pass starts; the first chunk of a prefill resets the tails to hold `rows` rows (what
    /// it replaces is kept until the pass commits).
    pub(crate) fn begin(&mut self, pass: Pass, rows: usize) {
        self.undo = None;
        let Pass::Prefill(chunk) = pass else {
            return;
        };
        if chunk.is_first() {
            self.undo = Some(PrefillStart {
                tails: self.tails.iter_mut().map(std::mem::take).collect(),
                tail_rows: self.tail_rows,
                prefill_len: self.prefill_len,
            });
            self.tail_rows = rows;
            self.prefill_len = chunk.len;
        }
    }

    /// The pass went through: what its start replaced is gone for good.
    pub(crate) fn commit(&mut self) {
        self.undo = None;
    }

    /// The pass failed before it committed (nothing was recorded): the statistics go back to
    /// what they were before it started.
    pub(crate) fn abort(&mut self) {
        if let Some(start) = self.undo.take() {
            self.tails = start.tails;
            self.tail_rows = start.tail_rows;
            self.prefill_len = start.prefill_len;
        }
    }

    /// Bytes held: the query tails (those a running pass may still restore included) and H2O's
    /// sums.
    pub(crate) fn bytes(&self) -> usize {
        let undo = self
            .undo
            .as_ref()
            .map_or(0, |u| u.tails.iter().map(QueryTail::bytes).sum());
        self.tails.iter().map(QueryTail::bytes).sum::<usize>()
            + undo
            + self.h2o.as_ref().map_or(0, H2oAccumulator::bytes)
    }

    /// Whether a pass must hand its queries to `after_attention`: a prefill whose tails keep
    /// rows.
    pub(crate) fn wants_queries(&self, pass: Pass) -> bool {
        matches!(pass, Pass::Prefill(_)) && self.tail_rows > 0
    }

    /// Query rows whose attention a pass of `n` tokens must return (H2O: all of them).
    pub(crate) fn prob_rows(&self, n: usize) -> Option<Range<usize>> {
        self.h2o.is_some().then_some(0..n)
    }

    /// Records one layer's pass.
    pub(crate) fn record(
        &mut self,
        layer: usize,
        outcome: &AttentionOutcome<'_>,
        prefill: bool,
    ) -> model_zoo::Result<()> {
        if let (Some(acc), Some(sums)) = (&mut self.h2o, &outcome.prob_sums) {
            let queries = outcome.positions.len();
            for (head, head_sums) in sums.iter().enumerate() {
                acc.add(layer, head, head_sums, queries)?;
            }
        }
        if prefill {
            self.tails[layer].push(
                outcome.queries,
                outcome.positions,
                outcome.scale,
                self.tail_rows,
            );
        }
        Ok(())
    }
}
