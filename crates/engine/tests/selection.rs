//! End-to-end selection, per policy, against the papers' formulas computed here: on a tiny
//! random model, the queries and keys of every layer are captured from a full-cache prefill,
//! the attention matrices are recomputed in plain f64 loops (not the engine's scorer or kernel),
//! each policy's kept positions are derived from its definition (`docs/algorithms.md`),
//! and compared with what a session under the policy kept. The prefill runs in 64-token chunks,
//! so the policies' statistics span chunks.
//!
//! Two selections may differ only where the reference scores of the swapped entries tie within
//! rounding (the engine accumulates in f32).
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

mod common;

use std::collections::BTreeSet;

use common::tokens;

use engine::{Engine, PolicyOptions, PolicySpec};
use gate_core::select::Budget;
use kv_store::SequenceKv;
use model_zoo::{AttentionOutcome, LayerHook, LayerPlan, LogitsFor};

const CHUNK: usize = 64;
const WINDOW: usize = 32;

fn tiny_engine() -> (tempfile::TempDir, Engine) {
    common::tiny_engine(3, 17, engine::KvDtype::F32, CHUNK)
}

/// Records every layer's queries (after RoPE) during a full-cache prefill.
#[derive(Default)]
struct Capture {
    /// `[layer]`: token-major `[T, n_heads * head_dim]`.
    queries: Vec<Vec<f32>>,
}

impl LayerHook for Capture {
    fn plan(
        &mut self,
        _layer: usize,
        _normed: &candle_core::Tensor,
        _positions: &[u32],
        _kv: &SequenceKv,
    ) -> model_zoo::Result<LayerPlan> {
        // The decoder hands queries only to hooks that ask for them.
        Ok(LayerPlan {
            queries: true,
            ..LayerPlan::default()
        })
    }

    fn after_attention(&mut self, layer: usize, o: AttentionOutcome<'_>) -> model_zoo::Result<()> {
        if self.queries.len() <= layer {
            self.queries.resize(layer + 1, Vec::new());
        }
        self.queries[layer].extend_from_slice(o.queries);
        Ok(())
    }
}

/// Queries and keys of one layer, in f64.
struct Layer {
    /// `[T][n_heads][d]`.
    q: Vec<Vec<Vec<f64>>>,
    /// `[n_kv_heads][T][d]`.
    k: Vec<Vec<Vec<f64>>>,
}

struct Model {
    layers: Vec<Layer>,
    n_heads: usize,
    n_kv: usize,
    d: usize,
    t: usize,
}

fn capture(engine: &Engine, prompt: &[u32]) -> Model {
    let cfg = engine.model_config();
    let (n_heads, n_kv, d) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
    let mut kv = SequenceKv::new(engine.pool(), cfg.n_layers, n_kv);
    let mut hook = Capture::default();
    for (c, chunk) in prompt.chunks(CHUNK).enumerate() {
        engine
            .model()
            .forward(
                chunk,
                (c * CHUNK) as u32,
                &mut kv,
                &mut hook,
                LogitsFor::Last,
            )
            .unwrap();
    }
    let t = prompt.len();
    let layers = (0..cfg.n_layers)
        .map(|l| Layer {
            q: (0..t)
                .map(|i| {
                    (0..n_heads)
                        .map(|h| {
                            let at = (i * n_heads + h) * d;
                            hook.queries[l][at..at + d]
                                .iter()
                                .map(|&x| x as f64)
                                .collect()
                        })
                        .collect()
                })
                .collect(),
            k: (0..n_kv)
                .map(|g| {
                    kv.read_head(l, g)
                        .keys
                        .chunks(d)
                        .map(|k| k.iter().map(|&x| x as f64).collect())
                        .collect()
                })
                .collect(),
        })
        .collect();
    Model {
        layers,
        n_heads,
        n_kv,
        d,
        t,
    }
}

