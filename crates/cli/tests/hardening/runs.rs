//! Outputs, sessions and training runs: outputs are written through links, FIFOs and devices,
//! never replaced; chats survive a full pool, lines that are not UTF-8 and (in cache positions)
//! the end of the context; train-gates checkpoints are checksummed, resumed logs have no holes,
//! and Ctrl-C ends training with status 130; `bench --text` reads, repeats and checks its file.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::{agate, agate_with_input, fails_with, s, succeeds, text, tiny_model};

/// A PNG's signature.
fn is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.starts_with(b"\x89PNG"))
}

#[cfg(unix)]
#[test]
fn outputs_are_written_through_links_fifos_and_devices_never_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let map = |out: &Path| {
        agate(&[
            "generate",
            "hello",
            "--model",
            s(&model),
            "--max-tokens",
            "2",
            "--eviction-map",
            s(out),
        ])
    };
    // A symlink stays a link; its target gets the picture.
    let target = dir.path().join("target.png");
    let link = dir.path().join("link.png");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    succeeds(&map(&link));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(is_png(&target));
    // /dev/null stays a device (a name without an extension takes the one format).
    succeeds(&map(Path::new("/dev/null")));
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    // A FIFO is written through to its reader.
    let fifo = dir.path().join("pipe.png");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    succeeds(&map(&fifo));
    assert!(reader.join().unwrap().starts_with(b"\x89PNG"));
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    // A directory is refused; so is a picture format the extension does not name.
    let as_dir = dir.path().join("d.png");
    std::fs::create_dir(&as_dir).unwrap();
    fails_with(&map(&as_dir), &["d.png", "is a directory"]);
    fails_with(
        &map(&dir.path().join("x.bmp")),
        &["--eviction-map", "x.bmp", ".png"],
    );
    fails_with(
        &map(&dir.path().join("no/such/map.png")),
        &["--eviction-map", "no/such", "does not exist"],
    );
    // A temporary file of a killed run is removed on the next write of that output.
    let out = dir.path().join("map.png");
    let dead = Command::new("true").spawn().unwrap();
    let pid = dead.id();
    dead.wait_with_output().unwrap();
    let stale = dir.path().join(format!(".map.png.agate-tmp.{pid}.x1y2z3"));
    std::fs::write(&stale, "half a picture").unwrap();
    succeeds(&map(&out));
    assert!(is_png(&out));
    assert!(!stale.exists(), "stale temporary file kept");
}

// ---- sessions ----

/// The tokens seen that a `/stats` line reports (`… N tokens seen …`).
fn tokens_seen(stats: &str) -> usize {
    stats
        .split(" tokens seen")
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_chat_whose_pool_runs_out_keeps_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 8192);
    // 1 MiB: 1,024 blocks of 16 tokens of one head; 4 heads: about 4,000 tokens.
    let long = "x".repeat(5000);
    let input = format!("hello\n/stats\n{long}\n/stats\nhi again\n/stats\n/exit\n");
    let out = agate_with_input(
        &[
            "chat",
            "--model",
            s(&model),
            "--kv-memory-mb",
            "1",
            "--max-tokens",
            "4",
        ],
        &input,
    );
    succeeds(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("out of KV blocks"), "{stderr}");
    let stats: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("tokens seen"))
        .collect();
    assert_eq!(stats.len(), 3, "{stderr}");
    assert_eq!(stats[0], stats[1], "the failed turn changed the session");
    assert!(tokens_seen(stats[2]) > tokens_seen(stats[1]));
    assert!(!stderr.contains("eviction ratio -"), "{stderr}");
}

/// A line that is not UTF-8 is skipped with a message; the chat goes on. Sampling commands
/// confirm what they set, and refuse a bad value keeping the old one.
#[test]
fn a_chat_line_that_is_not_utf8_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 256);
    let out = agate_with_input(
        &["chat", "--model", s(&model), "--max-tokens", "2"],
        b"\xff\xfe bad\nhello\n/stats\n/temp 0.3\n/topp 2\n/topp 0.9\n/temp 1e40\n/exit\n",
    );
    succeeds(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not valid UTF-8"), "{stderr}");
    assert!(stderr.contains("tokens seen"), "{stderr}");
    assert!(stderr.contains("temperature 0.3\n"), "{stderr}");
    assert!(!stderr.contains("top-p 2"), "{stderr}");
    assert!(stderr.contains("top-p 0.9\n"), "{stderr}");
    assert!(
        stderr.contains("/temp needs a finite number, got `1e40`"),
        "{stderr}"
    );
}

