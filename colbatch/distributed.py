"""Whole-split tasks on a Dask cluster: workers read, transform and write; the driver only commits.

When a run's executor is a `dask.distributed.Client` (or a scheduler address,
`[run] executor = "tcp://HOST:PORT"`), every split of the source becomes one
task on a worker: read the split → all steps (UDFs run inline on the worker,
`"threads"` UDFs on the worker's threads) → write its part files and a part of
its rejects into a private staging directory under the output
(`OUT/.colbatch-staging/`). The task returns only metadata: staged paths, row
counts, stage metrics. No row flows through the driver except rejected rows,
which are merged into the run's single rejects output.

The driver commits each finished split exactly as the local directory sink
does: fsync + rename of each part into the output directory, then the ledger
(`colbatch.ledger`) records it, so resume, the manifest and `finished` work
unchanged and a local run and a Dask run of one job are the same job. Parts
keep the local names (`part-SSSSS-NNNN`, split index then sequence), so the
output is the same set of files with the same rows.

Pipelines that cannot run split-wise (a single output file, an aggregate
stage, a database or callable sink, hive partitions, an in-memory source)
fall back to shipping batches: the run happens in the driver and each
`map_batches` step with the default executor runs its batches on the cluster.
The fallback is logged and named in the report's warnings.

Inputs and outputs must be on storage that every worker sees at the same path
(a shared file system); the staging directory is under the output so that the
final rename never crosses file systems.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from colbatch.lazy import cloudpickle
import polars as pl

from colbatch import faults
from colbatch.batch import Batch, Split
from colbatch.diagnose import diagnose
from colbatch.errors import ColbatchError, ConfigError, ErrorThresholdExceeded
from colbatch.ledger import Committed, JobIdentity, SplitState
from colbatch.metrics import MemorySampler, StageMetrics
from colbatch.rejects import RejectCollector
from colbatch.report import Report
from colbatch.runner import DEFAULT_RATE_MIN_ROWS, RunOptions, Runner, _progress
from colbatch.sinks.base import Sink, publish
from colbatch.sinks.files import FileSink
from colbatch.sources.base import RejectFn, Source
from colbatch.steps import Step
from colbatch.udf.backends import dask_client
from colbatch.udf.step import DASK_SCHEMES, MapBatches

log = logging.getLogger("colbatch")

# Hidden, under the output directory: same file system as the parts' final names, so the
# commit is a rename; hidden so that globs over the output never match a staged part.
STAGING_DIR = ".colbatch-staging"
# After a failure, how long running split tasks get to finish before their staging is deleted (the
# local runner gives its threads as long).
DEFAULT_STOP_WAIT_S = 30.0
# Created in the staging directory when the run failed: split tasks still running stop, queued ones skip.
STOP_FILE = "STOP"
# How often a split task looks for the stop file.
STOP_POLL_S = 0.2
# Rejects of one split task, written on the worker and merged by the driver.
REJECTS_PART = "rejects.parquet"


def is_dask_executor(executor: Any) -> bool:
    """True for a `dask.distributed.Client` or a Dask scheduler address."""
    if isinstance(executor, str):
        return executor.startswith(DASK_SCHEMES)
    return type(executor).__module__.startswith("distributed") and hasattr(executor, "get_executor")


def connect(address: str) -> Any:
    """A Client of the Dask scheduler at `address`; the caller closes it."""
    try:
        return dask_client(address)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"cannot connect to the Dask scheduler at `{address}`: {exc}", value=address) from exc


# -- planning (driver) ----------------------------------------------------------------------------


def splitwise_refusal(source: Source, sink: Sink) -> str | None:
    """Why this pipeline cannot run as whole-split tasks, or None when it can."""
    if type(sink) is not FileSink:
        return f"{sink.describe()} is not a directory of part files"
    if sink.single:
        return f"{sink.describe()} is a single file (give a directory to get one part per split)"
    if not source.stable:
        return f"{source.describe()} lives in this process (workers can read only files or tables)"
    return None


def make_runner(source: Source, steps: Sequence[Step], sink: Sink, rejects: RejectCollector, options: RunOptions,
                *, job: JobIdentity | None, resume: bool, overwrite: bool) -> Any:
    """The runner for a run whose `options.executor` is a Dask Client or address: split tasks, or the fallback."""
    reason = splitwise_refusal(source, sink)
    if reason is None:
        try:
            blob = cloudpickle.dumps(_SplitJob.build(source, steps, sink, options))
        except Exception as exc:  # anything unpicklable (an open handle, a lock) in the source or a step
            reason = f"the source or a step cannot be sent to workers ({type(exc).__name__}: {exc})"
        else:
            return SplitRunner(source, steps, sink, rejects, options, blob, job=job, resume=resume,
                               overwrite=overwrite)
    note = (f"running in this process and shipping map_batches batches to the Dask cluster: {reason}; "
            f"whole-split tasks need a file or table source and a directory sink")
    log.warning("%s", note)
    executor = options.executor
    shipped = tuple(replace(s, executor=executor) if isinstance(s, MapBatches) and s.executor == "auto" else s
                    for s in steps)
    return _Noted(Runner(source, shipped, sink, rejects, replace(options, executor=None), job=job, resume=resume,
                         overwrite=overwrite), note)


class _Noted:
    """A local runner whose report also carries why the run did not go to the cluster split-wise."""

    def __init__(self, runner: Runner, note: str) -> None:
        self.runner = runner
        self.note = note

    def run(self, report: Report) -> None:
        report.warnings.append(self.note)
        self.runner.run(report)


@dataclass
class _SplitJob:
    """Everything a worker needs to run any split of the job (pickled once per run)."""

    source: Source
    steps: tuple[Step, ...]
    sink: FileSink
    options: RunOptions
    columns: list[str]

    @classmethod
    def build(cls, source: Source, steps: Sequence[Step], sink: FileSink, options: RunOptions) -> _SplitJob:
        # Thresholds on rates are judged by the driver on all splits; `max_errors` only grows, so a
        # worker may stop early on it. A UDF runs inline (the task is the unit of parallelism), a
        # `"threads"` UDF on the worker's threads: it waits on I/O, not on the CPU.
        worker_steps = tuple(replace(s, executor="threads" if s.executor == "threads" else "inline")
                             if isinstance(s, MapBatches) else s for s in steps)
        opts = replace(options, executor=None, progress=False, max_error_rate=None)
        return cls(source, worker_steps, sink.fresh(), opts, list(source.schema))


# -- the task (worker) -----------------------------------------------------------------------------


_JOBS: dict[str, _SplitJob] = {}
_INSTANCES = threading.local()
_JOBS_LOCK = threading.Lock()


def _job(token: str, blob: bytes) -> _SplitJob:
    with _JOBS_LOCK:
        job = _JOBS.get(token)
        if job is None:
            _JOBS.clear()  # one job at a time per worker is the common case; do not hoard old ones
            job = _JOBS[token] = cloudpickle.loads(blob)
        return job


def _worker_steps(token: str, steps: tuple[Step, ...]) -> list[Step]:
    """Steps with class UDFs instantiated once per worker thread (not once per split task)."""
    cache = getattr(_INSTANCES, "cache", None)
    if cache is None or cache[0] != token:
        cache = _INSTANCES.cache = (token, {})
    out = []
    for i, step in enumerate(steps):
        if isinstance(step, MapBatches) and isinstance(step.fn, type):
            if i not in cache[1]:
                cache[1][i] = step.fn()
            step = replace(step, fn=cache[1][i])
        out.append(step)
    return out


class _OneSplit(Source):
    """The job's source seen through one split."""

    def __init__(self, inner: Source, split: Split) -> None:
        self.inner = inner
        self.split = split
        self.notes = inner.notes
        self.stable = inner.stable
        self.adaptive_batches = inner.adaptive_batches

    @property
    def schema(self) -> pl.Schema:
        return self.inner.schema

    def splits(self) -> list[Split]:
        return [self.split]

    def read(self, split: Split, *, batch_rows: Any, on_reject: RejectFn, skip_rows: int = 0) -> Iterator[Batch]:
        return self.inner.read(split, batch_rows=batch_rows, on_reject=on_reject, skip_rows=skip_rows)

    def total_bytes(self) -> int | None:
        return self.split.size_bytes

    def describe(self) -> str:
        return self.inner.describe()


