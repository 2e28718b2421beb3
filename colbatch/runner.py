"""The runner: read | transform | write overlap on bounded queues, with accounting and thresholds."""

from __future__ import annotations

import importlib.util
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import polars as pl

from colbatch import faults
from colbatch.alerts import Alerts, Progress, RunWarning
from colbatch.batch import Batch
from colbatch.batching import DEFAULT_START_ROWS, BatchSizer
from colbatch.diagnose import GcTimer, MemoryFacts, Timeline, diagnose
from colbatch.errors import ColbatchError, ErrorThresholdExceeded
from colbatch.ledger import Committed, JobIdentity
from colbatch.metrics import ByteQueue, MemorySampler, StageMetrics
from colbatch.rejects import RejectCollector, reject_frame
from colbatch.report import Report
from colbatch.sinks.base import Sink
from colbatch.sources.base import Source
from colbatch.sources.files import is_transient
from colbatch.steps import ROW_COL, Step
from colbatch.udf import StageStopped
from colbatch.udf.step import MapBatches

log = logging.getLogger("colbatch")

# ~100k rows is on the flat part of the throughput curve for typical 5–20 column
# data (≈8 MB of CSV) while keeping a batch far below memory limits.
# Two batches in flight per queue: enough to overlap stages, little memory.
DEFAULT_QUEUE_ITEMS = 2
# Small batches may queue deeper, up to this many while they total at most the bytes below: with two
# 1,000-row batches per queue the threads took turns waking each other, ~300 us a batch against
# ~140 us with 32 (a run of 3,000 batches through an identity UDF).
DEFAULT_SMALL_QUEUE_ITEMS = 64
DEFAULT_SMALL_QUEUE_BYTES = 8 << 20
# Cap on bytes waiting between two stages; bounds memory whatever the batch size.
DEFAULT_QUEUE_BYTES = 256 << 20
# A job that rejects over 10% of its rows is nearly always misconfigured (wrong
# separator or schema), not merely dirty; stop it rather than write a broken output.
DEFAULT_MAX_ERROR_RATE = 0.1
# Transient read failures (EIO, timeouts, connection loss) are retried this often; a
# failure that persists over ~15 s of backoff is not transient.
DEFAULT_READ_RETRIES = 4
# First retry delay; doubled per attempt, with jitter so parallel jobs do not retry in step.
DEFAULT_RETRY_BACKOFF_S = 1.0
# During a run the error rate is judged only after this many rows, so one early bad
# row cannot abort it; at the end it is judged on all rows.
DEFAULT_RATE_MIN_ROWS = 100
# DuckDB (aggregate stage) threads: None lets DuckDB use one per core, which is what a batch job wants.
DEFAULT_DUCKDB_THREADS: int | None = None
# Inputs smaller than this do not start the UDF worker zygote ahead of the first batch: their UDF
# stage may well run inline (one batch of at most `MapBatches.inline_rows` rows).
PRESTART_MIN_BYTES = 4 << 20
# Where DuckDB spills: None gives each run a private directory under the system temp dir, removed after it.
DEFAULT_TEMP_DIRECTORY: str | None = None


@dataclass(frozen=True)
class RunOptions:
    """How a pipeline runs (the `[run]` table of a job file)."""

    batch_size: int | Literal["auto"] = "auto"
    max_error_rate: float | None = DEFAULT_MAX_ERROR_RATE
    max_errors: int | None = None
    memory_limit: int | None = None
    progress: bool | None = None
    read_retries: int = DEFAULT_READ_RETRIES
    retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S
    # None: DEFAULT_QUEUE_ITEMS, deeper for small batches; a number: exactly that depth.
    queue_items: int | None = None
    queue_bytes: int = DEFAULT_QUEUE_BYTES
    threads: int | None = DEFAULT_DUCKDB_THREADS
    temp_directory: str | None = DEFAULT_TEMP_DIRECTORY
    # Where `batch_size="auto"` starts: the size `colbatch tune --write` recommended for this job, if any.
    tuned_rows: int | None = None
    # A `dask.distributed.Client` or a scheduler address ("tcp://HOST:PORT"): one task per split on
    # the cluster (see `colbatch.distributed`); None runs in this process.
    executor: Any = None
    # Hooks (Python API only): progress snapshots, and warnings as they are raised (see colbatch.alerts).
    on_progress: Callable[[Progress], object] | None = None
    on_warning: Callable[[RunWarning], object] | None = None

    def batch_rows(self) -> int:
        """Rows per batch the reader starts with."""
        if self.batch_size == "auto":
            return self.tuned_rows or DEFAULT_START_ROWS
        return int(self.batch_size)

    def sizer(self) -> BatchSizer:
        """The batch-size controller for one run: adaptive for "auto", a memory clamp for a fixed size."""
        return BatchSizer(self.batch_rows(), memory_limit=self.memory_limit, adaptive=self.batch_size == "auto")


