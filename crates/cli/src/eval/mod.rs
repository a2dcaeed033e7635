//! `agate eval`: score a task file (`--tasks FILE`, JSONL, see docs/eval.md) or built-in
//! synthetic long-context tasks (`--synthetic FAMILY`) under one eviction policy, or sweep
//! policies × eviction ratios (`--sweep 0.25,0.5,0.75`), printing a table, writing JSON, CSV and
//! accuracy-vs-eviction plots (`--out DIR`).
//!
//! Stable contract: `--json` prints exactly one JSON object on stdout. A single run prints
//! `{tasks, policy, n, accuracy, accuracy_ci95, eviction_ratio, kv_bytes_in_use, kv_bytes_full,
//! per_type, by_depth?, model, query_aware, chat}`; a sweep prints `{tasks, model, query_aware,
//! chat, rows: [{policy, target_ratio, matched_to, n, accuracy, accuracy_ci95, eviction_ratio,
//! kv_bytes_in_use, kv_bytes_full, per_type, by_depth?}]}`. Intervals are 95% ones
//! (engine::eval::stats). Progress bars (tasks/s, ETA) go to stderr.
//!
//! Invariants: every flag is validated before the model loads (except what needs the model's
//! tokenizer); files under `--out` are written atomically; a failed task fails the command.

mod flags;

use std::path::Path;

use anyhow::Context;
use engine::eval::sweep::{self, SweepPlan, SweepRow, SweepRun};
use engine::eval::synthetic::{self, Family, SyntheticSpec};
use engine::eval::{self, EvalOptions, EvalSummary, Task, TaskOutcome};
use engine::{Engine, Policy, PolicyKind};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::args::load_engine;
use crate::plot::{self, Series};
use crate::policy_args::{AgModeArg, PolicyChoice};
pub use flags::EvalArgs;

/// Most synthetic tasks one run makes (they are all made before the first runs).
const MAX_SYNTHETIC_TASKS: usize = 100_000;

/// Runs `agate eval`: checks every flag, makes or reads the tasks, then runs them once or as a
/// sweep.
pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.sweep.is_some() || args.policy.count() == 1,
        "--policy: name one policy, or sweep several with --sweep RATIOS"
    );
    let choices = args.policy.policies()?;
    let filler = match &args.filler {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("--filler: cannot read {}", p.display()))?,
        ),
        None => None,
    };
    let (tasks_from_file, lines) = match &args.tasks {
        Some(p) => {
            let (lines, tasks) = eval::load_task_lines(p)?.into_iter().unzip();
            (Some((p.display().to_string(), tasks)), lines)
        }
        None => (None, Vec::new()),
    };
    let plan = match &args.sweep {
        Some(ratios) => Some(sweep_plan(args, &choices, ratios)?),
        None => None,
    };
    check_outputs(args)?;
    let engine = load_engine(&args.model)?;
    let (label, mut tasks) = match (tasks_from_file, args.synthetic) {
        (Some(read), _) => read,
        (None, Some(family)) => (
            format!("synthetic:{}:{}", family.name(), args.length),
            synthetic_tasks(args, &engine, family, filler)?,
        ),
        (None, None) => anyhow::bail!("give --tasks FILE or --synthetic FAMILY"),
    };
    if let Some(limit) = args.limit {
        tasks.truncate(limit as usize);
    }
    if let Some(path) = &args.write_tasks {
        let text: String = tasks.iter().map(|t| t.to_json_line() + "\n").collect();
        write_text("--write-tasks", path, &text)?;
        say!("{} tasks written to {}", tasks.len(), path.display());
        return Ok(());
    }
    let opts = EvalOptions {
        positions: args.policy.positions_or(engine::Positions::Original),
        query_aware: args.query_aware,
        chat: args.chat,
        answer_margin: args.answer_margin,
        ppl_context: args.ppl_context,
        ppl_chunk: args.ppl_chunk as usize,
        shared_prefill: !args.separate_prefills,
    };
    match plan {
        None => single(args, &engine, &choices[0], &label, &tasks, &opts),
        Some(plan) => run_sweep(args, &engine, &choices, plan, &label, &tasks, &opts),
    }
    .map_err(|e| at_line(e, &label, &lines))
}

