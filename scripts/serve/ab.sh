#!/usr/bin/env bash
# A/B of the serving throughput of two agate binaries (e.g. main's and a branch's), in the same
# run: REPS rounds, each serving with A then with B (one server per binary and round, THREADS
# threads) and measuring aggregate decode tokens/s at each of STREAMS concurrent streams with
# throughput.sh's settings (greedy, end-of-sequence ignored, MAX_TOKENS tokens each). Prints the
# median per binary and stream count, its ratio to that binary's single-stream figure, and B/A.
# Usage: scripts/serve/ab.sh A_BINARY B_BINARY
# Env: THREADS (2), REPS (3), MAX_TOKENS (128), STREAMS ("1 16"), OUT (target/serve-ab).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -eq 2 ] || { echo "usage: $0 A_BINARY B_BINARY" >&2; exit 2; }
A=$1 B=$2
for bin in "$A" "$B"; do [ -x "$bin" ] || { echo "$bin: not an executable" >&2; exit 2; }; done
THREADS=${THREADS:-2} REPS=${REPS:-3} MAX_TOKENS=${MAX_TOKENS:-128} STREAMS=${STREAMS:-1 16}
OUT=${OUT:-target/serve-ab}
mkdir -p "$OUT"
source scripts/serve/server.sh
trap stop_server EXIT

echo "A: $A"
echo "B: $B"
echo "threads $THREADS, $MAX_TOKENS tokens per request, streams: $STREAMS, load before: $(uptime)"
for rep in $(seq 1 "$REPS"); do
  for side in A B; do
    SERVE_BIN=$([ "$side" = A ] && echo "$A" || echo "$B")
    start_server --max-sessions 16
    "$B" bench-serve --url "$URL" --clients 1 --max-tokens 8 --json >/dev/null # warm-up
    for n in $STREAMS; do
      "$B" --threads 1 bench-serve --url "$URL" --clients "$n" --max-tokens "$MAX_TOKENS" --json \
        >"$OUT/$side-streams-$n-rep$rep.json"
    done
    stop_server
  done
done
echo "load after: $(uptime)"
python3 - "$OUT" "$REPS" $STREAMS <<'PY'
import json, statistics, sys
out, reps, streams = sys.argv[1], int(sys.argv[2]), [int(n) for n in sys.argv[3:]]
med = {}
print("| streams | A tok/s (median; runs) | B tok/s (median; runs) | B/A |")
print("|---:|---|---|---:|")
for n in streams:
    row = []
    for side in "AB":
        runs = [json.load(open(f"{out}/{side}-streams-{n}-rep{r}.json"))["aggregate_decode_tokens_per_s"]
                for r in range(1, reps + 1)]
        med[side, n] = statistics.median(runs)
        base = med[side, streams[0]]
        row.append(f"{med[side, n]:.1f} ({med[side, n] / base:.2f}x of {streams[0]}; {', '.join('%.1f' % r for r in runs)})")
    print(f"| {n} | {row[0]} | {row[1]} | {med['B', n] / med['A', n]:.2f} |")
PY
