"""`python -m colbatch` entry point."""

from colbatch.cli import main
from colbatch.exits import exit_quietly

if __name__ == "__main__":
    # Outputs are committed and the report printed by now: skip the interpreter's module teardown.
    exit_quietly(main())
