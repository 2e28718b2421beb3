"""DuckDB table sink: units committed with their ledger rows, the table swapped in once at the end.

Rows go to a staging table (`__colbatch_stage_<job>`, beside the target) in commit units of at
most `part_rows` rows (a unit also ends with its split). Each unit is one
transaction: its rows and its row in the ledger table `colbatch.units` commit
together, so a process killed at any instant leaves whole units only (DuckDB
does not replay an uncommitted transaction from its WAL), and a resumed run
(`run(resume=True)`) continues after the last committed unit, redoing at most
the one it was writing. The final commit moves the staged rows into the target
table (a rename, or an insert when appending to an existing table) and marks the
job finished in `colbatch.jobs`, in one transaction: until
then no reader of the target table sees any of the run's rows, and a run that
fails leaves the target as it was.

The ledger tables live in the schema `colbatch` of the same database; `colbatch
query` and `cb.open_output` list neither them nor staging tables.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from colbatch.lazy import duckdb
import polars as pl

from colbatch import faults
from colbatch.batch import Batch, Split
from colbatch.duck import connect, quote_ident
from colbatch.errors import CheckpointError, ConfigError, SinkError
from colbatch.ledger import Committed, JobIdentity, OutputLock, SplitState, contiguous_rows, digest, refusal
from colbatch.sinks.base import Sink, SinkResult
from colbatch.steps import ROW_COL

Mode = Literal["append", "create", "replace"]
MODES = ("append", "create", "replace")
DUCKDB_SUFFIXES = (".duckdb", ".ddb")
# Rows per commit unit: the most a resumed run redoes; as for file parts, ~1M rows is seconds of work,
# and fewer, larger transactions keep DuckDB's commit cost out of the way.
DEFAULT_PART_ROWS = 1_000_000
# The schema of colbatch's ledger tables inside the user's database.
LEDGER_SCHEMA = "colbatch"
# Staging tables sit in the target's schema, so the final commit can rename one into place (no copy).
STAGE_PREFIX = "__colbatch_stage_"
# Registered name of the batch being inserted; quoted, so no table name can collide with SQL.
_BATCH_VIEW = "__colbatch_batch"
_S = quote_ident(LEDGER_SCHEMA)
_DDL = (
    f"CREATE SCHEMA IF NOT EXISTS {_S}",
    f"CREATE TABLE IF NOT EXISTS {_S}.jobs (job_id VARCHAR PRIMARY KEY, fingerprint VARCHAR NOT NULL, "
    "definition VARCHAR NOT NULL, target VARCHAR NOT NULL, finished BOOLEAN NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {_S}.units (job_id VARCHAR NOT NULL, split VARCHAR NOT NULL, "
    "first_row BIGINT NOT NULL, row_count BIGINT NOT NULL, rows_loaded BIGINT NOT NULL, complete BOOLEAN NOT NULL, "
    "rejects VARCHAR, committed_at TIMESTAMP NOT NULL DEFAULT current_timestamp, "
    "PRIMARY KEY (job_id, split, first_row))",
)


class DuckDBSink(Sink):
    """Inserts batches into a DuckDB table; the table changes once, on commit; killed runs resume.

    Args:
        path: The database file (created when missing).
        table: Table name; any text, quoted as an identifier.
        mode: `append` (create the table if missing, else insert by column name), `create` (fail if the
            table exists) or `replace` (swap the table's contents on commit).
        part_rows: Rows per commit unit (the most a resumed run redoes).
    """

    name = "duckdb"
    supports_resume = True
    durable_rejects = True

    def __init__(self, path: str | os.PathLike, table: str, *, mode: Mode = "append",
                 part_rows: int = DEFAULT_PART_ROWS) -> None:
        if mode not in MODES:
            raise ConfigError(f"duckdb sink `mode` must be one of {', '.join(MODES)}, got {mode!r}", value=mode)
        if not isinstance(table, str) or not table:
            raise ConfigError(f"duckdb sink `table` must be a non-empty name, got {table!r}", value=table)
        if not isinstance(part_rows, int) or isinstance(part_rows, bool) or part_rows < 1:
            raise ConfigError(f"duckdb sink `part_rows` must be a positive row count, got {part_rows!r}",
                              value=part_rows)
        self.path = os.fspath(path)
        self.table = table
        self.mode = mode
        self.part_rows = part_rows
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock: OutputLock | None = None
        self._job: JobIdentity | None = None
        self._stage = ""
        self._columns: list[str] = []
        self._rows = 0
        self._rejects: list[str] = []
        # The unit being written (its transaction is open): split, split index, first and end record, rows.
        self._unit: dict[str, Any] | None = None

    def fresh(self) -> DuckDBSink:
        """A new sink with the same settings and no run state."""
        return DuckDBSink(self.path, self.table, mode=self.mode, part_rows=self.part_rows)

    def describe(self) -> str:
        """One-line description for reports."""
        return f"duckdb {self.path} table {quote_ident(self.table)} ({self.mode})"

    def _exists(self, con: duckdb.DuckDBPyConnection) -> bool:
        found = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ?",
            [self.table],
        ).fetchall()
        return bool(found[0][0])

    # -- ledger -----------------------------------------------------------------------------

    def finished(self, job: JobIdentity) -> bool:
        """True when the database's ledger says this same job completed and its table is there."""
        if not os.path.isfile(self.path):
            return False
        try:
            with duckdb.connect(self.path, read_only=True) as con:
                row = con.execute(f"SELECT fingerprint, finished FROM {_S}.jobs WHERE job_id = ?",
                                  [job.job_id]).fetchone()
                return row is not None and row[0] == job.fingerprint and bool(row[1]) and self._exists(con)
        except duckdb.Error:  # no ledger yet, or the database is busy: not known to be finished
            return False

    def begin(self, job: JobIdentity, *, resume: bool) -> Committed:
        """Lock the output, connect, create the ledger tables; with `resume`, return this job's committed units."""
        head, tail = os.path.split(os.path.abspath(self.path))
        lock = OutputLock(os.path.join(head, f".{tail}.{digest(self.table)}.colbatch-lock"),
                          output=f"{self.path} table {self.table}")
        lock.acquire()
        self._lock, self._job = lock, job
        self._stage = quote_ident(STAGE_PREFIX + job.job_id)
        try:
            try:
                os.makedirs(head, exist_ok=True)
                self._con = con = connect(self.path)
                for ddl in _DDL:
                    con.execute(ddl)
                row = con.execute(f"SELECT fingerprint, definition, finished FROM {_S}.jobs WHERE job_id = ?",
                                  [job.job_id]).fetchone()
            except (OSError, duckdb.Error) as exc:
                raise SinkError(f"cannot open DuckDB database `{self.path}`: {exc}", path=self.path) from exc
            if resume and row is not None and row[0] != job.fingerprint:
                raise CheckpointError(
                    f"cannot resume into table `{self.table}` of `{self.path}`: the job changed since its ledger was "
                    f"written ({refusal(json.loads(row[1]), job.description)} differ); run without resume to start "
                    f"over", path=self.path, table=self.table)
            if resume and row is not None and not row[2]:
                committed = self._committed(con, job)
                committed.redone = lock.redone(committed)
                return committed
            self._start_over(con, job)
            return Committed()
        except BaseException:
            self._close()
            raise

    def _committed(self, con: duckdb.DuckDBPyConnection, job: JobIdentity) -> Committed:
        rows = con.execute(f"SELECT split, first_row, row_count, complete, rejects FROM {_S}.units WHERE job_id = ?",
                           [job.job_id]).fetchall()
        ranges: dict[str, list[tuple[int, int]]] = {}
        complete: set[str] = set()
        for split, first, count, done, rejects in rows:
            ranges.setdefault(split, []).append((first, count))
            if done:
                complete.add(split)
            if rejects:
                self._rejects.append(rejects)
        return Committed(splits={s: SplitState(contiguous_rows(r), s in complete) for s, r in ranges.items()})

    def _start_over(self, con: duckdb.DuckDBPyConnection, job: JobIdentity) -> None:
        """Forget this job's units and staged rows (a fresh run, or a finished job run again)."""
        try:
            con.execute("BEGIN TRANSACTION")
            con.execute(f"DELETE FROM {_S}.units WHERE job_id = ?", [job.job_id])
            con.execute(f"DROP TABLE IF EXISTS {self._stage}")
            con.execute(f"INSERT OR REPLACE INTO {_S}.jobs VALUES (?, ?, ?, ?, false)",
                        [job.job_id, job.fingerprint, json.dumps(dict(job.description), sort_keys=True, default=str),
                         self.describe()])
            con.execute("COMMIT")
        except duckdb.Error as exc:
            raise SinkError(f"cannot reset the ledger of table `{self.table}` in `{self.path}`: {exc}",
                            table=self.table) from exc

    # -- lifecycle --------------------------------------------------------------------------

    def open(self, schema: pl.Schema) -> None:
        """Check the target and create the staging table (kept as it is when resuming)."""
        if self._job is None:  # used without a runner's begin (e.g. behind an aggregate): a fresh run
            self.begin(JobIdentity(job_id=digest(self.describe()), fingerprint="direct"), resume=False)
        con = self._con
        assert con is not None
        self._columns = [c for c in schema if c != ROW_COL]
        self._rows = 0
        try:
            if self.mode == "create" and self._exists(con):
                raise ConfigError(f"table `{self.table}` already exists in `{self.path}`; use mode=\"append\" or "
                                  f"mode=\"replace\"", table=self.table)
            empty = pl.DataFrame(schema={c: schema[c] for c in self._columns}).to_arrow()
            con.register(_BATCH_VIEW, empty)
            con.execute(f"CREATE TABLE IF NOT EXISTS {self._stage} AS SELECT * FROM {quote_ident(_BATCH_VIEW)} LIMIT 0")
            con.unregister(_BATCH_VIEW)
        except ConfigError:
            self.abort(None)
            raise
        except duckdb.Error as exc:
            self.abort(exc)
            raise SinkError(f"cannot prepare table `{self.table}` in `{self.path}`: {exc}", table=self.table) from exc
        if self.reject_units is not None:
            self.reject_units.start(keep=self._rejects)

    def write(self, batch: Batch) -> None:
        """Insert one batch into the open unit (a new split or a full unit commits the previous one first)."""
        con = self._con
        assert con is not None, "write() before open()"
        unit = self._unit
        if unit is not None and (unit["split"] != batch.split.id or unit["rows"] >= self.part_rows):
            self._finish_unit(complete=False)
            unit = None
        try:
            if unit is None:
                con.execute("BEGIN TRANSACTION")
                unit = self._unit = {"split": batch.split.id, "index": batch.split.index,
                                     "first_row": batch.first_row, "end_row": batch.first_row, "rows": 0}
            df = batch.data
            if ROW_COL in df.columns:
                df = df.drop(ROW_COL)
            if df.height:
                con.register(_BATCH_VIEW, df.to_arrow())
                con.execute(f"INSERT INTO {self._stage} BY NAME SELECT * FROM {quote_ident(_BATCH_VIEW)}")
                con.unregister(_BATCH_VIEW)
        except duckdb.Error as exc:
            raise SinkError(f"cannot insert into table `{self.table}` of `{self.path}`: {exc}",
                            table=self.table) from exc
        unit["end_row"] = batch.first_row + batch.rows_read
        unit["rows"] += df.height
        self._rows += df.height
        assert self._lock is not None
        self._lock.note(batch.split.id, unit["end_row"])

    def _finish_unit(self, *, complete: bool) -> None:
        """Commit the open unit: its staged rows and its ledger row (naming its rejects part) in one transaction."""
        unit, self._unit = self._unit, None
        if unit is None:
            return
        con = self._con
        assert con is not None and self._job is not None
        rejects = self.reject_units.cut(unit["index"], unit["end_row"]) if self.reject_units is not None else None
        if rejects:
            self._rejects.append(rejects)
        try:
            con.execute(f"INSERT INTO {_S}.units (job_id, split, first_row, row_count, rows_loaded, complete, rejects) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [self._job.job_id, unit["split"], unit["first_row"], unit["end_row"] - unit["first_row"],
                         unit["rows"], complete, rejects])
            faults.point("duckdb-before-commit")
            con.execute("COMMIT")
        except duckdb.Error as exc:
            raise SinkError(f"cannot commit rows {unit['first_row']}+ of split `{unit['split']}` to table "
                            f"`{self.table}` of `{self.path}`: {exc}", table=self.table) from exc
        faults.point("duckdb-after-commit")

    def split_done(self, split: Split, rows: int) -> None:
        """The split ended: its open unit commits, marked complete, so a resumed run skips the split."""
        if self._unit is not None and self._unit["split"] == split.id:
            self._unit["end_row"] = rows
            self._finish_unit(complete=True)

    def commit(self) -> SinkResult:
        """Commit the last unit, then move the staged rows into the table and mark the job finished, atomically."""
        self._finish_unit(complete=True)
        con = self._con
        assert con is not None and self._job is not None, "commit() before open()"
        if self.reject_units is not None:
            # Before the ledger says finished: a kill in between redoes this merge, from the same parts.
            self.reject_units.publish(self._rejects)
        table = quote_ident(self.table)
        try:
            con.execute("BEGIN TRANSACTION")
            exists = self._exists(con)
            if exists and self.mode == "create":
                raise ConfigError(f"table `{self.table}` already exists in `{self.path}`; use mode=\"append\" or "
                                  f"mode=\"replace\"", table=self.table)
            if exists and self.mode == "append":
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {self._stage}")
                con.execute(f"DROP TABLE {self._stage}")
            else:
                if exists:
                    con.execute(f"DROP TABLE {table}")
                con.execute(f"ALTER TABLE {self._stage} RENAME TO {table}")
            con.execute(f"DELETE FROM {_S}.units WHERE job_id = ?", [self._job.job_id])
            con.execute(f"UPDATE {_S}.jobs SET finished = true WHERE job_id = ?", [self._job.job_id])
            faults.point("duckdb-before-commit")
            con.execute("COMMIT")
        except ConfigError:
            self.abort(None)
            raise
        except duckdb.Error as exc:
            self.abort(exc)
            raise SinkError(f"cannot commit table `{self.table}` of `{self.path}`: {exc}", table=self.table) from exc
        faults.point("duckdb-after-commit")
        if self.reject_units is not None:
            self.reject_units.cleanup()
        self._close()
        return SinkResult(rows=self._rows, files=[], bytes=0, target=f"{self.path}#{self.table}")

    def abort(self, error: BaseException | None) -> None:
        """Roll back the open unit; committed units stay staged for a resumed run. Never raises."""
        self._unit = None
        if self._con is not None:
            try:
                self._con.execute("ROLLBACK")
            except Exception:  # nothing was begun, or the connection is broken: closing discards it either way
                pass
        self._close()

    def _close(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            try:
                con.close()
            except Exception:  # abort paths never raise
                pass
        if self._lock is not None:
            self._lock.release()
            self._lock = None