/// The files a single run writes under `--out` (kept in step with [`single`]).
const SINGLE_FILES: [&str; 2] = ["summary.json", "outcomes.jsonl"];
/// The files a sweep writes under `--out` (kept in step with [`write_sweep`]).
const SWEEP_FILES: [&str; 5] = [
    "sweep.json",
    "sweep.csv",
    "sweep.md",
    "accuracy.svg",
    "accuracy.png",
];

/// Checks before any work that every output can be written: `--out` is made (parents too) and
/// each file the run writes there is checked (not a directory, writable), so that a run never
/// ends with some of its files written and the rest refused; `--write-tasks` likewise.
fn check_outputs(args: &EvalArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.out {
        engine::atomic::ensure_dir(dir).context("--out")?;
        let files: &[&str] = if args.sweep.is_some() {
            &SWEEP_FILES
        } else {
            &SINGLE_FILES
        };
        for name in files {
            plot::check_writable(&dir.join(name), "--out")?;
        }
    }
    if let Some(path) = &args.write_tasks {
        plot::check_writable(path, "--write-tasks")?;
    }
    Ok(())
}

/// A task's failure with its file and line first (`tasks.jsonl:4: task 4 (choice): …`), when
/// the tasks came from a file (`lines[i]` is task `i + 1`'s line); other errors as they are.
fn at_line(e: anyhow::Error, file: &str, lines: &[usize]) -> anyhow::Error {
    let number = e
        .chain()
        .find_map(|c| match c.downcast_ref::<engine::EngineError>() {
            Some(engine::EngineError::Task { number, .. }) => Some(*number),
            _ => None,
        });
    match number.and_then(|n| lines.get(n.checked_sub(1)?)) {
        Some(line) => e.context(format!("{file}:{line}")),
        None => e,
    }
}

/// The `--synthetic` tasks, their sizes checked against the model before any is made.
fn synthetic_tasks(
    args: &EvalArgs,
    engine: &Engine,
    family: Family,
    filler: Option<String>,
) -> anyhow::Result<Vec<Task>> {
    let context = engine.model_config().max_position;
    anyhow::ensure!(
        args.length as usize <= context,
        "--length {}: longer than the model's context of {context} tokens",
        args.length
    );
    let per_run = if family.uses_depth() {
        args.depths.len()
    } else {
        1
    };
    let count = (args.samples as usize).saturating_mul(per_run);
    anyhow::ensure!(
        count <= MAX_SYNTHETIC_TASKS,
        "--samples {} × {per_run} depth(s) = {count} tasks: at most {MAX_SYNTHETIC_TASKS} are made at once",
        args.samples
    );
    let spec = SyntheticSpec {
        family,
        length: args.length as usize,
        depths: args.depths.clone(),
        n: args.samples as usize,
        seed: args.seed,
        filler,
        keys: args.keys as usize,
        overhead: if args.chat {
            eval::chat_template_overhead(engine)?
        } else {
            0
        },
    };
    let count =
        |t: &str| -> engine::Result<usize> { Ok(engine.tokenizer().encode(t, false)?.len()) };
    Ok(synthetic::generate(&spec, &count)?)
}

/// How the tasks were put to the model, in words.
fn protocol(args: &EvalArgs) -> &'static str {
    match (args.chat, args.query_aware) {
        (true, true) => "chat template, query-aware",
        (true, false) => "chat template",
        (false, true) => "raw text, query-aware",
        (false, false) => "raw text",
    }
}

