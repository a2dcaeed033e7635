#!/usr/bin/env bash
# The lean engine's figures (docs/architecture.md, "Embedding the engine lean"): for the embed
# example built with the engine's default features and without them, the engine crate's own
# compile cost in CPU seconds (rustc user+sys, timed by a RUSTC_WRAPPER, non-incremental, so the
# figure holds on a busy machine) and the example binary's size; then the engine's dependency
# tree without default features. Rebuilds only engine and the example (and, the first time, the
# workspace members for CARGO_INCREMENTAL=0); a normal build afterwards rebuilds them back.
set -euo pipefail
cd "$(dirname "$0")/../.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cat > "$scratch/time-rustc" <<'WRAP'
#!/usr/bin/env bash
name=""; prev=""
for a in "$@"; do [ "$prev" = "--crate-name" ] && name="$a"; prev="$a"; done
[ -z "$name" ] && exec "$@"
exec /usr/bin/time -a -o "$TIMES" -f "%U %S $name" "$@"
WRAP
chmod +x "$scratch/time-rustc"
for features in "" "--no-default-features" "--no-default-features --features default-gates"; do
  export TIMES="$scratch/times"
  : > "$TIMES"
  touch crates/engine/src/lib.rs crates/engine/examples/embed.rs
  # shellcheck disable=SC2086
  RUSTC_WRAPPER="$scratch/time-rustc" CARGO_INCREMENTAL=0 \
    cargo build --release -q -p engine --example embed $features
  cpu=$(awk '$3 == "engine" { printf "%.1f", $1 + $2 }' "$TIMES")
  size=$(stat -c %s "${CARGO_TARGET_DIR:-target}/release/examples/embed")
  echo "features [${features:-default}]: engine compile ${cpu} CPU-s, embed binary ${size} bytes"
done
tree=$(cargo tree -e normal -p engine --no-default-features)
echo "cargo tree -e normal -p engine --no-default-features: $(wc -l <<< "$tree") lines," \
  "$(sed 's/^[│├└─ ]*//; s/ (\*)//; s/ (proc-macro)//' <<< "$tree" | sort -u | wc -l) crates"
