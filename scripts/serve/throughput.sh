#!/usr/bin/env bash
# Serving figures for docs/benchmarks.md, on the default model (run on a quiet machine):
#  1. aggregate decode tokens/s at 1, 4 and 16 concurrent streams (bench-serve, REPS rounds,
#     alternating the stream counts), greedy, end-of-sequence ignored, MAX_TOKENS each;
#  2. memory: 16 long conversations (~1,500-token prompt + 500 generated, ~2,030 tokens each)
#     with kv_policy streaming and kv_keep 256 in a KV pool sized for 4 full-cache ones
#     (4 × 127 blocks × 90 (layer, KV head) tables × 4 KiB = 179 MiB, f16, 16-token blocks);
#     then the same 16 with the full cache (FULL=0 skips it), which must queue or preempt.
# Everything runs on 127.0.0.1; each server is stopped at the end of its part.
# Env: THREADS (2), REPS (2), MAX_TOKENS (128), POOL_MB (179), OUT (target/serve-bench),
# PARTS ("1 2": which parts to run). Two binaries side by side: scripts/serve/ab.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${THREADS:-2} REPS=${REPS:-2} MAX_TOKENS=${MAX_TOKENS:-128} POOL_MB=${POOL_MB:-179}
OUT=${OUT:-target/serve-bench}
mkdir -p "$OUT"
cargo build --release --quiet -p cli
AGATE=target/release/agate

source scripts/serve/server.sh
trap stop_server EXIT

PARTS=${PARTS:-1 2}
if [[ " $PARTS " == *" 1 "* ]]; then
echo "## 1. Aggregate decode throughput (threads $THREADS, $MAX_TOKENS tokens per request)"
start_server --max-sessions 16
"$AGATE" bench-serve --url "$URL" --clients 1 --max-tokens 8 --json >/dev/null # warm-up
for rep in $(seq 1 "$REPS"); do
  for n in 1 4 16; do
    "$AGATE" --threads 1 bench-serve --url "$URL" --clients "$n" --max-tokens "$MAX_TOKENS" --json \
      >"$OUT/streams-$n-rep$rep.json"
  done
done
stop_server
python3 - "$OUT" "$REPS" <<'PY'
import json, statistics, sys
out, reps = sys.argv[1], int(sys.argv[2])
print("| streams | aggregate decode tok/s (median) | runs | per-stream tok/s | TTFT p50 s | mean batch |")
print("|---:|---:|---|---:|---:|---:|")
base = None
for n in (1, 4, 16):
    runs = [json.load(open(f"{out}/streams-{n}-rep{r}.json")) for r in range(1, reps + 1)]
    agg = statistics.median(r["aggregate_decode_tokens_per_s"] for r in runs)
    base = base or agg
    print(f"| {n} | {agg:.1f} ({agg / base:.2f}x) | {', '.join('%.1f' % r['aggregate_decode_tokens_per_s'] for r in runs)} "
          f"| {statistics.median(r['per_request_decode_tokens_per_s']['median'] for r in runs):.1f} "
          f"| {statistics.median(r['ttft_s']['p50'] for r in runs):.2f} "
          f"| {statistics.median(r['server']['mean_batch'] for r in runs):.2f} |")
PY
fi

if [[ " $PARTS " == *" 2 "* ]]; then
echo
echo "## 2. 16 long conversations in a pool for 4 full-cache ones ($POOL_MB MiB)"
LONG=(--clients 16 --prompt "Lighthouses guided ships along dangerous coasts for centuries. "
      --prompt-repeat 136 --max-tokens 500 --json)
start_server --kv-memory-mb "$POOL_MB" --max-sessions 16
"$AGATE" --threads 1 bench-serve --url "$URL" "${LONG[@]}" --kv-policy streaming --kv-keep 256 \
  >"$OUT/long-streaming.json"
stop_server
if [ "${FULL:-1}" != 0 ]; then
  start_server --kv-memory-mb "$POOL_MB" --max-sessions 16
  "$AGATE" --threads 1 bench-serve --url "$URL" "${LONG[@]}" --kv-policy full >"$OUT/long-full.json"
  stop_server
fi
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
print("| policy | finished | prompt tokens | preemptions | server peak KV MiB / pool MiB | KV per conversation MiB (in use / full) | aggregate tok/s |")
print("|---|---:|---:|---:|---|---|---:|")
for name in ("streaming", "full"):
    path = f"{out}/long-{name}.json"
    if not os.path.exists(path):
        continue
    r = json.load(open(path))
    kv, mib = r["kv"], lambda b: (b or 0) / 2**20
    prompt = max(q["prompt_tokens"] for q in r["per_request"])
    print(f"| {name}{' --keep 256' if name == 'streaming' else ''} | {r['requests'] - r['failed']} of {r['requests']} | {prompt} "
          f"| {r['server']['preemptions']:.0f} | {mib(kv['server_peak_bytes']):.0f} / {mib(kv['server_capacity_bytes']):.0f} "
          f"| {mib(kv['bytes_in_use_per_request_max']):.1f} / {mib(kv['bytes_full_per_request_max']):.1f} "
          f"| {r['aggregate_tokens_per_s']:.1f} |")
PY
fi