impl Model {
    /// Softmax attention of query `i` in query head `h` of `layer` over the keys, causal or not.
    fn attention(&self, layer: usize, i: usize, h: usize, causal: bool) -> Vec<f64> {
        let g = h / (self.n_heads / self.n_kv);
        let lay = &self.layers[layer];
        let scale = 1.0 / (self.d as f64).sqrt();
        let visible = if causal { i + 1 } else { self.t };
        let logits: Vec<f64> = (0..visible)
            .map(|j| {
                lay.q[i][h]
                    .iter()
                    .zip(&lay.k[g][j])
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
        let mut p: Vec<f64> = logits.iter().map(|l| (l - max).exp() / z).collect();
        p.resize(self.t, 0.0);
        p
    }

    /// Per key, attention summed over `queries`, averaged over KV head `g`'s query heads.
    fn group_sums(
        &self,
        layer: usize,
        g: usize,
        queries: std::ops::Range<usize>,
        causal: bool,
    ) -> Vec<f64> {
        let group = self.n_heads / self.n_kv;
        let mut out = vec![0.0; self.t];
        for h in g * group..(g + 1) * group {
            for i in queries.clone() {
                for (o, p) in out.iter_mut().zip(self.attention(layer, i, h, causal)) {
                    *o += p / group as f64;
                }
            }
        }
        out
    }
}

/// The `keep` best entries: protected first, then higher score, then the more recent.
fn top(scores: &[f64], keep: usize, protected: impl Fn(usize) -> bool) -> BTreeSet<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| {
        protected(b)
            .cmp(&protected(a))
            .then(scores[b].total_cmp(&scores[a]))
            .then(b.cmp(&a))
    });
    idx.into_iter().take(keep).collect()
}

/// Asserts the engine kept `want` (by reference `scores`), up to swaps of near-tied entries.
fn assert_same_selection(what: &str, got: &[u32], want: &BTreeSet<usize>, scores: &[f64]) {
    let got: BTreeSet<usize> = got.iter().map(|&p| p as usize).collect();
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: kept {} entries, reference {}",
        got.len(),
        want.len()
    );
    for &a in got.difference(want) {
        for &b in want.difference(&got) {
            let tol = 1e-5 * scores[a].abs().max(scores[b].abs()).max(1e-9);
            assert!(
                (scores[a] - scores[b]).abs() <= tol,
                "{what}: kept {a} (score {}) instead of {b} (score {})",
                scores[a],
                scores[b]
            );
        }
    }
}

/// SnapKV's selection for one head from the window's attention sums.
fn snapkv_reference(sums: &[f64], keep: usize) -> (BTreeSet<usize>, Vec<f64>) {
    let t = sums.len();
    let prefix = t - WINDOW;
    // avg_pool1d(kernel 5, stride 1, padding 2, count_include_pad): zeros outside the prefix.
    let pooled: Vec<f64> = (0..t)
        .map(|j| {
            if j >= prefix {
                return f64::INFINITY;
            }
            (j.saturating_sub(2)..(j + 3).min(prefix))
                .map(|k| sums[k])
                .sum::<f64>()
                / 5.0
        })
        .collect();
    (top(&pooled, keep, |j| j >= prefix), pooled)
}

fn session_kept(engine: &Engine, spec: &PolicySpec, prompt: &[u32]) -> Vec<Vec<Vec<u32>>> {
    let mut s = engine.session_with(spec.build(engine).unwrap()).unwrap();
    s.prefill(prompt).unwrap();
    let kv = s.kv();
    (0..kv.n_layers())
        .map(|l| (0..kv.n_kv_heads()).map(|h| kv.positions(l, h)).collect())
        .collect()
}

/// A reference selection of one layer and KV head: the kept positions and the scores they were
/// ranked by.
type Selection = (BTreeSet<usize>, Vec<f64>);

/// The policies' formulas on the captured model (`docs/algorithms.md`), one layer and KV head
/// at a time, for a budget of `keep` entries per head.
impl Model {
    /// SnapKV: the last [`WINDOW`] queries' attention, pooled, the top `keep - WINDOW` of the
    /// prefix plus the window.
    fn snapkv(&self, l: usize, g: usize, keep: usize) -> Selection {
        snapkv_reference(&self.group_sums(l, g, self.t - WINDOW..self.t, true), keep)
    }

