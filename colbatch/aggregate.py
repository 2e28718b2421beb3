"""The aggregate stage: DuckDB SQL over the transformed stream, exposed to the query as the table `input`.

`AggregateSink` wraps the pipeline's real sink. Its `write` hands each batch
to a bounded queue; a DuckDB thread reads that queue as an Arrow
RecordBatchReader (`input`), so DuckDB pulls batches as it needs them and
nothing is materialised in Python. DuckDB's result streams, batch by batch,
into the inner sink from the same thread. `commit` ends the input, waits for
the query to finish and commits the inner sink; `abort` stops the query and
aborts the inner sink. DuckDB spills to `temp_directory` when its state
(e.g. many groups) outgrows `memory_limit`.

The Polars-shaped form `.aggregate(by=[...], aggs=[...])` is translated to
SQL (`aggregate_sql`), so both forms run the same way.
"""

from __future__ import annotations

import json
import queue
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from colbatch.lazy import duckdb
import polars as pl

from colbatch.lazy import pyarrow as pa
from colbatch.batch import Batch, Split
from colbatch.duck import connect, quote_ident
from colbatch.errors import ConfigError, SinkError
from colbatch.metrics import StageMetrics
from colbatch.diagnose import diagnose
from colbatch.report import Report
from colbatch.sinks.base import Sink, SinkResult
from colbatch.steps import ROW_COL

INPUT_TABLE = "input"
# Batches waiting for DuckDB; the runner's own queues already bound bytes, two keeps DuckDB busy.
DEFAULT_AGG_QUEUE = 2
# DuckDB's result arrives in batches of this many rows (its own vector-friendly default).
DEFAULT_RESULT_ROWS = 122_880
# DuckDB aggregates come out as one logical split for the sink (one part file in directory mode).
RESULT_SPLIT = Split(index=0, id="aggregate")
_END = object()
_ABORT = object()

# Polars aggregation → DuckDB aggregate function; `{c}` is the quoted column.
_POLARS_AGGS = {
    "Sum": "sum({c})", "Mean": "avg({c})", "Min": "min({c})", "Max": "max({c})", "Median": "median({c})",
    "First": "first({c})", "Last": "last({c})", "NUnique": "count(DISTINCT {c})", "Count": "count({c})",
}


class _Aborted(Exception):
    """Raised inside DuckDB's input iterator to stop the query on abort."""


# -- the Polars-shaped form --------------------------------------------------------------------


def aggregate_sql(by: Sequence[str] | str, aggs: Sequence[pl.Expr | str]) -> str:
    """Translate `by=[...]`, `aggs=[...]` into DuckDB SQL over `input`.

    `aggs` items are simple Polars aggregations of one column (`pl.col("x").sum().alias("total")`,
    `.mean() .min() .max() .median() .first() .last() .n_unique() .count() .std() .var()`, `pl.len()`)
    or SQL strings (`"sum(amount * 2) AS total"`), passed through as written.

    Example:
        >>> aggregate_sql(["type"], [pl.col("amount").sum().alias("total"), pl.len().alias("n")])
        'SELECT "type", sum("amount") AS "total", count(*) AS "n" FROM "input" GROUP BY "type"'
    """
    keys = [by] if isinstance(by, str) else list(by)
    if not aggs:
        raise ConfigError("`aggs` must name at least one aggregation")
    items = [quote_ident(k) for k in keys] + [_agg_item(a) for a in aggs]
    group = f" GROUP BY {', '.join(quote_ident(k) for k in keys)}" if keys else ""
    return f"SELECT {', '.join(items)} FROM {quote_ident(INPUT_TABLE)}{group}"


def _agg_item(agg: pl.Expr | str) -> str:
    if isinstance(agg, str):
        return agg
    if not isinstance(agg, pl.Expr):
        raise ConfigError(f"`aggs` items must be Polars expressions or SQL strings, got {type(agg).__name__}")
    with warnings.catch_warnings():  # the JSON form is marked unstable; it is only read here, never stored
        warnings.simplefilter("ignore")
        tree = json.loads(agg.meta.serialize(format="json"))
    alias = None
    if isinstance(tree, dict) and "Alias" in tree:
        tree, alias = tree["Alias"]
    sql = _agg_tree(tree)
    if sql is None:
        raise ConfigError(f"aggregation `{agg}` cannot be translated; use one column aggregation such as "
                          f"pl.col(\"x\").sum() or a SQL string such as \"sum(x * 2) AS total\"", expr=str(agg))
    name = alias if alias is not None else agg.meta.output_name()
    return f"{sql} AS {quote_ident(name)}"


