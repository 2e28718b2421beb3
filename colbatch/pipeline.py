"""The lazy pipeline: a source, steps and a sink, built like a Polars LazyFrame and run with `.run()`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import polars as pl

from colbatch.errors import ColbatchError, ConfigError
from colbatch.ledger import JobIdentity, digest
from colbatch.rejects import DEFAULT_KEEP_REJECTS, RejectCollector
from colbatch.report import Report
from colbatch.runner import RunOptions, Runner, check_accounting
from colbatch.sinks.base import Sink
from colbatch.sinks.callable import DEFAULT_BACKOFF_S, DEFAULT_RETRIES, CallableSink
from colbatch.sinks.duckdb_table import DEFAULT_PART_ROWS as DEFAULT_DUCKDB_PART_ROWS
from colbatch.sinks.duckdb_table import DuckDBSink
from colbatch.sinks.files import DEFAULT_PART_ROWS, FileSink, FileSinkOptions, format_of
from colbatch.sinks.partitioned import PartitionedParquetSink
from colbatch.sources.base import Source
from colbatch.steps import (
    Rename,
    Step,
    make_cast,
    make_filter,
    make_select,
    make_validate,
    make_with_columns,
    step_definition,
)
from colbatch.udf.step import DEFAULT_CONCURRENCY, ExecutorName, MapBatches
from colbatch.udf.step import DEFAULT_RETRIES as DEFAULT_UDF_RETRIES

if TYPE_CHECKING:  # the aggregate stage (DuckDB) loads when a pipeline uses it
    from colbatch.aggregate import AggregateSpec

log = logging.getLogger("colbatch")


@dataclass(frozen=True)
class Pipeline:
    """A lazy batch job. Every method returns a new Pipeline; nothing runs until `.run()`.

    Example:
        >>> import colbatch as cb, polars as pl
        >>> report = (
        ...     cb.scan_csv("data/sample/events.csv")
        ...     .validate(pl.col("amount") > 0, name="positive_amount")
        ...     .with_columns((pl.col("amount") * 1.1).alias("value"))
        ...     .sink_parquet("out/events.parquet")
        ...     .run()
        ... )
    """

    source: Source
    steps: tuple[Step, ...] = ()
    sink: Sink | None = None
    rejects_sink: Sink | None = None
    options: RunOptions = field(default_factory=RunOptions)
    aggregation: AggregateSpec | None = None

    # -- steps ------------------------------------------------------------------------------

    def _add(self, step: Step) -> Pipeline:
        return replace(self, steps=(*self.steps, step))

    def filter(self, predicate: pl.Expr | str, *, name: str = "") -> Pipeline:
        """Keep rows where `predicate` is true; dropped rows are counted as filtered."""
        return self._add(make_filter(predicate, name))

    def with_columns(self, *exprs: pl.Expr | str, **named: pl.Expr | str) -> Pipeline:
        """Add or replace columns (Polars expressions or SQL strings like `"amount * 1.1 AS value"`)."""
        return self._add(make_with_columns(exprs, named))

    def select(self, *exprs: pl.Expr | str) -> Pipeline:
        """Keep only these columns or expressions."""
        return self._add(make_select(exprs))

    def rename(self, mapping: Mapping[str, str]) -> Pipeline:
        """Rename columns."""
        return self._add(Rename(mapping=dict(mapping), name="rename"))

    def cast(self, dtypes: Mapping[str, Any]) -> Pipeline:
        """Cast columns; values that do not fit are rejected with stage `cast`."""
        return self._add(make_cast(dtypes))

    def validate(self, rule: pl.Expr | str, *, name: str | None = None) -> Pipeline:
        """Reject rows where `rule` is false or null, with `name` as the reason."""
        return self._add(make_validate(rule, name))

    # -- aggregate --------------------------------------------------------------------------

    def aggregate(self, sql: str | None = None, *, by: Sequence[str] | str | None = None,
                  aggs: Sequence[pl.Expr | str] | None = None) -> Pipeline:
        """Aggregate the transformed stream with DuckDB; the result goes to the sink.

        Give DuckDB SQL over the table `input`, or the Polars-shaped `by=` / `aggs=` (simple column
        aggregations such as `pl.col("x").sum().alias("total")`, `pl.len()`, or SQL strings), which is
        translated to SQL. DuckDB pulls the stream batch by batch and spills past `memory_limit`
        (run options `memory_limit`, `threads`, `temp_directory`).

        Example:
            >>> (cb.scan_csv("data/sample/events.csv")
            ...    .aggregate(by="type", aggs=[pl.col("amount").sum().alias("total"), pl.len().alias("n")])
            ...    .sink_parquet("out/totals.parquet").run())
        """
        if (sql is None) == (by is None and aggs is None):
            raise ConfigError("`aggregate` takes either a SQL string or `by=`/`aggs=`, not both and not neither")
        if self.aggregation is not None:
            raise ConfigError("the pipeline already has an aggregate stage; combine both into one query")
        if sql is None:
            from colbatch.aggregate import aggregate_sql

            sql = aggregate_sql(by or [], aggs or [])
        if not isinstance(sql, str) or not sql.strip():
            raise ConfigError(f"`aggregate` sql must be a non-empty string, got {sql!r}", value=sql)
        from colbatch.aggregate import AggregateSpec

        return replace(self, aggregation=AggregateSpec(sql))

    def map_batches(self, fn: Callable[[pl.DataFrame], pl.DataFrame] | type, *, workers: int = 1,
                    executor: ExecutorName | Executor | Any = "auto", ordered: bool = True,
                    retries: int = DEFAULT_UDF_RETRIES, timeout: float | None = None,
                    concurrency: int = DEFAULT_CONCURRENCY, isolate_rows: bool = False,
                    schema: Mapping[str, Any] | None = None, max_in_flight: int | None = None,
                    name: str = "") -> Pipeline:
        """Apply a Python function `fn(pl.DataFrame) -> pl.DataFrame` to every batch.

        `fn` may be a class: it is instantiated once per worker and its instances
        are called with each batch. When `fn` raises, the batch's rows are
        rejected with stage `udf` (bisected down to the failing rows with
        `isolate_rows=True`); a batch whose worker died or ran past `timeout`
        seconds is retried `retries` times, then rejected.

        Args:
            fn: The function or class.
            workers: Worker processes; more than one makes `"processes"` the default executor.
            executor: `"inline"`, `"threads"` (I/O-bound work, `concurrency` threads), `"processes"`,
                a `concurrent.futures.Executor` or a `dask.distributed.Client`.
            ordered: Keep the input order of batches (else emit them as they finish).
            retries: Attempts after a worker is lost or a batch times out.
            timeout: Seconds a batch may run; None for no limit.
            concurrency: Threads of the `"threads"` executor.
            isolate_rows: Bisect a failing batch so that only the rows that fail are rejected.
            schema: The output schema, `{column: dtype}`; by default `fn` is called once on an empty frame.
            max_in_flight: Batches submitted and not yet collected (default: 2 per worker).
            name: The step's name in the report (default: the function's name).

        Example:
            >>> def score(df: pl.DataFrame) -> pl.DataFrame:
            ...     return df.with_columns(pl.col("type").map_elements(len, return_dtype=pl.Int64).alias("n"))
            >>> cb.scan_csv("data/sample/events.csv").map_batches(score, workers=2).sink_parquet("out.parquet")
        """
        return self._add(MapBatches(fn=fn, workers=workers, executor=executor, ordered=ordered, retries=retries,
                                    timeout=timeout, concurrency=concurrency, isolate_rows=isolate_rows,
                                    schema=schema, max_in_flight=max_in_flight, name=name))

    # -- sinks ------------------------------------------------------------------------------

    def _sink(self, sink: Sink) -> Pipeline:
        return replace(self, sink=sink)

    def sink_parquet(self, path: str | os.PathLike, *, compression: str = "zstd", compression_level: int | None = None,
                     row_group_size: int | None = None, partition_by: Sequence[str] | str | None = None,
                     part_rows: int = DEFAULT_PART_ROWS) -> Pipeline:
        """Write Parquet: one file (`out.parquet`), a directory of parts, or hive partitions.

        In directory mode a part holds at most `part_rows` rows and is the unit a resumed run redoes.
        """
        if partition_by:
            keys = [partition_by] if isinstance(partition_by, str) else list(partition_by)
            return self._sink(PartitionedParquetSink(path, partition_by=keys, compression=compression,
                                                     row_group_size=row_group_size))
        opts = FileSinkOptions(compression=compression, compression_level=compression_level,
                               row_group_size=row_group_size)
        return self._sink(FileSink(path, format="parquet", options=opts, part_rows=part_rows))

    def sink_csv(self, path: str | os.PathLike, *, separator: str = ",", include_header: bool = True,
                 compression: Literal["gzip", "zstd", "uncompressed"] | None = None,
                 part_rows: int = DEFAULT_PART_ROWS, escape_formulas: bool = False) -> Pipeline:
        """Write CSV; `.csv.gz` / `.csv.zst` paths are compressed; a directory gets parts of `part_rows` rows.

        With `escape_formulas=True`, text cells starting with `= + - @`, tab or CR get a leading `'`
        so spreadsheet programs show them instead of evaluating them (CSV formula injection).
        """
        opts = FileSinkOptions(compression=compression, separator=separator, include_header=include_header,
                               escape_formulas=escape_formulas)
        return self._sink(FileSink(path, format="csv", options=opts, part_rows=part_rows))

    def sink_ndjson(self, path: str | os.PathLike, *,
                    compression: Literal["gzip", "zstd", "uncompressed"] | None = None,
                    part_rows: int = DEFAULT_PART_ROWS) -> Pipeline:
        """Write JSON Lines; `.jsonl.gz` paths are compressed; a directory gets parts of `part_rows` rows."""
        return self._sink(FileSink(path, format="ndjson", options=FileSinkOptions(compression=compression),
                                   part_rows=part_rows))

    def foreach_batch(self, fn: Callable[[pl.DataFrame], Any], *, retries: int = DEFAULT_RETRIES,
                      backoff_s: float = DEFAULT_BACKOFF_S) -> Pipeline:
        """Call `fn(df)` for every batch (push to an API or queue), retrying failures with backoff."""
        return self._sink(CallableSink(fn, retries=retries, backoff_s=backoff_s))

    def sink_duckdb(self, path: str | os.PathLike, table: str, *,
                    mode: Literal["append", "create", "replace"] = "append",
                    part_rows: int = DEFAULT_DUCKDB_PART_ROWS) -> Pipeline:
        """Insert into a DuckDB table, visible only on commit; a killed run resumes (units of `part_rows` rows).

        `mode`: `append` (create the table when missing), `create` (fail when it exists) or
        `replace` (swap its contents on commit). Any table name is safe: it is quoted.

        Example:
            >>> cb.scan_csv("data/sample/events.csv").sink_duckdb("out/events.duckdb", "events").run()
        """
        return self._sink(DuckDBSink(path, table, mode=mode, part_rows=part_rows))

    def sink_postgres(self, dsn: str, table: str, *, mode: Literal["append", "create", "replace", "upsert"] = "append",
                      key: str | Sequence[str] | None = None, schema: str | None = None, retries: int | None = None,
                      **options: Any) -> Pipeline:
        """Load into a PostgreSQL table with binary COPY, exactly once per batch (see `colbatch.sinks.postgres`).

        Example:
            >>> cb.scan_csv("events.csv").sink_postgres("postgresql://me@db/app", "events", mode="upsert", key="id")
        """
        from colbatch.sinks.postgres import PostgresSink

        if retries is not None:
            options["retries"] = retries
        return self._sink(PostgresSink(dsn, table, mode=mode, key=key, schema=schema, **options))

    def sink_rejects(self, path: str | os.PathLike) -> Pipeline:
        """Write every rejected row to Parquet or CSV at `path`."""
        fmt = format_of(os.fspath(path))
        if fmt not in ("parquet", "csv", "ndjson"):
            raise ConfigError(f"rejects path `{path}` must end in .parquet, .csv, .csv.gz or .jsonl")
        return replace(self, rejects_sink=FileSink(path, format=fmt))

    def with_options(self, **options: Any) -> Pipeline:
        """Set run options (`batch_size`, `max_error_rate`, `max_errors`, `memory_limit`, `progress`, `threads`,
        `temp_directory`, `on_progress`, `on_warning`, `executor`: a `dask.distributed.Client` or
        `"tcp://HOST:PORT"` runs one task per split)."""
        if options.get("memory_limit") is not None:
            from colbatch.config import parse_size  # config imports this module

            options = {**options, "memory_limit": parse_size(options["memory_limit"], key="memory_limit")}
        try:
            return replace(self, options=replace(self.options, **options))
        except TypeError as exc:
            valid = ", ".join(RunOptions.__dataclass_fields__)
            raise ConfigError(f"unknown run option in {sorted(options)}; valid options: {valid}") from exc

    # -- run --------------------------------------------------------------------------------

    def schema(self) -> pl.Schema:
        """The output schema, computed without reading data."""
        schema = self.source.schema
        for step in self.steps:
            schema = step.output_schema(schema)
        if self.aggregation is not None:
            schema = self.aggregation.output_schema(schema)
        return schema

    def job_identity(self) -> JobIdentity:
        """The job's name for ledgers: its output, and a fingerprint of its definition."""
        assert self.sink is not None
        definition = {
            "source": self.source.describe(),
            "splits": [[s.id, s.size_bytes] for s in self.source.splits()],
            "schema": {k: str(v) for k, v in self.source.schema.items()},
            "steps": [step_definition(s) for s in self.steps],
            "sink": self.sink.describe(),
        }
        return JobIdentity(job_id=digest(self.sink.describe()), fingerprint=digest(definition), description=definition)

    def run(self, *, raise_on_error: bool = True, resume: bool = False, overwrite: bool = False,
            **options: Any) -> Report:
        """Run the job and return its Report.

        Options given here override `with_options`. When the run fails the
        error is raised with the report attached as `error.report`, unless
        `raise_on_error=False`, in which case the failed report is returned.
        With `resume=True`, work an interrupted run of the same job committed
        (per the sink's ledger) is skipped, so the output holds every row once.
        A job whose output already holds its complete result does nothing
        (`report.skipped`) unless `overwrite=True`.

        Hooks: `on_progress=fn` gets a `cb.Progress` after the first batch, at most twice a
        second after that, and with `done=True` when the run succeeded; `on_warning=fn` gets
        a `cb.RunWarning` when rejects pass half of `max_error_rate`/`max_errors`, RSS passes
        90% of the memory limit, or throughput drops sharply (each once per run; also logged
        and kept in `report.warnings`). A hook that raises stops the run uncommitted.

        Example:
            >>> report = pipeline.run(on_progress=lambda p: print(p.rows_written, p.fraction),
            ...                       on_warning=lambda w: print(w.kind, w.message))
        """
        pipeline = self.with_options(**options) if options else self
        if pipeline.sink is None:
            raise ConfigError("the pipeline has no sink; call .sink_parquet/.sink_csv/.sink_ndjson/.foreach_batch first")
        sink = pipeline.sink.fresh()
        if pipeline.aggregation is not None:
            from colbatch.aggregate import AggregateSink, fill_report

            o = pipeline.options
            sink = AggregateSink(pipeline.aggregation, sink, memory_limit=o.memory_limit, threads=o.threads,
                                 temp_directory=o.temp_directory)
        report = Report(source=pipeline.source.describe(), sink=sink.describe())
        rejects_sink = pipeline.rejects_sink.fresh() if pipeline.rejects_sink is not None else None
        collector = RejectCollector(rejects_sink, columns=list(pipeline.source.schema),
                                    keep=DEFAULT_KEEP_REJECTS)
        if resume and not sink.supports_resume:
            raise ConfigError(f"`resume` needs an output with a ledger (a file or directory, DuckDB or PostgreSQL); "
                              f"{sink.describe()} keeps none, so run without resume to write it again")
        job = pipeline.job_identity() if sink.supports_resume else None
        steps = pipeline.steps
        if job is not None and any(isinstance(s, MapBatches) and not s.ordered for s in steps):
            # A ledger names committed work by (split, first row): batches must reach the sink in order.
            log.info("map_batches(ordered=False) runs ordered: %s keeps a resume ledger", sink.describe())
            steps = tuple(replace(s, ordered=True) if isinstance(s, MapBatches) else s for s in steps)
        # In-memory data can change under the same description, so "already done" is only
        # trusted for stable sources (files, tables); resume works for any re-readable source.
        runner: Any = Runner
        if pipeline.options.executor is not None:
            from colbatch.distributed import make_runner as runner  # whole split tasks on a Dask cluster
        runner = runner(pipeline.source, steps, sink, collector, pipeline.options,
                        job=job, resume=resume, overwrite=overwrite or not pipeline.source.stable)
        try:
            try:
                runner.run(report)
            finally:
                if pipeline.aggregation is not None:
                    fill_report(report, sink)
            report.status = "succeeded"
        except BaseException as exc:
            report.status = "failed"
            report.error = str(exc)
            report.error_type = type(exc).__name__
            if isinstance(exc, ColbatchError):
                exc.report = report  # type: ignore[attr-defined]
            log.info("run failed: %s", exc)
            if raise_on_error or not isinstance(exc, Exception):
                raise
        finally:
            report.warnings = [*report.warnings, *pipeline.source.notes.warnings]
        check_accounting(report)
        if report.rows_rejected:
            log.warning("%d rows rejected (%s)", report.rows_rejected,
                        ", ".join(f"{k}: {v}" for k, v in report.rejects_by_stage.items()))
        return report