class _Stop(Exception):
    """Internal: another thread failed; unwind quietly."""


class Runner:
    """Runs one source through steps into one sink, rejects to a collector; produces a Report."""

    def __init__(self, source: Source, steps: Sequence[Step], sink: Sink, rejects: RejectCollector,
                 options: RunOptions, *, job: JobIdentity | None = None, resume: bool = False,
                 overwrite: bool = False) -> None:
        self.source = source
        self.job = job
        self.resume = resume
        self.overwrite = overwrite
        self.committed = Committed()
        self.steps = list(steps)
        self.sink = sink
        self.rejects = rejects
        self.options = options
        self.read_stage = StageMetrics("read")
        self.step_stages = [StageMetrics(f"{s.kind}:{s.name}" if s.name != s.kind else s.kind) for s in self.steps]
        self.write_stage = StageMetrics("write")
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        # A sink that rejects rows itself (PostgreSQL) needs each row's position as read, for `_line`.
        self._sink_rows = bool(getattr(sink, "needs_rows", False))
        self._needs_rows = any(s.needs_rows for s in self.steps) or self._sink_rows
        self._batches = 0
        self._lock = threading.Lock()
        self.retries = 0
        self.sizer = options.sizer()
        self.gc_timer = GcTimer()
        self.timeline: Timeline | None = None
        self._sampler: MemorySampler | None = None
        self._total_bytes: int | None = None
        self._t_start = time.perf_counter()
        self.alerts = Alerts(self._snapshot, counts=self._counts, max_error_rate=options.max_error_rate,
                             max_errors=options.max_errors, memory_limit=self.sizer.memory_limit,
                             explicit_limit=options.memory_limit is not None,
                             on_progress=options.on_progress, on_warning=options.on_warning)

    # -- threads ----------------------------------------------------------------------------

    def _on_reject(self, frame: pl.DataFrame, at: tuple[int, int] | None = None) -> None:
        self.rejects.add(frame, at=at)

    def _read(self, out: ByteQueue) -> None:
        """The read thread: batches into `out` (with backpressure), then the end marker."""
        stage = self.read_stage
        try:
            for batch, size in self._read_batches():
                t1 = time.perf_counter()
                if not out.put(batch, size, self._stop):
                    return
                stage.blocked_s += time.perf_counter() - t1
                if self._stop.is_set():
                    return
        except BaseException as exc:
            self._fail(exc)
        finally:
            out.put(None, 0, self._stop)

    def _read_batches(self) -> Iterator[tuple[Batch, int]]:
        """Every split's batches not yet committed, with their in-memory size; transient failures retried."""
        stage = self.read_stage
        adaptive = self.source.adaptive_batches
        for split in self.source.splits():
            skip = self.committed.skip_for(split.id)
            if skip is None:
                continue
            rows = self.sizer if adaptive else self.sizer()

            def on_reject(frame: pl.DataFrame, split=split) -> None:
                self.rejects.add(frame, at=(split.index, skip))  # the batch being read starts at `skip`

            it = self.source.read(split, batch_rows=rows, on_reject=on_reject, skip_rows=skip)
            failures = 0
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it, None)
                except Exception as exc:
                    stage.busy_s += time.perf_counter() - t0
                    failures += 1
                    if not is_transient(exc) or failures > self.options.read_retries:
                        raise
                    # Re-open the split after the records already delivered: none twice, none lost.
                    self._retry_wait(split, exc, failures)
                    it = self.source.read(split, batch_rows=rows, on_reject=on_reject, skip_rows=skip)
                    continue
                stage.busy_s += time.perf_counter() - t0
                if batch is None:
                    break
                skip = batch.first_row + batch.rows_read
                with self._lock:
                    stage.rows_in += batch.rows_read
                    stage.rows_out += batch.num_rows
                    stage.rows_rejected += batch.rows_read - batch.num_rows
                    stage.bytes_in += batch.bytes_read
                size = batch.data.estimated_size()
                self.sizer.note_bytes(batch.num_rows, size, batch.bytes_read)
                yield batch, size

    def _retry_wait(self, split, exc: BaseException, attempt: int) -> None:
        delay = backoff_delay(self.options.retry_backoff_s, attempt)
        with self._lock:
            self.retries += 1
        log.warning("transient read failure on `%s` (attempt %d of %d, retrying in %.2fs): %s",
                    split.path or split.id, attempt, self.options.read_retries, delay, exc)
        if self._stop.wait(delay):
            raise _Stop()

    def _transform(self, inp: ByteQueue | None, out: ByteQueue) -> None:
        udf_stages: list = []
        try:
            for result in self._transformed(self._inputs(inp), udf_stages):
                self._check_thresholds()
                t1 = time.perf_counter()
                if not out.put(result, result.bytes_read, self._stop):
                    return
                if self.step_stages:
                    self.step_stages[-1].blocked_s += time.perf_counter() - t1
        except BaseException as exc:
            self._fail(_Stop() if isinstance(exc, StageStopped) else exc)
        finally:
            for stage in udf_stages:
                try:
                    stage.close()
                except BaseException as exc:  # the run fails with it; the other stages still close
                    self._fail(exc)
            out.put(None, 0, self._stop)  # the writer always gets the end, or it would wait forever

    def _inputs(self, inp: ByteQueue | None) -> Iterator[Batch]:
        """The transform thread's input: the read queue, or with no queue the source itself (in memory)."""
        if inp is None:
            for batch, _size in self._read_batches():
                yield batch
                if self._stop.is_set():
                    return
            return
        while True:
            t0 = time.perf_counter()
            batch = inp.get(self._stop)
            if self.step_stages:
                self.step_stages[0].wait_s += time.perf_counter() - t0
            if batch is None:
                return
            yield batch

    def _transformed(self, batches: Iterator[Batch], udf_stages: list) -> Iterator[Batch]:
        """Chain the steps: runs of vectorised steps in this thread, each UDF as a pipelined stage."""
        stream, start = batches, 0
        cuts = [i for i, step in enumerate(self.steps) if isinstance(step, MapBatches)]
        if cuts:
            from colbatch.udf.stage import UdfStage  # process pools and their transport load with the first UDF
        for cut in [*cuts, len(self.steps)]:
            if cut > start:
                stream = self._vectorised(stream, start, cut)
            if cut < len(self.steps):
                stage = UdfStage(self.steps[cut], self.step_stages[cut], self._on_reject, self._stop,
                                 keep_rows=self._sink_rows or any(s.needs_rows for s in self.steps[cut + 1:]),
                                 on_memory_error=self.sizer.on_memory_error)
                udf_stages.append(stage)
                stream = stage.run(stream)
            start = cut + 1
        for batch in stream:
            if ROW_COL in batch.data.columns and not self._sink_rows:
                batch.data = batch.data.drop(ROW_COL)
            yield batch

    def _vectorised(self, batches: Iterator[Batch], start: int, stop: int) -> Iterator[Batch]:
        for batch in batches:
            yield self._apply_steps(batch, start, stop)

    def _apply_steps(self, batch: Batch, start: int = 0, stop: int | None = None) -> Batch:
        df = batch.data
        if self._needs_rows and ROW_COL not in df.columns:
            # Row positions are fixed on the whole batch, so halves of a retried batch keep their lines.
            df = df.with_row_index(ROW_COL)
        out = self._apply_rows(batch, df, start, stop)
        return Batch(out, batch.split, first_row=batch.first_row, rows_read=batch.rows_read,
                     first_line=batch.first_line, bytes_read=batch.bytes_read, line_fn=batch.line_fn)

    def _apply_rows(self, batch: Batch, df: pl.DataFrame, start: int, stop: int | None) -> pl.DataFrame:
        """Steps over `df` (rows of `batch`); on MemoryError, the rows again in two halves.

        Counters and rejects are committed only when every step succeeded, so a retried
        batch is counted once: nothing lost, nothing twice.
        """
        counts: list[tuple[StageMetrics, int, int, int, int]] = []
        rejects: list[pl.DataFrame] = []
        original = df
        try:
            for step, stage in zip(self.steps[start:stop], self.step_stages[start:stop]):
                t0 = time.perf_counter()
                try:
                    res = step.apply(df)
                finally:
                    stage.busy_s += time.perf_counter() - t0
                rejected = 0
                if res.rejected is not None and res.rejected.height:
                    rejected = res.rejected.height
                    positions = res.rejected[ROW_COL].to_numpy().astype("int64")
                    lines = batch.lines_of(positions)
                    rejects.append(reject_frame(
                        source=batch.split.path or batch.split.id, lines=lines, stage=step.kind,
                        reasons=res.reasons if res.reasons is not None else f"rejected by `{step.name}`",
                        values=res.rejected.drop(ROW_COL, strict=False),
                    ))
                counts.append((stage, df.height, res.data.height, res.filtered, rejected))
                df = res.data
        except MemoryError:
            if original.height < 2:
                raise
            self.sizer.on_memory_error(original.height)
            half = original.height // 2
            log.warning("a step ran out of memory on a batch of %d rows; retrying it in two halves", original.height)
            parts = [self._apply_rows(batch, original.slice(0, half), start, stop),
                     self._apply_rows(batch, original.slice(half), start, stop)]
            return pl.concat(parts, how="vertical_relaxed")
        for stage, rows_in, rows_out, filtered, rejected in counts:
            stage.rows_in += rows_in
            stage.rows_out += rows_out
            stage.rows_filtered += filtered
            stage.rows_rejected += rejected
        for frame in rejects:
            self.rejects.add(frame, at=(batch.split.index, batch.first_row))
        return df

    def _check_thresholds(self, *, final: bool = False) -> None:
        o = self.options
        rejected = self.rejects.total
        read = self.read_stage.rows_in
        if o.max_errors is not None and rejected > o.max_errors:
            raise self._threshold_error(f"{rejected:,} rows rejected, more than max_errors={o.max_errors:,}")
        enough = read >= DEFAULT_RATE_MIN_ROWS or (final and read > 0)
        if o.max_error_rate is not None and enough and rejected / read > o.max_error_rate:
            raise self._threshold_error(
                f"{rejected:,} of {read:,} rows rejected ({rejected / read:.1%}), more than max_error_rate={o.max_error_rate:g}"
            )

    def _threshold_error(self, what: str) -> ErrorThresholdExceeded:
        sink = self.rejects.sink
        where = f"rejects are in `{sink.path}`" if sink is not None and hasattr(sink, "path") else "rejects are in report.rejects"
        return ErrorThresholdExceeded(f"error threshold exceeded: {what}; {where}", rejected=self.rejects.total,
                                      rows_read=self.read_stage.rows_in)

    def _fail(self, exc: BaseException) -> None:
        if not isinstance(exc, _Stop):
            self._errors.append(exc)
        self._stop.set()

    # -- main -------------------------------------------------------------------------------

    def run(self, report: Report) -> None:
        """Run to completion (or failure), filling `report`; raises the first error.

        A job whose output already holds its complete result is not run again
        (unless `overwrite`): the report says so and nothing is read or written.
        """
        if self.job is not None and not self.overwrite and self.sink.finished(self.job):
            report.skipped = True
            report.warnings.append(f"{self.sink.describe()} already holds the complete output of this job; "
                                   "nothing was run (run with overwrite to run it again)")
            log.warning("%s", report.warnings[-1])
            report.stages = [self.read_stage, *self.step_stages, self.write_stage]
            self.rejects.drop_parts()  # merged into the rejects file before the job was marked finished
            return
        o = self.options
        # Under a memory limit the two queues together hold at most a quarter of it.
        queue_bytes = o.queue_bytes if o.memory_limit is None else max(1 << 20, min(o.queue_bytes, o.memory_limit // 8))
        depth = (dict(max_items=DEFAULT_QUEUE_ITEMS, small_items=DEFAULT_SMALL_QUEUE_ITEMS,
                      small_bytes=DEFAULT_SMALL_QUEUE_BYTES) if o.queue_items is None else dict(max_items=o.queue_items))
        read_q = ByteQueue(max_bytes=queue_bytes, **depth)
        write_q = ByteQueue(max_bytes=queue_bytes, **depth)
        sampler = self._sampler = MemorySampler().start()
        self.timeline = Timeline([self.read_stage, *self.step_stages, self.write_stage],
                                 queues={"read→transform": read_q.__len__, "transform→write": write_q.__len__},
                                 rows=lambda: self.write_stage.rows_out).start()
        self.gc_timer.__enter__()
        t_start = self._t_start = time.perf_counter()
        self._total_bytes = self.sizer.input_bytes = self.source.total_bytes()
        self._prestart_workers()
        progress = _progress(self._total_bytes, o.progress)
        # Data already in memory is sliced in the transform thread: a read thread would add a
        # hand-off per batch and overlap nothing.
        if self.source.in_memory:
            threads = [threading.Thread(target=self._transform, args=(None, write_q), name="colbatch-transform",
                                        daemon=True)]
        else:
            threads = [
                threading.Thread(target=self._read, args=(read_q,), name="colbatch-read", daemon=True),
                threading.Thread(target=self._transform, args=(read_q, write_q), name="colbatch-transform",
                                 daemon=True),
            ]
        committed = False
        try:
            if self.job is not None:
                self.committed = self.sink.begin(self.job, resume=self.resume)
                report.rows_resumed, report.rows_redone = self.committed.rows, self.committed.redone
                if self.sink.durable_rejects:
                    self.sink.reject_units = self.rejects.durable()
            self.rejects.open()
            schema = self.source.schema
            for step in self.steps:
                schema = step.output_schema(schema)
            self.sink.on_reject = self._on_reject
            self.sink.open(schema)
            for t in threads:
                t.start()
            self._write_loop(write_q, progress)
            for t in threads:
                t.join()
            if self._errors:
                raise self._errors[0]
            self._check_thresholds(final=True)
            result = self.sink.commit()
            committed = True
            report.outputs = result.files or [result.target]
            self.write_stage.rows_out = result.rows
            self.write_stage.rows_rejected = result.rejected
            try:
                self.alerts.finish()
            except Exception as exc:  # the output is committed: a failing last progress call cannot undo it
                log.warning("on_progress raised after the output was committed: %s: %s", type(exc).__name__, exc)
        except BaseException as exc:
            self._stop.set()
            for t in threads:
                if t.is_alive():
                    t.join(timeout=30)
            if not committed:
                self.sink.abort(exc)
            raise
        finally:
            if progress is not None:
                progress.close()
            try:
                res = self.rejects.commit()
                if res is not None and res.files:
                    report.rejects_path = res.files[0]
            finally:
                sampler.stop()
                self.timeline.stop()
                self.gc_timer.__exit__()
                self._fill(report, t_start, sampler)

    def _prestart_workers(self) -> None:
        # A UDF on worker processes: their zygote loads while the first batches are read, unless the
        # input is so small that the stage may run it inline, or in memory (no reading to overlap).
        small = self._total_bytes is not None and self._total_bytes < PRESTART_MIN_BYTES
        on_processes = any(isinstance(s, MapBatches) and s.resolved_executor() == "processes" for s in self.steps)
        if on_processes and not (small or self.source.in_memory):
            from colbatch.udf.procpool import prestart_zygote

            prestart_zygote()

    def _write_loop(self, inp: ByteQueue, progress) -> None:
        stage = self.write_stage
        split, split_rows = None, 0
        last = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            batch = inp.get(self._stop)
            stage.wait_s += time.perf_counter() - t0
            if batch is None:
                if self._errors:
                    raise self._errors[0]
                if split is not None:
                    self.sink.split_done(split, split_rows)
                return
            t1 = time.perf_counter()
            if batch.split != split:
                if split is not None:
                    self.sink.split_done(split, split_rows)
                split, split_rows = batch.split, self.committed.skip_for(batch.split.id) or 0
            split_rows += batch.rows_read
            self.sink.write(batch)
            faults.point("after-write")
            stage.busy_s += time.perf_counter() - t1
            stage.rows_in += batch.num_rows
            stage.rows_out += batch.num_rows
            self._batches += 1
            now = time.perf_counter()
            self.sizer.observe(batch.rows_read, now - last)
            self.alerts.after_batch(batch.rows_read, now - last)
            last = now
            if progress is not None:
                progress.update(batch.bytes_read)
                progress.set_postfix_str(f"{self.read_stage.rows_in:,} rows, {self.rejects.total:,} rejected",
                                         refresh=False)

    def _counts(self) -> tuple[int, int, int]:
        """Rows read, rows rejected and the latest RSS sample: what the checks after every batch need."""
        return (self.read_stage.rows_in, self.rejects.total,
                self._sampler.last_rss if self._sampler is not None else 0)

    def _snapshot(self, done: bool) -> Progress:
        return Progress(elapsed_s=time.perf_counter() - self._t_start, rows_read=self.read_stage.rows_in,
                        rows_written=self.write_stage.rows_out,
                        rows_filtered=sum(s.rows_filtered for s in self.step_stages), rows_rejected=self.rejects.total,
                        batches=self._batches, batch_rows=self.sizer.rows, rows_per_s=self.alerts.recent_rate,
                        rss_bytes=self._sampler.last_rss if self._sampler is not None else 0,
                        bytes_read=self.read_stage.bytes_in, total_bytes=self._total_bytes, done=done)

    def _fill(self, report: Report, t_start: float, sampler: MemorySampler) -> None:
        report.elapsed_s = time.perf_counter() - t_start
        report.stages = [self.read_stage, *self.step_stages, self.write_stage]
        report.rows_read = self.read_stage.rows_in
        report.rows_written = self.write_stage.rows_out
        report.rows_filtered = sum(s.rows_filtered for s in self.step_stages)
        report.rows_rejected = self.rejects.total
        report.rejects_by_stage = dict(self.rejects.by_stage)
        report.peak_rss_bytes = sampler.peak_rss
        report.memory_samples = sampler.samples
        report.batch_rows = self.sizer.rows
        report.batch_sizes = list(self.sizer.history)
        report.batches = self._batches
        report.retries = self.retries + self.sink.retried
        report.rejects = self.rejects.frame()
        report.warnings.extend(self.alerts.messages)
        cpu = self.timeline.cpu_summary(report.elapsed_s) if self.timeline is not None else {}
        report.timeline = self.timeline.samples if self.timeline is not None else []
        report.gc = self.gc_timer.to_dict()
        udfs = {stage.name: step.workers for step, stage in zip(self.steps, self.step_stages)
                if isinstance(step, MapBatches)}
        memory = MemoryFacts(limit=self.options.memory_limit, peak_rss=sampler.peak_rss,
                             pressure_events=self.sizer.pressure_events, memory_errors=self.sizer.memory_errors,
                             clamped=self.sizer.clamped and self.options.memory_limit is not None)
        report.bottleneck = diagnose(report.stages, report.elapsed_s, source=report.source, sink=report.sink,
                                     udfs=udfs, memory=memory, cpu=cpu, gc_pause_s=self.gc_timer.pause_s)


def backoff_delay(base_s: float, attempt: int) -> float:
    """Exponential backoff with full jitter: uniform in [base/2, base] * 2**(attempt-1)."""
    ceiling = base_s * (2 ** (attempt - 1))
    return ceiling * (0.5 + random.random() / 2)


def in_notebook() -> bool:
    """True inside a Jupyter kernel (its stderr is not a terminal, but a progress bar still renders)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except AttributeError:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _progress(total_bytes: int | None, enabled: bool | None):
    """A tqdm bar over input bytes, or None when disabled or neither on a terminal nor in a notebook."""
    notebook = in_notebook()
    if enabled is False or (enabled is None and not (notebook or sys.stderr.isatty())):
        return None
    from tqdm.std import tqdm

    if notebook and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm  # a widget bar; without ipywidgets, text on the cell's stderr
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="colbatch", leave=True)


def check_accounting(report: Report) -> None:
    """Raise when a stage or the totals do not balance (a colbatch bug, never the user's)."""
    if report.status == "succeeded" and not report.accounting_ok():
        bad = [s.to_dict() for s in report.stages if not s.balanced()]
        raise ColbatchError(
            f"row accounting does not balance: read {report.rows_read} != written {report.rows_written} + filtered "
            f"{report.rows_filtered} + rejected {report.rows_rejected}; stages {bad}", stages=bad)
