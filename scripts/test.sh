#!/usr/bin/env bash
# Run the whole check: create the virtual environment if missing, install the project with its test extra,
# then ruff, mypy --strict on the package, and pytest. Extra arguments go to pytest.
#   PYTHON=python3.10 VENV=.venv-3.10 bash scripts/test.sh    # another interpreter, in its own environment
# PYTHON is the interpreter (default python3), VENV the environment's folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
if [ ! -x "$VENV/bin/python" ]; then
    echo "test.sh: creating $VENV with $("$PY" --version)" >&2
    "$PY" -m venv "$VENV"
elif [ -n "${PYTHON:-}" ] && [ "$(version "$VENV/bin/python")" != "$(version "$PY")" ]; then
    echo "test.sh: $VENV holds Python $(version "$VENV/bin/python"), not $PY's $(version "$PY")." \
        "Pick another folder (VENV=.venv-$(version "$PY")) or remove $VENV" >&2
    exit 2
fi
# An editable install needs pip >= 21.3 (PEP 660); newer pips are used as they are (an upgrade costs a download).
if ! "$VENV/bin/python" -c 'import pip, sys; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (21, 3))'; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
fi
"$VENV/bin/python" -m pip install --quiet -e '.[test]'
# NPATCH_LINT=0 skips ruff and mypy (CI runs them on the oldest and newest Pythons, not on each one between).
if [ "${NPATCH_LINT:-1}" != 0 ]; then
    echo "test.sh: ruff" >&2
    "$VENV/bin/ruff" check patcher tests scripts
    echo "test.sh: mypy --strict patcher" >&2
    "$VENV/bin/mypy" --strict patcher
fi
echo "test.sh: pytest on $("$VENV/bin/python" --version)" >&2
exec "$VENV/bin/python" -m pytest "$@"
