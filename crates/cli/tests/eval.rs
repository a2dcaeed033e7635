//! `agate eval` as a user meets it, on a tiny random model: `--json` prints one object with the
//! contract's keys; a bad task file fails with one `error:` line naming file, line and field;
//! `--sweep --out` writes the table, JSON, CSV and both plots; synthetic tasks can be written
//! out as a task file and read back.
#![allow(clippy::unwrap_used)] // a test stops at the first unexpected failure

mod common;

use std::path::PathBuf;
use std::process::Output;

use common::{agate, fails_with, random_gates, s, stdout_json, tiny_model};

const MIXED: &str = r#"{"type":"choice","context":"The sky is","question":"Colour?","choices":["blue","green"],"answer":0}
{"type":"generate","context":"a b c d e f","question":"Next letter:","answer":"g","match":"contains"}
{"type":"perplexity","text":"one two three four five six seven eight"}
"#;

/// A tiny model (2,048-token context) and the [`MIXED`] task file in a temporary folder.
struct Mixed {
    dir: tempfile::TempDir,
    model: PathBuf,
    tasks: PathBuf,
}

impl Mixed {
    fn new() -> Mixed {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path(), 2, 2, 2048);
        let tasks = dir.path().join("tasks.jsonl");
        std::fs::write(&tasks, MIXED).unwrap();
        Mixed { dir, model, tasks }
    }

    /// `agate eval --tasks TASKS --model MODEL` with `extra` flags.
    fn eval(&self, extra: &[&str]) -> Output {
        let mut args = vec!["eval", "--tasks", s(&self.tasks), "--model", s(&self.model)];
        args.extend_from_slice(extra);
        agate(&args)
    }
}

#[test]
fn json_output_keeps_its_keys() {
    let mixed = Mixed::new();
    let tasks = &mixed.tasks;
    let v = stdout_json(&mixed.eval(&["--json"]));
    for key in [
        "tasks",
        "policy",
        "n",
        "accuracy",
        "eviction_ratio",
        "kv_bytes_in_use",
        "kv_bytes_full",
    ] {
        assert!(v.get(key).is_some(), "missing `{key}` in {v}");
    }
    assert_eq!(v["tasks"], tasks.to_str().unwrap());
    assert_eq!(v["policy"], "full");
    assert_eq!(v["n"], 3);
    assert!(v["accuracy"].as_f64().is_some());
    assert_eq!(v["eviction_ratio"], 0.0);
    assert!(v["kv_bytes_in_use"].as_u64().unwrap() > 0);
    assert!(v["kv_bytes_full"].as_u64().is_some());
    for kind in ["choice", "generate", "perplexity"] {
        assert_eq!(v["per_type"][kind]["n"], 1, "{v}");
    }
    assert!(v["per_type"]["choice"]["acc_norm"].as_f64().is_some());
    assert!(v["per_type"]["perplexity"]["perplexity"].as_f64().unwrap() > 1.0);
    assert_eq!(v["per_type"]["perplexity"]["kl"], 0.0);
}

#[test]
fn bad_task_files_fail_with_the_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let tasks = dir.path().join("tasks.jsonl");
    let good = MIXED.lines().next().unwrap();
    std::fs::write(&tasks, format!("{good}\n{good}\n{{\"type\":\"choice\",\"context\":\"c\",\"question\":\"q\",\"choices\":[\"a\",\"b\"]}}\n{good}\n")).unwrap();
    let out = agate(&[
        "eval",
        "--tasks",
        tasks.to_str().unwrap(),
        "--model",
        "/nonexistent",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: {}:3: field `answer` is missing",
            tasks.display()
        )),
        "{stderr}"
    );
}

