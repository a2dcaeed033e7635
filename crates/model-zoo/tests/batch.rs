//! Batched forward passes equal lone ones: with quantized weights (the default model's),
//! sequences of different lengths (a decode row, short prefills, a prefill long enough to take
//! the dense GEMM) in one `forward_batch` get bit for bit the logits and the cache each gets
//! alone; with float weights, equal to rounding. A sequence whose hook fails, or whose input is
//! invalid, drops out and leaves the others untouched.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use kv_store::{BlockPool, KvDtype, PoolConfig, SequenceKv};
use model_zoo::{
    KeepAll, LayerHook, LayerPlan, LlamaModel, LogitsFor, ModelError, SequenceInput, WeightFormat,
};

/// Writes a model's files straight into a directory (model-zoo itself never opens a file for
/// writing; engine's atomic `StagedDir` is the real sink).
struct Dir<'a>(&'a std::path::Path);

impl model_zoo::convert::FileSink for Dir<'_> {
    fn file(
        &mut self,
        name: &str,
        body: &mut dyn FnMut(&mut dyn std::io::Write) -> model_zoo::Result<()>,
    ) -> model_zoo::Result<()> {
        body(&mut std::fs::File::create(self.0.join(name))?)
    }
}

fn tiny_model(dir: &std::path::Path, format: WeightFormat) -> LlamaModel {
    let cfg = model_zoo::random::tiny_config(2, 4, 2);
    model_zoo::random::write_random_model(&mut Dir(dir), &cfg, 5).unwrap();
    model_zoo::load(dir, format).unwrap().model
}

fn pool(model: &LlamaModel) -> BlockPool {
    let cfg = model.config();
    BlockPool::new(PoolConfig::from_token_capacity(
        16,
        cfg.head_dim,
        KvDtype::F16,
        1 << 20,
    ))
}

fn new_kv(model: &LlamaModel, pool: &BlockPool) -> SequenceKv {
    let cfg = model.config();
    SequenceKv::new(pool, cfg.n_layers, cfg.n_kv_heads)
}

/// Token ids `0..n` shifted by `seed`, inside the byte vocabulary.
fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7 + seed * 13) % 256).collect()
}

fn values(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Every retained key and value of every head, as f32.
fn contents(kv: &SequenceKv) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for l in 0..kv.n_layers() {
        for h in 0..kv.n_kv_heads() {
            let c = kv.read_head(l, h);
            out.push(c.keys);
            out.push(c.values);
        }
    }
    out
}

/// Sequences of `lengths` prompt tokens prefill, then decode one token each, alone and
/// batched; returns the largest logit difference and whether the caches are identical.
fn batched_vs_alone(model: &LlamaModel, lengths: &[usize]) -> (f32, bool) {
    let pool = pool(model);
    let prompts: Vec<Vec<u32>> = (0u32..)
        .zip(lengths)
        .map(|(i, &n)| tokens(n, i + 1))
        .collect();
    let next: Vec<u32> = (0..prompts.len() as u32).map(|i| 11 * (i + 1)).collect();
    let mut alone = Vec::new();
    let mut alone_kv = Vec::new();
    for (p, &t) in prompts.iter().zip(&next) {
        let mut kv = new_kv(model, &pool);
        let a = model
            .forward(p, 0, &mut kv, &mut KeepAll, LogitsFor::Last)
            .unwrap();
        let b = model
            .forward(&[t], p.len() as u32, &mut kv, &mut KeepAll, LogitsFor::All)
            .unwrap();
        alone.push((values(&a), values(&b)));
        alone_kv.push(contents(&kv));
    }
    let mut kvs: Vec<SequenceKv> = (0..prompts.len()).map(|_| new_kv(model, &pool)).collect();
    let mut hooks = vec![KeepAll; prompts.len()];
    let first = {
        let mut batch: Vec<SequenceInput> = kvs
            .iter_mut()
            .zip(hooks.iter_mut())
            .zip(&prompts)
            .map(|((kv, hook), p)| SequenceInput {
                tokens: p,
                start: 0,
                kv,
                hook,
                logits_for: LogitsFor::Last,
            })
            .collect();
        model.forward_batch(&mut batch).unwrap()
    };
    let second = {
        let mut batch: Vec<SequenceInput> = kvs
            .iter_mut()
            .zip(hooks.iter_mut())
            .zip(prompts.iter().zip(&next))
            .map(|((kv, hook), (p, t))| SequenceInput {
                tokens: std::slice::from_ref(t),
                start: p.len() as u32,
                kv,
                hook,
                logits_for: LogitsFor::All,
            })
            .collect();
        model.forward_batch(&mut batch).unwrap()
    };
    let mut diff = 0f32;
    for (i, (a, b)) in first.into_iter().zip(second).enumerate() {
        for (got, want) in [
            (values(&a.unwrap()), &alone[i].0),
            (values(&b.unwrap()), &alone[i].1),
        ] {
            assert_eq!(got.len(), want.len());
            diff = got
                .iter()
                .zip(want)
                .map(|(x, y)| (x - y).abs())
                .fold(diff, f32::max);
        }
    }
    let same_cache = kvs.iter().map(contents).collect::<Vec<_>>() == alone_kv;
    (diff, same_cache)
}

