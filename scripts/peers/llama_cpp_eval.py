#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) on `agate eval` generate tasks: the same protocol with a
full cache, as a peer for agate's full-cache accuracy and greedy outputs.

Protocol, as agate's (docs/eval.md): the context is tokenized with BOS, "\\n" + question +
answer_prefix without BOS (separately, then joined); greedy decoding of at most tokens(answer) + margin tokens, stopping
at end of sequence; the output is scored after lower-casing and collapsing whitespace (exact,
contains, or `all`: the fraction of the answer's comma-separated items found).

With --agate OUTCOMES (the outcomes.jsonl that `agate eval --out DIR` writes for the same task
file), also prints how many outputs agree exactly with agate's, and by how many characters they
share a prefix otherwise. Prints one JSON object.

    pip install llama-cpp-python==0.3.16
    agate eval --synthetic passkey --length 2048 -n 4 --write-tasks pk.jsonl
    agate eval --tasks pk.jsonl --out out/
    python3 scripts/peers/llama_cpp_eval.py MODEL.gguf pk.jsonl --agate out/outcomes.jsonl -t 2
"""
import argparse
import json
import os
import sys

import llama_cpp


def normalize(text):
    return " ".join(text.split()).lower()


def score(kind, output, answer):
    out = normalize(output)
    if kind == "exact":
        return float(out.rstrip(".,;:!?\"'").strip() == normalize(answer))
    if kind == "contains":
        return float(normalize(answer) in out)
    items = [normalize(i) for i in answer.split(",") if normalize(i)]
    return sum(i in out for i in items) / len(items) if items else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("tasks")
    ap.add_argument("--agate", help="agate's outcomes.jsonl for the same tasks")
    ap.add_argument("--answer-margin", type=int, default=8)
    ap.add_argument("-t", type=int, default=2, help="threads")
    ap.add_argument("-c", type=int, default=8192, help="context size")
    a = ap.parse_args()
    tasks = []
    with open(a.tasks) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                t = json.loads(line)
                if t.get("type") != "generate":
                    sys.exit(f"{a.tasks}:{n}: only generate tasks are supported here")
                tasks.append(t)
    # Quiet llama.cpp's loader.
    stderr = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    llm = llama_cpp.Llama(a.model, n_ctx=a.c, n_threads=a.t, n_batch=512, verbose=False)
    os.dup2(stderr, 2)
    eos = llm.token_eos()
    outputs, scores = [], []
    for i, t in enumerate(tasks):
        ctx, q = t["context"], t["question"] + t.get("answer_prefix", "")
        if ctx and q:
            ids = llm.tokenize(ctx.encode(), add_bos=True, special=False) + llm.tokenize(
                ("\n" + q).encode(), add_bos=False, special=False
            )
        else:
            ids = llm.tokenize((ctx + q).encode(), add_bos=True, special=False)
        max_tokens = len(llm.tokenize(t["answer"].encode(), add_bos=False, special=False)) + a.answer_margin
        llm.reset()
        out = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if tok == eos or len(out) >= max_tokens:
                break
            out.append(tok)
        text = llm.detokenize(out).decode("utf-8", errors="replace")
        outputs.append(text)
        scores.append(score(t.get("match", "contains"), text, t["answer"]))
        print(f"[{i + 1}/{len(tasks)}] score {scores[-1]:.2f} {text!r}", file=sys.stderr)
    result = {"tasks": a.tasks, "peer": "llama.cpp", "n": len(tasks), "accuracy": sum(scores) / len(scores)}
    if a.agate:
        with open(a.agate) as f:
            ours = [json.loads(l) for l in f if l.strip()]
        if len(ours) != len(outputs):
            sys.exit(f"{a.agate}: {len(ours)} outcomes for {len(outputs)} tasks")
        same = [o.get("output") == p for o, p in zip(ours, outputs)]
        prefix = [len(os.path.commonprefix([o.get("output") or "", p])) for o, p in zip(ours, outputs)]
        result["agate_accuracy"] = sum(o["score"] for o in ours) / len(ours)
        result["outputs_identical"] = sum(same)
        result["mean_common_prefix_chars"] = sum(prefix) / len(prefix)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
