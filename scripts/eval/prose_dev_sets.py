#!/usr/bin/env python3
"""Development sets for tuning Attention-Gate's prose settings without looking at the held-out
essays: passages of the *training* essays (the first 42 documents of `cpt-train.jsonl`, written
by `cargo xtask fetch-data`) cut to the lengths of the held-out passages (`heldout-ppl.jsonl`),
as perplexity tasks for `agate eval --tasks`.

- `dev-a.jsonl`: 18 passages, two per held-out length, from the start of the shortest unused
  essays long enough (each essay used once);
- `dev-b.jsonl`: 27 passages, three per held-out length, from seeded random offsets
  (seed 4), spreading the use over the essays.

Deterministic: the same data files always give byte-identical sets.

    scripts/eval/prose_dev_sets.py [--data ~/.cache/agate/data] [--out DIR]
"""
import argparse
import json
import os
import random

ESSAYS = 42  # cpt-train.jsonl starts with the training essays, in file-name order


def read_jsonl(path):
    with open(path, encoding="utf-8-sig") as f:
        return [json.loads(line) for line in f if line.strip()]


def cut(text, start, length):
    """`length` characters from `start`, ended at the last sentence end in its last tenth."""
    passage = text[start:start + length]
    end = passage.rfind(". ")
    return passage[:end + 1] if end > length * 0.9 else passage


def dev_a(essays, lengths):
    used, passages = set(), []
    for length in lengths:
        for _ in range(2):
            fits = [i for i in range(len(essays)) if i not in used and len(essays[i]) >= length + 300]
            i = min(fits, key=lambda i: len(essays[i]))
            used.add(i)
            start = essays[i].find("\n\n", 100)
            start = 0 if start < 0 or start > 300 else start + 2
            passages.append(cut(essays[i], start, length))
    return passages


def dev_b(essays, lengths):
    rng = random.Random(4)
    uses, passages = [0] * len(essays), []
    for length in lengths:
        for _ in range(3):
            fits = [i for i in range(len(essays)) if len(essays[i]) >= length + 500]
            fits.sort(key=lambda i: (uses[i], rng.random()))
            i = fits[0]
            uses[i] += 1
            essay = essays[i]
            start = rng.randrange(0, len(essay) - length)
            line = essay.find("\n", start)
            if 0 <= line < start + 300 and line + 1 + length <= len(essay):
                start = line + 1
            passages.append(cut(essay, start, length))
    return passages


def write_atomically(path, passages):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for text in passages:
            f.write(json.dumps({"type": "perplexity", "text": text}) + "\n")
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(
        os.environ.get("AGATE_HOME", os.path.expanduser("~/.cache/agate")), "data"))
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    essays = [d["text"] for d in read_jsonl(os.path.join(args.data, "cpt-train.jsonl"))[:ESSAYS]]
    heldout = read_jsonl(os.path.join(args.data, "heldout-ppl.jsonl"))
    lengths = sorted((len(t["text"]) for t in heldout), reverse=True)
    for name, passages in (("dev-a.jsonl", dev_a(essays, lengths)),
                           ("dev-b.jsonl", dev_b(essays, lengths))):
        path = os.path.join(args.out, name)
        write_atomically(path, passages)
        print(f"{path}: {len(passages)} passages, {sum(map(len, passages))} characters")


if __name__ == "__main__":
    main()
