//! Batches of attention calls (several sequences' calls run as one job on a pool) against each
//! call run alone.

use kv_store::{AttendCall, AttendOptions, AttendOutput, KvDtype, KvError, Parallel, SequenceKv};

use crate::reference::{queries, Case};

/// A pool of `threads` scoped threads that counts its handoffs.
#[derive(Debug)]
struct CountingPool {
    threads: usize,
    handoffs: std::sync::atomic::AtomicUsize,
}

impl Parallel for CountingPool {
    fn threads(&self) -> usize {
        self.threads
    }

    fn min_work(&self) -> usize {
        1 << 16
    }

    fn for_each(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.handoffs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::thread::scope(|s| {
            for t in 0..self.threads {
                s.spawn(move || (t..n).step_by(self.threads).for_each(f));
            }
        });
    }
}

/// Several sequences' calls in one batch (short and long decodes, a masked prefill chunk with
/// probabilities, an invalid call) give each call bit for bit its lone result, or its lone
/// error, and run as one handoff to the pool.
#[test]
fn a_batch_of_calls_equals_each_call_alone() {
    let pool = CountingPool {
        threads: 3,
        handoffs: Default::default(),
    };
    let mut cases: Vec<Case> = [(1u64, 40usize), (2, 700), (3, 3000), (4, 200)]
        .into_iter()
        .map(|(seed, n)| {
            let mut case = Case::new(seed, 3, 64, KvDtype::F16, 16);
            case.append(n);
            case.evict_ragged();
            case
        })
        .collect();
    let rows = [1usize, 1, 1, 9];
    let new: Vec<Vec<u32>> = cases
        .iter_mut()
        .zip(rows)
        .map(|(c, n)| c.append(n))
        .collect();
    let qs: Vec<Vec<f32>> = cases
        .iter_mut()
        .zip(rows)
        .map(|(c, n)| queries(c, n, 9))
        .collect();
    let vis = cases[3].random_visibility();
    let opts: Vec<AttendOptions<'_>> = (0..4)
        .map(|i| {
            let o = AttendOptions::for_head_dim(64).parallel(&pool);
            match i {
                3 => o.visible_until(&vis).prob_sums(2..9),
                2 => o.prob_sums(0..1),
                _ => o,
            }
        })
        .collect();
    let mut calls: Vec<AttendCall<'_>> = (0..4)
        .map(|i| AttendCall {
            kv: &cases[i].kv,
            layer: 0,
            q: &qs[i],
            q_positions: &new[i],
            opts: opts[i].clone(),
        })
        .collect();
    // An invalid call (a layer the store does not have) in the middle.
    let bad = AttendCall {
        layer: 1,
        ..calls[1].clone()
    };
    calls.insert(2, bad);
    let alone: Vec<_> = calls
        .iter()
        .map(|c| c.kv.attend(c.layer, c.q, c.q_positions, &c.opts))
        .collect();
    let lone_handoffs = pool.handoffs.swap(0, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        lone_handoffs, 3,
        "the three longer calls run on the pool alone"
    );
    for batch_pool in [Some(&pool as &dyn Parallel), None] {
        let batched = SequenceKv::attend_batch(&calls, batch_pool);
        assert_same_results(&batched, &alone);
    }
    assert_eq!(
        pool.handoffs.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the batch is one handoff"
    );
}

/// Each batched result is bit for bit the call's lone result, or the same error.
fn assert_same_results(
    batched: &[Result<AttendOutput, KvError>],
    alone: &[Result<AttendOutput, KvError>],
) {
    assert_eq!(batched.len(), alone.len());
    for (i, (b, a)) in batched.iter().zip(alone).enumerate() {
        match (b, a) {
            (Ok(b), Ok(a)) => {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&b.out), bits(&a.out), "call {i}: output");
                assert_eq!(b.prob_sums, a.prob_sums, "call {i}: probability sums");
            }
            (Err(b), Err(a)) => assert_eq!(b.to_string(), a.to_string(), "call {i}"),
            _ => panic!("call {i}: batched {b:?} vs alone {a:?}"),
        }
    }
}
