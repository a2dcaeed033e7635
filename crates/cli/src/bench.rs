//! `agate bench`: llama-bench style throughput — prompt processing and token generation at
//! chosen context depths, per policy — as a markdown table or JSON lines (`--json`).

use clap::Args;
use engine::bench::{BenchRow, BenchSpec};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{load_engine, ModelArgs};
use crate::policy_args::{PolicyArgs, PolicyChoice};

/// Flags of `agate bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Prompt tokens per run.
    #[arg(short = 'p', long = "prompt", default_value_t = 512)]
    pub prompt: usize,
    /// Generated tokens per run.
    #[arg(short = 'n', long = "generate", default_value_t = 128)]
    pub generate: usize,
    /// Context depths before the prompt, comma-separated.
    #[arg(
        short = 'd',
        long = "depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub depths: Vec<usize>,
    /// Repetitions per configuration. A depth's runs alternate the policies in ABBA order
    /// (forward, then reversed): an even count gives each policy every position equally often.
    #[arg(short = 'r', long = "repetitions", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub repetitions: u64,
    /// Seed of the random prompt tokens.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Take the context and prompt tokens from this text file (in order, repeated when shorter
    /// than depth + prompt) instead of random ids: what an eviction policy keeps, and so its
    /// speed, depends on the text.
    #[arg(long, value_name = "FILE")]
    pub text: Option<std::path::PathBuf>,
    /// Print JSON lines (one object per row) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also measure this machine's memory bandwidth (a streaming read over 512 MiB on the same
    /// number of threads) and report, for each decode figure, the bytes one step reads (weights
    /// + retained K and V) and the fraction of the bound bandwidth / bytes reached.
    #[arg(long)]
    pub roofline: bool,
}

/// Runs `agate bench`: measures every policy at every depth, then prints the rows.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let policies = args.policy.policies()?;
    let engine = load_engine(&args.model)?;
    let mut rows = measure(args, &engine, &policies)?;
    if args.roofline {
        let bandwidth = engine::bench::measure_read_bandwidth(rayon::current_num_threads(), 5);
        rows = rows
            .into_iter()
            .map(|r| r.with_roofline(bandwidth))
            .collect();
    }
    if args.json {
        for row in &rows {
            outln!("{}", serde_json::to_string(row)?)?;
        }
        return Ok(());
    }
    print_table(&engine, &rows)?;
    print_roofline(&rows)
}

/// Runs the benchmark of every policy (their runs alternate) with one progress bar over every
/// run.
fn measure(
    args: &BenchArgs,
    engine: &engine::Engine,
    policies: &[PolicyChoice],
) -> anyhow::Result<Vec<BenchRow>> {
    let spec = BenchSpec {
        prompt: args.prompt,
        generate: args.generate,
        depths: args.depths.clone(),
        repetitions: args.repetitions as usize,
        seed: args.seed,
        text: args.text.clone(),
        positions: args.policy.positions_or(engine::Positions::Original),
    };
    let runs = policies
        .len()
        .saturating_mul(spec.depths.len())
        .saturating_mul(spec.repetitions);
    let bar = ProgressBar::new(runs as u64);
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} runs  {elapsed}  ETA {eta}  {msg}",
    )?);
    bar.enable_steady_tick(std::time::Duration::from_secs(1));
    let resolved = policies
        .iter()
        .map(|p| p.resolve(engine))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let repetitions = spec.repetitions;
    let rows = engine::bench::run(engine, &resolved, &spec, &mut |p| {
        // The position first: setting the message redraws the bar with both.
        bar.set_position(p.done as u64);
        bar.set_message(format!(
            "{} at depth {}, run {}/{repetitions}",
            p.policy,
            p.depth,
            p.repetition + 1
        ));
    })
    .map_err(|e| match &e {
        engine::EngineError::DataFile { file, .. } if args.text.as_ref() == Some(file) => {
            anyhow::Error::from(e).context("--text")
        }
        _ => e.into(),
    })?;
    bar.finish_and_clear();
    Ok(rows)
}

/// The llama-bench style table: one `pp` row per configuration and a `tg` row when it
/// generated.
fn print_table(engine: &engine::Engine, rows: &[BenchRow]) -> anyhow::Result<()> {
    outln!(
        "model: {} | threads: {}",
        engine.model_path().display(),
        rayon::current_num_threads()
    )?;
    outln!("| policy | depth | test | t/s (median) | range | TTFT s | KV MiB in use / full | evicted | peak RSS MiB |")?;
    outln!("|---|---:|---|---:|---|---:|---|---:|---:|")?;
    let mib = |b: f64| b / (1 << 20) as f64;
    for r in rows {
        let kv = format!(
            "{:.1} / {:.1}",
            mib(r.kv_bytes_in_use as f64),
            mib(r.kv_bytes_full as f64)
        );
        let rss = mib(r.peak_rss_bytes as f64);
        outln!(
            "| {} | {} | pp{} | {:.1} | {:.1}–{:.1} | {:.3} | {kv} | {:.2} | {rss:.0} |",
            r.policy,
            r.depth,
            r.prompt,
            r.prefill_tokens_per_s.median,
            r.prefill_tokens_per_s.min,
            r.prefill_tokens_per_s.max,
            r.time_to_first_token_s.median,
            r.eviction_ratio
        )?;
        if r.generate < 2 {
            continue; // no decode step: the first token comes from the prompt's prefill
        }
        outln!(
            "| {} | {} | tg{} | {:.1} | {:.1}–{:.1} | | {kv} | {:.2} | {rss:.0} |",
            r.policy,
            r.depth,
            r.generate,
            r.decode_tokens_per_s.median,
            r.decode_tokens_per_s.min,
            r.decode_tokens_per_s.max,
            r.eviction_ratio
        )?;
    }
    Ok(())
}

/// With `--roofline`: the measured bandwidth and, per decode figure, the bytes a step reads
/// and the fraction of the bandwidth bound reached (nothing without it).
fn print_roofline(rows: &[BenchRow]) -> anyhow::Result<()> {
    let Some(bw) = rows.first().and_then(|r| r.roofline) else {
        return Ok(());
    };
    outln!()?;
    outln!(
        "memory bandwidth (streaming read, {} threads): {:.1} GB/s",
        rayon::current_num_threads(),
        bw.bandwidth_gb_per_s
    )?;
    outln!("| policy | depth | tg t/s | MB/token (weights + KV) | bound t/s | of bound |")?;
    outln!("|---|---:|---:|---|---:|---:|")?;
    for r in rows.iter().filter(|r| r.generate >= 2) {
        let Some(roof) = r.roofline else { continue };
        outln!(
            "| {} | {} | {:.1} | {:.1} ({:.1} + {:.1}) | {:.1} | {:.0}% |",
            r.policy,
            r.depth,
            r.decode_tokens_per_s.median,
            roof.bytes_per_token / 1e6,
            r.weight_bytes_per_token as f64 / 1e6,
            r.kv_bytes_read_per_token / 1e6,
            roof.roofline_tokens_per_s,
            100.0 * roof.roofline_fraction
        )?;
    }
    Ok(())
}
