#!/usr/bin/env python3
"""A/B two agate binaries by CPU time per token, steadier than wall time on a busy machine.

Wall-clock speed on a shared 2-core machine is noise, and valgrind cannot run AVX-512 builds, so
this compares the process CPU milliseconds per decode (or prompt) token that `agate bench --json`
reports (`decode_cpu_ms_per_token`, `prefill_cpu_ms_per_token`), on ONE thread (with more,
spinning thread pools burn CPU while they wait). Runs alternate A, B, A, B, ... (`--rounds`),
each `agate --threads 1 bench ... -r REPS --json`; the script prints the median of each and the
ratio. Other processes still compete for memory bandwidth, so expect a few percent of noise.

    scripts/bench/ab_cpu.py A_BIN B_BIN [--depth 0] [--policy full] [--rounds 3] [--prefill]
                            [more bench flags, e.g. --evict 0.5 --kv-dtype q8_0]
"""
import argparse
import json
import statistics
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--policy", default="full")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="bench repetitions per run")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--generate", type=int, default=64)
    ap.add_argument("--prefill", action="store_true", help="compare prompt tokens instead")
    a, extra = ap.parse_known_args()
    key = "prefill_cpu_ms_per_token" if a.prefill else "decode_cpu_ms_per_token"

    def run(binary):
        cmd = [binary, "--threads", "1", "bench", "-p", str(a.prompt), "-n", str(a.generate),
               "-d", str(a.depth), "-r", str(a.reps), "--policy", a.policy, "--json",
               *[x for x in extra if x != "--"]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        return row[key]["median"]

    per = {a.a: [], a.b: []}
    for _ in range(a.rounds):
        for binary in (a.a, a.b):
            per[binary].append(run(binary))
            print(f"{binary}: {per[binary][-1]:.3f} ms", file=sys.stderr)
    what = "prompt" if a.prefill else "decode"
    ma, mb = statistics.median(per[a.a]), statistics.median(per[a.b])
    print(f"CPU ms per {what} token (1 thread, depth {a.depth}, {a.policy}, median of {a.rounds}):")
    print(f"  A {a.a}: {ma:.3f}  {[round(x, 3) for x in per[a.a]]}")
    print(f"  B {a.b}: {mb:.3f}  {[round(x, 3) for x in per[a.b]]}")
    print(f"  B/A speed: {ma / mb:.2f}x")


if __name__ == "__main__":
    main()
