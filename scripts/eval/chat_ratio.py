#!/usr/bin/env python3
"""Eviction in a conversation, measured as a user meets it: each held-out chat of
`cargo xtask fetch-data` (`chat-heldout.jsonl`: the user turns of a 12-turn conversation about a
held-out CoQA story) is typed into `agate chat` with greedy answers, then `/stats` is read.
Prints one JSON object per conversation and a summary line (mean eviction ratio, bytes).

    scripts/eval/chat_ratio.py [-n 5] [--agate target/release/agate] -- --policy ag
"""
import argparse
import json
import os
import re
import subprocess
import sys

STATS = re.compile(
    r"(?P<seen>\d+) tokens seen, (?P<kept>\d+) retained per head on average "
    r"\(eviction ratio (?P<ratio>[0-9.]+)\); (?P<used>\d+) bytes in use "
    r"\((?P<kv>\d+) in (?P<blocks>\d+) KV blocks \+ (?P<state>\d+) of policy state\) "
    r"of (?P<full>\d+) for the full cache")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=5, help="conversations (the first N)")
    ap.add_argument("--agate", default="target/release/agate")
    ap.add_argument("--data", default=os.path.join(
        os.environ.get("AGATE_HOME", os.path.expanduser("~/.cache/agate")), "data",
        "chat-heldout.jsonl"))
    ap.add_argument("--max-tokens", type=int, default=48, help="answer length cap")
    ap.add_argument("flags", nargs="*", help="agate chat flags after --, e.g. --policy ag")
    args = ap.parse_args()
    chats = [json.loads(l) for l in open(args.data) if l.strip()][: args.n]
    rows = []
    for i, chat in enumerate(chats):
        script = "\n".join(chat["turns"] + ["/stats", "/exit"]) + "\n"
        cmd = [args.agate, "chat", "--temp", "0", "--max-tokens", str(args.max_tokens)] + args.flags
        out = subprocess.run(cmd, input=script, capture_output=True, text=True)
        m = STATS.search(out.stderr)
        if out.returncode != 0 or not m:
            sys.exit(f"conversation {i}: agate chat failed ({out.returncode}):\n{out.stderr[-2000:]}")
        row = {"conversation": i, "turns": len(chat["turns"])}
        row.update({k: float(v) if k == "ratio" else int(v) for k, v in m.groupdict().items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    mean = lambda k: sum(r[k] for r in rows) / len(rows)
    print(json.dumps({"summary": True, "n": len(rows), "eviction_ratio": mean("ratio"),
                      "min_ratio": min(r["ratio"] for r in rows),
                      "max_ratio": max(r["ratio"] for r in rows),
                      "bytes_in_use": mean("used"), "bytes_full": mean("full"),
                      "flags": args.flags}))


if __name__ == "__main__":
    main()
