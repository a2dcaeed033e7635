//! [`GateConfig`]: the shape and hyper-parameters of the gates of one base model (stored as
//! JSON in gate files), their validation, the visibility rule of the gate's own attention
//! window, and the parameters' names and shapes.
//!
//! Invariants: a config that passed [`GateConfig::validate`] has non-zero sizes, an even
//! `head_dim`, a finite positive RoPE base, a threshold in `[0, 1]` and a finite bias; the
//! parameter list ([`GateConfig::param_shapes`]) is the one order gate files, constructors and
//! training use.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};
use crate::select::Protection;

/// Shape and hyper-parameters of an Attention-Gate for one base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateConfig {
    /// Hidden size `D` of the base model (the gate's input width; `hidden` in gate files).
    #[serde(rename = "hidden")]
    pub hidden_size: usize,
    /// Number of KV heads of the base model (one keep probability each).
    pub n_kv_heads: usize,
    /// Number of decoder layers (one gate each).
    pub n_layers: usize,
    /// The gate's own attention heads `Ha` (default 4).
    pub heads: usize,
    /// The gate's head dimension `da` (default 32; must be even for RoPE).
    pub head_dim: usize,
    /// RoPE base of the gate's attention (normally the base model's).
    pub rope_theta: f32,
    /// Hard-mode threshold `tau`: keep iff `s > tau` (default 0.5).
    pub threshold: f32,
    /// Initial gate bias `bg` (default 3.0: start from "keep almost everything").
    pub bias_init: f32,
    /// Protection the gates were trained with, the default of the inference policy: the first
    /// `sinks` tokens are always visible (default 0; absent in older files).
    #[serde(default)]
    pub sinks: usize,
    /// Protection the gates were trained with, the default of the inference policy: a
    /// flagged-out token stays visible to the next `recent` queries (default 0: only to itself;
    /// `window` in gate files).
    #[serde(default, rename = "window")]
    pub recent: usize,
    /// The gate's own attention window `W`: a token's gate attends to the tokens at most
    /// `W - 1` positions before it (and itself), so a session keeps `K'`, `V'` of only the last
    /// `W` tokens per layer. 0: unbounded (gates written before the window existed).
    #[serde(default)]
    pub attention_window: usize,
}

impl GateConfig {
    /// A configuration with the default gate shape (`heads = 4`, `head_dim = 32`,
    /// `attention_window = 64`, `threshold = 0.5`, `bias_init = 3.0`).
    pub fn new(hidden_size: usize, n_kv_heads: usize, n_layers: usize, rope_theta: f32) -> Self {
        Self {
            hidden_size,
            n_kv_heads,
            n_layers,
            heads: 4,
            head_dim: 32,
            rope_theta,
            threshold: 0.5,
            bias_init: 3.0,
            sinks: 0,
            recent: 0,
            attention_window: DEFAULT_ATTENTION_WINDOW,
        }
    }

    /// Whether a query at position `query` sees the key at position `key` in the gate's own
    /// attention (causal, and within the attention window when there is one; a window wider
    /// than the positions reach sees every earlier key).
    pub fn sees(&self, query: u32, key: u32) -> bool {
        key <= query
            && (self.attention_window == 0 || ((query - key) as usize) < self.attention_window)
    }

    /// The protection the gates were trained with (`sinks`, `recent`).
    pub fn protection(&self) -> Protection {
        Protection {
            sinks: self.sinks,
            recent: self.recent,
        }
    }

    /// Checks every field: non-zero sizes, even `head_dim`, `rope_theta > 0`, `threshold` in
    /// `[0, 1]`, finite `bias_init`.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("GateConfig.hidden_size", self.hidden_size),
            ("GateConfig.n_kv_heads", self.n_kv_heads),
            ("GateConfig.n_layers", self.n_layers),
            ("GateConfig.heads", self.heads),
            ("GateConfig.head_dim", self.head_dim),
        ];
        for (name, v) in sizes {
            if v == 0 {
                return Err(invalid(name, v, "a non-zero size"));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid(
                "GateConfig.head_dim",
                self.head_dim,
                "an even size (RoPE rotates halves)",
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(invalid(
                "GateConfig.rope_theta",
                self.rope_theta,
                "a finite positive RoPE base",
            ));
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(invalid(
                "GateConfig.threshold",
                self.threshold,
                "a keep-probability threshold in [0, 1]",
            ));
        }
        if self.heads.checked_mul(self.head_dim).is_none() {
            return Err(invalid(
                "GateConfig.heads",
                self.heads,
                "heads × head_dim that fits in memory",
            ));
        }
        if !self.bias_init.is_finite() {
            return Err(invalid(
                "GateConfig.bias_init",
                self.bias_init,
                "a finite bias",
            ));
        }
        Ok(())
    }

    /// Width of the gate's attention output, `heads * head_dim`.
    pub fn inner(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Every parameter tensor's name and shape, layer by layer, in a fixed order:
    /// `layers.{l}.wq`, `.wk`, `.wv` (`[inner, hidden]`), `.wg` (`[n_kv_heads, inner]`),
    /// `.bg` (`[n_kv_heads]`).
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (inner, hidden, kv) = (self.inner(), self.hidden_size, self.n_kv_heads);
        (0..self.n_layers)
            .flat_map(|l| {
                [
                    (PARAM_NAMES[0], vec![inner, hidden]),
                    (PARAM_NAMES[1], vec![inner, hidden]),
                    (PARAM_NAMES[2], vec![inner, hidden]),
                    (PARAM_NAMES[3], vec![kv, inner]),
                    (PARAM_NAMES[4], vec![kv]),
                ]
                .map(|(p, shape)| (format!("layers.{l}.{p}"), shape))
            })
            .collect()
    }
}

/// The gate's own attention window of new gates: 64 tokens keep its per-session state at
/// `2 * 64 * heads * head_dim` f32 per layer (64 KiB with the default shape), about 2% of the
/// default model's full f16 KV cache at 4,096 tokens, whatever the conversation's length.
pub const DEFAULT_ATTENTION_WINDOW: usize = 64;

/// Per-layer parameter names, in [`GateConfig::param_shapes`] order.
const PARAM_NAMES: [&str; 5] = ["wq", "wk", "wv", "wg", "bg"];
