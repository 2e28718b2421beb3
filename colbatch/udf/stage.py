"""The UDF stage of the runner: bounded, ordered, crash-safe `map_batches` over a stream of batches.

At most `step.in_flight()` batches are submitted and not yet collected, so
memory does not grow with the input. A batch whose function raises is
rejected (or bisected down to the failing rows with `isolate_rows`); a batch
whose function raised `MemoryError` is run again in halves until the parts
fit, and the runner's batch size shrinks (`on_memory_error`); a batch
whose worker died or timed out is retried up to `retries` times, then
rejected. Every rejected row carries stage `udf`, the function and the error.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

import polars as pl

from colbatch.lazy import numpy as np
from colbatch.batch import Batch
from colbatch.metrics import StageMetrics
from colbatch.rejects import reject_frame
from colbatch.steps import ROW_COL
from colbatch.udf import StageStopped
from colbatch.udf.backends import Backend, InlineBackend, make_backend
from colbatch.udf.procpool import TaskTimeout, WorkerLost
from colbatch.udf.step import MapBatches
from colbatch.udf.worker import Failure

# How often a wait for results wakes up to notice that the run was stopped elsewhere.
STOP_POLL_S = 0.2


@dataclass(eq=False)  # identity: items are removed from the in-flight deque by object
class _Item:
    batch: Batch
    df: pl.DataFrame  # the function's input, without the row-position column
    rows: np.ndarray | None  # row positions within the batch as read, when the batch carried them
    future: Future
    started: float
    attempts: int = 0

    @property
    def positions(self) -> np.ndarray:
        """Row positions within the batch as read, for reject lines and the output's row column."""
        if self.rows is None:
            # Made only when needed: 1,000-row batches that fail nothing and keep no row column
            # paid ~20 us each for an `arange` they never used.
            self.rows = np.arange(self.df.height, dtype="int64")
        return self.rows