def _agg_tree(tree: object) -> str | None:
    if tree == "Len":
        return "count(*)"
    if not (isinstance(tree, dict) and "Agg" in tree and isinstance(tree["Agg"], dict)):
        return None
    ((kind, arg),) = tree["Agg"].items()
    fn = ""
    if kind in ("Std", "Var"):
        arg, ddof = arg
        if ddof not in (0, 1):
            return None
        fn = ("stddev" if kind == "Std" else "var") + ("_samp" if ddof == 1 else "_pop")
    elif isinstance(arg, dict) and "input" in arg:
        arg = arg["input"]
    if not (isinstance(arg, dict) and set(arg) == {"Column"}):
        return None
    column = quote_ident(arg["Column"])
    if kind in ("Std", "Var"):
        return f"{fn}({column})"
    template = _POLARS_AGGS.get(kind)
    return template.format(c=column) if template else None


@dataclass(frozen=True)
class AggregateSpec:
    """The aggregate stage of a pipeline: DuckDB SQL over the table `input`."""

    sql: str

    def output_schema(self, schema: pl.Schema) -> pl.Schema:
        """The result's schema for an input of `schema`, planned by DuckDB on no rows.

        Raises:
            ConfigError: when DuckDB cannot plan the query (syntax, unknown column, wrong types).
        """
        con = connect(threads=1)
        try:
            con.register(INPUT_TABLE, _empty_arrow(schema))
            return pl.from_arrow(con.sql(self.sql).limit(0).to_arrow_table()).schema
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"aggregate sql does not fit the stream's columns {list(schema)}: {first}",
                              sql=self.sql) from exc
        finally:
            con.close()


def _empty_arrow(schema: pl.Schema) -> pa.Table:
    return pl.DataFrame(schema={c: t for c, t in schema.items() if c != ROW_COL}).to_arrow()


# -- the stage ---------------------------------------------------------------------------------


