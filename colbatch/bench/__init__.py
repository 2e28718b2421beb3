"""Benchmarks: `python -m colbatch bench core` compares colbatch with Polars, DuckDB, PyArrow and Python."""

from __future__ import annotations

import compileall
import os
import sys


def compile_package() -> bool:
    """Compile colbatch's modules to bytecode, as `pip install` does; False when some could not be.

    An editable install has no bytecode until an import writes it, and with
    PYTHONDONTWRITEBYTECODE set (common in containers, and on the benchmark machine) no import ever
    does: every process, each worker included, would compile colbatch's sources again (~0.1 s of
    the core job), against Polars' precompiled modules. Benchmarks measure colbatch as installed.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ok = bool(compileall.compile_dir(root, quiet=2, workers=1))
    if not ok:  # e.g. a read-only install: each process compiles what it imports
        print(f"note: could not compile all of {root} to bytecode; imports compile it in each process",
              file=sys.stderr)
    return ok
