"""Entry points that start a pipeline: `scan_csv`, `scan_ndjson`, `scan_parquet`, `scan_ipc`, `scan_postgres`, `from_arrow`, `from_batches`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import polars as pl

from colbatch.lazy import pyarrow as pa
from colbatch.pipeline import Pipeline
from colbatch.sources.csv import CsvSource
from colbatch.sources.memory import IterableSource, arrow_source
from colbatch.sources.ndjson import NdjsonSource
from colbatch.sources.parquet import IpcSource, ParquetSource

PathLike = str | os.PathLike | Sequence[str | os.PathLike]


def scan_csv(path: PathLike, *, schema: Mapping[str, Any] | None = None, has_header: bool = True,
             separator: str = ",", quote_char: str = '"', null_values: Sequence[str] | None = None) -> Pipeline:
    """Lazily scan CSV files (a file, directory or glob; `.gz`/`.zst` decompressed).

    Rows that do not parse or do not fit `schema` are rejected with file, line and reason.

    Example:
        >>> cb.scan_csv("data/sample/*.csv*", schema={"amount": "float64"})
    """
    return Pipeline(CsvSource(path, schema=schema, has_header=has_header, separator=separator,
                              quote_char=quote_char, null_values=null_values))


def scan_ndjson(path: PathLike, *, schema: Mapping[str, Any] | None = None) -> Pipeline:
    """Lazily scan JSON Lines files; malformed lines are rejected with file, line and reason.

    Example:
        >>> cb.scan_ndjson("data/sample/events.jsonl")
    """
    return Pipeline(NdjsonSource(path, schema=schema))


def scan_parquet(path: PathLike, *, schema: Mapping[str, Any] | None = None) -> Pipeline:
    """Lazily scan Parquet files; a corrupt file fails naming the file.

    Example:
        >>> cb.scan_parquet("out/events.parquet")
    """
    return Pipeline(ParquetSource(path, schema=schema))


def scan_ipc(path: PathLike, *, schema: Mapping[str, Any] | None = None) -> Pipeline:
    """Lazily scan Arrow IPC (Feather v2) files.

    Example:
        >>> cb.scan_ipc("events.arrow")
    """
    return Pipeline(IpcSource(path, schema=schema))


def scan_postgres(dsn: str, query: str | None = None, *, table: str | None = None, schema: str | None = None,
                  partition_on: str | None = None, partitions: int = 1) -> Pipeline:
    """Lazily read a PostgreSQL query's (or table's) rows, optionally split into key ranges of `partition_on`.

    Example:
        >>> cb.scan_postgres("postgresql://me@db/app", "SELECT * FROM events", partition_on="id", partitions=4)
    """
    from colbatch.sources.postgres import PostgresSource

    return Pipeline(PostgresSource(dsn, query=query, table=table, schema=schema, partition_on=partition_on,
                                   partitions=partitions))


def from_arrow(data: pa.Table | pa.RecordBatch | pa.RecordBatchReader | pl.DataFrame) -> Pipeline:
    """Start a pipeline from an Arrow table, batch or RecordBatchReader (or a Polars DataFrame).

    Example:
        >>> cb.from_arrow(pa.table({"id": [1, 2]}))
    """
    return Pipeline(arrow_source(data))


def from_batches(batches: Iterable[Any] | Callable[[], Iterable[Any]], *, schema: Mapping[str, Any] | None = None,
                 name: str = "batches") -> Pipeline:
    """Start a pipeline from any iterator of Arrow batches, DataFrames, dicts or lists of dicts.

    Pass a callable returning a fresh iterator to make the source re-readable.
    With `schema`, values that do not fit are rejected with stage `cast`.

    Example:
        >>> def pages():
        ...     for page in range(3):
        ...         yield [{"id": page * 10 + i, "amount": 1.5} for i in range(10)]
        >>> cb.from_batches(pages, schema={"id": "int64", "amount": "float64"})
    """
    if callable(batches):
        return Pipeline(IterableSource(batches, schema=schema, label=name, reiterable=True))
    reiterable = not isinstance(batches, Iterable) or iter(batches) is not batches  # type: ignore[arg-type]
    return Pipeline(IterableSource(lambda: batches, schema=schema, label=name, reiterable=reiterable))
