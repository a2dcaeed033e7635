//! The flags of `agate eval` and the parsers of their values: a value out of its range is
//! refused by clap, naming the flag, before anything else runs.

use std::path::PathBuf;

use clap::Args;
use engine::eval::synthetic::Family;
use engine::eval::PplContext;

use crate::args::ModelArgs;
use crate::policy_args::PolicyArgs;

/// Flags of `agate eval`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("task_source").required(true).args(["tasks", "synthetic"])))]
pub struct EvalArgs {
    /// A JSONL task file (format: docs/eval.md).
    #[arg(long, value_name = "FILE")]
    pub tasks: Option<PathBuf>,
    /// A synthetic task family: passkey, niah, niah-multi, kv, vt, cwe.
    #[arg(long, value_name = "FAMILY", value_parser = parse_family)]
    pub synthetic: Option<Family>,
    /// Synthetic: prompt length in tokens (context + question).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(16..))]
    pub length: u64,
    /// Synthetic: needle depths in [0, 1], comma-separated (passkey, niah, niah-multi, kv).
    #[arg(long, value_delimiter = ',', default_value = "0.5", value_parser = parse_depth)]
    pub depths: Vec<f64>,
    /// Synthetic: tasks per depth (per run for vt and cwe).
    #[arg(short = 'n', long = "samples", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub samples: u64,
    /// Synthetic: random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Synthetic: haystack text file, split into sentences (default: RULER's noise, its block of
    /// neutral sentences repeated whole, one per line).
    #[arg(long, value_name = "FILE")]
    pub filler: Option<PathBuf>,
    /// Synthetic niah-multi: keys hidden (the asked one included).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(2..=64))]
    pub keys: u64,
    /// Write the tasks (synthetic or read) to this JSONL file and exit without running them.
    #[arg(long, value_name = "FILE")]
    pub write_tasks: Option<PathBuf>,
    /// Run only the first N tasks.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// Prefill the question together with the context, before eviction (kvpress' query-aware
    /// setting); by default the question is appended after the context is evicted.
    #[arg(long)]
    pub query_aware: bool,
    /// Render choice and generate tasks (synthetic ones too) through the model's chat template,
    /// as the instruct model is used: the context is compressed with the template's head, the
    /// question and the assistant header follow (a task's `chat` field overrides this).
    #[arg(long)]
    pub chat: bool,
    /// Prefill each policy's context separately instead of once per task for every policy
    /// (forking the cache copy-on-write): the same results, slower — to check or time the
    /// shared path.
    #[arg(long)]
    pub separate_prefills: bool,
    /// Generate tasks: tokens allowed beyond the reference answer's length.
    #[arg(long, default_value_t = 8)]
    pub answer_margin: usize,
    /// Perplexity tasks: the evicted head of each text — a fraction in (0, 1) (`0.5`) or a
    /// token count (`512`, shorter than every text: a text it covers whole is an error); the
    /// rest is scored.
    #[arg(long, default_value = "0.5", value_parser = parse_ppl_context)]
    pub ppl_context: PplContext,
    /// Perplexity tasks: tokens scored per forward pass.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=8192))]
    pub ppl_chunk: u64,
    /// Sweep: run every `--policy` at each of these eviction ratios (comma-separated, in
    /// [0, 1)), plus full; `all` policies with `--policy all`.
    #[arg(long, value_delimiter = ',', value_name = "RATIOS", value_parser = parse_sweep_ratio)]
    pub sweep: Option<Vec<f64>>,
    /// Sweep: policies run once at their own settings whose *measured* ratio the others are
    /// also run at (default: ag in threshold mode when swept, which sets no ratio and so runs
    /// once at its own settings either way; `none` for no matching).
    #[arg(long, value_delimiter = ',', value_name = "NAMES", requires = "sweep")]
    pub match_to: Option<Vec<String>>,
    /// Write results here: summary.json and outcomes.jsonl (single run); sweep.json,
    /// sweep.csv, sweep.md, accuracy.svg and accuracy.png (sweep).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

fn parse_family(s: &str) -> Result<Family, String> {
    s.parse::<Family>().map_err(|e| e.to_string())
}

fn parse_depth(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v + 0.0) // -0 is 0
    } else {
        Err(format!("depth must be in [0, 1], got {v}"))
    }
}

/// A ratio as `--evict` reads it (the f32 a policy holds: 0.999999999 is 1, refused here).
fn parse_sweep_ratio(s: &str) -> Result<f64, String> {
    crate::policy_args::parse_ratio(s.trim()).map(f64::from)
}

fn parse_ppl_context(s: &str) -> Result<PplContext, String> {
    if let Ok(t) = s.parse::<usize>() {
        return if t >= 1 {
            Ok(PplContext::Tokens(t))
        } else {
            Err("give a fraction in (0, 1) or a token count >= 1".into())
        };
    }
    match s.parse::<f64>() {
        Ok(f) if f > 0.0 && f < 1.0 => Ok(PplContext::Fraction(f)),
        _ => Err(format!(
            "`{s}`: give a fraction in (0, 1) or a token count >= 1"
        )),
    }
}
