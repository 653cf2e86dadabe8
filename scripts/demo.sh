#!/usr/bin/env bash
# Demo on a fresh machine: build a sample old conversion (a sparse FLUX.1-dev int4 r32 file with the
# real tensor table and no metadata), then inspect it, show the dry-run diff, patch it, and validate it.
# Creates .venv and installs the project on first use; takes a few seconds after that.
# VENV=DIR runs it with the nunchaku-patch installed in DIR (CI: the installed wheel, scripts/check_wheel.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/nunchaku-patch" ]; then
    echo "==> Creating $VENV and installing nunchaku-patch (first run only)"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet -e .
fi
NP="$VENV/bin/nunchaku-patch"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/nunchaku-patch-demo.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
SAMPLE="$WORK/svdq-int4_r32-flux.1-dev.safetensors"
TIMEFORMAT='(took %Rs)'

# Bold step titles on a terminal only, and never with NO_COLOR (https://no-color.org).
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD='' PLAIN=''; fi
step() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$PLAIN"; }
say() { printf '    %s\n' "$@"; }
disk_usage() { du -h "$1" | cut -f1; }

step "1. Build a sample old conversion"
say "The real FLUX.1-dev int4 r32 tensor table with no __metadata__, like the files published before" \
    "Nunchaku needed it. The 6.8 GB data region is a hole, so it takes almost no disk."
"$VENV/bin/python" scripts/make_sample.py "$SAMPLE"
say "apparent size $(du -h --apparent-size "$SAMPLE" | cut -f1), on disk $(disk_usage "$SAMPLE")"

step "2. What the header says: nunchaku-patch inspect FILE"
say "Tensor count, dtypes, header layout, and what the tensors say about the model, with the tensors as evidence."
"$NP" inspect "$SAMPLE"

step "3. Would Nunchaku load it? nunchaku-patch validate FILE"
say "Expect 'needs work' and exit code 1: every loader reads metadata[\"config\"] and finds nothing."
"$NP" validate "$SAMPLE" || say "(exit code $?)"

step "4. What a patch would write: nunchaku-patch FILE --model flux.1-dev --dry-run"
say "The diff goes to stdout, key by key, JSON pretty-printed; the last line gives the header size change," \
    "the data alignment and the write strategy. The file is opened read-only."
"$NP" "$SAMPLE" --model flux.1-dev --dry-run

step "5. The patch: nunchaku-patch FILE --model flux.1-dev"
say "Only the header changes; the tensor bytes are not read, moved or copied."
time "$NP" "$SAMPLE" --model flux.1-dev
say "still sparse: on disk $(disk_usage "$SAMPLE") (a full rewrite would have written 6.8 GB)"

step "6. What a loader sees: safetensors.safe_open(FILE).metadata()"
"$VENV/bin/python" - "$SAMPLE" <<'EOF'
import json, sys
from safetensors import safe_open
with safe_open(sys.argv[1], framework="np") as f:
    metadata = f.metadata()
config = json.loads(metadata["config"])
quant = json.loads(metadata["quantization_config"])
print(f"    keys: {', '.join(sorted(metadata))}")
print(f"    config: {config['_class_name']}, {config['num_layers']} + {config['num_single_layers']} blocks")
print(f"    quantization_config: {quant['weight']['dtype']}, rank {quant['rank']}, model_class {metadata['model_class']}")
EOF

step "7. Validate again: nunchaku-patch validate -v FILE"
say "Expect 'ok' for every loader (one line per check with -v)."
"$NP" validate -v "$SAMPLE"

step "8. Run it again: nothing to do, the file is not touched"
"$NP" "$SAMPLE" --model flux.1-dev
"$NP" "$SAMPLE" --model flux.1-dev --check -q && say "--check (for CI) exits 0: nothing left to patch"

printf '\nDemo done. The sample lived in %s (removed on exit).\n' "$WORK"
