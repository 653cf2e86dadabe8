"""Command line (placeholder until the CLI issue lands)."""

from __future__ import annotations

import sys


def main() -> None:
    """Entry point of the ``nunchaku-patch`` command."""
    sys.stderr.write("nunchaku-patch: the command line is not built yet\n")
    raise SystemExit(2)
