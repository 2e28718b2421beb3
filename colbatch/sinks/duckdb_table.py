"""DuckDB table sink: every batch is inserted inside one transaction, committed once.

The commit unit is the run: `open` begins a transaction, each `write`
inserts a batch inside it, `commit` commits, `abort` rolls back. Until the
commit no reader — another connection, or the same file opened after a crash —
sees any of the run's rows; a process killed mid-run leaves the table as it
was (DuckDB does not replay an uncommitted transaction from its WAL).
"""

from __future__ import annotations

import os
from typing import Literal

import duckdb
import polars as pl

from colbatch.batch import Batch
from colbatch.duck import connect, quote_ident
from colbatch.errors import ConfigError, SinkError
from colbatch.sinks.base import Sink, SinkResult
from colbatch.steps import ROW_COL

Mode = Literal["append", "create", "replace"]
MODES = ("append", "create", "replace")
DUCKDB_SUFFIXES = (".duckdb", ".ddb")
# Registered name of the batch being inserted; quoted, so no table name can collide with SQL.
_BATCH_VIEW = "__colbatch_batch"


class DuckDBSink(Sink):
    """Inserts batches into a DuckDB table, atomically on commit.

    Args:
        path: The database file (created when missing).
        table: Table name; any text, quoted as an identifier.
        mode: `append` (create the table if missing, else insert by column name), `create` (fail if the
            table exists) or `replace` (swap the table's contents on commit).
    """

    name = "duckdb"

    def __init__(self, path: str | os.PathLike, table: str, *, mode: Mode = "append") -> None:
        if mode not in MODES:
            raise ConfigError(f"duckdb sink `mode` must be one of {', '.join(MODES)}, got {mode!r}", value=mode)
        if not isinstance(table, str) or not table:
            raise ConfigError(f"duckdb sink `table` must be a non-empty name, got {table!r}", value=table)
        self.path = os.fspath(path)
        self.table = table
        self.mode = mode
        self._con: duckdb.DuckDBPyConnection | None = None
        self._columns: list[str] = []
        self._rows = 0

    def describe(self) -> str:
        """One-line description for reports."""
        return f"duckdb {self.path} table {quote_ident(self.table)} ({self.mode})"

    def _exists(self, con: duckdb.DuckDBPyConnection) -> bool:
        found = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ?",
            [self.table],
        ).fetchall()
        return bool(found[0][0])

    def open(self, schema: pl.Schema) -> None:
        """Connect, begin the transaction and create (or replace) the table inside it."""
        self._columns = [c for c in schema if c != ROW_COL]
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
            self._con = connect(self.path)
        except (OSError, duckdb.Error) as exc:
            raise SinkError(f"cannot open DuckDB database `{self.path}`: {exc}", path=self.path) from exc
        con, table = self._con, quote_ident(self.table)
        try:
            con.execute("BEGIN TRANSACTION")
            exists = self._exists(con)
            if exists and self.mode == "create":
                raise ConfigError(f"table `{self.table}` already exists in `{self.path}`; use mode=\"append\" or "
                                  f"mode=\"replace\"", table=self.table)
            if not exists or self.mode == "replace":
                empty = pl.DataFrame(schema={c: schema[c] for c in self._columns}).to_arrow()
                con.register(_BATCH_VIEW, empty)
                verb = "CREATE OR REPLACE TABLE" if self.mode == "replace" else "CREATE TABLE"
                con.execute(f"{verb} {table} AS SELECT * FROM {quote_ident(_BATCH_VIEW)} LIMIT 0")
                con.unregister(_BATCH_VIEW)
        except ConfigError:
            self.abort(None)
            raise
        except duckdb.Error as exc:
            self.abort(exc)
            raise SinkError(f"cannot prepare table `{self.table}` in `{self.path}`: {exc}", table=self.table) from exc

    def write(self, batch: Batch) -> None:
        """Insert one batch, matching columns by name, inside the open transaction."""
        assert self._con is not None, "write() before open()"
        df = batch.data
        if not df.height:
            return
        if ROW_COL in df.columns:
            df = df.drop(ROW_COL)
        try:
            self._con.register(_BATCH_VIEW, df.to_arrow())
            self._con.execute(f"INSERT INTO {quote_ident(self.table)} BY NAME SELECT * FROM {quote_ident(_BATCH_VIEW)}")
            self._con.unregister(_BATCH_VIEW)
        except duckdb.Error as exc:
            raise SinkError(f"cannot insert into table `{self.table}` of `{self.path}`: {exc}",
                            table=self.table) from exc
        self._rows += df.height

    def commit(self) -> SinkResult:
        """Commit the transaction: all of the run's rows become visible at once."""
        assert self._con is not None, "commit() before open()"
        con, self._con = self._con, None
        try:
            con.execute("COMMIT")
        except duckdb.Error as exc:
            _close_quietly(con)
            raise SinkError(f"cannot commit table `{self.table}` of `{self.path}`: {exc}", table=self.table) from exc
        con.close()
        return SinkResult(rows=self._rows, files=[], bytes=0, target=f"{self.path}#{self.table}")

    def abort(self, error: BaseException | None) -> None:
        """Roll back; the table keeps what it held before the run. Never raises."""
        con, self._con = self._con, None
        if con is None:
            return
        try:
            con.execute("ROLLBACK")
        except Exception:  # nothing was begun, or the connection is broken: closing discards it either way
            pass
        _close_quietly(con)


def _close_quietly(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.close()
    except Exception:  # abort paths never raise
        return
