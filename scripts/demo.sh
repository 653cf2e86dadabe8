#!/usr/bin/env bash
# Demo on a fresh machine: build a sample old conversion (a sparse FLUX.1-dev int4 r32 file with the
# real tensor table and no metadata), then inspect it, show the dry-run diff, patch it, and validate it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/nunchaku-patch ]; then
    echo "==> Creating .venv and installing nunchaku-patch (first run only)"
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    .venv/bin/python -m pip install --quiet -e .
fi
NP=.venv/bin/nunchaku-patch
WORK="$(mktemp -d "${TMPDIR:-/tmp}/nunchaku-patch-demo.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
SAMPLE="$WORK/svdq-int4_r32-flux.1-dev.safetensors"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Building a sample old conversion (sparse: the real FLUX.1-dev tensor table, no metadata)"
.venv/bin/python scripts/make_sample.py "$SAMPLE"
ls -lhs "$SAMPLE"

step "What the header says: nunchaku-patch inspect"
"$NP" inspect "$SAMPLE"

step "Would Nunchaku load it? nunchaku-patch validate (expect: needs work, exit 1)"
"$NP" validate "$SAMPLE" || echo "(exit code $?)"

step "What a patch would change: nunchaku-patch --dry-run (writes nothing)"
"$NP" "$SAMPLE" --model flux.1-dev --dry-run

step "The patch itself: nunchaku-patch FILE --model flux.1-dev"
time "$NP" "$SAMPLE" --model flux.1-dev

step "Validate again (expect: ok for every loader)"
"$NP" validate -v "$SAMPLE"

step "Running the same command again changes nothing"
"$NP" "$SAMPLE" --model flux.1-dev

echo
echo "Demo done. The sample lived in $WORK (removed on exit)."
