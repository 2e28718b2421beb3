"""DuckDB helpers shared by the aggregate stage, the DuckDB sink and the query command.

Identifiers are always double-quoted with `"` doubled and string literals
single-quoted with `'` doubled (DESIGN.md, "Safe by default"); nothing a user
names is formatted into SQL raw.
"""

from __future__ import annotations

from colbatch.lazy import duckdb
import polars as pl

# Partition column types recorded in manifests, so `007` stays text and `1` stays an integer on read.
_HIVE_TYPES = {
    pl.Int8: "TINYINT", pl.Int16: "SMALLINT", pl.Int32: "INTEGER", pl.Int64: "BIGINT",
    pl.UInt8: "UTINYINT", pl.UInt16: "USMALLINT", pl.UInt32: "UINTEGER", pl.UInt64: "UBIGINT",
    pl.Float32: "FLOAT", pl.Float64: "DOUBLE", pl.String: "VARCHAR", pl.Boolean: "BOOLEAN", pl.Date: "DATE",
}


def quote_ident(name: str) -> str:
    """Quote a DuckDB identifier in double quotes, doubling any double quote inside it.

    Example:
        >>> quote_ident('a"b')
        '"a""b"'
    """
    return '"' + str(name).replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote a DuckDB string literal in single quotes, doubling any single quote inside it."""
    return "'" + str(value).replace("'", "''") + "'"


def connect(database: str = ":memory:", *, memory_limit: int | None = None, threads: int | None = None,
            temp_directory: str | None = None, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open a DuckDB connection with colbatch's resource settings.

    Args:
        database: A database file, or `:memory:`.
        memory_limit: Bytes DuckDB may use before it spills to `temp_directory`; None keeps DuckDB's default
            (80% of RAM).
        threads: DuckDB worker threads; None keeps DuckDB's default (one per core).
        temp_directory: Where DuckDB spills; None keeps DuckDB's default (`<database>.tmp`, or none in memory).
        read_only: Open the database file read-only (other readers may open it too).
    """
    con = duckdb.connect(database, read_only=read_only)
    try:
        if memory_limit is not None:
            con.execute(f"SET memory_limit = {quote_literal(f'{int(memory_limit)}B')}")
        if threads is not None:
            con.execute(f"SET threads = {int(threads)}")
        if temp_directory is not None:
            con.execute(f"SET temp_directory = {quote_literal(temp_directory)}")
    except BaseException:
        con.close()
        raise
    return con


def hive_type(dtype: pl.DataType) -> str | None:
    """DuckDB type for a hive partition column of Polars `dtype`, or None to let DuckDB infer it."""
    return _HIVE_TYPES.get(dtype.base_type())  # type: ignore[call-overload]
