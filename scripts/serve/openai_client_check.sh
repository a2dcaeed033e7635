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
source scripts/serve/server.sh
trap 'stop_server; rm -rf "$OUT"' EXIT
start_server "$@"
echo "server: $URL"
"$VENV/bin/python" scripts/serve/openai_client_check.py "$URL"
