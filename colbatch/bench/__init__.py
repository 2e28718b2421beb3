"""Benchmarks: `python -m colbatch bench core` compares colbatch with Polars, DuckDB, PyArrow and Python."""
