//! The H2O baseline's state: per (layer, KV head), the attention each retained entry has
//! accumulated over every query that saw it, prompt and generated.
//!
//! Invariants: for every (layer, head) the accumulator holds exactly one sum (and one count of
//! the queries that saw the entry) per entry the cache retains, in the cache's order: entries
//! are appended by [`H2oAccumulator::add`] when the cache appends them and compacted by
//! [`H2oAccumulator::retain`] with the very mask the cache applies. Sums are kept in f64.
//!
//! Selection (not done here): keep the top `k_heavy` by [`H2oAccumulator::scores`] plus the
//! last `k_recent`, i.e. `select_top_k(&scores, k_heavy + k_recent, &Protection { sinks: 0,
//! recent: k_recent })`, whenever the head exceeds its budget.

use crate::error::{invalid, GateError, Result};

/// Accumulated attention per retained entry, for every (layer, KV head).
#[derive(Debug, Clone)]
pub struct H2oAccumulator {
    n_layers: usize,
    n_heads: usize,
    normalise: bool,
    /// `[layer * n_heads + head][entry]`: summed attention.
    sums: Vec<Vec<f64>>,
    /// Same layout: how many queries have seen the entry.
    counts: Vec<Vec<u64>>,
}

impl H2oAccumulator {
    /// An empty accumulator for `n_layers` x `n_kv_heads` heads. With `normalise`, scores are
    /// the mean attention per query that saw the entry instead of the plain sum.
    ///
    /// Errors: zero layers or heads.
    pub fn new(n_layers: usize, n_kv_heads: usize, normalise: bool) -> Result<Self> {
        if n_layers == 0 || n_kv_heads == 0 {
            return Err(invalid(
                "H2oAccumulator::new: n_layers x n_kv_heads",
                format!("{n_layers} x {n_kv_heads}"),
                "at least one layer and one KV head",
            ));
        }
        let slots = n_layers * n_kv_heads;
        Ok(Self {
            n_layers,
            n_heads: n_kv_heads,
            normalise,
            sums: vec![Vec::new(); slots],
            counts: vec![Vec::new(); slots],
        })
    }

    /// The same sums and counts, scored with or without normalisation (a policy continuing
    /// from statistics gathered for another).
    pub fn with_normalise(mut self, normalise: bool) -> Self {
        self.normalise = normalise;
        self
    }

    /// Whether scores are normalised by the number of queries that saw each entry.
    pub fn normalised(&self) -> bool {
        self.normalise
    }

    fn slot(&self, layer: usize, head: usize) -> Result<usize> {
        if layer >= self.n_layers {
            return Err(GateError::OutOfRange {
                what: "layer",
                index: layer,
                len: self.n_layers,
            });
        }
        if head >= self.n_heads {
            return Err(GateError::OutOfRange {
                what: "kv head",
                index: head,
                len: self.n_heads,
            });
        }
        Ok(layer * self.n_heads + head)
    }

    /// Bytes of the accumulated state (a sum and a count per tracked entry), all heads.
    pub fn bytes(&self) -> usize {
        let per_entry = std::mem::size_of::<f64>() + std::mem::size_of::<u64>();
        self.sums.iter().map(Vec::len).sum::<usize>() * per_entry
    }

    /// Number of entries tracked for (layer, head).
    pub fn len(&self, layer: usize, head: usize) -> Result<usize> {
        Ok(self.sums[self.slot(layer, head)?].len())
    }

    /// Adds one block of causal queries' attention to (layer, head).
    ///
    /// `column_sums[j]` is the attention mass the block's queries gave entry `j` (group mean
    /// over the head's query heads, summed over the block's queries), over the `m =
    /// column_sums.len()` entries retained *after* appending the block's new tokens. Entries
    /// beyond the current length are appended. The block's `n_queries` queries are the last
    /// `n_queries` entries, causal: entry `j < m - n_queries` was seen by all of them, entry
    /// `j >= m - n_queries` by `m - j` of them (prefill: `n_queries = m = T`; decode: 1).
    ///
    /// Errors: bad indices, `m` below the current length, or `n_queries` outside
    /// `[m - len, m]` (every appended entry must be one of the queries).
    pub fn add(
        &mut self,
        layer: usize,
        head: usize,
        column_sums: &[f32],
        n_queries: usize,
    ) -> Result<()> {
        let s = self.slot(layer, head)?;
        let (len, m) = (self.sums[s].len(), column_sums.len());
        if m < len {
            return Err(invalid(
                "H2oAccumulator::add: column_sums.len()",
                m,
                format!(
                    "at least the {len} entries already tracked for layer {layer}, head {head}"
                ),
            ));
        }
        if n_queries > m || n_queries < m - len {
            return Err(invalid(
                "H2oAccumulator::add: n_queries",
                n_queries,
                format!(
                    "between the {} appended entries and the {m} columns",
                    m - len
                ),
            ));
        }
        self.sums[s].resize(m, 0.0);
        self.counts[s].resize(m, 0);
        let first_query = m - n_queries;
        for (j, (acc, &v)) in self.sums[s].iter_mut().zip(column_sums).enumerate() {
            *acc += f64::from(v);
            self.counts[s][j] += if j < first_query { n_queries } else { m - j } as u64;
        }
        Ok(())
    }

    /// Compacts (layer, head) in step with the cache: keeps entry `j` iff `keep[j]`.
    ///
    /// Errors: bad indices, or `keep.len()` differs from the tracked length.
    pub fn retain(&mut self, layer: usize, head: usize, keep: &[bool]) -> Result<()> {
        let s = self.slot(layer, head)?;
        if keep.len() != self.sums[s].len() {
            return Err(invalid(
                "H2oAccumulator::retain: keep.len()",
                keep.len(),
                format!(
                    "the {} entries tracked for layer {layer}, head {head}",
                    self.sums[s].len()
                ),
            ));
        }
        let mut flags = keep.iter();
        self.sums[s].retain(|_| flags.next().copied().unwrap_or(false));
        let mut flags = keep.iter();
        self.counts[s].retain(|_| flags.next().copied().unwrap_or(false));
        Ok(())
    }

    /// The H2O score of every tracked entry of (layer, head): the accumulated sum, or with
    /// normalisation the sum divided by the number of queries that saw the entry.
    pub fn scores(&self, layer: usize, head: usize) -> Result<Vec<f32>> {
        let s = self.slot(layer, head)?;
        Ok(self.sums[s]
            .iter()
            .zip(&self.counts[s])
            .map(|(&sum, &c)| {
                if self.normalise && c > 0 {
                    (sum / c as f64) as f32
                } else {
                    sum as f32
                }
            })
            .collect())
    }

    /// Forgets every entry of every head (a new sequence).
    pub fn clear(&mut self) {
        self.sums.iter_mut().for_each(Vec::clear);
        self.counts.iter_mut().for_each(Vec::clear);
    }
}
