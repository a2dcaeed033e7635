//! `engine::bench::run` with several policies: their runs alternate (ABBA) at each depth, and
//! the rows come policy by policy with each policy's own figures.

mod common;

use common::{evicting, tiny_engine};
use engine::bench::{run, BenchSpec};
use engine::{KvDtype, Positions};

/// Random-id runs of a 4-token prompt, then `generate` tokens, at `depths`.
fn bench_spec(generate: usize, depths: Vec<usize>, repetitions: usize) -> BenchSpec {
    BenchSpec {
        prompt: 4,
        generate,
        depths,
        repetitions,
        seed: 1,
        text: None,
        positions: Positions::Original,
    }
}

#[test]
fn policies_alternate_abba_and_rows_come_policy_by_policy() {
    let (_dir, engine) = tiny_engine(2, 7, KvDtype::F32, 16);
    let full = engine::PolicySpec::new("full".parse().unwrap())
        .build(&engine)
        .unwrap();
    let h2o = evicting("h2o", 0.5).build(&engine).unwrap();
    let spec = bench_spec(2, vec![0, 40], 3);
    let mut order = Vec::new();
    let rows = run(&engine, &[full, h2o], &spec, &mut |p| {
        order.push((p.done, p.total, p.policy.to_string(), p.depth, p.repetition));
    })
    .unwrap();

    let abba = ["full", "h2o", "h2o", "full", "full", "h2o"];
    let expected: Vec<(usize, usize, String, usize, usize)> = [0, 40]
        .iter()
        .flat_map(|&depth| abba.iter().enumerate().map(move |(i, &p)| (depth, i, p)))
        .enumerate()
        .map(|(done, (depth, i, p))| (done, 12, p.to_string(), depth, i / 2))
        .collect();
    assert_eq!(order, expected);

    let shape: Vec<(&str, usize)> = rows.iter().map(|r| (r.policy.as_str(), r.depth)).collect();
    assert_eq!(shape, [("full", 0), ("full", 40), ("h2o", 0), ("h2o", 40)]);
    assert!(rows[..2].iter().all(|r| r.eviction_ratio == 0.0));
    // H2O keeps half of every head once it holds more than its protected tokens.
    assert!(rows[3].eviction_ratio > 0.3, "{}", rows[3].eviction_ratio);
    assert!(rows[3].kv_bytes_in_use < rows[1].kv_bytes_in_use);
    assert_eq!(rows[1].kv_bytes_full, rows[3].kv_bytes_full);
}

/// With one token to generate the prefill samples it and no decode step runs: both decode
/// figures are 0 (not the CPU time of the call over a step that never ran); with two, both are
/// positive.
#[test]
fn one_generated_token_has_no_decode_figures() {
    let (_dir, engine) = tiny_engine(2, 7, KvDtype::F32, 16);
    let full = engine::Policy::Full;
    for generate in [1, 2] {
        let spec = bench_spec(generate, vec![0], 1);
        let rows = run(&engine, std::slice::from_ref(&full), &spec, &mut |_| {}).unwrap();
        let (rate, cpu) = (
            rows[0].decode_tokens_per_s.median,
            rows[0].decode_cpu_ms_per_token.median,
        );
        match generate {
            1 => assert_eq!((rate, cpu), (0.0, 0.0)),
            _ => assert!(rate > 0.0 && cpu >= 0.0, "{rate} {cpu}"),
        }
    }
}
