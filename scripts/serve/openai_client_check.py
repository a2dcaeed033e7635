"""Exercises `agate serve` with the official openai client (see openai_client_check.sh)."""

import json
import sys

import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="not-needed", timeout=600, max_retries=0)

model = client.models.list().data[0].id
print(f"models: {model}")

question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]

r = client.chat.completions.create(model=model, messages=question, max_tokens=32, temperature=0)
print(f"\n[chat] {r.choices[0].message.content!r}")
print(f"  finish_reason={r.choices[0].finish_reason} usage: prompt={r.usage.prompt_tokens} "
      f"completion={r.usage.completion_tokens} cached={r.usage.prompt_tokens_details.cached_tokens}")

pieces = []
usage = None
for chunk in client.chat.completions.create(
    model=model, messages=question, max_tokens=32, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
streamed = "".join(pieces)
print(f"\n[chat, stream] {len(pieces)} chunks: {streamed!r}")
print(f"  same text as non-streaming: {streamed == r.choices[0].message.content}; "
      f"usage.kv={json.dumps(usage.model_extra['kv'])}")

c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
print(f"\n[completion] {c.choices[0].text!r} ({c.choices[0].finish_reason})")

essay = ("Lighthouses guided ships along dangerous coasts for centuries. " * 30).strip()
long_question = [{"role": "user", "content": essay + "\nWhat did lighthouses do?"}]
for extra in ({"kv_policy": "ag"}, {"kv_policy": "streaming", "kv_keep": 64}):
    r = client.chat.completions.create(
        model=model, messages=long_question, max_tokens=24, temperature=0, extra_body=extra,
    )
    kv = r.usage.model_extra["kv"]
    print(f"\n[extra_body={extra}] {r.choices[0].message.content!r}")
    print(f"  kv: {kv['tokens_retained']} of {kv['tokens_seen']} tokens retained, eviction ratio "
          f"{kv['eviction_ratio']:.2f}; bytes in use {kv['bytes_in_use']} (KV blocks "
          f"{kv['kv_block_bytes']} + policy state {kv['policy_state_bytes']}) vs full cache "
          f"{kv['bytes_full']}")

# A conversation continued: turn 2 prefills only its new text.
turn1 = [{"role": "user", "content": "Name a large city in Japan."}]
a1 = client.chat.completions.create(model=model, messages=turn1, max_tokens=16, temperature=0)
turn2 = turn1 + [{"role": "assistant", "content": a1.choices[0].message.content},
                 {"role": "user", "content": "And one in Italy?"}]
a2 = client.chat.completions.create(model=model, messages=turn2, max_tokens=16, temperature=0)
print(f"\n[2 turns] turn 2: prompt {a2.usage.prompt_tokens} tokens, "
      f"{a2.usage.prompt_tokens_details.cached_tokens} from the prompt cache")

try:
    client.chat.completions.create(model=model, messages=question, extra_body={"kv_policy": "nope"})
except openai.BadRequestError as e:
    print(f"\n[bad policy] HTTP {e.status_code}: {e.body['message']} (param={e.body['param']})")
