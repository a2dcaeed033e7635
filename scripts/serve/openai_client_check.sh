#!/usr/bin/env bash
# Runs the official `openai` Python client against `agate serve` on loopback: /v1/models,
# non-streaming and streaming chat, a text completion, requests with agate's policy settings in
# `extra_body` (Attention-Gate, StreamingLLM at --keep 64) and an error case. The client is
# pip-installed into a venv (target/openai-venv); the server listens on 127.0.0.1 on a free port
# and is stopped on exit. Extra arguments go to `agate serve` (e.g. --model PATH).
# Output recorded in docs/serve.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-target/openai-venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check "openai>=1.40,<3"
echo "openai client $("$VENV/bin/python" -c 'import openai; print(openai.__version__)')"
cargo build --release --quiet -p cli
OUT=$(mktemp -d)
target/release/agate --threads "${THREADS:-2}" serve --host 127.0.0.1 --port 0 "$@" \
  >"$OUT/stdout" 2>"$OUT/stderr" &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; rm -rf "$OUT"' EXIT
# Wait for the address, at most 120 s.
for _ in $(seq 1 240); do
  grep -q '^listening on ' "$OUT/stdout" && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$OUT/stderr"; exit 1; }
  sleep 0.5
done
URL=$(sed -n 's/^listening on //p' "$OUT/stdout")
[ -n "$URL" ] || { echo "agate serve did not start"; cat "$OUT/stderr"; exit 1; }
echo "server: $URL"
"$VENV/bin/python" scripts/serve/openai_client_check.py "$URL"