fn sweep_plan(
    args: &EvalArgs,
    choices: &[PolicyChoice],
    ratios: &[f64],
) -> anyhow::Result<SweepPlan> {
    let kinds: Vec<PolicyKind> = choices.iter().map(PolicyChoice::kind).collect();
    // Attention-Gate in threshold mode sets no ratio: it runs once, matched to or not.
    let outcome_only = args.policy.ag_mode != Some(AgModeArg::Budget);
    let fixed: Vec<PolicyKind> = kinds
        .iter()
        .copied()
        .filter(|&k| k == PolicyKind::Ag && outcome_only)
        .collect();
    let anchors = match &args.match_to {
        Some(m) if m.iter().any(|n| n == "none") => Vec::new(),
        Some(m) => m
            .iter()
            .map(|n| {
                n.parse()
                    .map_err(|e| anyhow::anyhow!("--match-to: {e} or none"))
            })
            .collect::<anyhow::Result<_>>()?,
        None => fixed.clone(),
    };
    // A budget flag sets only the anchors' own runs; the grid sets every other run's ratio.
    for (flag, given) in [
        ("--evict", args.policy.evict.is_some()),
        ("--keep", args.policy.keep.is_some()),
    ] {
        anyhow::ensure!(
            !given || !anchors.is_empty(),
            "{flag} does nothing with --sweep, which sets each run's eviction ratio, unless a --match-to policy runs at it; remove it"
        );
    }
    let plan = SweepPlan {
        policies: kinds,
        ratios: distinct_ratios(ratios),
        anchors,
        fixed,
        tolerance: 0.005,
    };
    plan.validate()?;
    if plan.baselines().is_empty() {
        say!(
            "agate: note: --sweep's ratios do nothing here: every policy named runs once at its \
             own settings (sweep a policy with a budget beside it to use them)"
        );
    }
    Ok(plan)
}

/// The `--sweep` ratios in order, each once; a note names those given more than once (as
/// `--policy` does for policies).
fn distinct_ratios(ratios: &[f64]) -> Vec<f64> {
    let (mut distinct, mut repeated) = (Vec::new(), Vec::new());
    for &r in ratios {
        if !distinct.contains(&r) {
            distinct.push(r);
        } else if !repeated.contains(&r) {
            repeated.push(r);
        }
    }
    if !repeated.is_empty() {
        let names: Vec<String> = repeated.iter().map(f64::to_string).collect();
        say!(
            "agate: note: --sweep names {} more than once; each ratio runs once",
            names.join(", ")
        );
    }
    distinct
}

