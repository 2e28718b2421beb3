"""Querying outputs with DuckDB: `cb.open_output(path)` and `python -m colbatch query`.

An output is read through its manifest (see `colbatch.manifest`): exactly the
files its last commit published become one DuckDB view, hive-partitioned
outputs with their partition columns. A DuckDB database written by
`sink_duckdb` is attached read-only and its tables are the views.

Example:
    >>> out = cb.open_output("out/events.parquet")
    >>> out.sql("SELECT category, sum(value) FROM events GROUP BY ALL").pl()
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from colbatch.lazy import duckdb
import polars as pl

from colbatch.duck import connect, quote_ident, quote_literal
from colbatch.errors import ColbatchError, ConfigError
from colbatch.manifest import Manifest, read_manifest
from colbatch.sinks.duckdb_table import DUCKDB_SUFFIXES

_READERS = {"parquet": "read_parquet", "csv": "read_csv", "ndjson": "read_json"}
class QueryError(ColbatchError):
    """A query over outputs failed (DuckDB rejected or could not run it)."""


def view_sql(manifest: Manifest) -> str:
    """The SELECT that reads exactly the files of `manifest` (with hive partition values)."""
    reader = _READERS.get(manifest.format)
    if reader is None:
        raise ConfigError(f"output format `{manifest.format}` cannot be queried; valid: {', '.join(_READERS)}")
    paths = manifest.paths()
    if not paths:  # an empty commit: a view with no rows would need the schema; say so instead
        raise ConfigError(f"output `{manifest.output}` committed no files, so there is nothing to query")
    options = ""
    if manifest.partition_by:
        types = manifest.extra.get("partition_types") or {}
        typed = ", ".join(f"{quote_literal(c)}: {quote_literal(t)}" for c, t in types.items())
        options = ", hive_partitioning = true" + (f", hive_types = {{{typed}}}" if typed else "")
    files = ", ".join(quote_literal(p) for p in paths)
    return f"SELECT * FROM {reader}([{files}]{options})"


def is_duckdb_path(path: str | os.PathLike) -> bool:
    """True when `path` names a DuckDB database file."""
    return os.fspath(path).lower().endswith(DUCKDB_SUFFIXES)


def register_output(con: duckdb.DuckDBPyConnection, path: str | os.PathLike, name: str | None = None) -> list[str]:
    """Create views over the output at `path` on `con`; returns the view names.

    A file output becomes one view called `name` (default: the output's name, e.g. `events`). A DuckDB
    database is attached read-only; each of its tables becomes a view of the same name (or, with `name`,
    its only table becomes `name`).

    Raises:
        ConfigError: when `path` is not a committed output.
    """
    if is_duckdb_path(path):
        return _attach(con, os.fspath(path), name)
    manifest = read_manifest(path)
    view = name or manifest.name
    con.execute(f"CREATE OR REPLACE VIEW {quote_ident(view)} AS {view_sql(manifest)}")
    return [view]


def _attach(con: duckdb.DuckDBPyConnection, path: str, name: str | None) -> list[str]:
    if not os.path.isfile(path):
        raise ConfigError(f"no DuckDB database at `{path}`", path=path)
    alias = f"colbatch_db_{len(con.execute('SELECT * FROM duckdb_databases()').fetchall())}"
    con.execute(f"ATTACH {quote_literal(path)} AS {quote_ident(alias)} (READ_ONLY)")
    tables = [r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND schema_name <> 'colbatch' "  # the ledger
        "AND NOT starts_with(table_name, '__colbatch_stage_') ORDER BY table_name", [alias]).fetchall()]
    if name is not None:
        if len(tables) != 1:
            raise ConfigError(f"`{path}` holds {len(tables)} tables; name them in SQL as {alias}.<table> "
                              f"instead of giving one name", path=path)
        pairs = [(name, tables[0])]
    else:
        pairs = [(t, t) for t in tables]
    for view, table in pairs:
        con.execute(f"CREATE OR REPLACE VIEW {quote_ident(view)} AS "
                    f"SELECT * FROM {quote_ident(alias)}.{quote_ident(table)}")
    return [view for view, _ in pairs]


class Output:
    """A committed output opened for querying; its view is named after it (and `output`).

    Example:
        >>> out = cb.open_output("out/events.parquet")
        >>> out.sql("SELECT count(*) FROM output").fetchall()
        >>> out.to_polars()
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.connection = connect()
        self.views = register_output(self.connection, self.path)
        if "output" not in self.views and len(self.views) == 1:
            self.connection.execute(f"CREATE OR REPLACE VIEW output AS SELECT * FROM {quote_ident(self.views[0])}")
        self.name = self.views[0] if self.views else "output"

    def sql(self, query: str) -> duckdb.DuckDBPyRelation:
        """Run DuckDB SQL over the output's view; returns a DuckDB relation (`.pl()`, `.fetchall()`, ...)."""
        try:
            return self.connection.sql(query)
        except duckdb.Error as exc:
            raise QueryError(f"query failed: {_first_line(exc)}", query=query) from exc

    def to_polars(self) -> pl.DataFrame:
        """All committed rows as a Polars DataFrame."""
        return self.sql(f"SELECT * FROM {quote_ident(self.name)}").pl()

    def close(self) -> None:
        """Close the DuckDB connection."""
        self.connection.close()

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Output({self.path!r}, views={self.views})"


def open_output(path: str | os.PathLike) -> Output:
    """Open a committed output (file, directory, hive-partitioned directory or DuckDB database) for querying.

    Only the files listed in the output's manifest are read.

    Example:
        >>> cb.open_output("out/events.parquet").sql("SELECT count(*) FROM events").fetchall()
    """
    return Output(path)


def run_query(sql: str, outputs: Mapping[str | None, str | os.PathLike] | list[tuple[str | None, str]]
              ) -> tuple[duckdb.DuckDBPyConnection, duckdb.DuckDBPyRelation]:
    """Register `outputs` (pairs of view name or None, path) and run `sql`; returns the connection and relation."""
    con = connect()
    pairs = list(outputs.items()) if isinstance(outputs, Mapping) else list(outputs)
    seen: dict[str, str] = {}
    try:
        for name, path in pairs:
            for view in register_output(con, path, name):
                if view in seen:
                    raise ConfigError(f"outputs `{seen[view]}` and `{path}` are both named `{view}`; "
                                      f"name one with --as NAME=PATH", view=view)
                seen[view] = str(path)
    except BaseException:
        con.close()
        raise
    try:
        return con, con.sql(sql)
    except duckdb.Error as exc:
        con.close()
        raise QueryError(f"query failed: {_first_line(exc)}", query=sql) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- the command line --------------------------------------------------------------------------

FORMATS = ("table", "csv", "json", "parquet")
# Rows a `table` result prints before eliding; more belongs in --format csv/parquet.
DEFAULT_TABLE_ROWS = 50


def query_command(sql: str, *, outputs: list[str], named: list[str], format: str, to: str | None) -> int:
    """`python -m colbatch query`: run `sql` over outputs and print (or write) the result; returns 0.

    Raises:
        ConfigError: bad `--as`, an output that was never committed, parquet to a terminal (exit 2).
        QueryError: DuckDB rejected or failed the query (exit 1).
    """
    import sys

    pairs: list[tuple[str | None, str]] = [(None, p) for p in outputs]
    for item in named:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"`--as` takes NAME=PATH, got {item!r}", value=item)
        pairs.append((name, path))
    if format == "parquet" and to is None and sys.stdout.isatty():
        raise ConfigError("`--format parquet` writes binary data: give `--to FILE` or redirect stdout")
    con, rel = run_query(sql, pairs)
    try:
        df = rel.pl()
    except duckdb.Error as exc:
        raise QueryError(f"query failed: {_first_line(exc)}", query=sql) from exc
    finally:
        con.close()
    if format == "parquet":
        df.write_parquet(to if to is not None else sys.stdout.buffer)
    elif format == "csv":
        text = df.write_csv()
    elif format == "json":
        text = df.write_json() + "\n"
    else:
        with pl.Config(tbl_rows=DEFAULT_TABLE_ROWS, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
            text = f"{df}\n"
    if format != "parquet":
        if to is None:
            sys.stdout.write(text)
        else:
            with open(to, "w", encoding="utf-8") as fh:
                fh.write(text)
    return 0
