"""Run the command line as ``python -m patcher``."""

from .cli.app import main

if __name__ == "__main__":
    main()