class _StagingSink(FileSink):
    """A FileSink into a split's staging directory whose parts carry their final names."""

    def __init__(self, like: FileSink, path: str, *, first_seq: int) -> None:
        super().__init__(path, format=like.format, options=like.options, part_rows=like.part_rows)
        self.first_seq = first_seq
        self.end_row: int | None = None

    def _part_name(self, split: Split) -> str:
        # The ledger of the real output already lists `first_seq` parts of this split (resume).
        seq = self.first_seq + sum(1 for u in self._units if u["split"] == split.id)
        return f"part-{split.index:05d}-{seq:04d}{self._part_suffix()}"

    def split_done(self, split: Split, rows: int) -> None:
        self.end_row = rows
        super().split_done(split, rows)


def run_split(token: str, blob: bytes, split: Split, skip_rows: int, first_seq: int, staging: str) -> dict[str, Any]:
    """The Dask task: read one split, run the steps, write staged parts; return what the driver commits.

    Errors of the run (a corrupt file, a failing step, `max_errors`) come back as
    the `error` value, with the rejects written so far, so that the driver keeps
    them; only infrastructure failures (a lost worker) raise.
    """
    job = _job(token, blob)
    stop_file = os.path.join(staging, STOP_FILE)
    if os.path.exists(stop_file) or not os.path.isdir(staging):
        return {"split": split.id, "stopped": True}
    # The driver made `staging`; a task that starts after the run ended must not recreate it.
    where = tempfile.mkdtemp(prefix=f"split-{split.index:05d}-", dir=staging)
    sink = _StagingSink(job.sink, os.path.join(where, "parts"), first_seq=first_seq)
    rejects = RejectCollector(FileSink(os.path.join(where, REJECTS_PART), format="parquet"), columns=job.columns)
    runner = Runner(_OneSplit(job.source, split), _worker_steps(token, job.steps), sink, rejects, job.options)
    if skip_rows:
        runner.committed = Committed(splits={split.id: SplitState(skip_rows, False)})
    report = Report()
    error: BaseException | None = None
    t0 = time.perf_counter()
    finished = threading.Event()
    watcher = threading.Thread(target=_watch_stop, args=(stop_file, finished, runner), daemon=True,
                               name="colbatch-stop-watch")
    watcher.start()
    try:
        runner.run(report)
    except Exception as exc:  # returned, not raised: the driver must still merge this split's rejects
        error = exc
    finally:
        finished.set()
        watcher.join()
    units = [] if error is not None else [
        {**{k: u[k] for k in ("file", "split", "first_row", "end_row", "rows")},
         "staged": os.path.join(sink.path, u["file"])} for u in sink._units]
    return {
        "split": split.id, "stopped": False, "units": units,
        "end_row": sink.end_row if sink.end_row is not None else skip_rows,
        "stages": [s.to_dict() for s in report.stages],
        "rejected": rejects.total, "rejects_path": report.rejects_path if rejects.total else None,
        "batches": report.batches, "retries": report.retries, "peak_rss": report.peak_rss_bytes,
        "elapsed_s": time.perf_counter() - t0, "warnings": list(job.source.notes.warnings),
        "error": error,
    }


