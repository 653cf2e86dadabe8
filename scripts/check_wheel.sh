#!/usr/bin/env bash
# Check the package as a user gets it: build the sdist and, from it, the wheel (python -m build); install the
# wheel, not editable, into a fresh virtual environment; check that it holds every file of patcher/ (modules,
# py.typed, configs/*.json) and the nunchaku-patch command; then run scripts/demo.sh (inspect, dry-run, patch,
# validate) with that installed command. A file left out of the package, or a broken entry point, fails here.
# Needs a virtual environment with the test extra (it has `build`): run scripts/test.sh first.
#   VENV=.venv bash scripts/check_wheel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
BUILDER="$VENV/bin/python"
"$BUILDER" -m build --version >/dev/null 2>&1 || {
    echo "check_wheel.sh: $BUILDER has no 'build' module: run scripts/test.sh (it installs the test extra)" >&2
    exit 2
}
WORK="$(mktemp -d "${TMPDIR:-/tmp}/nunchaku-patch-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Build from a copy of the files git knows (tracked, or new and not ignored), as a fresh clone would: a stale
# *.egg-info/SOURCES.txt in this folder would otherwise slip files into the sdist that package_data leaves out.
git rev-parse --is-inside-work-tree >/dev/null 2>&1 || { echo "check_wheel.sh: needs a git checkout" >&2; exit 2; }
git ls-files -z --cached --others --exclude-standard | "$BUILDER" -c '
import shutil, sys
from pathlib import Path
for name in sys.stdin.buffer.read().decode().split("\0"):
    if name and Path(name).is_file():
        (Path(sys.argv[1]) / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(name, Path(sys.argv[1]) / name)
' "$WORK/src"
(cd "$WORK/src" && find patcher -type f) >"$WORK/expected"

echo "check_wheel.sh: building the sdist and the wheel with $("$BUILDER" --version)" >&2
"$BUILDER" -m build --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; exit 1; }
WHEEL="$(echo "$WORK"/dist/*.whl)"
SDIST="$(echo "$WORK"/dist/*.tar.gz)"
if [ ! -f "$WHEEL" ] || [ ! -f "$SDIST" ]; then echo "check_wheel.sh: expected one wheel and one sdist" >&2; exit 1; fi
echo "check_wheel.sh: built $(basename "$SDIST") and $(basename "$WHEEL")" >&2

"$BUILDER" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet "$WHEEL"

# Every file of patcher/ must be in the installed package, and the package must be the installed one (run from an
# empty folder, so this checkout is not on sys.path).
mkdir "$WORK/empty"
(cd "$WORK/empty" && "$WORK/venv/bin/python" - "$WORK/expected" "$WORK/venv" <<'EOF'
import sys
from importlib import metadata
from pathlib import Path

import patcher

expected_list, venv = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
installed = Path(patcher.__file__).resolve().parent
if venv not in installed.parents:
    sys.exit(f"check_wheel.sh: patcher was imported from {installed}, not from the fresh environment {venv}")
expected = {line.strip() for line in expected_list.read_text().splitlines() if line.strip()}
missing = sorted(name for name in expected if not (installed.parent / name).is_file())
if missing:
    sys.exit(f"check_wheel.sh: the wheel lacks {len(missing)} file(s) of patcher/: {', '.join(missing)}")
commands = [e for e in metadata.distribution("nunchaku-patch").entry_points if e.group == "console_scripts"]
if [e.name for e in commands] != ["nunchaku-patch"] or not callable(commands[0].load()):
    sys.exit(f"check_wheel.sh: expected one console script, nunchaku-patch, got {commands}")
print(f"check_wheel.sh: the installed package holds all {len(expected)} files of patcher/ and its command", file=sys.stderr)
EOF
)
"$WORK/venv/bin/nunchaku-patch" --version

echo "check_wheel.sh: the demo with the installed command" >&2
NO_COLOR=1 VENV="$WORK/venv" bash scripts/demo.sh
echo "check_wheel.sh: ok" >&2
