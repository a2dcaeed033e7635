//! Eval sweeps without a model: baselines are matched to the anchor's measured ratio, a fixed
//! policy runs once without matching, an anchor that evicted everything is matched by nothing,
//! and every rendering shows every row.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

use std::collections::BTreeMap;

use engine::eval::sweep::{self, SweepPlan};
use engine::eval::EvalSummary;

fn summary(ratio: f64) -> EvalSummary {
    EvalSummary {
        n: 2,
        accuracy: 1.0 - ratio,
        accuracy_ci95: [0.5 - ratio, 1.0],
        eviction_ratio: ratio,
        kv_bytes_in_use: 1 << 20,
        kv_bytes_full: 2 << 20,
        per_type: BTreeMap::new(),
        by_depth: BTreeMap::new(),
    }
}

/// The plan of the sweep tests: AG anchoring H2O and TOVA, at ratios 0.25 and 0.5.
fn anchored_plan() -> SweepPlan {
    use engine::PolicyKind::{Ag, H2o, Tova};
    SweepPlan {
        policies: vec![Ag, H2o, Tova],
        ratios: vec![0.25, 0.5],
        anchors: vec![Ag],
        fixed: vec![Ag],
        tolerance: 0.005,
    }
}

/// The rows of `plan` and the size of each batch it handed out, each run's summary measuring
/// its requested ratio (full: 0; the anchor, at its own settings: `anchor_ratio`).
fn run_sweep(plan: &SweepPlan, anchor_ratio: f64) -> (Vec<usize>, Vec<sweep::SweepRow>) {
    let mut batches = Vec::new();
    let rows = plan
        .run(
            &mut |batch: &[sweep::SweepRun]| -> engine::Result<Vec<EvalSummary>> {
                batches.push(batch.len());
                Ok(batch
                    .iter()
                    .map(|r| {
                        summary(match (r.policy.name(), r.ratio) {
                            ("full", None) => 0.0,
                            ("ag", None) => anchor_ratio,
                            (_, Some(r)) => r,
                            other => panic!("unexpected run {other:?}"),
                        })
                    })
                    .collect())
            },
        )
        .unwrap();
    (batches, rows)
}

/// An anchor that evicted everything gets no matched runs (no budget is a ratio of 1), and the
/// sweep's rows are all kept.
#[test]
fn an_anchor_that_evicted_everything_is_matched_by_nothing() {
    let (batches, rows) = run_sweep(&anchored_plan(), 1.0);
    assert_eq!(batches, [6]);
    assert!(rows.iter().all(|r| r.matched_to.is_none()));
    assert_eq!(rows.len(), 6);
}

/// A policy that sets no ratio runs once at its own settings even when nothing is matched to
/// it (`--match-to none`): never once per requested ratio, labelled with a ratio it ignores.
#[test]
fn a_fixed_policy_runs_once_without_matching() {
    let plan = SweepPlan {
        anchors: vec![],
        ..anchored_plan()
    };
    let (batches, rows) = run_sweep(&plan, 0.35);
    // Full, ag once, h2o and tova at each ratio; nothing matched.
    assert_eq!(batches, [6]);
    let ag: Vec<Option<f64>> = rows
        .iter()
        .filter(|r| r.policy.name() == "ag")
        .map(|r| r.target_ratio)
        .collect();
    assert_eq!(ag, [None]);
    assert!(rows.iter().all(|r| r.matched_to.is_none()));
}

#[test]
fn sweeps_match_baselines_to_the_anchors_measured_ratio() {
    let (batches, rows) = run_sweep(&anchored_plan(), 0.35);
    // Full, the anchor and the baselines at the grid first; then the matched runs.
    assert_eq!(batches, [6, 2]);
    let names: Vec<(&str, Option<f64>, Option<&str>)> = rows
        .iter()
        .map(|r| {
            (
                r.policy.name(),
                r.target_ratio,
                r.matched_to.map(|m| m.name()),
            )
        })
        .collect();
    assert_eq!(
        names,
        vec![
            ("full", None, None),
            ("ag", None, None),
            ("h2o", Some(0.25), None),
            ("tova", Some(0.25), None),
            ("h2o", Some(0.5), None),
            ("tova", Some(0.5), None),
            ("h2o", Some(0.35), Some("ag")),
            ("tova", Some(0.35), Some("ag")),
        ]
    );
    // An anchor landing on a requested ratio gets no matched runs.
    let (batches, on_grid) = run_sweep(&anchored_plan(), 0.5);
    assert_eq!((batches, on_grid.len()), (vec![6], 6));
}

/// The markdown table and the CSV have one line per row (after their headers); the accuracy
/// series puts each policy's points in ratio order, the anchor's at its measured ratio.
#[test]
fn sweep_renderings_show_every_row() {
    let (_, rows) = run_sweep(&anchored_plan(), 0.35);
    let md = sweep::markdown_table(&rows);
    assert_eq!(md.lines().count(), rows.len() + 2);
    assert!(
        md.contains("| h2o | 0.350 | 0.350 | 0.650 | 0.150 | 1.000 |"),
        "{md}"
    );
    assert!(md.contains("| ag | - | 0.350 | 0.650 |"), "{md}");
    assert_eq!(sweep::csv(&rows).lines().count(), rows.len() + 1);
    let series = sweep::accuracy_series(&rows);
    let xy = |i: usize| -> Vec<(f64, f64)> { series[i].1.iter().map(|p| (p.x, p.y)).collect() };
    assert_eq!(series[2].0, "h2o");
    assert_eq!((series[1].0.as_str(), xy(1)), ("ag", vec![(0.35, 0.65)]));
    assert_eq!(xy(2), vec![(0.25, 0.75), (0.35, 0.65), (0.5, 0.5)]);
    assert_eq!(series[2].1[0].ci95, [0.25, 1.0]);
}