#[test]
fn quantized_batch_is_bit_identical_to_lone_passes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), WeightFormat::Quantize(GgmlDType::Q8_0));
    // One prompt long enough for the dense GEMM (it runs alone), short ones beside it.
    assert_eq!(
        batched_vs_alone(&model, &[5, 140, 20, 100, 60]),
        (0.0, true)
    );
    // Only short prompts, but 161 rows together: still the quantized kernel for every row.
    assert_eq!(batched_vs_alone(&model, &[100, 60, 1]), (0.0, true));
}

/// Float weights take one GEMM for all rows (that is where batching pays), and a float GEMM's
/// rounding depends on its row count: equal to rounding, not bit for bit.
#[test]
fn dense_batch_equals_lone_passes_to_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), WeightFormat::Dense(DType::F32));
    let (diff, _) = batched_vs_alone(&model, &[5, 140, 20, 100, 60]);
    assert!(diff < 1e-4, "batched vs lone logits differ by {diff}");
}

/// Fails in `plan` of layer 1.
struct FailAtLayer1;

impl LayerHook for FailAtLayer1 {
    fn plan(
        &mut self,
        layer: usize,
        _normed: &candle_core::Tensor,
        _positions: &[u32],
        _kv: &SequenceKv,
    ) -> model_zoo::Result<LayerPlan> {
        if layer == 1 {
            return Err(ModelError::Input("injected failure".into()));
        }
        Ok(LayerPlan::default())
    }
}

#[test]
fn a_failing_sequence_leaves_the_others_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), WeightFormat::Quantize(GgmlDType::Q8_0));
    let pool = pool(&model);
    let (a, b) = (tokens(9, 4), tokens(12, 5));
    let mut kv = new_kv(&model, &pool);
    let want = values(
        &model
            .forward(&a, 0, &mut kv, &mut KeepAll, LogitsFor::Last)
            .unwrap(),
    );
    let want_cache = contents(&kv);

    let (mut kv_a, mut kv_b, mut kv_c) = (
        new_kv(&model, &pool),
        new_kv(&model, &pool),
        new_kv(&model, &pool),
    );
    let (mut keep, mut fail, mut keep_c) = (KeepAll, FailAtLayer1, KeepAll);
    let bad_token = [100_000u32];
    let mut batch = vec![
        SequenceInput {
            tokens: &b,
            start: 0,
            kv: &mut kv_b,
            hook: &mut fail,
            logits_for: LogitsFor::Last,
        },
        SequenceInput {
            tokens: &a,
            start: 0,
            kv: &mut kv_a,
            hook: &mut keep,
            logits_for: LogitsFor::Last,
        },
        SequenceInput {
            tokens: &bad_token,
            start: 0,
            kv: &mut kv_c,
            hook: &mut keep_c,
            logits_for: LogitsFor::Last,
        },
    ];
    let results = model.forward_batch(&mut batch).unwrap();
    drop(batch);
    let mut results = results.into_iter();
    let failed = results.next().unwrap().unwrap_err().to_string();
    assert!(failed.contains("injected failure"), "{failed}");
    assert_eq!(values(&results.next().unwrap().unwrap()), want);
    let invalid = results.next().unwrap().unwrap_err().to_string();
    assert!(invalid.contains("outside the vocabulary"), "{invalid}");
    assert_eq!(contents(&kv_a), want_cache);
    // The failing sequence's layer-0 appends were undone.
    assert_eq!(kv_b.stats().blocks_in_use, 0);
    assert!(contents(&kv_b).iter().all(Vec::is_empty));
    // The invalid sequence was refused before anything ran: its cache is empty.
    assert_eq!(kv_c.stats().blocks_in_use, 0);
}
