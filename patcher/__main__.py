"""Run the command line as ``python -m patcher``."""

from .cli.app import run

if __name__ == "__main__":
    run()
