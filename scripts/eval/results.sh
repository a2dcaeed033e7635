#!/bin/sh
# Regenerates every number and plot in docs/results.md from scratch: builds agate (release),
# runs the evaluations below into docs/results/, and rewrites docs/results.md from their outputs
# (scripts/eval/render_results.py; nothing on that page is written by hand). Deterministic
# (greedy decoding, seeded tasks, fixed-seed bootstrap intervals): rerunning gives the same
# numbers. Attention-Gate (`ag`: the gates shipped for the default model, or --gates) is swept
# beside the baselines, at its own threshold and with the baselines matched to its ratio.
#
#     scripts/eval/results.sh                          # everything
#     AGATE_RESULTS_PEER=0 scripts/eval/results.sh     # skip the llama.cpp peer
#     AGATE_RESULTS_ONLY="sweeps ruler" scripts/eval/results.sh   # only some steps, then render
#
# Steps: sweeps (passkey, niah-multi and kv at 1k tokens, 100 tasks each, every policy at
# evict 0.25/0.5/0.75, chat template), ruler (five RULER families at 2k tokens, 30 tasks each (vt and
# cwe, which have no depths: 10), evict 0.5, chat template), peer (passkey at 2k, full cache, raw text, with llama.cpp on the same tasks), arc
# (ARC-Easy, full cache), ag (Attention-Gate: memory, held-out essays and retrieval, chat ratio). Each
# sweep prefills every context once for all its baselines (copy-on-write forks); on 2 quiet
# cores a 1k sweep takes well under an hour (scripts/eval/sweep_speed.sh measures it).
set -eu
cd "$(dirname "$0")/../.."
cargo build --release -p cli >&2
agate=target/release/agate
out=docs/results
mkdir -p "$out" target/eval
step() { [ -z "${AGATE_RESULTS_ONLY:-}" ] || case " $AGATE_RESULTS_ONLY " in *" $1 "*) ;; *) return 1 ;; esac; }

# 1. Sweeps at 1k tokens through the chat template: 5 depths x 20 seeds = 100 tasks per cell.
if step sweeps; then
  for family in passkey niah-multi kv; do
    $agate eval --synthetic "$family" --length 1024 --depths 0,0.25,0.5,0.75,1 -n 20 --seed 1 \
      --chat --sweep 0.25,0.5,0.75 --policy all,ag --out "$out/sweep-$family-1k" > /dev/null
  done
fi

# 2. RULER, kvpress-style: niah, multi-key, kv (3 depths x 10 seeds), vt and cwe (no depths: 10 tasks) at 2k
#    tokens, every policy at evict 0.5 and Attention-Gate at its own ratio, chat template (the
#    longest length whose five families fit in about an hour on 2 cores).
if step ruler; then
  for family in niah niah-multi kv vt cwe; do
    $agate eval --synthetic "$family" --length 2048 --depths 0.1,0.5,0.9 -n 10 --seed 1 \
      --chat --sweep 0.5 --policy all,ag --match-to none --out "$out/ruler-$family" > /dev/null
  done
fi

# 3. Passkey at 2k, full cache, raw text; llama.cpp on the same tasks and GGUF, same protocol
#    (needs llama-cpp-python 0.3.16).
if step peer; then
  pk="--synthetic passkey --length 2048 --depths 0,0.25,0.5,0.75,1 -n 4 --seed 1"
  $agate eval $pk --out "$out/passkey-2k-full" --json > "$out/passkey-2k-full.json"
  if [ "${AGATE_RESULTS_PEER:-1}" != 0 ] && python3 -c "import llama_cpp" 2>/dev/null; then
    $agate eval $pk --write-tasks target/eval/passkey-2k.jsonl
    python3 scripts/peers/llama_cpp_eval.py "$HOME/.cache/agate/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
      target/eval/passkey-2k.jsonl --agate "$out/passkey-2k-full/outcomes.jsonl" -t 2 > "$out/passkey-2k-llama-cpp.json"
  fi
fi

# 4. Log-likelihood multiple choice: ARC-Easy (first 100 validation questions, 0-shot), full cache.
if step arc; then
  python3 scripts/eval/olmo_tasks.py arc_easy rc_0shot target/eval/arc_easy.jsonl --limit 100
  $agate eval --tasks target/eval/arc_easy.jsonl --out "$out/arc-easy-full" --json > "$out/arc-easy-full.json"
fi

# 5. Attention-Gate as a user meets it (memory at 4k, held-out essays and retrieval, a 12-turn
#    chat): scripts/eval/ag_acceptance.sh, into the same directory.
if step ag; then
  OUT="$out" scripts/eval/ag_acceptance.sh
fi

python3 scripts/eval/render_results.py "$out" docs/results.md
echo "docs/results.md regenerated" >&2
