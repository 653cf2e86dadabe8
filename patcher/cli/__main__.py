"""Run the command line as ``python -m patcher.cli`` (``python -m patcher`` is the documented form)."""

from .app import run

if __name__ == "__main__":
    run()
