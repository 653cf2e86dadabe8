#!/usr/bin/env bash
# Run the whole check: create .venv if missing, install the project with its test extra,
# then ruff, mypy --strict on the package, and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "test.sh: creating .venv with $($PY --version)" >&2
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "test.sh: ruff" >&2
.venv/bin/ruff check patcher tests scripts
echo "test.sh: mypy --strict patcher" >&2
.venv/bin/mypy --strict patcher
echo "test.sh: pytest" >&2
exec .venv/bin/python -m pytest "$@"
