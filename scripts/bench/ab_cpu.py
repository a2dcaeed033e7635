#!/usr/bin/env python3
"""A/B two agate binaries by CPU time per decode token, robust to a busy machine.

Wall-clock speed on a shared 2-core machine is noise, and valgrind cannot run AVX-512 builds, so
this measures CPU seconds (user + sys of the child process) instead, on ONE thread (with more,
spinning thread pools burn CPU while they wait). Each binary runs `agate --threads 1 bench` twice
per round, with N_SHORT and N_LONG generated tokens after the same depth and prompt; the difference
is the CPU cost of (N_LONG - N_SHORT) decode steps, so model loading and prefill cancel out.
Rounds alternate A, B, A, B, ...; the script prints the median ms per decode token of each and
their ratio, and, with --prefill, the CPU per prompt token from runs with two prompt lengths.

    scripts/bench/ab_cpu.py A_BIN B_BIN [--depth 0] [--policy full] [--rounds 3] [-- extra args]
"""
import argparse
import resource
import statistics
import subprocess
import sys


def cpu_of(cmd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--policy", default="full")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--short", type=int, default=8, help="generated tokens of the short run")
    ap.add_argument("--long", type=int, default=72, help="generated tokens of the long run")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--prefill", action="store_true",
                    help="measure CPU per prompt token instead (prompt 16 vs --prompt)")
    ap.add_argument("extra", nargs="*", help="more agate bench flags (after --)")
    a = ap.parse_args()

    def run(binary, prompt, n):
        cmd = [binary, "--threads", "1", "bench", "-p", str(prompt), "-n", str(n), "-d",
               str(a.depth), "-r", "1", "--policy", a.policy, "--json", *a.extra]
        return cpu_of(cmd)

    per = {a.a: [], a.b: []}
    for _ in range(a.rounds):
        for binary in (a.a, a.b):
            if a.prefill:
                lo, hi = run(binary, 16, 1), run(binary, a.prompt, 1)
                per[binary].append((hi - lo) / (a.prompt - 16) * 1e3)
            else:
                lo, hi = run(binary, a.prompt, a.short), run(binary, a.prompt, a.long)
                per[binary].append((hi - lo) / (a.long - a.short) * 1e3)
            print(f"{binary}: {per[binary][-1]:.3f} ms", file=sys.stderr)
    what = "prompt" if a.prefill else "decode"
    ma, mb = statistics.median(per[a.a]), statistics.median(per[a.b])
    print(f"CPU ms per {what} token (1 thread, depth {a.depth}, {a.policy}, median of {a.rounds}):")
    print(f"  A {a.a}: {ma:.3f}  {[round(x, 3) for x in per[a.a]]}")
    print(f"  B {a.b}: {mb:.3f}  {[round(x, 3) for x in per[a.b]]}")
    print(f"  B/A speed: {ma / mb:.2f}x")


if __name__ == "__main__":
    main()
