#!/bin/sh
# Times an evaluation sweep: every baseline at evict 0.25/0.5/0.75 over N passkey
# tasks of ~1k tokens through the chat template, with each context prefilled once and forked per
# run (the default), and with a separate prefill per run (--separate-prefills, what every sweep
# did before), alternating REPS times so both see the same machine. Prints one JSON line per
# run: {"mode", "tasks", "wall_s", "cpu_s", "per_task_s"}, then the speed-up. Both modes give
# the same rows (checked here too). Take the figures on a quiet machine; on a busy one compare
# the two modes of the same run, not absolute times.
#
#     scripts/eval/sweep_speed.sh            # N=100 tasks (20 per depth), REPS=1
#     N_PER_DEPTH=2 REPS=2 scripts/eval/sweep_speed.sh   # a quick A/B on 10 tasks
#     POLICY=all,ag scripts/eval/sweep_speed.sh          # with Attention-Gate and its matched runs
set -eu
cd "$(dirname "$0")/../.."
cargo build --release -p cli >&2
agate=target/release/agate
n=${N_PER_DEPTH:-20}
reps=${REPS:-1}
policy=${POLICY:-all}
threads=${THREADS:-2}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
run() { # mode, extra flag
  start=$(date +%s.%N)
  /usr/bin/time -f "%U %S" -o "$dir/cpu" $agate --threads "$threads" eval --synthetic passkey \
    --length 1024 --depths 0,0.25,0.5,0.75,1 -n "$n" --seed 1 --chat --sweep 0.25,0.5,0.75 \
    --policy "$policy" --json $2 > "$dir/$1.json" 2> /dev/null
  end=$(date +%s.%N)
  python3 - "$1" "$start" "$end" "$dir/cpu" "$((n * 5))" <<'EOF'
import json, sys
mode, start, end, cpu, tasks = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
user, system = map(float, open(cpu).read().split()[-2:])
wall = end - start
print(json.dumps({"mode": mode, "tasks": tasks, "wall_s": round(wall, 1), "cpu_s": round(user + system, 1),
                  "per_task_s": round(wall / tasks, 2)}))
EOF
}
i=0
while [ "$i" -lt "$reps" ]; do
  run shared "" | tee -a "$dir/times"
  run separate --separate-prefills | tee -a "$dir/times"
  i=$((i + 1))
done
python3 - "$dir" <<'EOF'
import json, sys
d = sys.argv[1]
rows = lambda m: json.load(open(f"{d}/{m}.json"))["rows"]
assert rows("shared") == rows("separate"), "shared and separate prefills gave different rows"
times = [json.loads(l) for l in open(f"{d}/times")]
best = {m: min(t["wall_s"] for t in times if t["mode"] == m) for m in ("shared", "separate")}
print(json.dumps({"speedup_wall": round(best["separate"] / best["shared"], 2),
                  "shared_wall_min": round(best["shared"] / 60, 1),
                  "separate_wall_min": round(best["separate"] / 60, 1), "identical_rows": True}))
EOF