class UdfStage:
    """Runs one `MapBatches` step over a stream of batches; see the module docstring."""

    def __init__(self, step: MapBatches, metrics: StageMetrics, on_reject: Callable[..., None],
                 stop: threading.Event, *, keep_rows: bool = True,
                 on_memory_error: Callable[[int], None] | None = None) -> None:
        self.step = step
        # Whether a later step needs the row positions (to name reject lines); without one, the output
        # skips the position column, a copy of every batch that I/O-bound UDFs would pay per batch.
        self.keep_rows = keep_rows
        self._on_memory_error = on_memory_error
        self.metrics = metrics
        self._on_reject = on_reject
        self._stop = stop
        self._backend: Backend | None = None
        self._limit = step.in_flight()
        self._empty: pl.DataFrame | None = None

    @property
    def backend(self) -> Backend | None:
        """The backend in use once the first batch arrived."""
        return self._backend

    def close(self) -> None:
        """Shut the backend down (kills workers still busy with abandoned batches)."""
        if self._backend is not None:
            self._backend.shutdown()
            stats = getattr(self._backend, "stats", None)
            if stats is not None and stats.tasks:
                self.metrics.worker_cpu_s = stats.fn_cpu_s
                self.metrics.transport_cpu_s = stats.worker_transport_cpu_s

    # -- stream -----------------------------------------------------------------------------

    def run(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """Yield the transformed batches (in input order when `ordered`)."""
        m = self.metrics
        it = iter(batches)
        first = self._next(it)
        if first is None:
            return
        second = self._next(it)
        self._backend = self._choose_backend(first, single=second is None)
        pending = [b for b in (first, second) if b is not None]
        inflight: collections.deque[_Item] = collections.deque()
        exhausted = second is None
        while True:
            while len(inflight) < self._limit and (pending or not exhausted):
                batch = pending.pop(0) if pending else self._next(it)
                if batch is None:
                    exhausted = True
                    break
                inflight.append(self._submit(batch))
            if not inflight:
                return
            t0 = time.perf_counter()
            item = self._collect(inflight)
            out = self._finish(item)
            m.busy_s += time.perf_counter() - t0
            if out is not None:
                inflight.remove(item)
                yield out

    def _next(self, it: Iterator[Batch]) -> Batch | None:
        t0 = time.perf_counter()
        batch = next(it, None)
        self.metrics.wait_s += time.perf_counter() - t0
        return batch

    def _choose_backend(self, first: Batch, *, single: bool) -> Backend:
        step = self.step
        executor = step.resolved_executor()
        small = single and first.num_rows <= step.inline_rows and step.timeout is None
        if executor == "processes" and small:
            # One small batch: a pool would cost more to start than the work itself.
            return InlineBackend(step.fn)
        return make_backend(step.fn, executor, workers=step.workers, concurrency=step.concurrency,
                            timeout=step.timeout)

    def _submit(self, batch: Batch) -> _Item:
        df = batch.data
        positions = None
        if ROW_COL in df.columns:
            positions = df[ROW_COL].to_numpy().astype("int64")
            df = df.drop(ROW_COL)
        t0 = time.perf_counter()
        future = self._backend.submit(df)
        # The inline backend runs the function inside submit; that is the stage's busy time too.
        self.metrics.busy_s += time.perf_counter() - t0
        return _Item(batch, df, positions, future, time.perf_counter())

    # -- results ----------------------------------------------------------------------------

    def _timeout_left(self, item: _Item) -> float | None:
        if self.step.timeout is None or self._backend.enforces_timeout:
            return None
        return item.started + self.step.timeout - time.perf_counter()

    def _collect(self, inflight: collections.deque[_Item]) -> _Item:
        """Block until the head item (ordered) or any item is done or has timed out."""
        candidates = [inflight[0]] if self.step.ordered else list(inflight)
        for c in candidates:  # already done: skip `wait`'s set-up (~30 us a batch, much for small API batches)
            if c.future.done():
                return c
        while True:
            done, _ = wait([c.future for c in candidates], timeout=STOP_POLL_S, return_when=FIRST_COMPLETED)
            for c in candidates:
                if c.future in done:
                    return c
                left = self._timeout_left(c)
                if left is not None and left <= 0:
                    # A thread cannot be killed: abandon its batch, the thread finishes on its own.
                    c.future = _failed(TaskTimeout(f"the batch ran longer than timeout={self.step.timeout:g}s"))
                    return c
            if self._stop.is_set():
                raise StageStopped()

    def _finish(self, item: _Item) -> Batch | None:
        """The output batch, or None when the item was resubmitted (it stays in place)."""
        try:
            result = item.future.result()
        except (WorkerLost, TaskTimeout) as exc:
            item.attempts += 1
            if item.attempts <= self.step.retries:
                item.future, item.started = self._backend.submit(item.df), time.perf_counter()
                return None
            result = Failure(type(exc).__name__, f"{exc} (after {item.attempts} attempt(s))", "")
        if isinstance(result, Failure) and item.df.height > 1 and (self.step.isolate_rows or _oom(result)):
            if _oom(result) and self._on_memory_error is not None:
                self._on_memory_error(item.df.height)
            return self._bisect(item)
        m = self.metrics
        m.rows_in += item.df.height
        if isinstance(result, Failure):
            self._reject(item, item.positions, item.df, result)
            m.rows_rejected += item.df.height
            return self._output(item, [])
        return self._output(item, [(0, item.df.height, result)])

    def _bisect(self, item: _Item) -> Batch:
        """Split a failed batch until the parts succeed or the failing rows are alone; reject those, keep the rest.

        A part that ran out of memory is always split again; one that failed otherwise only with
        `isolate_rows` (else it is rejected whole). Each row ends up in exactly one output or reject.
        """
        m = self.metrics
        m.rows_in += item.df.height
        parts: list[tuple[np.ndarray, int, pl.DataFrame]] = []
        todo = [(0, item.df.height)]
        while todo:
            halves = []
            for lo, hi in todo:
                mid = (lo + hi) // 2
                halves += [(lo, mid), (mid, hi)]
            futures = [self._backend.submit(item.df.slice(lo, hi - lo)) for lo, hi in halves]
            todo = []
            for (lo, hi), fut in zip(halves, futures):
                result = self._wait_one(fut)
                if not isinstance(result, Failure):
                    parts.append((lo, hi, result))
                elif hi - lo > 1 and (self.step.isolate_rows or _oom(result)):
                    if _oom(result) and self._on_memory_error is not None:
                        self._on_memory_error(hi - lo)
                    todo.append((lo, hi))
                else:
                    self._reject(item, item.positions[lo:hi], item.df.slice(lo, hi - lo), result)
                    m.rows_rejected += hi - lo
        parts.sort(key=lambda p: p[0])
        return self._output(item, parts)

    def _wait_one(self, fut: Future) -> pl.DataFrame | Failure:
        started = time.perf_counter()
        while True:
            try:
                return fut.result(timeout=STOP_POLL_S)
            except (WorkerLost, TaskTimeout) as exc:
                return Failure(type(exc).__name__, str(exc), "")
            except TimeoutError:
                if self._stop.is_set():
                    raise StageStopped() from None
                if (self.step.timeout is not None and not self._backend.enforces_timeout
                        and time.perf_counter() - started > self.step.timeout):
                    return Failure("TaskTimeout", f"the batch ran longer than timeout={self.step.timeout:g}s", "")

    def _output(self, item: _Item, parts: list[tuple[int, int, pl.DataFrame]]) -> Batch:
        """The batch of the successful parts, each `(lo, hi, output)` for input rows `lo:hi`."""
        m = self.metrics
        frames = []
        for lo, hi, out in parts:
            rows_in = hi - lo
            # A function that keeps the row count is taken to keep the rows in order, so later
            # rejects still point at source lines; otherwise they point at the part's first row.
            if self.keep_rows:
                positions = item.positions[lo:hi]
                pos = positions if out.height == rows_in else np.full(out.height, positions[0], dtype="int64")
                out = out.with_columns(pl.Series(ROW_COL, pos, dtype=pl.UInt32))
            frames.append(out)
            m.rows_out += out.height
            if out.height < rows_in:
                m.rows_filtered += rows_in - out.height
            else:
                m.rows_created += out.height - rows_in
        b = item.batch
        if len(frames) == 1:
            data = frames[0]
        else:
            data = pl.concat(frames, how="vertical_relaxed") if frames else self._empty_output(item.df.schema)
        return Batch(data, b.split, first_row=b.first_row, rows_read=b.rows_read, first_line=b.first_line,
                     bytes_read=b.bytes_read, line_fn=b.line_fn)

    def _empty_output(self, schema: pl.Schema) -> pl.DataFrame:
        # A batch whose rows were all rejected still flows on (it carries rows_read for the ledger),
        # shaped like the step's output so the steps and sink after it accept it.
        if self._empty is None:
            out = self.step.output_schema(schema)
            self._empty = pl.DataFrame(schema=out)
            if self.keep_rows:
                self._empty = self._empty.with_columns(pl.Series(ROW_COL, [], dtype=pl.UInt32))
        return self._empty

    def _reject(self, item: _Item, positions: np.ndarray, df: pl.DataFrame, failure: Failure) -> None:
        b = item.batch
        reason = f"udf `{self.step.function}` failed: {failure.error_type}: {failure.message}"
        self._on_reject(reject_frame(source=b.split.path or b.split.id, lines=b.lines_of(positions), stage="udf",
                                     reasons=reason, values=df), (b.split.index, b.first_row))


def _oom(result: object) -> bool:
    """True when the user's function ran out of memory (worth a retry on fewer rows)."""
    return isinstance(result, Failure) and result.error_type == "MemoryError"


def _failed(exc: BaseException) -> Future:
    fut: Future = Future()
    fut.set_exception(exc)
    return fut