    /// KNorm: the lowest-norm keys.
    fn knorm(&self, l: usize, g: usize, keep: usize) -> Selection {
        let scores: Vec<f64> = self.layers[l].k[g]
            .iter()
            .map(|k| -k.iter().map(|x| x * x).sum::<f64>().sqrt())
            .collect();
        (top(&scores, keep, |_| false), scores)
    }

    /// NACL without its random part: the last 1% of the prompt as proxy queries, attending
    /// non-causally; sinks and recent tokens (0.5% each) plus the top by proxy score.
    fn nacl(&self, l: usize, g: usize, keep: usize) -> Selection {
        let t = self.t;
        // The fractions are f32 settings: 0.005 * 300 rounds to 1, not 2.
        let frac = |f: f32| (f64::from(f) * t as f64).round() as usize;
        let (proxies, edge) = (frac(0.01).max(1), frac(0.005));
        let proxy = self.group_sums(l, g, t - proxies..t, false);
        (top(&proxy, keep, |j| j < edge || j >= t - edge), proxy)
    }

    /// H2O at the end of the prefill: attention summed over every query, the most recent half
    /// of the budget protected.
    fn h2o(&self, l: usize, g: usize, keep: usize) -> Selection {
        let recent = (0.5 * keep as f32).round() as usize;
        let scores = self.group_sums(l, g, 0..self.t, true);
        (top(&scores, keep, |j| j >= self.t - recent), scores)
    }

    /// TOVA at the end of the prefill: the last query's attention averaged over every head of
    /// the layer, the same tokens for every head.
    fn tova(&self, l: usize, keep: usize) -> Selection {
        let mut scores = vec![0.0; self.t];
        for g in 0..self.n_kv {
            for (s, v) in scores
                .iter_mut()
                .zip(self.group_sums(l, g, self.t - 1..self.t, true))
            {
                *s += v / self.n_kv as f64;
            }
        }
        (top(&scores, keep, |_| false), scores)
    }
}

/// Asserts that a session under `spec` (`what` in messages) keeps, in every layer and KV head
/// of `m`, what `reference(layer, head)` selects.
// (layer, head) index the engine's selection and the independent capture alike.
#[allow(clippy::needless_range_loop)]
fn assert_follows(
    (engine, m, prompt): (&Engine, &Model, &[u32]),
    what: &str,
    spec: &PolicySpec,
    reference: impl Fn(usize, usize) -> Selection,
) {
    let kept = session_kept(engine, spec, prompt);
    for l in 0..m.layers.len() {
        for g in 0..m.n_kv {
            let (want, scores) = reference(l, g);
            assert_same_selection(&format!("{what} l{l} h{g}"), &kept[l][g], &want, &scores);
        }
    }
}

#[test]
fn one_shot_and_prefill_end_selections_follow_the_formulas() {
    let (_dir, engine) = tiny_engine();
    let prompt = tokens(300, 99);
    let m = capture(&engine, &prompt);
    let run = (&engine, &m, prompt.as_slice());
    for ratio in [0.25f32, 0.6] {
        let keep = Budget::EvictRatio(ratio).keep_count(m.t);
        let follows = |spec: &PolicySpec, reference: &dyn Fn(usize, usize) -> Selection| {
            assert_follows(run, &format!("{} {ratio}", spec.kind), spec, reference)
        };
        let spec = |name| common::evicting(name, ratio);
        follows(&spec("snapkv"), &|l, g| m.snapkv(l, g, keep));
        // PyramidKV: SnapKV's scores under per-layer budgets.
        let budgets = gate_core::pyramid_budgets(keep, WINDOW, m.layers.len(), 20.0, m.t).unwrap();
        follows(&spec("pyramidkv"), &|l, g| m.snapkv(l, g, budgets[l]));
        follows(&spec("knorm"), &|l, g| m.knorm(l, g, keep));
        let nacl = PolicySpec {
            options: PolicyOptions {
                kr_frac: Some(0.0),
                ..PolicyOptions::default()
            },
            ..spec("nacl")
        };
        follows(&nacl, &|l, g| m.nacl(l, g, keep));
        follows(&spec("h2o"), &|l, g| m.h2o(l, g, keep));
        follows(&spec("tova"), &|l, _| m.tova(l, keep));
    }
}
