"""The CPU-bound UDF of the benchmarks, in a module that imports only Polars.

Worker processes import the module of a pickled function to load it; a user's UDF module imports
what its function needs, so this one does not bring the benchmark harness (NumPy, HTTP, argparse).
"""

from __future__ import annotations

import polars as pl


def score(name: str, x: float) -> int:
    """Per-row Python: a polynomial string hash mixed with the amount, the kind of code Polars cannot vectorise."""
    h = 7
    for ch in name:
        h = (h * 31 + ord(ch)) % 1_000_003
    return (h + int(x * 100)) % 9973


def cpu_udf(df: pl.DataFrame) -> pl.DataFrame:
    """The CPU-bound UDF on a Polars batch."""
    scores = [score(n, x) for n, x in zip(df["name"].to_list(), df["x"].to_list())]
    return df.with_columns(pl.Series("score", scores, dtype=pl.Int64))
