//! Sweeps: every policy × every requested eviction ratio, plus matched comparisons — a policy
//! whose ratio is an outcome rather than a setting (*fixed*, e.g. AG in threshold mode) is run
//! once at its own settings, and when it is an *anchor* every other policy is run again at the
//! ratio it actually reached, so the comparison is at equal memory.
//!
//! Runs are handed to the caller in two batches — full, the anchors and fixed policies, and
//! every baseline at every requested ratio; then the matched runs, which need the anchors' measured ratios — so that the
//! caller can run a batch task by task, prefilling each context once for all its runs.
//!
//! Invariants: `full` always runs, once, first, with no target (ratio 0); anchors and fixed
//! policies run once, with no target; rows come in run order (full, anchors and fixed policies,
//! baselines at the requested ratios, baselines matched to anchors); a matched
//! run is added only when the measured ratio is below 1 and differs from every requested ratio
//! by more than the tolerance; the renderers give one line per row with the same columns in the
//! same order (markdown and CSV alike), accuracies and perplexities with their 95% intervals.

use super::EvalSummary;
use crate::error::{EngineError, Result};
use crate::policy::PolicyKind;

/// What to sweep.
#[derive(Clone, Debug)]
pub struct SweepPlan {
    /// The policies, in the order given (`full` included or not).
    pub policies: Vec<PolicyKind>,
    /// Requested eviction ratios, each in `[0, 1)`.
    pub ratios: Vec<f64>,
    /// Policies among `policies` whose measured ratio the others are matched to.
    pub anchors: Vec<PolicyKind>,
    /// Policies among `policies` that cannot be set to a ratio (Attention-Gate in threshold
    /// mode): run once at their own settings, like an anchor, whether or not the others are
    /// matched to them.
    pub fixed: Vec<PolicyKind>,
    /// Measured ratios within this of a requested one get no matched run.
    pub tolerance: f64,
}

/// One run to make: a policy at a ratio (`None`: full, or an anchor at its own settings).
#[derive(Clone, Debug, PartialEq)]
pub struct SweepRun {
    /// The policy.
    pub policy: PolicyKind,
    /// Requested eviction ratio.
    pub ratio: Option<f64>,
}

/// One run of a sweep.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SweepRow {
    /// The policy.
    pub policy: PolicyKind,
    /// The eviction ratio the policy was asked for (`None`: full, or an anchor at its own
    /// settings).
    pub target_ratio: Option<f64>,
    /// The anchor whose measured ratio this run matches, if any.
    pub matched_to: Option<PolicyKind>,
    /// The run's figures.
    pub summary: EvalSummary,
}

impl SweepPlan {
    /// Checks names and ratios.
    pub fn validate(&self) -> Result<()> {
        let bad = |setting, problem: String| Err(EngineError::Setting { setting, problem });
        if self.policies.is_empty() {
            return bad("SweepPlan.policies", "no policy to sweep".into());
        }
        if let Some(r) = self.ratios.iter().find(|r| !(0.0..1.0).contains(*r)) {
            return bad("SweepPlan.ratios", format!("ratio {r} is outside [0, 1)"));
        }
        if self.ratios.is_empty() {
            return bad(
                "SweepPlan.ratios",
                "give the ratios to sweep (e.g. 0.25,0.5,0.75)".into(),
            );
        }
        for (setting, list) in [
            ("SweepPlan.anchors", &self.anchors),
            ("SweepPlan.fixed", &self.fixed),
        ] {
            if let Some(a) = list.iter().find(|a| !self.policies.contains(a)) {
                return bad(setting, format!("`{a}` is not among the swept policies"));
            }
        }
        Ok(())
    }

    /// The policies run at each requested ratio (and matched to the anchors): every one but
    /// full, the anchors and the fixed policies, in the order given.
    pub fn baselines(&self) -> Vec<PolicyKind> {
        self.policies
            .iter()
            .copied()
            .filter(|p| {
                *p != PolicyKind::Full && !self.anchors.contains(p) && !self.fixed.contains(p)
            })
            .collect()
    }

    /// Runs the sweep: `run(batch)` evaluates every run of a batch and returns their
    /// summaries in batch order. The first batch is full, the anchors at their own settings and
    /// every baseline at every requested ratio; the second (possibly empty, then not made) the
    /// baselines at each anchor's measured ratio. The runner's error type is the caller's (the
    /// CLI's runs fail with its own errors); the plan's own errors convert into it.
    pub fn run<E, F>(&self, mut run: F) -> std::result::Result<Vec<SweepRow>, E>
    where
        E: From<EngineError>,
        F: FnMut(&[SweepRun]) -> std::result::Result<Vec<EvalSummary>, E>,
    {
        self.validate()?;
        let baselines = self.baselines();
        let own = self
            .policies
            .iter()
            .copied()
            .filter(|p| *p != PolicyKind::Full && !baselines.contains(p));
        let at = |policy: PolicyKind, ratio: Option<f64>| SweepRun { policy, ratio };
        let mut first = vec![at(PolicyKind::Full, None)];
        first.extend(own.map(|a| at(a, None)));
        for &r in &self.ratios {
            first.extend(baselines.iter().map(|&p| at(p, Some(r))));
        }
        let mut rows = Vec::new();
        let mut add = |rows: &mut Vec<SweepRow>,
                       batch: &[SweepRun],
                       matched: &[Option<PolicyKind>]|
         -> std::result::Result<(), E> {
            if batch.is_empty() {
                return Ok(());
            }
            let summaries = run(batch)?;
            if summaries.len() != batch.len() {
                return Err(EngineError::Unscored(format!(
                    "sweep: the runner gave {} summaries for {} runs",
                    summaries.len(),
                    batch.len()
                ))
                .into());
            }
            for ((r, summary), m) in batch.iter().zip(summaries).zip(matched) {
                rows.push(SweepRow {
                    policy: r.policy,
                    target_ratio: r.ratio,
                    matched_to: *m,
                    summary,
                });
            }
            Ok(())
        };
        add(&mut rows, &first, &vec![None; first.len()])?;
        let measured: Vec<(PolicyKind, f64)> = rows
            .iter()
            .filter(|row| self.anchors.contains(&row.policy))
            .map(|row| (row.policy, row.summary.eviction_ratio))
            .collect();
        let (mut second, mut matched) = (Vec::new(), Vec::new());
        for (anchor, m) in measured {
            // An anchor that evicted everything (ratio 1) has no ratio a budget can be set to.
            if m >= 1.0 || self.ratios.iter().any(|r| (r - m).abs() <= self.tolerance) {
                continue;
            }
            for &p in &baselines {
                second.push(at(p, Some(m)));
                matched.push(Some(anchor));
            }
        }
        add(&mut rows, &second, &matched)?;
        Ok(rows)
    }
}

