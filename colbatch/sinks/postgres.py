"""PostgreSQL sink: streaming binary COPY, exactly once per unit, bad rows isolated, transient errors retried.

Each batch is one *unit*: its good rows are COPYed and its ledger row is
written in one transaction (see `colbatch.pg.ledger`), so a killed run resumed
with `run(resume=True)` continues after the last committed unit with no
duplicates and no gaps. Modes:

* `append` (default): add rows; creates the table when missing, else checks compatibility.
* `create`: the table must not exist; it is created from the batch schema.
* `replace`: rows go to a staging table that replaces the target in one transaction at commit.
* `upsert`: each unit is COPYed into a temporary table and merged with
  `INSERT ... ON CONFLICT (key) DO UPDATE` in the unit's transaction.

Before a unit is sent, the table's cheap constraints are checked on it in Arrow
(`colbatch.pg.screen`), so rows that would fail are COPYed on their own and the
rest in one piece. A finished job run again is a no-op (its ledger holds a
finished row), and a session advisory lock on the table keeps a second run off it.

Durable rejects (a `[rejects]` file, see `colbatch.rejects.RejectParts`): inside a
unit's transaction, once its COPY has found the rows the server refuses, the
rejects of every record up to the unit's end (read, cast, validate and UDF rejects
held by the runner, plus these `load` rejects) are published as a part whose name
goes into the unit's ledger row; the transaction then commits. A part whose
transaction never commits is not in the ledger, and a resumed run removes it.
The parts are merged into the rejects file before the ledger says finished.
Before each unit, the lock's session notes how far the sink has been sent (a
ledger mark outside the unit transactions), so a resumed run reports `rows_redone`.

Parallel streams (`streams`, default 2 where it is safe): units are COPYed on
several pooled connections at once (`psycopg_pool`), so several server
processes ingest while the client prepares the next unit, but each unit cuts
its rejects part, writes its ledger row and commits only after the unit before
it committed. Committed units therefore stay a prefix of the input, which resume
relies on. A table with a unique index, an exclusion constraint or a user trigger,
and `upsert`, load on one stream: there two open units could wait on each other's
rows (a unique key in both), one in the server and the other for its turn to commit.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import polars as pl

from colbatch import faults
from colbatch.batch import Batch, Split
from colbatch.errors import CheckpointError, ColbatchError, ConfigError, SinkError
from colbatch.ledger import Committed, JobIdentity, digest
from colbatch.pg import connect, mask_dsn, psycopg, scrub
from colbatch.pg.copy import conform, encode
from colbatch.pg.isolate import BadRow, IsolatingLoader, LoadStats, UnitResult
from colbatch.pg.ledger import DEFAULT_LEDGER_TABLE, PgLedger
from colbatch.pg.retry import backoff_delay, is_transient, sqlstate
from colbatch.pg.screen import Screen, load_catalog, rules_for
from colbatch.pg.types import check_compatible, pg_type_for
from colbatch.rejects import reject_frame
from colbatch.sinks.base import Sink, SinkResult
from colbatch.steps import ROW_COL

log = logging.getLogger("colbatch")

Mode = Literal["append", "create", "replace", "upsert"]
MODES = ("append", "create", "replace", "upsert")
# Five retries with 0.2 s doubling backoff (capped at 10 s) ride out a server restart of ~10 s.
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 0.2
DEFAULT_BACKOFF_CAP_S = 10.0
# PostgreSQL silently truncates longer identifiers (NAMEDATALEN - 1), which would not round-trip.
MAX_IDENTIFIER_BYTES = 63
# COPY streams where they are safe. Measured, the sink loading a 1M-row CSV, 4 alternating runs in one
# process: 0.795 s on one stream, 0.733 s on two, 0.733 s on three (the 2 cores are then full).
DEFAULT_STREAMS = 2


class _Turn:
    """A unit's place in the commit order: it commits after the unit before it did."""

    def __init__(self, previous: _Turn | None) -> None:
        self.previous = previous
        self.done = threading.Event()
        self.ok = False

    def wait_previous(self) -> bool:
        """Wait until the unit before has committed or failed; True when it committed (or there is none)."""
        previous, self.previous = self.previous, None  # no chain of every unit kept alive
        if previous is None:
            return True
        previous.done.wait()
        return previous.ok

    def finish(self, ok: bool) -> None:
        self.ok = ok
        self.done.set()


