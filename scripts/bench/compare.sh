#!/usr/bin/env bash
# agate vs llama.cpp on the default model: same GGUF, same random-token shapes, same thread count,
# alternating run by run (peer, agate, peer, agate, ...) so that machine noise hits both. Writes
# every run as a JSON line to $OUT/bench.jsonl and prints a markdown table of medians (the table
# docs/benchmarks.md records) with agate's ratio to llama.cpp and the roofline fraction.
#
#   scripts/bench/compare.sh [THREADS] [DEPTHS] [POLICIES]
#   scripts/bench/compare.sh 2 0,4096,8000 full,streaming,ag
#
# Environment: PYTHON  an interpreter with llama-cpp-python==0.3.16 installed (default python3;
#                      e.g. a venv outside the repo: PYTHON=/work/venv-peer/bin/python);
#              REPS    runs per engine and depth (default 3; figures are medians);
#              P, N    prompt and generated tokens (default 512, 128); where depth + P + N would
#                      pass the model's context (8192), N drops to 64 and P to what fits, for both
#                      engines alike (depth 8000: P = 128, N = 64);
#              EVICT   eviction ratio of the budget policies (default 0.5);
#              OUT     output folder (default target/bench); GATES: a gates file for `ag`.
# Needs a release build of agate (`cargo build --release -p cli`). Run on a quiet machine:
# spin-barrier thread pools (candle's and ggml's) collapse when another process holds a core.
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${1:-2}
DEPTHS=${2:-0,4096,8000}
POLICIES=${3:-full,streaming,ag}
PYTHON=${PYTHON:-python3}
REPS=${REPS:-3}
P=${P:-512}
N=${N:-128}
OUT=${OUT:-target/bench}
AGATE=target/release/agate
mkdir -p "$OUT"
"$PYTHON" -c 'import llama_cpp' 2>/dev/null || {
  echo "error: $PYTHON cannot import llama_cpp; install llama-cpp-python==0.3.16 (set PYTHON=...)" >&2
  exit 1
}
MODEL=$(cargo xtask fetch-model)
CTX=$("$AGATE" inspect --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["config"]["max_position"])')
: > "$OUT/bench.jsonl"
# --evict only when a budget policy runs (agate refuses a flag that every chosen policy ignores).
EVICT_FLAG=()
if [[ ",$POLICIES," =~ ,(all|random|streaming|h2o|tova|snapkv|pyramidkv|knorm|nacl), ]]; then
  EVICT_FLAG=(--evict "${EVICT:-0.5}")
fi
IFS=, read -ra DS <<< "$DEPTHS"
for d in "${DS[@]}"; do
  p=$P n=$N
  if (( d + p + n > CTX )); then n=64; p=$(( CTX - d - n )); fi
  if (( p < 16 )); then echo "error: depth $d leaves no room for a prompt in $CTX tokens" >&2; exit 1; fi
  for ((r = 1; r <= REPS; r++)); do
    "$PYTHON" scripts/peers/llama_cpp_bench.py "$MODEL" -p "$p" -n "$n" -d "$d" -r 1 -t "$THREADS" --json >> "$OUT/bench.jsonl"
    "$AGATE" --threads "$THREADS" bench -p "$p" -n "$n" -d "$d" -r 1 --policy "$POLICIES" \
      "${EVICT_FLAG[@]}" --roofline --json ${GATES:+--gates "$GATES"} >> "$OUT/bench.jsonl"
  done
done
"$PYTHON" - "$OUT/bench.jsonl" <<'PY'
import json, statistics, sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    if line.strip():
        r = json.loads(line)
        engine = r.get("peer", "agate")
        runs[(r["depth"], engine, r.get("policy", "full"))].append(r)
def med(rows, key):
    vals = [r[key]["median"] if isinstance(r[key], dict) else r[key] for r in rows]
    return statistics.median(vals)
print("| depth | engine | policy | prompt | pp t/s | tg t/s | pp vs llama.cpp | tg vs llama.cpp | TTFT s | KV MiB in use / full | evicted | tg of roofline |")
print("|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
for depth in sorted({k[0] for k in runs}):
    peer = [k for k in runs if k[0] == depth and k[1] != "agate"]
    base = runs[peer[0]] if peer else None
    for key in sorted((k for k in runs if k[0] == depth), key=lambda k: (k[1] == "agate", k[2])):
        rows = runs[key]
        pp, tg = med(rows, "prefill_tokens_per_s"), med(rows, "decode_tokens_per_s")
        shape = f"{rows[0]['prompt']}+{rows[0]['generate']}"
        if key[1] != "agate":
            print(f"| {depth} | {key[1]} | full | {shape} | {pp:.1f} | {tg:.1f} | | | | | 0 | |")
            continue
        rel = lambda v, k: f"{v / med(base, k):.2f}x" if base else ""
        kv = f"{rows[-1]['kv_bytes_in_use'] / 2**20:.1f} / {rows[-1]['kv_bytes_full'] / 2**20:.1f}"
        roof = f"{100 * med(rows, 'roofline_fraction'):.0f}%" if "roofline_fraction" in rows[0] else ""
        print(f"| {depth} | agate | {key[2]} | {shape} | {pp:.1f} | {tg:.1f} | {rel(pp, 'prefill_tokens_per_s')} | "
              f"{rel(tg, 'decode_tokens_per_s')} | {med(rows, 'time_to_first_token_s'):.3f} | {kv} | "
              f"{rows[-1]['eviction_ratio']:.2f} | {roof} |")
n = {len(v) for v in runs.values()}
bw = [r["bandwidth_gb_per_s"] for v in runs.values() for r in v if "bandwidth_gb_per_s" in r]
print(f"\nmedians of {sorted(n)} runs per row, alternating; memory bandwidth (streaming read): "
      f"{statistics.median(bw):.1f} GB/s" if bw else "")
PY