def _watch_stop(stop_file: str, finished: threading.Event, runner: Runner) -> None:
    while not finished.wait(STOP_POLL_S):
        if os.path.exists(stop_file):
            runner._fail(ColbatchError("the run was stopped: another split failed"))
            return


# -- the run (driver) ------------------------------------------------------------------------------


class SplitRunner:
    """Runs a job as one Dask task per split and commits the staged parts; same report as `Runner`."""

    def __init__(self, source: Source, steps: Sequence[Step], sink: FileSink, rejects: RejectCollector,
                 options: RunOptions, blob: bytes, *, job: JobIdentity | None, resume: bool,
                 overwrite: bool) -> None:
        self.source = source
        self.steps = list(steps)
        self.sink = sink
        self.rejects = rejects
        self.options = options
        self.blob = blob
        self.token = hashlib.sha1(blob).hexdigest()
        self.job = job
        self.resume = resume
        self.overwrite = overwrite
        self.read_stage = StageMetrics("read")
        self.step_stages = [StageMetrics(f"{s.kind}:{s.name}" if s.name != s.kind else s.kind) for s in self.steps]
        self.write_stage = StageMetrics("write")
        self.staging = os.path.join(os.path.abspath(sink.path), STAGING_DIR)
        self._batches = self._retries = self._tasks = 0
        self._task_s = 0.0
        self._peak_rss = 0
        self._workers = 0
        self._warnings: list[str] = []

    @property
    def stages(self) -> list[StageMetrics]:
        return [self.read_stage, *self.step_stages, self.write_stage]

    def run(self, report: Report) -> None:
        """Run every uncommitted split on the cluster, commit each as it finishes, then commit the output."""
        if self.job is not None and not self.overwrite and self.sink.finished(self.job):
            report.skipped = True
            report.warnings.append(f"{self.sink.describe()} already holds the complete output of this job; "
                                   "nothing was run (run with overwrite to run it again)")
            log.warning("%s", report.warnings[-1])
            report.stages = self.stages
            return
        executor = self.options.executor
        owned = isinstance(executor, str)
        client = connect(executor) if owned else executor
        sampler = MemorySampler().start()
        t_start = time.perf_counter()
        futures: list[Any] = []
        committed = False
        try:
            done = Committed()
            if self.job is not None:
                done = self.sink.begin(self.job, resume=self.resume)
                report.rows_resumed = done.rows
            self.rejects.open()
            schema = self.source.schema
            for step in self.steps:
                schema = step.output_schema(schema)
            self.sink.on_reject = self.rejects.add
            self.sink.open(schema)
            # Whatever a killed run left staged was never committed: its splits run again.
            shutil.rmtree(self.staging, ignore_errors=True)
            os.makedirs(self.staging)
            futures = self._submit(client, done)
            self._collect(client, futures)
            self._check_thresholds(final=True)
            result = self.sink.commit()
            committed = True
            report.outputs = result.files or [result.target]
        except BaseException as exc:
            self._stop_tasks(futures)
            if not committed:
                self.sink.abort(exc)
            raise
        finally:
            try:
                res = self.rejects.commit()
                if res is not None and res.files:
                    report.rejects_path = res.files[0]
            finally:
                shutil.rmtree(self.staging, ignore_errors=True)
                sampler.stop()
                if owned:
                    client.close()
                self._fill(report, t_start, sampler)

    def _submit(self, client: Any, done: Committed) -> list[Any]:
        self._workers = len(client.nthreads())
        blob = client.scatter(self.blob, broadcast=True, hash=False)
        futures = []
        for split in self.source.splits():
            skip = done.skip_for(split.id)
            if skip is None:
                continue
            first_seq = sum(1 for u in self.sink._units if u["split"] == split.id)
            futures.append(client.submit(run_split, self.token, blob, split, skip, first_seq, self.staging,
                                         key=f"colbatch-split-{split.index:05d}-{os.urandom(4).hex()}", pure=False))
        return futures

    def _stop_tasks(self, futures: list[Any]) -> None:
        """Tell split tasks to stop (queued ones return at once) and wait a while for them, so staging can go.

        A running Dask task cannot be cancelled, only abandoned; a task that
        outlived the wait finds its staging directory gone and fails on its own.
        """
        from dask.distributed import wait

        if not futures:
            return
        try:
            with open(os.path.join(self.staging, STOP_FILE), "w"):
                pass
            wait(futures, timeout=DEFAULT_STOP_WAIT_S)
        except Exception:  # a timeout, or staging already gone: best effort, the next run clears staging
            pass
        for fut in futures:
            fut.cancel()

    def _collect(self, client: Any, futures: list[Any]) -> None:
        from dask.distributed import as_completed

        progress = _progress(self.source.total_bytes(), self.options.progress)
        sizes = {s.id: s.size_bytes or 0 for s in self.source.splits()}
        try:
            for fut in as_completed(futures):
                try:
                    result = fut.result()
                except Exception as exc:  # the task itself never raises: this is the cluster losing it
                    raise ColbatchError(f"a split task was lost on the Dask cluster: {type(exc).__name__}: {exc}",
                                        key=str(fut.key)) from exc
                if result["stopped"]:
                    continue
                self._absorb(result)
                if result["error"] is not None:
                    raise result["error"]
                self._check_thresholds()
                if progress is not None:
                    progress.update(sizes.get(result["split"], 0))
                    progress.set_postfix_str(f"{self.read_stage.rows_in:,} rows, {self.rejects.total:,} rejected",
                                             refresh=False)
        finally:
            if progress is not None:
                progress.close()

    def _absorb(self, result: dict[str, Any]) -> None:
        """Merge one split's rejects and metrics, then commit its parts (publish, then ledger)."""
        if result["rejects_path"]:
            self.rejects.add(pl.read_parquet(result["rejects_path"]))
        for mine, theirs in zip(self.stages, result["stages"]):
            for key in ("rows_in", "rows_out", "rows_filtered", "rows_rejected", "rows_created", "bytes_in"):
                setattr(mine, key, getattr(mine, key) + theirs[key])
            for key in ("busy_s", "wait_s", "blocked_s"):
                setattr(mine, key, getattr(mine, key) + theirs[key])
        self._batches += result["batches"]
        self._retries += result["retries"]
        self._peak_rss = max(self._peak_rss, result["peak_rss"])
        self._task_s += result["elapsed_s"]
        self._tasks += 1
        self._warnings += [w for w in result["warnings"] if w not in self._warnings]
        if result["error"] is not None:
            return
        self._commit_split(result)

    def _commit_split(self, result: dict[str, Any]) -> None:
        sink = self.sink
        units = result["units"]
        for i, unit in enumerate(units):
            faults.point("before-publish")
            publish(unit["staged"], os.path.join(sink.path, unit["file"]))
            faults.point("before-ledger")
            sink._record({k: unit[k] for k in ("file", "split", "first_row", "end_row", "rows")},
                         complete=i == len(units) - 1)
            sink._rows += unit["rows"]
            if sink._ledger is not None:
                sink._save_ledger()
            faults.point("after-ledger")
        if not units:
            # A split that produced no rows is still done: resume need not read it again.
            sink._done.splits[result["split"]] = SplitState(result["end_row"], True)
            if sink._ledger is not None:
                sink._save_ledger()

    def _check_thresholds(self, *, final: bool = False) -> None:
        o = self.options
        rejected, read = self.rejects.total, self.read_stage.rows_in
        what = None
        if o.max_errors is not None and rejected > o.max_errors:
            what = f"{rejected:,} rows rejected, more than max_errors={o.max_errors:,}"
        elif (o.max_error_rate is not None and (read >= DEFAULT_RATE_MIN_ROWS or (final and read > 0))
              and rejected / read > o.max_error_rate):
            what = (f"{rejected:,} of {read:,} rows rejected ({rejected / read:.1%}), more than "
                    f"max_error_rate={o.max_error_rate:g}")
        if what is not None:
            sink = self.rejects.sink
            where = f"rejects are in `{sink.path}`" if sink is not None and hasattr(sink, "path") else \
                "rejects are in report.rejects"
            raise ErrorThresholdExceeded(f"error threshold exceeded: {what}; {where}", rejected=rejected,
                                         rows_read=read)

    def _fill(self, report: Report, t_start: float, sampler: MemorySampler) -> None:
        report.elapsed_s = time.perf_counter() - t_start
        report.stages = self.stages
        report.rows_read = self.read_stage.rows_in
        report.rows_written = self.write_stage.rows_out
        report.rows_filtered = sum(s.rows_filtered for s in self.step_stages)
        report.rows_rejected = self.rejects.total
        report.rejects_by_stage = dict(self.rejects.by_stage)
        # The largest of the driver and any one split task: each runs in its own process.
        report.peak_rss_bytes = max(sampler.peak_rss, self._peak_rss)
        report.memory_samples = sampler.samples
        report.batch_rows = self.options.batch_rows()
        report.batches = self._batches
        report.retries = self._retries + self.sink.retried
        report.rejects = self.rejects.frame()
        report.warnings.extend(w for w in self._warnings if w not in self.source.notes.warnings)
        udfs = {stage.name: 1 for step, stage in zip(self.steps, self.step_stages) if isinstance(step, MapBatches)}
        # Stage times are summed over tasks, so they are judged against the tasks' total time.
        report.bottleneck = diagnose(report.stages, max(self._task_s, 1e-9), source=report.source, sink=report.sink,
                                     udfs=udfs)
        report.bottleneck["executor"] = (f"dask: {self._tasks} split task(s) on {self._workers} worker(s), "
                                         f"{self._task_s:.2f}s of task time")