#[test]
fn a_bounded_chat_in_cache_positions_runs_past_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    // Short turns: each must fit beside the 32 kept tokens in the 64-token context.
    let mut input: String = (0..60).map(|i| format!("go {i}\n")).collect();
    input.push_str("/stats\n/exit\n");
    let bounded = [
        "chat",
        "--model",
        s(&model),
        "--policy",
        "streaming",
        "--keep",
        "32",
        "--max-tokens",
        "8",
    ];
    let out = agate_with_input(&bounded, &input);
    succeeds(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cache positions"), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    let stats = stderr.lines().find(|l| l.contains("tokens seen")).unwrap();
    assert!(tokens_seen(stats) >= 1000, "{stats}");
    // Original positions stop at the context.
    let out = agate_with_input(
        &[&bounded[..], &["--positions", "original"]].concat(),
        "a first message\nand a second one\nand a third one that no longer fits\n/exit\n",
    );
    assert!(text(&out).contains("does not fit"), "{}", text(&out));
}

// ---- training ----

fn train_args<'a>(model: &'a str, data: &'a str, dir: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train-gates",
        "--model",
        model,
        "--data",
        data,
        "--seq-len",
        "16",
        "--steps",
        steps,
        "--checkpoint-dir",
        dir,
        "--checkpoint-every",
        "1",
        "--warmup",
        "1",
    ]
}

/// The files of a training run in a folder: a tiny model, some text, the checkpoint folder and
/// the gates' path.
struct TrainFiles {
    model: std::path::PathBuf,
    data: std::path::PathBuf,
    ckpt_dir: std::path::PathBuf,
    gates: std::path::PathBuf,
}

impl TrainFiles {
    /// Writes the model and the text into `dir`.
    fn new(dir: &Path) -> Self {
        let data = dir.join("data.txt");
        std::fs::write(&data, "The cat sat on the mat. ".repeat(40)).unwrap();
        TrainFiles {
            model: tiny_model(dir, 2, 2, 64),
            data,
            ckpt_dir: dir.join("ckpt"),
            gates: dir.join("gates.safetensors"),
        }
    }
}

#[test]
fn checkpoints_are_checksummed_and_resumed_logs_have_no_holes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 64);
    let data = dir.path().join("data.txt");
    std::fs::write(&data, "The cat sat on the mat. ".repeat(40)).unwrap();
    let ckpt_dir = dir.path().join("ckpt");
    let log = dir.path().join("log.jsonl");
    let out_gates = dir.path().join("gates.safetensors");
    let mut args = train_args(s(&model), s(&data), s(&ckpt_dir), "3");
    args.extend(["--log", s(&log), "--out", s(&out_gates)]);
    succeeds(&agate(&args));
    // Resume with a truncated log: it is rebuilt from the checkpoint, whole.
    std::fs::write(
        &log,
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let mut resume = train_args(s(&model), s(&data), s(&ckpt_dir), "5");
    resume.extend(["--log", s(&log), "--out", s(&out_gates), "--resume"]);
    let out = agate(&resume);
    succeeds(&out);
    assert!(text(&out).contains("rebuilt from"), "{}", text(&out));
    let steps: Vec<u64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5]);
    // A missing log too.
    std::fs::remove_file(&log).unwrap();
    let mut more = train_args(s(&model), s(&data), s(&ckpt_dir), "6");
    more.extend(["--log", s(&log), "--out", s(&out_gates), "--resume"]);
    succeeds(&agate(&more));
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 6);
    // One flipped byte anywhere in the checkpoint is refused.
    let ckpt = ckpt_dir.join("checkpoint.safetensors");
    let mut bytes = std::fs::read(&ckpt).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x10;
    std::fs::write(&ckpt, bytes).unwrap();
    let out = agate(&more);
    fails_with(&out, &["checkpoint.safetensors", "checksum mismatch"]);
}

