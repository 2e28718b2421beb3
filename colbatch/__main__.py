"""`python -m colbatch` entry point."""

import sys

from colbatch.cli import main

if __name__ == "__main__":
    sys.exit(main())
