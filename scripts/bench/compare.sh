#!/usr/bin/env bash
# agate vs llama.cpp on the default model, same GGUF, same shapes, same thread count, run
# alternately (peer, agate, peer, agate) so that machine noise hits both. Prints JSON lines to
# $OUT/bench.jsonl and a markdown table to stdout. Needs: a release build of agate and
# `pip install llama-cpp-python==0.3.16`. Run on a quiet machine: spin-barrier thread pools
# (candle's and ggml's) collapse when another process competes for the cores.
#
#   scripts/bench/compare.sh [THREADS] [DEPTHS] [POLICIES]
#   scripts/bench/compare.sh 2 0,4096 full,streaming,ag
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${1:-2}
DEPTHS=${2:-0,4096}
POLICIES=${3:-full,streaming}
OUT=${OUT:-target/bench}
mkdir -p "$OUT"
MODEL=$(cargo xtask fetch-model)
AGATE=target/release/agate
: > "$OUT/bench.jsonl"
IFS=, read -ra DS <<< "$DEPTHS"
for d in "${DS[@]}"; do
  python3 scripts/peers/llama_cpp_bench.py "$MODEL" -p 512 -n 128 -d "$d" -r "${REPS:-3}" -t "$THREADS" --json >> "$OUT/bench.jsonl"
  "$AGATE" --threads "$THREADS" bench -p 512 -n 128 -d "$d" -r "${REPS:-3}" --policy "$POLICIES" --evict 0.5 --json ${GATES:+--gates "$GATES"} >> "$OUT/bench.jsonl"
done
python3 - "$OUT/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| engine | policy | depth | pp512 t/s | tg128 t/s | TTFT s | KV MiB in use / full | evicted |")
print("|---|---|---:|---:|---:|---:|---|---:|")
for r in rows:
    if "peer" in r:
        print(f"| {r['peer']} | full | {r['depth']} | {r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | | | 0 |")
    else:
        kv = f"{r['kv_bytes_in_use']/2**20:.1f} / {r['kv_bytes_full']/2**20:.1f}"
        print(f"| agate | {r['policy']} | {r['depth']} | {r['prefill_tokens_per_s']['median']:.1f} | "
              f"{r['decode_tokens_per_s']['median']:.1f} | {r['time_to_first_token_s']['median']:.3f} | {kv} | {r['eviction_ratio']:.2f} |")
PY
