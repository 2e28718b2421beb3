"""The `map_batches` step: a Python function over whole batches, with where and how it runs."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl

from colbatch.errors import ConfigError, UdfError
from colbatch.schema import parse_dtype
from colbatch.steps import Step, StepResult
from colbatch.udf import resolve_executor
from colbatch.udf.worker import Failure, call, function_name, instantiate

ExecutorName = Literal["auto", "inline", "threads", "processes"]

# Dask scheduler addresses: the step connects when it starts and disconnects when it ends.
DASK_SCHEMES = ("tcp://", "tls://")
# One retry: a worker lost once is usually bad luck (memory pressure, a node going away);
# a batch that kills its worker twice is poison, and more retries would only kill more workers.
DEFAULT_RETRIES = 1
# I/O-bound UDFs (HTTP calls) wait, not compute: 8 concurrent calls hide typical latencies
# without flooding a remote service.
DEFAULT_CONCURRENCY = 8
# Two batches per worker: one running, one queued, so a worker never idles on the driver.
DEFAULT_IN_FLIGHT_PER_WORKER = 2
# An input that is one batch this small finishes inline faster than a process pool starts.
DEFAULT_INLINE_ROWS = 20_000


@dataclass
class MapBatches(Step):
    """Apply `fn(pl.DataFrame) -> pl.DataFrame` to every batch (see `Pipeline.map_batches`)."""

    fn: Any = None
    workers: int = 1
    executor: ExecutorName | Executor | Any = "auto"
    ordered: bool = True
    retries: int = DEFAULT_RETRIES
    timeout: float | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    isolate_rows: bool = False
    schema: Mapping[str, Any] | None = None
    max_in_flight: int | None = None
    inline_rows: int = DEFAULT_INLINE_ROWS
    kind: str = field(default="udf", init=False)
    needs_rows: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigError(f"`map_batches` needs a function or class, got {self.fn!r}", value=repr(self.fn))
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"`workers` must be a positive integer, got {self.workers!r}", value=self.workers)
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"`retries` must be a non-negative integer, got {self.retries!r}", value=self.retries)
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ConfigError(f"`timeout` must be a positive number of seconds, got {self.timeout!r}",
                              value=self.timeout)
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ConfigError(f"`concurrency` must be a positive integer, got {self.concurrency!r}",
                              value=self.concurrency)
        if (isinstance(self.executor, str) and self.executor not in ("auto", "inline", "threads", "processes")
                and not self.executor.startswith(DASK_SCHEMES)):
            raise ConfigError(f"`executor` {self.executor!r} is not valid; valid: auto, inline, threads, processes, "
                              "a concurrent.futures.Executor, a dask.distributed.Client or a Dask scheduler "
                              "address \"tcp://HOST:PORT\"", value=self.executor)
        if not self.name:
            self.name = function_name(self.fn).rsplit(":", 1)[-1]

    @property
    def function(self) -> str:
        """The function's `module:qualname`, as rejects and errors name it."""
        return function_name(self.fn)

    def resolved_executor(self) -> Any:
        """`"auto"` becomes processes with several workers, inline with one."""
        return resolve_executor(self.executor, self.workers)

    def in_flight(self) -> int:
        """Most batches submitted and not yet collected (the stage's backpressure)."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        parallel = self.concurrency if self.resolved_executor() == "threads" else self.workers
        return max(1, parallel * DEFAULT_IN_FLIGHT_PER_WORKER)

    def apply(self, df: pl.DataFrame) -> StepResult:
        """Run the function inline on one frame (schema probing and plain `Step` use)."""
        out = call(instantiate(self.fn), df)
        if isinstance(out, Failure):
            raise UdfError(f"udf `{self.function}` raised {out.error_type}: {out.message}", function=self.function,
                           error_type=out.error_type)
        return StepResult(out)

    def output_schema(self, schema: pl.Schema) -> pl.Schema:
        """The declared `schema`, or the function's output on an empty frame (run once, in the driver)."""
        if self.schema is not None:
            return pl.Schema({c: parse_dtype(t, column=c) for c, t in self.schema.items()})
        out = self.apply(pl.DataFrame(schema=schema)).data.schema
        unknown = [c for c, t in out.items() if t == pl.Null]
        if unknown:
            # An empty input gives untyped columns (`pl.Series(name, [])`); guessing would fail at the sink.
            raise UdfError(f"udf `{self.function}` gives column `{unknown[0]}` no type on an empty batch; give the "
                           f"Series a dtype or pass `schema=` to map_batches", function=self.function,
                           column=unknown[0])
        return out


def resolve_function(spec: str) -> Any:
    """Import `"package.module:function"` (or a class) for a job file's `udf` key."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"`udf` must look like \"package.module:function\", got {spec!r}", value=spec)
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"`udf` module `{module}` cannot be imported: {exc}", value=spec) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"`udf` module `{module}` has no attribute `{attr}`", value=spec)
        obj = getattr(obj, part)
    return obj