def check_identifier(name: str, what: str) -> str:
    """Refuse identifiers PostgreSQL would alter: empty, with NUL, or longer than 63 bytes."""
    if not name or "\x00" in name:
        raise ConfigError(f"{what} {name!r} is not a valid PostgreSQL identifier (empty or contains NUL)", name=name)
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        raise ConfigError(f"{what} `{name}` is {len(name.encode())} bytes; PostgreSQL identifiers hold at most "
                          f"{MAX_IDENTIFIER_BYTES} bytes", name=name)
    return name


class PostgresSink(Sink):
    """Loads batches into a PostgreSQL table with binary COPY; see the module docstring for modes."""

    name = "postgresql"
    supports_resume = True
    # Rows arrive with their position as read (ROW_COL), so load rejects name their source line.
    needs_rows = True
    durable_rejects = True

    def __init__(self, dsn: str, table: str, *, mode: Mode = "append", key: str | Sequence[str] | None = None,
                 schema: str | None = None, retries: int = DEFAULT_RETRIES, backoff_s: float = DEFAULT_BACKOFF_S,
                 ledger_table: str = DEFAULT_LEDGER_TABLE, sleep: Callable[[float], None] = time.sleep,
                 streams: int | None = None) -> None:
        psycopg()
        if streams is not None and (not isinstance(streams, int) or streams < 1):
            raise ConfigError(f"`streams` must be a positive integer, got {streams!r}", value=streams)
        if mode not in MODES:
            raise ConfigError(f"`mode` must be one of {', '.join(MODES)}, got {mode!r}", value=mode)
        keys = [key] if isinstance(key, str) else list(key or [])
        if mode == "upsert" and not keys:
            raise ConfigError("mode `upsert` needs `key`: the column(s) of the table's primary key or unique index")
        self._dsn = dsn
        self.table = check_identifier(table, "table name")
        self.schema_name = check_identifier(schema, "schema name") if schema else None
        self.mode = mode
        self.keys = [check_identifier(k, "key column") for k in keys]
        self.retries = retries
        self.backoff_s = backoff_s
        self._sleep = sleep
        self._ledger = PgLedger(self.schema_name, check_identifier(ledger_table, "ledger table"))
        self.stats = LoadStats()
        self.reconnects = 0
        self._conn: Any = None
        self._job: JobIdentity | None = None
        self._resume = False
        self._rows = 0
        self._rejected = 0
        self._load_table = self.table
        self._columns: list[str] = []
        self._screen: Screen | None = None
        self._lock_conn: Any = None
        # Durable rejects parts named by committed units (listed by the ledger on resume, then this run's).
        self._parts: list[str] = []
        # Parallel streams: the requested count (None: DEFAULT_STREAMS where safe), the count in use,
        # pooled connections for the stream threads, units in flight and the last unit's turn.
        self._streams_wanted = streams
        self.streams = 1
        self._pool: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: collections.deque[Future] = collections.deque()
        self._last_turn: _Turn | None = None
        self._stopping = False
        self._local = threading.local()  # a stream thread's connection

    # -- description ------------------------------------------------------------------------

    def describe(self) -> str:
        """One-line description (the DSN's password masked)."""
        where = f"{self.schema_name}.{self.table}" if self.schema_name else self.table
        return f"postgresql {mask_dsn(self._dsn)} table {where} mode {self.mode}"

    def __repr__(self) -> str:
        return f"PostgresSink({self.describe()!r})"

    def _ident(self, table: str) -> Any:
        from psycopg import sql

        return sql.Identifier(self.schema_name, table) if self.schema_name else sql.Identifier(table)

    # -- connection and retries -------------------------------------------------------------

    def _connection(self) -> Any:
        if getattr(self._local, "stream", False):  # a stream thread: a connection of the pool
            conn = self._local.conn
            if conn is None or conn.closed:
                if conn is not None:
                    self._pool.putconn(conn)
                conn = self._local.conn = self._pool.getconn()
            return conn
        if self._conn is None or self._conn.closed:
            self._conn = connect(self._dsn)
        return self._conn

    def _drop_connection(self) -> None:
        stream = getattr(self._local, "stream", False)
        if stream:
            conn, self._local.conn = self._local.conn, None
        else:
            conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # the connection is already broken; nothing to release
                pass
            if stream:
                self._pool.putconn(conn)  # the pool discards a closed connection and opens another

    def _transact(self, work: Callable[[Any, int], Any], what: str) -> Any:
        """Run `work(cursor, attempt)` in one transaction and commit, retrying transient failures on a new connection."""
        attempt = 0
        while True:
            try:
                conn = self._connection()
                with conn.cursor() as cur:
                    out = work(cur, attempt)
                faults.point("pg-before-commit")
                conn.commit()
                faults.point("pg-after-commit")
                return out
            except Exception as exc:
                transient = is_transient(exc)
                if not transient or attempt >= self.retries:
                    self._drop_connection()
                    if isinstance(exc, ColbatchError):
                        raise
                    tries = f" after {attempt + 1} attempts" if transient else ""
                    raise SinkError(f"PostgreSQL refused {what} on `{self.table}`{tries}: "
                                    f"{scrub(str(exc), self._dsn)}", sqlstate=sqlstate(exc)) from None
                delay = backoff_delay(attempt, self.backoff_s, DEFAULT_BACKOFF_CAP_S)
                log.warning("transient PostgreSQL error during %s (%s); reconnecting, retry %d/%d in %.2fs", what,
                            sqlstate(exc) or "connection lost", attempt + 1, self.retries, delay)
                self._drop_connection()
                self.reconnects += 1
                self.retried += 1
                self._sleep(delay)
                attempt += 1

    # -- lifecycle --------------------------------------------------------------------------

    def begin(self, job: JobIdentity, *, resume: bool) -> Committed:
        """Create the ledger table if needed; with `resume`, return this job's committed units, else forget them.

        A resumed run's `Committed.redone` counts the records the killed run had sent past its
        committed units (its progress marks), which this run reads again.
        """
        self._job, self._resume = job, resume
        self._lock()

        def work(cur: Any, _: int) -> Committed:
            if not resume:
                self._ledger.forget(cur, job.job_id)
                self._parts = []
                return Committed()
            committed = self._ledger.committed(cur.connection, job)  # refuses a changed job before anything changes
            self._parts = self._ledger.reject_parts(cur, job.job_id)
            for split, end in self._ledger.take_marks(cur, job.job_id).items():
                skip = committed.skip_for(split)
                committed.redone += 0 if skip is None else max(0, end - skip)
            return committed

        self._transact(lambda cur, _: self._ledger.ensure(cur.connection), "creating the ledger table")
        return self._transact(work, "reading the ledger")

    def _lock(self) -> None:
        """Take a session advisory lock on the target table, or fail at once: one run per table at a time.

        The lock lives on its own connection for the whole run; the server drops it when
        that session ends, so a killed run never leaves a stale lock.
        """
        if self._lock_conn is not None:
            return
        attempt = 0
        while True:
            try:
                conn = connect(self._dsn, autocommit=True)
                break
            except Exception as exc:
                if not is_transient(exc) or attempt >= self.retries:
                    raise SinkError(f"PostgreSQL refused a connection for `{self.table}` after {attempt + 1} "
                                    f"attempt(s): {scrub(str(exc), self._dsn)}", sqlstate=sqlstate(exc)) from None
                self._sleep(backoff_delay(attempt, self.backoff_s, DEFAULT_BACKOFF_CAP_S))
                self.retried += 1
                attempt += 1
        try:
            where = f"{self.schema_name or conn.execute('SELECT current_schema()').fetchone()[0]}.{self.table}"
            key = int.from_bytes(hashlib.sha256(f"colbatch table {where}".encode()).digest()[:8], "big", signed=True)
            locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
        except Exception as exc:
            conn.close()
            raise SinkError(f"PostgreSQL refused locking `{self.table}`: {scrub(str(exc), self._dsn)}",
                            sqlstate=sqlstate(exc)) from None
        if not locked:
            conn.close()
            raise CheckpointError(f"table `{where}` is locked by another running job; wait for it to finish "
                                  f"(advisory lock {key})", table=self.table)
        try:  # the progress marks written on this session only have to outlive the client, not the server
            conn.execute("SET synchronous_commit = off")
        except Exception:  # marks are then flushed like any commit: slower, not wrong
            pass
        self._lock_conn, self._lock_key = conn, key

    def _mark(self, split: str, end_row: int) -> None:
        """Note that the records of `split` before `end_row` are being sent (best effort: it only feeds the report)."""
        if self._lock_conn is None or self._job is None:
            return
        try:
            self._ledger.mark(self._lock_conn, self._job, self.describe(), split, end_row)
        except Exception as exc:  # a lost lock session: the load goes on, rows_redone may read low on resume
            log.debug("progress mark not written: %s", scrub(str(exc), self._dsn))

    def _unlock(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            try:  # release before closing: the server ends a closed session a moment later, not at once
                conn.execute("SELECT pg_advisory_unlock(%s)", (self._lock_key,))
            except Exception:  # the session is gone, and its lock with it
                pass
            try:
                conn.close()
            except Exception:  # closing ends the session, which drops the lock in any case
                pass

    def finished(self, job: JobIdentity) -> bool:
        """True when the ledger says this same job already finished and the table is there."""
        def work(cur: Any, _: int) -> bool:
            if not self._ledger.is_finished(cur.connection, job):
                return False
            return cur.execute("SELECT to_regclass(%s)", (self._ident(self.table).as_string(cur.connection),)
                               ).fetchone()[0] is not None

        try:
            return bool(self._transact(work, "reading the ledger"))
        finally:
            self._drop_connection()

    def open(self, schema: pl.Schema) -> None:
        """Create or check the target table (a staging table for `replace`) and prepare the COPY statement."""
        if self._job is None:
            self.begin(JobIdentity(job_id=digest(self.describe()), fingerprint="direct"), resume=False)
        schema = pl.Schema({c: t for c, t in schema.items() if c != ROW_COL})
        self._rows = self._rejected = self.reconnects = 0  # the same sink object may run again (resume)
        self.stats = LoadStats()
        for column in schema:
            check_identifier(column, "column name")
        missing = [k for k in self.keys if k not in schema]
        if missing:
            raise ConfigError(f"key column `{missing[0]}` is not among the output columns: {', '.join(schema)}")
        self._schema = schema
        self._columns = list(schema)
        assert self._job is not None
        if self.mode == "replace":
            self._load_table = _staging_name(self.table, self._job.job_id)
        self._transact(lambda cur, _: self._prepare(cur, schema), "preparing the table")
        self._start_streams()
        self._screen = Screen(rules_for(self._catalog[0], self._catalog[1], self._columns),
                              conform(pl.DataFrame(schema=schema), self._types)[0])
        self._loader = IsolatingLoader(self._copy_sql(), stats=self.stats,
                                       after_copy=self._merge if self.mode == "upsert" else None)
        if self.reject_units is not None:
            self.reject_units.start(keep=self._parts)

    def _prepare(self, cur: Any, schema: pl.Schema) -> None:
        from psycopg import sql

        existing = self._table_columns(cur, self._load_table)
        if self.mode == "replace" and existing is not None and not self._resume:
            cur.execute(sql.SQL("DROP TABLE {}").format(self._ident(self._load_table)))
            existing = None
        if self.mode == "create" and existing is not None and not self._resume:
            raise SinkError(f"table `{self.table}` already exists; use mode \"append\", \"replace\" or \"upsert\"",
                            table=self.table)
        if existing is None:
            columns = [sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(pg_type_for(c, t))) for c, t in schema.items()]
            if self.keys:
                columns.append(sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, self.keys))))
            cur.execute(sql.SQL("CREATE TABLE {} ({})").format(self._ident(self._load_table), sql.SQL(", ").join(columns)))
            existing = self._table_columns(cur, self._load_table)
            assert existing is not None
        types = check_compatible(schema, existing, target=self.table)
        self._types = [types[c] for c in schema]
        self._typnames = [existing[c] for c in schema]
        # The constraints rows must pass: the target's (upsert merges into it), else the table COPY writes.
        oid = self._table_oid(cur, self.table if self.mode == "upsert" else self._load_table)
        self._catalog = load_catalog(cur, oid)

    def _start_streams(self) -> None:
        """Use parallel COPY streams when asked for (or by default) and safe for the table."""
        wanted = DEFAULT_STREAMS if self._streams_wanted is None else self._streams_wanted
        self.streams, self._stopping, self._last_turn = 1, False, None
        if wanted <= 1:
            return
        why = "mode upsert" if self.mode == "upsert" else self._transact(self._serial_reason, "reading the table")
        if why:
            log.debug("PostgreSQL sink: one COPY stream (%s)", why)
            return
        from psycopg_pool import ConnectionPool

        self.streams = wanted
        self._pool = ConnectionPool(self._dsn, min_size=wanted, max_size=wanted, open=True,
                                    kwargs={"application_name": "colbatch"}, name="colbatch")
        self._executor = ThreadPoolExecutor(wanted, thread_name_prefix="colbatch-copy")

    def _serial_reason(self, cur: Any, _: int) -> str | None:
        """Why units of the load table must go one at a time, or None (see the module docstring)."""
        oid = self._table_oid(cur, self._load_table)
        unique, exclusion, triggers = cur.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = %s AND indisunique), "
            "EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = %s AND contype = 'x'), "
            "EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal)", (oid, oid, oid)).fetchone()
        return ("a unique index" if unique else "an exclusion constraint" if exclusion
                else "a trigger" if triggers else None)

    def _table_oid(self, cur: Any, table: str) -> int | None:
        return cur.execute("SELECT to_regclass(%s)::oid", (self._ident(table).as_string(cur.connection),)).fetchone()[0]

    def _table_columns(self, cur: Any, table: str) -> dict[str, str] | None:
        """Column name → `pg_type.typname` of a table, or None when it does not exist."""
        oid = self._table_oid(cur, table)
        if oid is None:
            return None
        return {name: col.typname for name, col in load_catalog(cur, oid)[0].items()}

    def _copy_sql(self) -> Any:
        from psycopg import sql

        target = sql.Identifier("colbatch_stage") if self.mode == "upsert" else self._ident(self._load_table)
        cols = sql.SQL(", ").join(map(sql.Identifier, self._columns))
        return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(target, cols)

    def _merge(self, cur: Any) -> None:
        """Upsert the staged rows (the last row wins for a key repeated in the unit), then empty the stage."""
        from psycopg import sql

        cols = sql.SQL(", ").join(map(sql.Identifier, self._columns))
        keys = sql.SQL(", ").join(map(sql.Identifier, self.keys))
        rest = [c for c in self._columns if c not in self.keys]
        action = sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
            sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c)) for c in rest
        )) if rest else sql.SQL("DO NOTHING")
        cur.execute(sql.SQL("INSERT INTO {} ({}) SELECT DISTINCT ON ({}) {} FROM colbatch_stage ORDER BY {}, ctid DESC "
                            "ON CONFLICT ({}) {}; TRUNCATE colbatch_stage").format(
            self._ident(self.table), cols, keys, cols, keys, keys, action))

    def write(self, batch: Batch) -> None:
        """COPY one batch as one unit with its ledger row and rejects part in one transaction (retried if transient).

        On parallel streams the unit goes to a stream thread, and this waits only while `streams`
        units are in flight; a failed unit's error is raised by a later call (or by `commit`).
        """
        assert self._job is not None
        job = self._job
        while self._inflight and (self._inflight[0].done() or len(self._inflight) >= self.streams):
            self._inflight.popleft().result()()  # a free stream first: at most `streams` units sent, not committed
        end_row = batch.first_row + batch.rows_read
        self._mark(batch.split.id, end_row)
        # Positions of the rows in the batch as read (earlier steps may have filtered or rejected some).
        read_pos = batch.data[ROW_COL].to_numpy().astype(np.int64) if ROW_COL in batch.data.columns else None
        df = batch.data.select(self._columns)
        cast, lost = conform(df, self._types)
        positions = np.arange(df.height) if lost is None else np.flatnonzero(~lost)
        frame = cast if lost is None else cast.filter(pl.Series(~lost))
        frame, positions, pieces = self._screened(frame, positions)
        encoded = encode(frame, self._types, self._typnames)
        outcome: dict[str, Any] = {}
        turn = _Turn(self._last_turn) if self.streams > 1 else None
        self._last_turn = turn

        def work(cur: Any, attempt: int) -> UnitResult:
            if attempt and "result" in outcome and self._ledger.has_unit(cur, job.job_id, batch.split.id,
                                                                         batch.first_row):
                return outcome["result"]  # the last attempt's commit reached the server before the connection broke
            if self.mode == "upsert":
                self._create_stage(cur)
            result = self._loader.load(cur, encoded, pieces)
            if turn is not None:  # commit in input order: committed units stay a prefix
                if not turn.wait_previous():
                    raise SinkError("an earlier unit failed to load; this one was rolled back", table=self.table)
                if self._stopping:
                    raise SinkError("the run stopped; this unit was rolled back", table=self.table)
            bad = [(int(positions[b.index]), f"SQLSTATE {b.sqlstate}: {b.message}") for b in result.bad]
            if lost is not None:
                bad += [(int(i), "SQLSTATE 22003: value out of range for the column's PostgreSQL type")
                        for i in np.flatnonzero(lost)]
            bad.sort()
            part = self._cut(batch, df, bad, read_pos, outcome) if self.reject_units is not None else None
            self._ledger.record(cur, job, self.describe(), batch.split.id, batch.first_row, batch.rows_read,
                                result.loaded, len(bad), rejects=part)
            outcome["result"], outcome["bad"] = result, bad
            return result

        def settle(result: UnitResult) -> None:
            self._rows += result.loaded
            bad = outcome["bad"]
            if outcome.get("part"):
                self._parts.append(outcome["part"])
            if self.reject_units is not None:
                self._rejected += len(bad)  # already with the runner's rejects, in the committed part
            elif bad:
                self._reject(batch, df, bad, read_pos)

        what = f"rows {batch.first_row}+ of split `{batch.split.id}`"
        if turn is None:
            settle(self._transact(work, what))
            return

        def stream() -> Callable[[], None]:
            self._local.stream, self._local.conn = True, None
            ok = False
            try:
                result = self._transact(work, what)
                ok = True
                return lambda: settle(result)
            finally:
                turn.finish(ok)
                conn, self._local.conn = self._local.conn, None
                if conn is not None:
                    self._pool.putconn(conn)  # rolled back by the pool if a failure left it in a transaction

        assert self._executor is not None
        self._inflight.append(self._executor.submit(stream))

    def _drain(self) -> None:
        """Wait for the units in flight, in order; raises the first unit's error."""
        while self._inflight:
            self._inflight.popleft().result()()

    def _cut(self, batch: Batch, df: pl.DataFrame, bad: list[tuple[int, str]], read_pos: np.ndarray | None,
             outcome: dict[str, Any]) -> str | None:
        """Inside the unit's transaction: publish the rejects part of the unit (its own load rejects included).

        The part is cut once per unit; a retried transaction names the same part, after checking that
        the server refused the same rows again (the attempts see the same table: the failed one rolled back).
        """
        assert self.reject_units is not None
        if "cut" in outcome:
            if [i for i, _ in bad] != outcome["cut"]:
                raise SinkError(f"PostgreSQL refused other rows of rows {batch.first_row}+ of split "
                                f"`{batch.split.id}` when the unit was retried (was another session writing to "
                                f"`{self.table}`?); run the job again with resume", table=self.table)
            return outcome["part"]
        if bad:
            self.reject_units.collector.add(self._reject_frame(batch, df, bad, read_pos),
                                            at=(batch.split.index, batch.first_row))
        outcome["part"] = self.reject_units.cut(batch.split.index, batch.first_row + batch.rows_read)
        outcome["cut"] = [i for i, _ in bad]
        return outcome["part"]

    def _screened(self, frame: pl.DataFrame, positions: np.ndarray
                  ) -> tuple[pl.DataFrame, np.ndarray, list[tuple[int, int]] | None]:
        """Move the rows the screen suspects to the end, to be COPYed apart; returns rows, positions, pieces."""
        suspect = self._screen.suspects(frame) if self._screen else None
        if suspect is None:
            return frame, positions, None
        if self.mode == "upsert" and frame.select(self.keys).is_duplicated().any():
            return frame, positions, None  # the last row of a key must stay last: keep the unit's order
        self.stats.suspects += int(suspect.sum())
        order = np.concatenate([np.flatnonzero(~suspect), np.flatnonzero(suspect)])
        good = frame.height - int(suspect.sum())
        return frame[order], positions[order], [(0, good), (good, frame.height)]

    def _create_stage(self, cur: Any) -> None:
        from psycopg import sql

        cols = sql.SQL(", ").join(map(sql.Identifier, self._columns))
        cur.execute(sql.SQL("CREATE TEMP TABLE colbatch_stage ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA")
                    .format(cols, self._ident(self.table)))

    def _reject(self, batch: Batch, df: pl.DataFrame, bad: list[tuple[int, str]], read_pos: np.ndarray | None) -> None:
        self._rejected += len(bad)
        if self.on_reject is not None:
            self.on_reject(self._reject_frame(batch, df, bad, read_pos))

    def _reject_frame(self, batch: Batch, df: pl.DataFrame, bad: list[tuple[int, str]],
                      read_pos: np.ndarray | None) -> pl.DataFrame:
        """Load rejects of `batch` (positions in `df` with reasons), with their source lines."""
        idx = np.array([i for i, _ in bad], dtype=np.int64)
        reasons = pl.Series("_reason", [scrub(r, self._dsn) for _, r in bad], dtype=pl.String)
        lines = batch.lines_of(idx if read_pos is None else read_pos[idx])
        return reject_frame(source=batch.split.path or batch.split.id, lines=lines, stage="load", reasons=reasons,
                            values=df[idx])

    def split_done(self, split: Split, rows: int) -> None:
        """Mark `split` complete in the ledger, so a resumed run skips it without reading it.

        Rejects of records after the split's last unit (a last batch rejected whole) go in a part named here.
        """
        assert self._job is not None
        job = self._job
        self._drain()  # the split's units commit before it is marked complete
        part = self.reject_units.cut(split.index, rows) if self.reject_units is not None else None
        self._transact(lambda cur, _: self._ledger.record(cur, job, self.describe(), split.id, rows, 0, 0, 0,
                                                          complete=True, rejects=part), f"closing split `{split.id}`")
        if part:
            self._parts.append(part)

    def commit(self) -> SinkResult:
        """Units are already committed; `replace` now swaps the staging table in, atomically."""
        assert self._job is not None
        job = self._job
        self._drain()
        if self.reject_units is not None:
            # Before the ledger says finished: a kill in between redoes this merge, from the same parts.
            self.reject_units.publish(sorted(set(self._parts)))
        if self.mode == "replace":
            self._transact(self._swap, "replacing the table")
        else:
            self._transact(lambda cur, _: self._ledger.finish(cur, job, self.describe()), "finishing the job")
        self._close()
        if self.reject_units is not None:
            self.reject_units.cleanup()
        return SinkResult(rows=self._rows, target=self.describe(), rejected=self._rejected)

    def _swap(self, cur: Any, _: int) -> None:
        from psycopg import sql

        assert self._job is not None
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self._ident(self.table)))
        cur.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(self._ident(self._load_table),
                                                                  sql.Identifier(self.table)))
        self._ledger.forget(cur, self._job.job_id)
        self._ledger.finish(cur, self._job, self.describe())

    def _close(self) -> None:
        self._drop_connection()
        executor, pool, self._executor, self._pool = self._executor, self._pool, None, None
        if executor is not None:
            executor.shutdown(wait=True)
        if pool is not None:
            pool.close()
        self._unlock()
        if self._screen is not None:
            self._screen.close()
            self._screen = None

    def abort(self, error: BaseException | None) -> None:
        """Roll back the open unit (committed units stay, recorded in the ledger for resume); never raises."""
        self._stopping = True  # units in flight that have not committed roll back
        while self._inflight:
            self._inflight.popleft().exception()
        try:
            if self._conn is not None and not self._conn.closed:
                self._conn.rollback()
        except Exception:  # best effort: the connection may be gone already
            pass
        self._close()


def _staging_name(table: str, job_id: str) -> str:
    """Deterministic staging table for `replace` (so a resumed run finds it), within 63 bytes."""
    suffix = f"__colbatch_{job_id[:8]}"
    head = table.encode()[: MAX_IDENTIFIER_BYTES - len(suffix)].decode(errors="ignore")
    return head + suffix


__all__ = ["BadRow", "MODES", "PostgresSink"]
