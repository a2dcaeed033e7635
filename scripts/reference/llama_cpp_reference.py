#!/usr/bin/env python3
"""Reference outputs of the default model from llama.cpp (llama-cpp-python), committed as fixtures.

For each prompt: the prompt's token ids, 32 greedy tokens, and at every step the top-5 (id, logit)
of llama.cpp's logits. Also token ids for tokenizer edge cases (digits, unicode, whitespace,
special tokens). agate's tests compare against this file; regenerate with:

    pip install llama-cpp-python==0.3.16
    python3 scripts/reference/llama_cpp_reference.py MODEL.gguf crates/engine/tests/fixtures/llama_cpp_reference.json
"""
import hashlib
import json
import sys

import llama_cpp
import numpy as np

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three primary colors are",
    "Water boils at 100 degrees Celsius. At sea level, water freezes at",
    "<|im_start|>user\nWhat is the largest planet in the solar system?<|im_end|>\n<|im_start|>assistant\n",
    "In 1969, Neil Armstrong became the first person to",
]
TOKENIZER_CASES = [
    "Hello, world!",
    "1234567 apples cost $89.50",
    "  leading spaces and\ttabs\n\nnewlines  ",
    "naïve café — déjà vu 🙂 日本語",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n",
    "don't you'll we've I'm",
]
STEPS = 32


def main(model_path, out_path):
    digest = hashlib.sha256(open(model_path, "rb").read()).hexdigest()
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=1024, n_threads=2, logits_all=True, verbose=False, seed=0)
    cases = []
    for prompt in PROMPTS:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        generated, top5 = [], []
        for _ in range(STEPS):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            order = np.argsort(-logits, kind="stable")[:5]
            top5.append([[int(i), float(logits[i])] for i in order])
            nxt = int(order[0])
            generated.append(nxt)
            llm.eval([nxt])
        cases.append({"prompt": prompt, "prompt_ids": ids, "greedy_ids": generated, "top5": top5,
                      "greedy_text": llm.detokenize(generated).decode("utf-8", errors="replace")})
        print(repr(prompt[:40]), "->", repr(cases[-1]["greedy_text"][:60]), file=sys.stderr)
    tok = [{"text": t, "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)} for t in TOKENIZER_CASES]
    out = {"reference": f"llama-cpp-python {llama_cpp.__version__}", "model_sha256": digest,
           "steps": STEPS, "cases": cases, "tokenizer": tok}
    with open(out_path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    import os
    os.replace(out_path + ".tmp", out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
