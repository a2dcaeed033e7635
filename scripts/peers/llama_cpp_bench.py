#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) on the same GGUF and the same shapes as `agate bench`.

For each depth d: a fresh context is filled with d random tokens (untimed), a prompt of p random
tokens is timed, then n tokens are generated greedily (end of sequence ignored) and timed.
Median over r runs. Prints a markdown table, or JSON lines with --json.

    pip install llama-cpp-python==0.3.16
    python3 scripts/peers/llama_cpp_bench.py MODEL.gguf -p 512 -n 128 -d 0,1024,4096 -r 3 -t 2
"""
import argparse
import json
import statistics
import time

import llama_cpp
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-d", default="0")
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("-t", type=int, default=2, help="threads")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    depths = [int(x) for x in a.d.split(",")]
    llm = llama_cpp.Llama(model_path=a.model, n_ctx=max(depths) + a.p + a.n + 8, n_threads=a.t,
                          n_threads_batch=a.t, n_batch=512, logits_all=False, verbose=False)
    vocab = llm.n_vocab()
    rows = []
    for d in depths:
        rng = np.random.default_rng(a.seed)
        filler = rng.integers(0, vocab, d).tolist()
        prompt = rng.integers(0, vocab, a.p).tolist()
        pp, tg = [], []
        for _ in range(a.r):
            llm.reset()
            llm._ctx.kv_cache_clear()
            if filler:
                llm.eval(filler)
            t0 = time.perf_counter()
            llm.eval(prompt)
            t1 = time.perf_counter()
            tok = int(np.argmax(llm._scores[-1]))
            t2 = time.perf_counter()
            for _ in range(a.n):
                llm.eval([tok])
                tok = int(np.argmax(llm._scores[-1]))
            t3 = time.perf_counter()
            pp.append(a.p / (t1 - t0))
            tg.append(a.n / (t3 - t2))
        rows.append({"peer": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "depth": d,
                     "prompt": a.p, "generate": a.n, "threads": a.t,
                     "prefill_tokens_per_s": statistics.median(pp), "prefill_range": [min(pp), max(pp)],
                     "decode_tokens_per_s": statistics.median(tg), "decode_range": [min(tg), max(tg)]})
    if a.json:
        for r in rows:
            print(json.dumps(r))
        return
    print("| peer | depth | test | t/s (median) | range |")
    print("|---|---:|---|---:|---|")
    for r in rows:
        print(f"| llama.cpp | {r['depth']} | pp{r['prompt']} | {r['prefill_tokens_per_s']:.1f} | "
              f"{r['prefill_range'][0]:.1f}–{r['prefill_range'][1]:.1f} |")
        print(f"| llama.cpp | {r['depth']} | tg{r['generate']} | {r['decode_tokens_per_s']:.1f} | "
              f"{r['decode_range'][0]:.1f}–{r['decode_range'][1]:.1f} |")


if __name__ == "__main__":
    main()