#[test]
fn sweeps_write_table_json_csv_and_plots() {
    let mixed = Mixed::new();
    // --out is a folder: created, parents too.
    let out_dir = mixed.dir.path().join("results/out");
    let v = stdout_json(&mixed.eval(&["--sweep", "0.25,0.5", "--out", s(&out_dir), "--json"]));
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows[0]["policy"], "full");
    assert!(rows[0]["target_ratio"].is_null());
    for key in [
        "n",
        "accuracy",
        "eviction_ratio",
        "kv_bytes_in_use",
        "kv_bytes_full",
        "matched_to",
    ] {
        assert!(rows[0].get(key).is_some(), "missing `{key}` in {}", rows[0]);
    }
    for file in [
        "sweep.json",
        "sweep.csv",
        "sweep.md",
        "accuracy.svg",
        "accuracy.png",
    ] {
        let p = out_dir.join(file);
        assert!(
            std::fs::metadata(&p).map(|m| m.len() > 0).unwrap_or(false),
            "{file} missing"
        );
    }
    let csv = std::fs::read_to_string(out_dir.join("sweep.csv")).unwrap();
    assert!(
        csv.starts_with("policy,target_evict,measured_evict,accuracy,"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), rows.len() + 1);
    // Without --json the table goes to stdout.
    let out = mixed.eval(&["--sweep", "0.5"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("| policy | target_evict |"));
    // A budget flag beside --sweep would be ignored: refused.
    let out = mixed.eval(&["--policy", "h2o", "--sweep", "0.5", "--keep", "8"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--keep does nothing with --sweep"));
    // Attention-Gate in threshold mode alone uses none of the ratios: it runs once, with a note.
    let gates = random_gates(mixed.dir.path(), &mixed.model);
    let out = mixed.eval(&["--policy", "ag", "--gates", s(&gates), "--sweep", "0.5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.matches("\n| ag | - |").count(), 1, "{table}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sweep's ratios do nothing here"));
}

/// The folder describes the last run: a single run into it removes a sweep's files, with a
/// note (and a sweep a single run's), never a file agate did not write.
#[test]
fn an_out_folder_holds_one_runs_outputs() {
    let mixed = Mixed::new();
    let out_dir = mixed.dir.path().join("out");
    assert!(mixed
        .eval(&["--sweep", "0.5", "--out", s(&out_dir)])
        .status
        .success());
    let sweep_files = [
        "sweep.json",
        "sweep.csv",
        "sweep.md",
        "accuracy.svg",
        "accuracy.png",
    ];
    let single_files = ["summary.json", "outcomes.jsonl"];
    std::fs::write(out_dir.join("notes.txt"), "mine").unwrap();
    let present = |names: &[&str]| names.iter().filter(|n| out_dir.join(n).exists()).count();
    let single = mixed.eval(&["--out", s(&out_dir)]);
    assert!(single.status.success());
    assert_eq!((present(&single_files), present(&sweep_files)), (2, 0));
    let note = String::from_utf8_lossy(&single.stderr);
    assert!(
        note.contains("removed sweep.json, sweep.csv, sweep.md, accuracy.svg, accuracy.png"),
        "{note}"
    );
    assert!(mixed
        .eval(&["--sweep", "0.5", "--out", s(&out_dir)])
        .status
        .success());
    assert_eq!((present(&single_files), present(&sweep_files)), (0, 5));
    assert!(out_dir.join("notes.txt").exists());
}

#[test]
fn synthetic_tasks_round_trip_through_a_task_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 2048);
    let file = dir.path().join("pk.jsonl");
    let m = model.to_str().unwrap();
    let common = [
        "--synthetic",
        "passkey",
        "--length",
        "600",
        "--depths",
        "0,1",
        "-n",
        "2",
        "--seed",
        "3",
        "--model",
        m,
    ];
    let out = agate(
        &[
            &["eval", "--write-tasks", file.to_str().unwrap()],
            &common[..],
        ]
        .concat(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 4);
    let direct = stdout_json(&agate(&[&["eval", "--json"], &common[..]].concat()));
    let from_file = stdout_json(&agate(&[
        "eval",
        "--json",
        "--tasks",
        file.to_str().unwrap(),
        "--model",
        m,
    ]));
    assert_eq!(direct["n"], 4);
    assert_eq!(direct["accuracy"], from_file["accuracy"]);
    assert_eq!(direct["by_depth"], from_file["by_depth"]);
    let out = agate(&[
        "eval",
        "--synthetic",
        "passkey",
        "--depths",
        "1.5",
        "--model",
        m,
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--depths"));
}

#[test]
fn sweeps_match_baselines_to_an_anchors_measured_ratio() {
    let mixed = Mixed::new();
    // streaming keeps 8 tokens per head (its own setting): its measured ratio is not on the grid,
    // so h2o also runs at it.
    let out = mixed.eval(&[
        "--policy",
        "streaming,h2o",
        "--keep",
        "8",
        "--sweep",
        "0.5",
        "--match-to",
        "streaming",
        "--json",
    ]);
    let v = stdout_json(&out);
    let rows: Vec<(String, Option<f64>, Option<String>, f64)> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["policy"].as_str().unwrap().to_string(),
                r["target_ratio"].as_f64(),
                r["matched_to"].as_str().map(str::to_string),
                r["eviction_ratio"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].3), ("full", 0.0));
    assert_eq!((rows[1].0.as_str(), rows[1].1), ("streaming", None));
    let anchor = rows[1].3;
    assert!(anchor > 0.0 && (anchor - 0.5).abs() > 0.005, "{rows:?}");
    assert_eq!((rows[2].0.as_str(), rows[2].1), ("h2o", Some(0.5)));
    assert_eq!(rows[3].0, "h2o");
    assert_eq!(rows[3].1, Some(anchor));
    assert_eq!(rows[3].2.as_deref(), Some("streaming"));
}

/// `--chat` renders every task through the model's chat template, and `--json` gives
/// each accuracy with its sample size and 95% interval, and says which protocol ran.
#[test]
fn chat_json_has_the_protocol_and_intervals() {
    let mixed = Mixed::new();
    let run = |extra: &[&str]| {
        stdout_json(&mixed.eval(&[&["--policy", "full", "--json"], extra].concat()))
    };
    let v = run(&["--chat"]);
    for key in [
        "tasks",
        "policy",
        "n",
        "accuracy",
        "accuracy_ci95",
        "chat",
        "eviction_ratio",
        "kv_bytes_in_use",
        "kv_bytes_full",
        "per_type",
        "model",
        "query_aware",
    ] {
        assert!(v.get(key).is_some(), "missing `{key}` in {v}");
    }
    assert_eq!(v["chat"], true);
    assert_eq!(v["n"], 3);
    let acc = v["accuracy"].as_f64().unwrap();
    let ci: Vec<f64> = v["accuracy_ci95"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(ci.len(), 2);
    assert!(
        ci[0] <= acc && acc <= ci[1] && ci[0] >= 0.0 && ci[1] <= 1.0,
        "{v}"
    );
    let ppl = &v["per_type"]["perplexity"];
    let pci = ppl["perplexity_ci95"].as_array().unwrap();
    assert!(pci[0].as_f64().unwrap() <= ppl["perplexity"].as_f64().unwrap());
    // The chat template adds tokens around the same tasks: more KV bytes than the raw protocol.
    let raw = run(&[]);
    assert_eq!(raw["chat"], false);
    assert!(
        v["kv_bytes_full"].as_u64().unwrap() > raw["kv_bytes_full"].as_u64().unwrap(),
        "{v} vs {raw}"
    );
}

/// A sweep shares one prefill of each context between its policies (copy-on-write forks); the
/// same sweep with a separate prefill per policy gives the very same rows.
#[test]
fn shared_and_separate_prefills_give_the_same_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 2048);
    let m = model.to_str().unwrap();
    let common = [
        "eval",
        "--synthetic",
        "kv",
        "--length",
        "300",
        "-n",
        "2",
        "--model",
        m,
        "--policy",
        "all",
        "--sweep",
        "0.3,0.6",
        "--json",
    ];
    let shared = stdout_json(&agate(&common));
    let separate = stdout_json(&agate(&[&common[..], &["--separate-prefills"]].concat()));
    assert_eq!(shared["rows"], separate["rows"]);
    assert_eq!(shared["rows"].as_array().unwrap().len(), 1 + 8 * 2);
}

/// Output failures name the flag and the path: a task file's folder must exist (as for every
/// output file; `--out` is a folder and is created), checked before any work; a failed write
/// of `--write-tasks` or of a file under `--out` says which.
#[test]
fn output_failures_name_the_flag_and_the_path() {
    let mixed = Mixed::new();
    let dir = mixed.dir.path();
    let synthetic = [
        "eval",
        "--synthetic",
        "passkey",
        "--length",
        "600",
        "-n",
        "1",
        "--model",
        s(&mixed.model),
        "--write-tasks",
    ];
    let missing = dir.join("no/such/tasks.jsonl");
    fails_with(
        &agate(&[&synthetic[..], &[s(&missing)]].concat()),
        &["--write-tasks", "no/such", "does not exist"],
    );
    #[cfg(target_os = "linux")]
    fails_with(
        &agate(&[&synthetic[..], &["/dev/full"]].concat()),
        &["--write-tasks", "/dev/full", "No space left"],
    );
    let out_dir = dir.join("out");
    std::fs::create_dir_all(out_dir.join("summary.json")).unwrap();
    fails_with(
        &mixed.eval(&["--out", s(&out_dir)]),
        &["--out", "summary.json", "is a directory"],
    );
    fails_with(
        &mixed.eval(&["--out", s(&mixed.tasks)]),
        &["--out", "exists and is not a directory"],
    );
}

/// What would silently go wrong is refused or said up front: a ratio swept twice runs once (with
/// a note, as a policy named twice), a `--policy-opt` key given twice is refused, a task too
/// long for the model names its file and line, and a sweep file `--out` cannot hold fails the
/// command before the sweep, leaving nothing written.
#[test]
fn repeats_and_late_failures_are_caught_up_front() {
    let mixed = Mixed::new();
    let out = mixed.eval(&["--policy", "h2o", "--sweep", "0.5,0.5", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--sweep names 0.5 more than once; each ratio runs once"),
        "{stderr}"
    );
    assert_eq!(stdout_json(&out)["rows"].as_array().unwrap().len(), 2);
    fails_with(
        &mixed.eval(&["--policy", "pyramidkv", "--policy-opt", "beta=2,beta=3"]),
        &["--policy-opt", "`beta` is given more than once"],
    );
    let long = mixed.dir.path().join("long.jsonl");
    let good = MIXED.lines().next().unwrap();
    let context = "x ".repeat(3000);
    std::fs::write(
        &long,
        format!("{good}\n\n{{\"type\":\"choice\",\"context\":\"{context}\",\"question\":\"q\",\"choices\":[\"a\",\"b\"],\"answer\":0}}\n"),
    )
    .unwrap();
    fails_with(
        &agate(&["eval", "--tasks", s(&long), "--model", s(&mixed.model)]),
        &[
            &format!("{}:3: task 2 (choice)", long.display()),
            "does not fit",
        ],
    );
    let out_dir = mixed.dir.path().join("sweep");
    std::fs::create_dir_all(out_dir.join("accuracy.png")).unwrap();
    fails_with(
        &mixed.eval(&["--policy", "h2o", "--sweep", "0.5", "--out", s(&out_dir)]),
        &["--out", "accuracy.png"],
    );
    assert!(!out_dir.join("sweep.json").exists());
}
