#!/usr/bin/env python3
"""Drives `agate chat` through a long conversation and records what a user would see.

The conversation: paragraphs of the held-out CPT text (`cargo xtask fetch-data`: Paul Graham
essays, LAMBADA fiction, CoQA stories), each followed by a question about it, every fourth turn a follow-up about the answer before; greedy
sampling, so the run is reproducible. Every `--stats-every` turns it asks `/stats` and reads the
process's resident memory. Writes, into OUT (default docs/results/endless_chat):
  transcript.md  - every turn (question, answer, finish reason)
  stats.jsonl    - tokens seen, retained, KV bytes, RSS at each /stats
Usage: scripts/chat/endless_chat.py [--tokens 20000] [--keep 512] [--policy streaming]
       [--positions original|cache] [--threads N] [OUT]
The same conversation with the full cache, for comparison (it ends at the 8,192-token context):
  scripts/chat/endless_chat.py --policy full --keep 0 --positions original --tokens 8000 OUT
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def paragraphs(min_chars=300, max_chars=900):
    data = Path(os.environ.get("AGATE_HOME", Path.home() / ".cache/agate")) / "data"
    out = []
    for line in (data / "cpt-heldout.jsonl").read_text().splitlines():
        text = json.loads(line)["text"]
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if len(para) >= min_chars:
                out.append(para[:max_chars])
    return out


def rss_kib(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    get = lambda k: int(re.search(rf"^{k}:\s+(\d+)", status, re.M).group(1))
    return get("VmRSS"), get("VmHWM")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--keep", type=int, default=512, help="0: no --keep (e.g. --policy full)")
    ap.add_argument("--positions", default=None, help="agate --positions (chat's default: cache)")
    ap.add_argument("--policy", default="streaming")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--stats-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="agate --threads (1 on a busy machine)")
    ap.add_argument("--agate", default=str(ROOT / "target/release/agate"))
    ap.add_argument("out", nargs="?", default=str(ROOT / "docs/results/endless_chat"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [args.agate, "chat", "--policy", args.policy, "--temp", "0",
           "--max-tokens", str(args.max_tokens)]
    if args.keep:
        cmd += ["--keep", str(args.keep)]
    if args.positions:
        cmd += ["--positions", args.positions]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, bufsize=0)

    def read_until(marker):
        buf = b""
        while not buf.endswith(marker):
            c = proc.stdout.read(1)
            if not c:
                raise SystemExit(f"agate ended early:\n{buf.decode(errors='replace')}")
            buf += c
        return buf.decode(errors="replace")

    def send(line):
        proc.stdin.write((line + "\n").encode())
        proc.stdin.flush()

    banner = read_until(b"> ")
    transcript = [f"# Endless chat: `{' '.join(cmd[1:])}`\n", "```text", banner.strip(), "```\n"]
    stats = []
    paras = paragraphs()
    turn, seen = 0, 0
    last_answer = ""
    while seen < args.tokens:
        if turn % 4 == 3:
            question = "Thanks. Can you say that again in simpler words, for a teenager?"
        else:
            para = paras[turn % len(paras)]
            question = f"Here is a passage from an essay: \"{para}\" What is the author's main point, in one or two sentences?"
        send(question)
        reply = read_until(b"> ")
        answer, _, info = reply.rpartition("\n[prefill ")
        info = "[prefill " + info.rsplit("]", 1)[0] + "]"
        if "error:" in answer or "error:" in info:
            transcript.append(f"## Turn {turn + 1}: ERROR\n\n{reply}\n")
        transcript.append(f"## Turn {turn + 1}\n\n**User:** {question}\n\n**agate:** {answer.strip()}\n\n`{info}`\n")
        turn += 1
        if turn % args.stats_every == 0 or turn == 1:
            send("/stats")
            line = read_until(b"> ")
            m = re.search(r"(\d+) tokens seen, (\d+) retained per head.*?KV (\d+) bytes in use of (\d+)", line)
            rss, hwm = rss_kib(proc.pid)
            row = {"turn": turn, "tokens_seen": int(m.group(1)), "retained": int(m.group(2)),
                   "kv_bytes_in_use": int(m.group(3)), "kv_bytes_full": int(m.group(4)),
                   "rss_kib": rss, "peak_rss_kib": hwm}
            stats.append(row)
            seen = row["tokens_seen"]
            print(json.dumps(row), flush=True)
    send("/exit")
    proc.wait()
    (out / "transcript.md").write_text("\n".join(transcript))
    (out / "stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stats))
    print(f"{turn} turns, {seen} tokens seen; written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