class AggregateSink(Sink):
    """Runs the aggregate query on the batches it receives and writes the result to `inner`.

    Args:
        spec: The query.
        inner: The sink that receives DuckDB's result.
        memory_limit: DuckDB's memory limit in bytes (None: DuckDB's default, 80% of RAM).
        threads: DuckDB threads (None: one per core).
        temp_directory: Where DuckDB spills (None: a private directory under the system temp dir,
            removed after the run).
    """

    name = "aggregate"

    def __init__(self, spec: AggregateSpec, inner: Sink, *, memory_limit: int | None = None,
                 threads: int | None = None, temp_directory: str | None = None) -> None:
        self.spec = spec
        self.inner = inner
        self.memory_limit = memory_limit
        self.threads = threads
        self.temp_directory = temp_directory
        self.stage = StageMetrics("aggregate")
        self.result_rows = 0
        self.inner_write_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=DEFAULT_AGG_QUEUE)
        self._thread: threading.Thread | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._error: BaseException | None = None
        self._own_temp: str | None = None
        self._pl_schema: pl.Schema | None = None
        self._arrow_schema: pa.Schema | None = None

    def describe(self) -> str:
        """One-line description for reports."""
        return f"{self.inner.describe()} (after a DuckDB aggregate)"

    def open(self, schema: pl.Schema) -> None:
        """Plan the query, open the inner sink with the result's schema and start the DuckDB thread."""
        self._pl_schema = pl.Schema({c: t for c, t in schema.items() if c != ROW_COL})
        self._arrow_schema = _empty_arrow(self._pl_schema).schema
        self.inner.open(self.spec.output_schema(self._pl_schema))
        temp = self.temp_directory
        if temp is None:
            temp = self._own_temp = tempfile.mkdtemp(prefix="colbatch-duckdb-")
        self._con = connect(memory_limit=self.memory_limit, threads=self.threads, temp_directory=temp)
        self._thread = threading.Thread(target=self._run, name="colbatch-aggregate", daemon=True)
        self._thread.start()

    def _input(self) -> Iterator[pa.RecordBatch]:
        while True:
            t0 = time.perf_counter()
            item = self._queue.get()
            self.stage.wait_s += time.perf_counter() - t0
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted()
            yield from item

    def _run(self) -> None:
        assert self._con is not None and self._arrow_schema is not None
        started = time.perf_counter()
        try:
            self._con.register(INPUT_TABLE, pa.RecordBatchReader.from_batches(self._arrow_schema, self._input()))
            for rb in self._con.sql(self.spec.sql).to_arrow_reader(DEFAULT_RESULT_ROWS):
                if not rb.num_rows:
                    continue
                t0 = time.perf_counter()
                self.inner.write(Batch(pl.from_arrow(rb), RESULT_SPLIT, rows_read=rb.num_rows))
                self.inner_write_s += time.perf_counter() - t0
                self.result_rows += rb.num_rows
        except BaseException as exc:  # handed to the runner's thread by _check
            self._error = exc
        finally:
            self.stage.busy_s = time.perf_counter() - started - self.stage.wait_s - self.inner_write_s

    def _check(self) -> None:
        if self._error is not None:
            raise _wrap(self._error)
        if self._thread is not None and not self._thread.is_alive():
            raise SinkError("the aggregate query stopped before its input ended")

    def _put(self, item: object) -> None:
        while True:
            self._check()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def write(self, batch: Batch) -> None:
        """Hand one batch to DuckDB (blocks while DuckDB is behind: backpressure)."""
        assert self._pl_schema is not None and self._arrow_schema is not None
        df = batch.data
        if df.schema != self._pl_schema:
            df = df.select(list(self._pl_schema)).cast(dict(self._pl_schema))
        if not df.height:
            return
        table = df.to_arrow()
        if table.schema != self._arrow_schema:
            table = table.cast(self._arrow_schema)
        self._put(table.to_batches())
        self.stage.rows_in += df.height
        self.stage.rows_out += df.height

    def commit(self) -> SinkResult:
        """End the input, wait for DuckDB's last result rows, then commit the inner sink."""
        assert self._thread is not None
        self._put(_END)
        self._thread.join()
        if self._error is not None:
            raise _wrap(self._error)
        self._close()
        t0 = time.perf_counter()
        result = self.inner.commit()
        self.inner_write_s += time.perf_counter() - t0
        return result

    def abort(self, error: BaseException | None) -> None:
        """Stop the query and abort the inner sink; never raises."""
        if self._thread is not None and self._thread.is_alive():
            while not self._queue.empty():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                self._queue.put(_ABORT, timeout=5)
            except queue.Full:
                pass
            if self._con is not None:
                self._con.interrupt()
            self._thread.join(timeout=30)
        self._close()
        self.inner.abort(error)

    def _close(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            try:
                con.close()
            except Exception:  # closing after an interrupted query may complain; the connection is gone anyway
                pass
        if self._own_temp is not None:
            shutil.rmtree(self._own_temp, ignore_errors=True)
            self._own_temp = None


def _wrap(exc: BaseException) -> BaseException:
    """DuckDB's errors become SinkError naming the stage; colbatch's own (e.g. from the inner sink) pass."""
    if isinstance(exc, duckdb.Error):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return SinkError(f"the aggregate query failed: {first}")
    return exc


def fill_report(report: Report, sink: AggregateSink) -> None:
    """Account for the aggregate stage in a report the runner filled as if `sink` were a plain sink.

    The runner counted the rows handed to the aggregate as written. They are
    moved to an `aggregate` stage (rows in = rows out = rows consumed by the
    query) and to `report.rows_aggregated`, which balances the totals:
    `rows_read = rows_aggregated + rows_filtered + rows_rejected`. The `write`
    stage then counts the result rows the inner sink received.
    """
    stages = list(report.stages)
    write = next((s for s in reversed(stages) if s.name == "write"), None)
    if write is None:
        return
    handed = StageMetrics("write", rows_in=sink.result_rows, rows_out=sink.result_rows,
                          busy_s=sink.inner_write_s, wait_s=sink.stage.busy_s + sink.stage.wait_s,
                          blocked_s=write.busy_s + write.blocked_s)
    stages[stages.index(write)] = handed
    stages.insert(stages.index(handed), sink.stage)
    report.stages = stages
    report.rows_aggregated = sink.stage.rows_in
    report.rows_written = sink.result_rows
    if report.bottleneck.get("resource") != "memory":  # memory facts are the runner's; keep that verdict
        report.bottleneck = diagnose(stages, report.elapsed_s, source=report.source, sink=report.sink,
                                     cpu=report.bottleneck.get("cpu"), gc_pause_s=report.gc.get("pause_s", 0.0))

