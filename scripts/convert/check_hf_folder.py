#!/usr/bin/env python3
"""Checks that a folder written by `cargo xtask convert` is a valid Hugging Face checkpoint, with
tools independent of agate:

1. If `transformers` and `torch` are importable: loads it with AutoModelForCausalLM /
   AutoTokenizer and compares greedy tokens with the fixture.
2. Always: loads model.safetensors with the `safetensors` package (numpy), config.json and
   tokenizer.json (the `tokenizers` package), runs a float64 numpy Llama forward in Hugging Face
   layout (rotate-half RoPE; the q/k rows must already be un-permuted, nothing is undone here),
   and compares the prompt token ids and greedy tokens with
   crates/engine/tests/fixtures/numpy_reference.json (the same forward over the GGUF's
   dequantized weights). Also renders the chat template from tokenizer_config.json.

    pip install numpy safetensors tokenizers jinja2
    cargo xtask convert --to safetensors --dtype f32 --out /tmp/smol-f32
    python3 scripts/convert/check_hf_folder.py /tmp/smol-f32 crates/engine/tests/fixtures/numpy_reference.json

Exits non-zero on any mismatch.
"""
import json
import sys

import numpy as np


def numpy_check(folder, ref, steps):
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    cfg = json.load(open(f"{folder}/config.json"))
    w = {k: v.astype(np.float64) for k, v in load_file(f"{folder}/model.safetensors").items()}
    tok = Tokenizer.from_file(f"{folder}/tokenizer.json")
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd = cfg.get("head_dim", D // H)
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x, pos):
        ang = np.outer(pos, inv)
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

    def forward(ids, cache):
        start = cache["n"]
        pos = np.arange(start, start + len(ids))
        x = w["model.embed_tokens.weight"][ids]
        g = H // KV
        for l in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{l}."
            h = norm(x, w[p + "input_layernorm.weight"])
            q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(len(ids), H, hd), pos)
            k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(len(ids), KV, hd), pos)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(len(ids), KV, hd)
            cache[l] = (np.concatenate([cache[l][0], k]), np.concatenate([cache[l][1], v])) if l in cache else (k, v)
            K, V = cache[l]
            out = np.empty((len(ids), H, hd))
            for hh in range(H):
                s = q[:, hh] @ K[:, hh // g].T / np.sqrt(hd)
                s = np.where(np.arange(len(K))[None, :] <= pos[:, None], s, -np.inf)
                s = np.exp(s - s.max(-1, keepdims=True))
                out[:, hh] = (s / s.sum(-1, keepdims=True)) @ V[:, hh // g]
            x = x + out.reshape(len(ids), -1) @ w[p + "self_attn.o_proj.weight"].T
            h = norm(x, w[p + "post_attention_layernorm.weight"])
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        cache["n"] = start + len(ids)
        return norm(x[-1], w["model.norm.weight"]) @ head.T

    ok = True
    for case in ref["cases"]:
        ids = tok.encode(case["prompt"], add_special_tokens=False).ids
        same_ids = ids == case["prompt_ids"]
        cache = {"n": 0}
        logits = forward(case["prompt_ids"], cache)
        greedy = []
        for _ in range(steps):
            greedy.append(int(np.argmax(logits)))
            logits = forward([greedy[-1]], cache)
        want = case["greedy_ids"][:steps]
        match = greedy == want
        ok &= match and same_ids
        print(f"numpy  {case['prompt'][:32]!r:36} tokenizer ids {'same' if same_ids else 'DIFFER'}; "
              f"{steps} greedy tokens {'identical' if match else 'DIFFER: ' + str(greedy) + ' vs ' + str(want)}; "
              f"text {tok.decode(greedy)[:40]!r}")
    tc = json.load(open(f"{folder}/tokenizer_config.json"))
    try:
        import jinja2
        text = jinja2.Template(tc["chat_template"]).render(
            messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        print("chat template renders:", repr(text))
    except ImportError:
        print("chat template present:", bool(tc.get("chat_template")), "(jinja2 not installed: not rendered)")
    return ok


def transformers_check(folder, ref, steps):
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        print(f"transformers check skipped: {e}")
        return True
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    ok = True
    for case in ref["cases"]:
        ids = torch.tensor([case["prompt_ids"]])
        out = model.generate(ids, max_new_tokens=steps, do_sample=False)[0, ids.shape[1]:].tolist()
        match = out == case["greedy_ids"][:steps]
        ok &= match
        print(f"transformers {case['prompt'][:32]!r:36} greedy {'identical' if match else 'DIFFER'}: {tok.decode(out)[:40]!r}")
    return ok


def main(folder, fixture, steps="16"):
    ref = json.load(open(fixture))
    steps = min(int(steps), ref["steps"])
    ok = transformers_check(folder, ref, steps)
    ok = numpy_check(folder, ref, steps) and ok
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
