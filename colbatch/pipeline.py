"""The lazy pipeline: a source, steps and a sink, built like a Polars LazyFrame and run with `.run()`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import polars as pl

from colbatch.errors import ColbatchError, ConfigError
from colbatch.rejects import DEFAULT_KEEP_REJECTS, RejectCollector
from colbatch.report import Report
from colbatch.runner import RunOptions, Runner, check_accounting
from colbatch.sinks.base import Sink
from colbatch.sinks.callable import DEFAULT_BACKOFF_S, DEFAULT_RETRIES, CallableSink
from colbatch.sinks.files import FileSink, FileSinkOptions, format_of
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
)
from colbatch.udf.step import DEFAULT_CONCURRENCY, ExecutorName, MapBatches
from colbatch.udf.step import DEFAULT_RETRIES as DEFAULT_UDF_RETRIES

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
                     row_group_size: int | None = None, partition_by: Sequence[str] | str | None = None) -> Pipeline:
        """Write Parquet: one file (`out.parquet`), a directory of parts, or hive partitions."""
        if partition_by:
            keys = [partition_by] if isinstance(partition_by, str) else list(partition_by)
            return self._sink(PartitionedParquetSink(path, partition_by=keys, compression=compression,
                                                     row_group_size=row_group_size))
        opts = FileSinkOptions(compression=compression, compression_level=compression_level,
                               row_group_size=row_group_size)
        return self._sink(FileSink(path, format="parquet", options=opts))

    def sink_csv(self, path: str | os.PathLike, *, separator: str = ",", include_header: bool = True,
                 compression: Literal["gzip", "zstd", "uncompressed"] | None = None) -> Pipeline:
        """Write CSV; `.csv.gz` / `.csv.zst` paths are compressed."""
        opts = FileSinkOptions(compression=compression, separator=separator, include_header=include_header)
        return self._sink(FileSink(path, format="csv", options=opts))

    def sink_ndjson(self, path: str | os.PathLike, *,
                    compression: Literal["gzip", "zstd", "uncompressed"] | None = None) -> Pipeline:
        """Write JSON Lines; `.jsonl.gz` paths are compressed."""
        return self._sink(FileSink(path, format="ndjson", options=FileSinkOptions(compression=compression)))

    def foreach_batch(self, fn: Callable[[pl.DataFrame], Any], *, retries: int = DEFAULT_RETRIES,
                      backoff_s: float = DEFAULT_BACKOFF_S) -> Pipeline:
        """Call `fn(df)` for every batch (push to an API or queue), retrying failures with backoff."""
        return self._sink(CallableSink(fn, retries=retries, backoff_s=backoff_s))

    def sink_rejects(self, path: str | os.PathLike) -> Pipeline:
        """Write every rejected row to Parquet or CSV at `path`."""
        fmt = format_of(os.fspath(path))
        if fmt not in ("parquet", "csv", "ndjson"):
            raise ConfigError(f"rejects path `{path}` must end in .parquet, .csv, .csv.gz or .jsonl")
        return replace(self, rejects_sink=FileSink(path, format=fmt))

    def with_options(self, **options: Any) -> Pipeline:
        """Set run options (`batch_size`, `max_error_rate`, `max_errors`, `memory_limit`, `progress`)."""
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
        return schema

    def run(self, *, raise_on_error: bool = True, **options: Any) -> Report:
        """Run the job and return its Report.

        Options given here override `with_options`. When the run fails the
        error is raised with the report attached as `error.report`, unless
        `raise_on_error=False`, in which case the failed report is returned.
        """
        pipeline = self.with_options(**options) if options else self
        if pipeline.sink is None:
            raise ConfigError("the pipeline has no sink; call .sink_parquet/.sink_csv/.sink_ndjson/.foreach_batch first")
        report = Report(source=pipeline.source.describe(), sink=pipeline.sink.describe())
        collector = RejectCollector(pipeline.rejects_sink, columns=list(pipeline.source.schema),
                                    keep=DEFAULT_KEEP_REJECTS)
        runner = Runner(pipeline.source, pipeline.steps, pipeline.sink, collector, pipeline.options)
        try:
            runner.run(report)
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
            report.warnings = list(pipeline.source.notes.warnings)
        check_accounting(report)
        if report.rows_rejected:
            log.warning("%d rows rejected (%s)", report.rows_rejected,
                        ", ".join(f"{k}: {v}" for k, v in report.rejects_by_stage.items()))
        return report
