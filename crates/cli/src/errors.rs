//! How the CLI words the engine's typed errors: every setting named by its flag. The engine's
//! messages name its own fields (`keep`, `SweepPlan.ratios`); [`describe`] renders one cause of
//! an error chain with the flags instead (`--keep`, `--sweep`), and [`hint`] adds what the user
//! can do about a cause that a flag controls.

use engine::{EngineError, KvError, PolicyError, PolicyKind};

use crate::policy_args::flag;

/// One cause of an error chain as the user reads it on the command line.
pub fn describe(cause: &(dyn std::error::Error + 'static)) -> String {
    match cause.downcast_ref::<EngineError>() {
        Some(EngineError::Policy(PolicyError::NeedsGates)) => {
            "--policy ag needs --gates FILE for this model (trained gates ship only for the \
             default model; random gates for testing: `agate init-gates --out FILE`)"
                .into()
        }
        Some(EngineError::Policy(p)) => p.describe(&flag),
        Some(EngineError::Setting { setting, problem }) => {
            format!("{}: {problem}", setting_flag(setting))
        }
        Some(EngineError::Task {
            number,
            kind,
            policy,
            source,
        }) => {
            let under = policy.map_or_else(String::new, |p| format!(", policy {p}"));
            format!(
                "task {number} ({kind}{under}): {}",
                describe(source.as_ref())
            )
        }
        _ => cause.to_string(),
    }
}

/// The flag of a plan's setting (`SweepPlan.ratios` → `--sweep`); the setting itself when it
/// has no flag.
fn setting_flag(setting: &'static str) -> &'static str {
    match setting {
        "SweepPlan.policies" => "--policy",
        "SweepPlan.ratios" => "--sweep",
        "SweepPlan.anchors" => "--match-to",
        "EngineConfig.block_size" => "--block-size",
        "EngineConfig.kv_memory_mb" => "--kv-memory-mb",
        "EngineConfig.prefill_chunk" => "--prefill-chunk",
        "SchedulerConfig.max_sessions" => "--max-sessions",
        "EvalOptions.ppl_chunk" => "--ppl-chunk",
        "EvalOptions.ppl_context" => "--ppl-context",
        "SyntheticSpec.length" => "--length",
        "SyntheticSpec.depths" => "--depths",
        "SyntheticSpec.keys" => "--keys",
        "SyntheticSpec.n" => "-n",
        "SyntheticSpec.filler" => "--filler",
        "BenchSpec.prompt" => "--prompt",
        "BenchSpec.sizes" => "--depth + --prompt + --generate",
        "BenchSpec.repetitions" => "--repetitions",
        "TrainConfig.mode" => "--mode",
        "TrainConfig.data" => "--data",
        "TrainConfig.heldout" => "--heldout",
        "TrainConfig.init_gates" => "--init-gates",
        "TrainConfig.train" => "--train",
        "TrainConfig.lora" => "--lora-rank",
        "TrainConfig.lora.rank" => "--lora-rank",
        "TrainConfig.lora.alpha" => "--lora-alpha",
        "TrainConfig.lora.targets" => "--lora-targets",
        "TrainConfig.heldout_seqs" => "--heldout-seqs",
        "TrainConfig.seq_len" => "--seq-len",
        "TrainConfig.batch" => "--batch",
        "TrainConfig.grad_accum" => "--grad-accum",
        "TrainConfig.steps" => "--steps",
        "TrainConfig.lr" => "--lr",
        "TrainConfig.min_lr_ratio" => "--min-lr-ratio",
        "TrainConfig.weight_decay" => "--weight-decay",
        "TrainConfig.clip" => "--clip",
        "TrainConfig.target_evict" => "--target-evict",
        "TrainConfig.lambda" => "--lambda",
        other => other,
    }
}

/// The context of a run's error under an evicting policy: an out-of-blocks cause then gets the
/// hint that fits (the prompt is prefilled whole before the policy evicts, so `--keep` does not
/// bound the prefill's peak), instead of "evict with --policy".
#[derive(Debug)]
pub struct UnderPolicy(pub PolicyKind);

impl std::fmt::Display for UnderPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--policy {}", self.0)
    }
}