/// What train-gates cannot do as asked is said: a resume at the checkpoint's step trains
/// nothing, calibration covers at most the sequences there are, a failed write names its flag.
#[test]
fn train_gates_says_what_it_cannot_do_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let TrainFiles {
        model,
        data,
        ckpt_dir,
        gates: out_gates,
    } = TrainFiles::new(dir.path());
    let mut args = train_args(s(&model), s(&data), s(&ckpt_dir), "2");
    args.extend(["--out", s(&out_gates)]);
    succeeds(&agate(&args));
    let more = [&args[..], &["--resume"]].concat();
    // Resumed at the checkpoint's step: nothing to train, and a note says so.
    let out = agate(&more);
    succeeds(&out);
    assert!(text(&out).contains("nothing is trained"), "{}", text(&out));
    // More calibration sequences than the data holds: all of them, with a note.
    let mut calibrated = train_args(s(&model), s(&data), s(&ckpt_dir), "2");
    calibrated.extend([
        "--out",
        s(&out_gates),
        "--resume",
        "--calibrate-seqs",
        "999",
    ]);
    let out = agate(&calibrated);
    succeeds(&out);
    assert!(
        text(&out).contains("--calibrate-seqs 999: the data holds"),
        "{}",
        text(&out)
    );
    // A write that fails names the flag.
    #[cfg(target_os = "linux")]
    {
        let mut full = train_args(s(&model), s(&data), s(&ckpt_dir), "2");
        full.extend(["--out", "/dev/full", "--resume"]);
        let out = agate(&full);
        let said = text(&out);
        assert!(!out.status.success(), "{said}");
        assert!(
            said.lines()
                .any(|l| l.starts_with("error: --out: /dev/full: No space left")),
            "{said}"
        );
    }
}

#[cfg(unix)]
#[test]
fn ctrl_c_ends_training_with_130_and_names_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let TrainFiles {
        model,
        data,
        ckpt_dir,
        gates,
    } = TrainFiles::new(dir.path());
    let mut args = train_args(s(&model), s(&data), s(&ckpt_dir), "100000");
    args.extend(["--out", s(&gates)]);
    let child = Command::new(env!("CARGO_BIN_EXE_agate"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ckpt = ckpt_dir.join("checkpoint.safetensors");
    for _ in 0..600 {
        if ckpt.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(ckpt.exists(), "no checkpoint appeared");
    assert!(Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("interrupted at step"), "{stderr}");
    assert!(
        stderr.contains(s(&ckpt)) && stderr.contains("--resume"),
        "{stderr}"
    );
    assert!(!gates.exists(), "an interrupted run wrote its final gates");
    assert!(!stderr.contains("panicked"));
}

/// `bench --text FILE` takes its tokens from the file: a missing, empty or non-UTF-8 file is
/// one error naming it; a short one is repeated, an endless one is read only as far as needed,
/// and every policy gets a row.
#[test]
fn bench_text_is_read_repeated_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), 2, 2, 128);
    let m = s(&model);
    let bench = |text: &Path| {
        agate(&[
            "bench",
            "--model",
            m,
            "--policy",
            "full,h2o",
            "-d",
            "40",
            "-p",
            "8",
            "-n",
            "2",
            "-r",
            "2",
            "--json",
            "--text",
            s(text),
        ])
    };
    let missing = dir.path().join("missing.txt");
    fails_with(
        &bench(&missing),
        &["--text: ", "missing.txt", "cannot read"],
    );
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    fails_with(&bench(&empty), &["empty.txt", "has no text"]);
    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait").unwrap();
    fails_with(&bench(&latin1), &["latin1.txt", "is not UTF-8 text"]);
    #[cfg(target_os = "linux")]
    succeeds(&bench(Path::new("/dev/zero")));
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "The cat sat.").unwrap();
    let out = bench(&short);
    succeeds(&out);
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let policies: Vec<&str> = rows.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(policies, ["full", "h2o"]);
    assert_eq!(rows[0]["depth"], 40);
}
