#!/usr/bin/env python3
"""An exact float64 reference of the default model: a plain numpy Llama forward pass over the
GGUF's dequantized weights, in Hugging Face layout (llama.cpp's q/k row permutation undone,
rotate-half RoPE), independent of agate's code and of llama.cpp's 8-bit activation kernels.

Records, for each prompt of llama_cpp_reference.json (same token ids), 32 greedy tokens and the
top-5 logits at every step. agate's dequantized f32 path must reproduce them; its quantized path
must agree within quantization noise.

    pip install gguf==0.19.0 numpy
    python3 scripts/reference/numpy_reference.py MODEL.gguf crates/engine/tests/fixtures/llama_cpp_reference.json \
        crates/engine/tests/fixtures/numpy_reference.json
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def load(path):
    r = GGUFReader(path)
    f = lambda k: r.fields[k].contents()
    cfg = dict(layers=f("llama.block_count"), heads=f("llama.attention.head_count"),
               kv_heads=f("llama.attention.head_count_kv"), hidden=f("llama.embedding_length"),
               eps=f("llama.attention.layer_norm_rms_epsilon"), theta=f("llama.rope.freq_base"))
    w = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        w[t.name] = a.reshape([int(x) for x in reversed(t.shape)])
    return cfg, w


def unpermute(w, n_head):
    # llama.cpp's convert: w.reshape(n_head, 2, dim/n_head/2, in).swapaxes(1, 2) -- undo it.
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


class Model:
    def __init__(self, cfg, w):
        self.c, self.w = cfg, w
        self.hd = cfg["hidden"] // cfg["heads"]
        for l in range(cfg["layers"]):
            w[f"blk.{l}.attn_q.weight"] = unpermute(w[f"blk.{l}.attn_q.weight"], cfg["heads"])
            w[f"blk.{l}.attn_k.weight"] = unpermute(w[f"blk.{l}.attn_k.weight"], cfg["kv_heads"])
        self.head = w.get("output.weight", w["token_embd.weight"])
        self.inv = 1.0 / cfg["theta"] ** (np.arange(0, self.hd, 2) / self.hd)

    def norm(self, x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.c["eps"]) * g

    def rope(self, x, pos):  # x [T, H, d], rotate-half layout
        ang = np.outer(pos, self.inv)
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., : self.hd // 2], x[..., self.hd // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

    def forward(self, ids, cache):
        c, w, hd = self.c, self.w, self.hd
        start = cache["n"]
        pos = np.arange(start, start + len(ids))
        x = w["token_embd.weight"][ids]
        g = c["heads"] // c["kv_heads"]
        for l in range(c["layers"]):
            p = f"blk.{l}."
            h = self.norm(x, w[p + "attn_norm.weight"])
            q = self.rope((h @ w[p + "attn_q.weight"].T).reshape(len(ids), c["heads"], hd), pos)
            k = self.rope((h @ w[p + "attn_k.weight"].T).reshape(len(ids), c["kv_heads"], hd), pos)
            v = (h @ w[p + "attn_v.weight"].T).reshape(len(ids), c["kv_heads"], hd)
            cache[l] = (np.concatenate([cache[l][0], k]), np.concatenate([cache[l][1], v])) if l in cache else (k, v)
            K, V = cache[l]
            out = np.empty((len(ids), c["heads"], hd))
            for head in range(c["heads"]):
                s = q[:, head] @ K[:, head // g].T / np.sqrt(hd)
                s = np.where(np.arange(len(K))[None, :] <= pos[:, None], s, -np.inf)
                s = np.exp(s - s.max(-1, keepdims=True))
                out[:, head] = (s / s.sum(-1, keepdims=True)) @ V[:, head // g]
            x = x + out.reshape(len(ids), -1) @ w[p + "attn_output.weight"].T
            h = self.norm(x, w[p + "ffn_norm.weight"])
            gate = h @ w[p + "ffn_gate.weight"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        cache["n"] = start + len(ids)
        return self.norm(x[-1], w["output_norm.weight"]) @ self.head.T


def main(model_path, llama_fixture, out_path):
    cfg, w = load(model_path)
    model = Model(cfg, w)
    ref = json.load(open(llama_fixture))
    cases = []
    for case in ref["cases"]:
        cache = {"n": 0}
        logits = model.forward(case["prompt_ids"], cache)
        greedy, top5 = [], []
        for _ in range(ref["steps"]):
            order = np.argsort(-logits, kind="stable")[:5]
            top5.append([[int(i), float(logits[i])] for i in order])
            greedy.append(int(order[0]))
            logits = model.forward([greedy[-1]], cache)
        cases.append({"prompt": case["prompt"], "prompt_ids": case["prompt_ids"], "greedy_ids": greedy, "top5": top5})
        same = next((i for i, (a, b) in enumerate(zip(greedy, case["greedy_ids"])) if a != b), None)
        print(repr(case["prompt"][:40]), "first difference from llama.cpp at step", same, file=sys.stderr)
    out = {"reference": "numpy float64 forward over dequantized GGUF weights (scripts/reference/numpy_reference.py)",
           "model_sha256": ref["model_sha256"], "steps": ref["steps"], "cases": cases, "tokenizer": ref["tokenizer"]}
    with open(out_path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(out_path + ".tmp", out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
