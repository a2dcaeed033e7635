#!/bin/sh
# Measures Attention-Gate as a user meets it, with the gates shipped for the default model (or
# GATES=path): every figure of docs/results.md's Attention-Gate section comes from here.
#
#   1. memory: `agate generate` on a ~4k-token held-out essay prompt, --json: the KV report's
#      bytes_in_use (KV blocks + the gate's own state), policy_state_bytes, bytes_full, ratio;
#   2. held-out essays: eviction ratio and perplexity of Attention-Gate, of the full cache and of
#      four baselines at Attention-Gate's measured ratio;
#   2b. held-out essays with the prose setting (the committed gates only: window 128 and the
#      per-layer thresholds of gates/smollm2-135m-instruct.prose-thresholds), beside the full
#      cache and H2O and StreamingLLM at its measured ratio;
#   3. held-out retrieval: chat-templated passkey and multi-key needle tasks of ~1k tokens whose
#      haystack is held-out essays (filler-heldout.txt, never a training haystack) and whose seed
#      (SEED, default 9001) was never used to tune anything; every baseline at Attention-Gate's
#      measured ratio, 95% intervals;
#   4. a 12-turn chat: the ratio after held-out conversations typed into `agate chat`.
#
#     scripts/eval/ag_acceptance.sh                  # everything, into docs/results/ag-*
#     AG_ONLY="memory essays" scripts/eval/ag_acceptance.sh
#     N_PER_DEPTH=4 OUT=/tmp/ag scripts/eval/ag_acceptance.sh   # a quick look
set -eu
cd "$(dirname "$0")/../.."
cargo build --release -p cli >&2
agate=target/release/agate
data="${AGATE_HOME:-$HOME/.cache/agate}/data"
out=${OUT:-docs/results}
seed=${SEED:-9001}
n=${N_PER_DEPTH:-20}
threads=${THREADS:-2}
gates=${GATES:+--gates $GATES}
mkdir -p "$out"
step() { [ -z "${AG_ONLY:-}" ] || case " $AG_ONLY " in *" $1 "*) ;; *) return 1 ;; esac; }
[ -f "$data/filler-heldout.txt" ] || cargo xtask fetch-data >&2

if step memory; then
  # The first 17,200 characters of the held-out essays: about 4,100 tokens.
  prompt=$(head -c 17200 "$data/filler-heldout.txt")
  for policy in full ag; do
    $agate --threads "$threads" generate --policy "$policy" $gates --max-tokens 32 --temp 0 \
      --json "$prompt" > "$out/ag-memory-$policy.json"
  done
  python3 - "$out" <<'EOF'
import json, sys
for p in ("full", "ag"):
    kv = json.load(open(f"{sys.argv[1]}/ag-memory-{p}.json"))["kv"]
    print(json.dumps({"policy": p, "tokens_seen": kv["tokens_seen"],
                      "eviction_ratio": round(kv["eviction_ratio"], 3),
                      "bytes_in_use": kv["bytes_in_use"], "kv_block_bytes": kv["kv_block_bytes"],
                      "policy_state_bytes": kv["policy_state_bytes"], "bytes_full": kv["bytes_full"],
                      "in_use_over_full": round(kv["bytes_in_use"] / kv["bytes_full"], 3),
                      "state_over_full": round(kv["policy_state_bytes"] / kv["bytes_full"], 4)}))
EOF
fi

if step essays; then
  $agate --threads "$threads" eval --tasks "$data/heldout-ppl.jsonl" $gates --sweep 0.5 \
    --policy ag,streaming,h2o,snapkv,nacl --out "$out/ag-heldout-ppl" > /dev/null
  cat "$out/ag-heldout-ppl/sweep.md"
fi

if step prose && [ -z "${GATES:-}" ]; then
  profile=$(cat gates/smollm2-135m-instruct.prose-thresholds)
  $agate --threads "$threads" eval --tasks "$data/heldout-ppl.jsonl" --policy ag --window 128 \
    --layer-thresholds "$profile" --json > "$out/ag-prose-ag.json"
  ratio=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["eviction_ratio"])' \
    "$out/ag-prose-ag.json")
  $agate --threads "$threads" eval --tasks "$data/heldout-ppl.jsonl" --policy full --json \
    > "$out/ag-prose-full.json"
  for policy in h2o streaming; do
    $agate --threads "$threads" eval --tasks "$data/heldout-ppl.jsonl" --policy "$policy" \
      --evict "$ratio" --json > "$out/ag-prose-$policy.json"
  done
  python3 - "$out" <<'EOF'
import json, sys
runs = {p: json.load(open(f"{sys.argv[1]}/ag-prose-{p}.json")) for p in ("full", "ag", "h2o", "streaming")}
full = runs["full"]["per_type"]["perplexity"]["perplexity"]
for policy, run in runs.items():
    ppl = run["per_type"]["perplexity"]
    print(json.dumps({"policy": policy, "eviction_ratio": round(run["eviction_ratio"], 4),
                      "perplexity": round(ppl["perplexity"], 3),
                      "vs_full": round(ppl["perplexity"] / full - 1, 4), "kl": round(ppl["kl"], 4),
                      "in_use_over_full": round(run["kv_bytes_in_use"] / run["kv_bytes_full"], 3)}))
EOF
fi

if step retrieval; then
  for family in passkey niah-multi; do
    $agate --threads "$threads" eval --synthetic "$family" --length 1024 \
      --depths 0,0.25,0.5,0.75,1 -n "$n" --seed "$seed" --filler "$data/filler-heldout.txt" \
      --chat $gates --sweep 0.5 --policy all,ag --out "$out/ag-heldout-$family-1k" > /dev/null
    cat "$out/ag-heldout-$family-1k/sweep.md"
  done
fi

if step chat; then
  python3 scripts/eval/chat_ratio.py -n "${CHATS:-5}" -- --policy ag $gates --threads "$threads" \
    | tee "$out/ag-chat-ratio.txt"
fi
