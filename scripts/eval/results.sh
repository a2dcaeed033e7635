#!/bin/sh
# Regenerates every number and plot in docs/results.md: builds agate (release), runs the
# evaluations below into docs/results/, and rewrites docs/results.md from their outputs.
# Deterministic (greedy decoding, seeded tasks): rerunning gives the same accuracies; timings
# are not reported. Takes about 75 minutes on 2 busy cores (the sweep is 25 runs of 6 tasks).
#
#     scripts/eval/results.sh            # everything
#     AGATE_RESULTS_PEER=0 scripts/eval/results.sh   # skip the llama.cpp peer
set -eu
cd "$(dirname "$0")/../.."
cargo build --release -p cli >&2
agate=target/release/agate
out=docs/results
mkdir -p "$out"

# 1. Full-cache passkey retrieval at 2k tokens on the default model: 5 depths x 4 seeds.
pk="--synthetic passkey --length 2048 --depths 0,0.25,0.5,0.75,1 -n 4 --seed 1"
$agate eval $pk --out "$out/passkey-2k-full" --json > "$out/passkey-2k-full.json"

# 2. llama.cpp on the same tasks and GGUF, same protocol (needs llama-cpp-python 0.3.16).
if [ "${AGATE_RESULTS_PEER:-1}" != 0 ] && python3 -c "import llama_cpp" 2>/dev/null; then
  mkdir -p target/eval
  $agate eval $pk --write-tasks target/eval/passkey-2k.jsonl
  python3 scripts/peers/llama_cpp_eval.py "$HOME/.cache/agate/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
    target/eval/passkey-2k.jsonl --agate "$out/passkey-2k-full/outcomes.jsonl" -t 2 > "$out/passkey-2k-llama-cpp.json"
fi

# 3. Sweep: every policy x evict {0.25, 0.5, 0.75}, passkey at 1k tokens, 3 depths x 2 seeds.
$agate eval --synthetic passkey --length 1024 --depths 0.1,0.5,0.9 -n 2 --seed 1 \
  --sweep 0.25,0.5,0.75 --policy all --out "$out/sweep-passkey-1k" > /dev/null

# 4. Log-likelihood multiple choice: ARC-Easy (first 100 validation questions, 0-shot), full cache.
mkdir -p target/eval
python3 scripts/eval/olmo_tasks.py arc_easy rc_0shot target/eval/arc_easy.jsonl --limit 100
$agate eval --tasks target/eval/arc_easy.jsonl --out "$out/arc-easy-full" --json > "$out/arc-easy-full.json"

# 5. Matched comparison: Attention-Gate (the committed gates, threshold mode) at its own measured
#    ratio, three baselines at 0.5 and at AG's measured ratio; passkey at 1k, 3 depths x 1 seed.
$agate eval --synthetic passkey --length 1024 --depths 0.1,0.5,0.9 -n 1 --seed 1 \
  --sweep 0.5 --policy ag,streaming,tova,knorm --out "$out/sweep-ag-passkey-1k" > /dev/null

# 6. Attention-Gate on held-out text (issue 7): perplexity of the committed gates and of four
#    baselines at the same measured ratio, on the held-out essays of `cargo xtask fetch-data`.
cargo xtask fetch-data >&2
$agate eval --tasks "${AGATE_HOME:-$HOME/.cache/agate}/data/heldout-ppl.jsonl" \
  --sweep 0.5 --policy ag,streaming,h2o,snapkv,nacl --out "$out/ag-heldout-ppl" > /dev/null

python3 scripts/eval/render_results.py "$out" docs/results.md
echo "docs/results.md regenerated" >&2