/// `e` with [`UnderPolicy`] as its context when `policy` evicts and a cause ran out of KV
/// blocks; otherwise `e` as it is.
pub fn under_policy(e: anyhow::Error, policy: PolicyKind) -> anyhow::Error {
    let out_of_blocks = e.chain().any(|c| {
        c.downcast_ref::<KvError>()
            .is_some_and(KvError::is_out_of_blocks)
    });
    if policy != PolicyKind::Full && out_of_blocks {
        e.context(UnderPolicy(policy))
    } else {
        e
    }
}

/// What the user can do about an error whose cause is a flag's value (empty: nothing to add).
pub fn hint(e: &anyhow::Error) -> &'static str {
    if e.downcast_ref::<UnderPolicy>().is_some() {
        return " (the prompt is prefilled whole before the policy evicts, so eviction cannot \
                make it fit: raise --kv-memory-mb or shorten the prompt)";
    }
    e.chain()
        .map(hint_for)
        .find(|h| !h.is_empty())
        .unwrap_or("")
}

/// [`hint`] for one cause.
fn hint_for(cause: &(dyn std::error::Error + 'static)) -> &'static str {
    if cause
        .downcast_ref::<KvError>()
        .is_some_and(KvError::is_out_of_blocks)
    {
        " (the KV pool is sized by --kv-memory-mb: raise it, or evict with --policy … --keep N)"
    } else if let Some(EngineError::CacheOverflow { .. }) = cause.downcast_ref::<EngineError>() {
        " (cache positions: a policy with a fixed --keep budget bounds what heads hold)"
    } else if let Some(EngineError::Diverged { .. } | EngineError::TrainingDiverged { .. }) =
        cause.downcast_ref::<EngineError>()
    {
        " (lower --lr or --lambda)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::{PolicyKind, Setting};

    #[test]
    fn out_of_blocks_under_an_evicting_policy_says_the_prompt_is_prefilled_whole() {
        let out_of_blocks = || {
            anyhow::Error::from(EngineError::from(KvError::ReserveFailed {
                requested: 11340,
                free: 2048,
                total: 2048,
            }))
        };
        let full = under_policy(out_of_blocks(), PolicyKind::Full);
        assert!(
            hint(&full).contains("evict with --policy"),
            "{}",
            hint(&full)
        );
        let streaming = under_policy(out_of_blocks(), PolicyKind::Streaming);
        assert_eq!(streaming.to_string(), "--policy streaming");
        assert!(
            hint(&streaming).contains("prefilled whole before the policy evicts")
                && hint(&streaming).contains("raise --kv-memory-mb or shorten the prompt"),
            "{}",
            hint(&streaming)
        );
        // Any other error keeps its own hint, under any policy.
        let other = under_policy(anyhow::anyhow!("no"), PolicyKind::Streaming);
        assert_eq!((other.to_string().as_str(), hint(&other)), ("no", ""));
    }

    #[test]
    fn policy_errors_name_the_flags() {
        let e = EngineError::from(PolicyError::ProtectionExceedsBudget {
            policy: PolicyKind::H2o,
            keep: 8,
            protected: 12,
            by: &[Setting::Sinks, Setting::Recent],
        });
        let text = describe(&e);
        assert!(
            text.contains("h2o keeps at most --keep 8 tokens per head")
                && text.contains("(--sinks + --window)"),
            "{text}"
        );
        assert!(e.to_string().contains("(sinks + recent)"), "{e}");
        let e = EngineError::Setting {
            setting: "SweepPlan.ratios",
            problem: "ratio 1 is outside [0, 1)".into(),
        };
        assert_eq!(describe(&e), "--sweep: ratio 1 is outside [0, 1)");
        let e = EngineError::from(PolicyError::NeedsGates);
        assert!(describe(&e).contains("--gates FILE"));
        // A task's failure keeps its cause, worded with flags too.
        let e = EngineError::Task {
            number: 3,
            kind: "perplexity",
            policy: Some(PolicyKind::Tova),
            source: Box::new(EngineError::Setting {
                setting: "EvalOptions.ppl_chunk",
                problem: "must be at least 1".into(),
            }),
        };
        assert_eq!(
            describe(&e),
            "task 3 (perplexity, policy tova): --ppl-chunk: must be at least 1"
        );
        assert!(e.to_string().contains("EvalOptions.ppl_chunk"), "{e}");
    }
}
