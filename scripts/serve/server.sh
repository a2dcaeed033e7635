# Sourced by the scripts in scripts/serve: start_server FLAGS… starts `agate serve` on
# 127.0.0.1 on a free port (THREADS threads, logs in $OUT; the binary: SERVE_BIN, default
# target/release/agate) and sets SERVER (its pid) and URL; stop_server stops it. The wait for
# the address is bounded (120 s).
SERVER=${SERVER:-}
start_server() {
  # The background job truncates the log only when it starts: a previous server's line must not
  # be read as this one's address.
  rm -f "$OUT/server.out"
  "${SERVE_BIN:-target/release/agate}" --threads "${THREADS:-2}" serve --host 127.0.0.1 --port 0 \
    "$@" >"$OUT/server.out" 2>"$OUT/server.err" &
  SERVER=$!
  for _ in $(seq 1 240); do
    grep -qs '^listening on ' "$OUT/server.out" && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$OUT/server.err"; exit 1; }
    sleep 0.5
  done
  URL=$(sed -n 's/^listening on //p' "$OUT/server.out")
  [ -n "$URL" ] || { echo "agate serve did not start"; cat "$OUT/server.err"; exit 1; }
}

stop_server() {
  kill "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
}