/// Runs the tasks under every policy (task by task, see `eval::run_policies`) with one progress
/// bar over tasks × policies labelled `what`.
fn run_many(
    engine: &Engine,
    policies: &[Policy],
    what: &str,
    tasks: &[Task],
    opts: &EvalOptions,
) -> anyhow::Result<Vec<Vec<TaskOutcome>>> {
    let bar = ProgressBar::new((tasks.len() * policies.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} task runs  {per_sec}  ETA {eta}  mean acc {msg}",
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    let (mut sum, mut count) = (0.0, 0usize);
    let outcomes = eval::run_policies(engine, policies, tasks, opts, &mut |_, o| {
        sum += o.score;
        count += 1;
        bar.set_message(format!("{:.3}", sum / count as f64));
        bar.inc(1);
        true
    })?;
    bar.finish_and_clear();
    Ok(outcomes)
}

fn summary_json(label: &str, policy: &str, s: &EvalSummary) -> Value {
    let mut v = json!({
        "tasks": label,
        "policy": policy,
        "n": s.n,
        "accuracy": s.accuracy,
        "accuracy_ci95": s.accuracy_ci95,
        "eviction_ratio": s.eviction_ratio,
        "kv_bytes_in_use": s.kv_bytes_in_use,
        "kv_bytes_full": s.kv_bytes_full,
        "per_type": s.per_type,
    });
    if !s.by_depth.is_empty() {
        v["by_depth"] = json!(s.by_depth);
    }
    v
}

/// One policy over the tasks: the summary as JSON or a table, and the files of `--out`.
fn single(
    args: &EvalArgs,
    engine: &Engine,
    choice: &PolicyChoice,
    label: &str,
    tasks: &[Task],
    opts: &EvalOptions,
) -> anyhow::Result<()> {
    let outcomes = run_many(
        engine,
        &[choice.resolve(engine)?],
        choice.name(),
        tasks,
        opts,
    )?
    .pop()
    .unwrap_or_default();
    let summary = EvalSummary::from_outcomes(&outcomes)?;
    let mut out = summary_json(label, choice.name(), &summary);
    out["model"] = json!(engine.model_path().display().to_string());
    out["query_aware"] = json!(args.query_aware);
    out["chat"] = json!(args.chat);
    if let Some(dir) = &args.out {
        write_text(
            "--out",
            &dir.join("summary.json"),
            &(serde_json::to_string_pretty(&out)? + "\n"),
        )?;
        let lines: String = outcomes
            .iter()
            .map(|o| serde_json::to_string(o).map(|l| l + "\n"))
            .collect::<Result<_, _>>()?;
        write_text("--out", &dir.join("outcomes.jsonl"), &lines)?;
        remove_earlier_outputs(dir, &SWEEP_FILES);
    }
    if args.json {
        outln!("{out}")?;
        return Ok(());
    }
    print_summary(args, label, choice.name(), &summary)
}

/// The table of a single run: accuracy with its interval, per task type and depth, and the KV
/// memory.
fn print_summary(
    args: &EvalArgs,
    label: &str,
    policy: &str,
    summary: &EvalSummary,
) -> anyhow::Result<()> {
    let ci = |c: [f64; 2]| format!("[{:.3}, {:.3}]", c[0], c[1]);
    outln!("tasks      {label}")?;
    outln!("policy     {policy}")?;
    outln!("protocol   {}", protocol(args))?;
    outln!("n          {}", summary.n)?;
    outln!(
        "accuracy   {:.4}  95% CI {}",
        summary.accuracy,
        ci(summary.accuracy_ci95)
    )?;
    for (kind, t) in &summary.per_type {
        let mut line = format!(
            "  {kind:<10} n={} acc={:.4} {}",
            t.n,
            t.accuracy,
            ci(t.accuracy_ci95)
        );
        if let (Some(a), Some(c)) = (t.acc_norm, t.acc_norm_ci95) {
            line.push_str(&format!(" acc_norm={a:.4} {}", ci(c)));
        }
        if let (Some(p), Some(c)) = (t.perplexity, t.perplexity_ci95) {
            line.push_str(&format!(" ppl={p:.4} [{:.3}, {:.3}]", c[0], c[1]));
        }
        if let Some(k) = t.kl {
            line.push_str(&format!(" kl={k:.5}"));
        }
        outln!("{line}")?;
    }
    for (depth, acc) in &summary.by_depth {
        outln!("  depth {depth:<5} acc={acc:.4}")?;
    }
    outln!("evicted    {:.2}%", summary.eviction_ratio * 100.0)?;
    outln!(
        "KV         {:.2} MiB in use of {:.2} MiB full",
        summary.kv_bytes_in_use as f64 / (1 << 20) as f64,
        summary.kv_bytes_full as f64 / (1 << 20) as f64
    )?;
    Ok(())
}

/// The sweep: its rows as JSON or a markdown table, and the files of `--out`.
fn run_sweep(
    args: &EvalArgs,
    engine: &Engine,
    choices: &[PolicyChoice],
    plan: SweepPlan,
    label: &str,
    tasks: &[Task],
    opts: &EvalOptions,
) -> anyhow::Result<()> {
    let rows = sweep_rows(engine, choices, plan, tasks, opts)?;
    let out = json!({
        "tasks": label,
        "model": engine.model_path().display().to_string(),
        "query_aware": args.query_aware,
        "chat": args.chat,
        "rows": rows.iter().map(row_json).collect::<Vec<_>>(),
    });
    let table = sweep::markdown_table(&rows);
    if let Some(dir) = &args.out {
        write_sweep(dir, label, protocol(args), &out, &rows, &table)?;
        remove_earlier_outputs(dir, &SINGLE_FILES);
        say!("results written to {}", dir.display());
    }
    if args.json {
        outln!("{out}")?;
    } else {
        out!("{table}")?;
    }
    Ok(())
}

/// Runs the plan batch by batch (each batch's policies task by task, see [`run_many`]), saying
/// each run's accuracy as it ends; the first failure ends the sweep with its own error.
fn sweep_rows(
    engine: &Engine,
    choices: &[PolicyChoice],
    plan: SweepPlan,
    tasks: &[Task],
    opts: &EvalOptions,
) -> anyhow::Result<Vec<SweepRow>> {
    let mut batches = 0;
    let mut run_batch = |batch: &[SweepRun]| -> anyhow::Result<Vec<EvalSummary>> {
        batches += 1;
        let policies = batch
            .iter()
            .map(|r| {
                let base = choices.iter().find(|c| c.kind() == r.policy);
                match (base, r.ratio) {
                    (None, _) => Ok(Policy::Full),
                    (Some(c), Some(ratio)) => c.with_evict(ratio as f32).resolve(engine),
                    (Some(c), None) => c.resolve(engine),
                }
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let what = format!("[batch {batches}: {} runs]", batch.len());
        let outcomes = run_many(engine, &policies, &what, tasks, opts)?;
        batch
            .iter()
            .zip(&outcomes)
            .map(|(r, o)| {
                let s = EvalSummary::from_outcomes(o)?;
                say!(
                    "{}{}: accuracy {:.3} [{:.3}, {:.3}], evicted {:.1}%",
                    r.policy,
                    r.ratio
                        .map_or_else(String::new, |x| format!(" evict={x:.3}")),
                    s.accuracy,
                    s.accuracy_ci95[0],
                    s.accuracy_ci95[1],
                    s.eviction_ratio * 100.0
                );
                Ok(s)
            })
            .collect()
    };
    plan.run(&mut run_batch)
}

/// Writes the sweep's files into `dir` (`--out`): sweep.json, sweep.csv, sweep.md (the table
/// with a caption) and the accuracy-vs-eviction chart as SVG and PNG.
fn write_sweep(
    dir: &Path,
    label: &str,
    protocol: &str,
    out: &Value,
    rows: &[SweepRow],
    table: &str,
) -> anyhow::Result<()> {
    write_text(
        "--out",
        &dir.join("sweep.json"),
        &(serde_json::to_string_pretty(out)? + "\n"),
    )?;
    write_text("--out", &dir.join("sweep.csv"), &sweep::csv(rows))?;
    let caption = format!(
        "Tasks `{label}`, protocol: {protocol}; `accuracy_lo`/`accuracy_hi`: 95% interval \
         (Wilson for 0/1 scores, bootstrap over tasks otherwise).\n\n"
    );
    write_text("--out", &dir.join("sweep.md"), &(caption + table))?;
    let series: Vec<Series> = sweep::accuracy_series(rows)
        .into_iter()
        .map(|(label, points)| Series {
            label,
            points: points.iter().map(|p| (p.x, p.y)).collect(),
            errors: points.iter().map(|p| (p.ci95[0], p.ci95[1])).collect(),
        })
        .collect();
    let title = format!("{label} ({protocol}): accuracy vs eviction, 95% CI");
    plot::line_chart_svg(
        &dir.join("accuracy.svg"),
        &title,
        "eviction ratio (measured)",
        "accuracy",
        &series,
    )
    .context("--out")?;
    plot::line_chart_png(
        &dir.join("accuracy.png"),
        "eviction ratio (measured)",
        "accuracy (bars: 95% CI)",
        (0.0, 1.0),
        &series,
    )
    .context("--out")?;
    Ok(())
}

fn row_json(row: &SweepRow) -> Value {
    let mut v = summary_json("", row.policy.name(), &row.summary);
    if let Some(o) = v.as_object_mut() {
        o.remove("tasks");
        o.insert("target_ratio".into(), json!(row.target_ratio));
        o.insert("matched_to".into(), json!(row.matched_to));
    }
    v
}

/// Removes from `dir` the files of the other kind of run (`names`: a sweep's after a single
/// run, a single run's after a sweep), left there by an earlier run into the same `--out`, so
/// that the folder describes this run alone; no other file is touched. A note names what was
/// removed, and any file that could not be (this run's files are written by then).
fn remove_earlier_outputs(dir: &Path, names: &[&str]) {
    let mut removed = Vec::new();
    for name in names {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(*name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => say!(
                "agate: note: --out: could not remove {} of an earlier run: {e}",
                path.display()
            ),
        }
    }
    if !removed.is_empty() {
        say!(
            "agate: note: --out: removed {} of an earlier run from {}",
            removed.join(", "),
            dir.display()
        );
    }
}

/// Writes `text` to `path` atomically; a failure names `flag`, the output it was for.
fn write_text(flag: &'static str, path: &Path, text: &str) -> anyhow::Result<()> {
    engine::atomic::write_atomically(path, |f| f.write_all(text.as_bytes())).context(flag)?;
    Ok(())
}