/// Column names of [`markdown_table`] and [`csv`] (`*_lo`, `*_hi`: the 95% interval).
pub const COLUMNS: [&str; 14] = [
    "policy",
    "target_evict",
    "measured_evict",
    "accuracy",
    "accuracy_lo",
    "accuracy_hi",
    "acc_norm",
    "perplexity",
    "perplexity_lo",
    "perplexity_hi",
    "kl",
    "kv_mib_in_use",
    "n",
    "matched_to",
];

fn cells(row: &SweepRow) -> [String; 14] {
    let s = &row.summary;
    let opt = |f: Option<f64>, prec: usize| f.map_or(String::new(), |v| format!("{v:.prec$}"));
    let ppl = s.per_type.get("perplexity");
    let ppl_ci = ppl.and_then(|c| c.perplexity_ci95);
    [
        row.policy.to_string(),
        row.target_ratio
            .map_or_else(|| "-".to_string(), |r| format!("{r:.3}")),
        format!("{:.3}", s.eviction_ratio),
        format!("{:.3}", s.accuracy),
        format!("{:.3}", s.accuracy_ci95[0]),
        format!("{:.3}", s.accuracy_ci95[1]),
        opt(s.per_type.get("choice").and_then(|c| c.acc_norm), 3),
        opt(ppl.and_then(|c| c.perplexity), 3),
        opt(ppl_ci.map(|c| c[0]), 3),
        opt(ppl_ci.map(|c| c[1]), 3),
        opt(ppl.and_then(|c| c.kl), 4),
        format!("{:.2}", s.kv_bytes_in_use as f64 / (1 << 20) as f64),
        s.n.to_string(),
        row.matched_to.map_or_else(String::new, |m| m.to_string()),
    ]
}

/// The rows as a GitHub markdown table.
pub fn markdown_table(rows: &[SweepRow]) -> String {
    let mut out = format!(
        "| {} |\n|{}\n",
        COLUMNS.join(" | "),
        "---|".repeat(COLUMNS.len())
    );
    for row in rows {
        out.push_str(&format!("| {} |\n", cells(row).join(" | ")));
    }
    out
}

/// The rows as CSV (RFC 4180 quoting where a cell needs it).
pub fn csv(rows: &[SweepRow]) -> String {
    let quote = |c: &str| {
        if c.contains([',', '"', '\n']) {
            format!("\"{}\"", c.replace('"', "\"\""))
        } else {
            c.to_string()
        }
    };
    let mut out = COLUMNS.join(",") + "\n";
    for row in rows {
        let line: Vec<String> = cells(row).iter().map(|c| quote(c)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// One point of an accuracy-vs-eviction chart: measured ratio, accuracy and its 95% interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccuracyPoint {
    /// Measured eviction ratio.
    pub x: f64,
    /// Accuracy.
    pub y: f64,
    /// The accuracy's 95% interval.
    pub ci95: [f64; 2],
}

/// Accuracy-vs-measured-eviction points per policy, in first-seen policy order, sorted by x.
pub fn accuracy_series(rows: &[SweepRow]) -> Vec<(String, Vec<AccuracyPoint>)> {
    let mut out: Vec<(String, Vec<AccuracyPoint>)> = Vec::new();
    for row in rows {
        let point = AccuracyPoint {
            x: row.summary.eviction_ratio,
            y: row.summary.accuracy,
            ci95: row.summary.accuracy_ci95,
        };
        match out.iter_mut().find(|(p, _)| *p == row.policy.name()) {
            Some((_, pts)) => pts.push(point),
            None => out.push((row.policy.to_string(), vec![point])),
        }
    }
    for (_, pts) in &mut out {
        pts.sort_by(|a, b| a.x.total_cmp(&b.x));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn bad_plans_name_the_setting() {
        let summary = |r: f64| super::EvalSummary {
            n: 1,
            accuracy: 0.0,
            accuracy_ci95: [0.0, 0.0],
            eviction_ratio: r,
            kv_bytes_in_use: 0,
            kv_bytes_full: 0,
            per_type: BTreeMap::new(),
            by_depth: BTreeMap::new(),
        };
        let plan = SweepPlan {
            policies: vec![PolicyKind::H2o],
            ratios: vec![1.0],
            anchors: vec![],
            fixed: vec![],
            tolerance: 0.0,
        };
        let err = plan
            .run(&mut |batch: &[SweepRun]| -> Result<Vec<EvalSummary>> {
                Ok(batch
                    .iter()
                    .map(|r| summary(r.ratio.unwrap_or(0.0)))
                    .collect())
            })
            .unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::Setting {
                    setting: "SweepPlan.ratios",
                    ..
                }
            ),
            "{err}"
        );
    }
}
