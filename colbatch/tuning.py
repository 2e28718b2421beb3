"""The batch-size tuner: run a job on a sample at several batch sizes and recommend one.

One sample run reads the head of the input in batches whose sizes follow a plan:
one warm-up batch (start-up and pipeline fill), then `repeats` batches of each
size, smallest first, with output in a temporary directory in the sink's format
(never the real sink). A size's throughput is its batches' rows over the time
between their arrivals at the sink: the steady rate of the pipeline at that size,
without paying start-up, fill and commit once per size. The plan reads at most
`budget` (10%) of the input's rows, less an allowance for start-up and commit;
sizes that do not fit get fewer batches or are left out, with a note. An input
shorter than the plan is read again (a new run) until every size is measured.
The smallest size within `DEFAULT_TOLERANCE` of the best that fits the memory
limit is recommended. `batch_size="auto"` starts from a recommendation written
next to the job file (`JOB.tune.json`).
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from colbatch.batch import Batch, Split
from colbatch.batching import BatchSizer, tune_file
from colbatch.errors import ConfigError, MissingDependencyError
from colbatch.pipeline import Pipeline
from colbatch.runner import RunOptions
from colbatch.sinks.files import FileSink
from colbatch.sources.base import RejectFn, Source
from colbatch.udf.step import MapBatches

# The sizes of the benchmark grid, from per-batch-overhead territory to memory-heavy.
DEFAULT_SIZES = (8_192, 32_768, 131_072, 524_288, 1_048_576)
# None: the budget alone bounds the rows tuning reads.
DEFAULT_SAMPLE_ROWS: int | None = None
# Tuning that costs more than a tenth of the run it tunes is not worth it.
DEFAULT_BUDGET = 0.1
# Of that budget, the batches may take this share: the rest pays for start-up, pipeline fill and commit.
DEFAULT_WORK_SHARE = 0.5
# Inputs too small for a tenth to measure anything may read this many rows (a second or so).
DEFAULT_MIN_BUDGET_ROWS = 200_000
# Batches measured per size: the median of three drops one outlier on a shared machine.
DEFAULT_REPEATS = 3
# Sizes within 5% of the best throughput are equally good (run-to-run noise); the smallest wins (less memory).
DEFAULT_TOLERANCE = 0.05
# A batch shorter than 1/_SHORT of its planned size ran into the end of the input (text blocks are
# cut by bytes, so batches land a few percent either side of the size).
_SHORT = 1.25
# Batches per measured segment when a UDF runs on a pool: enough to keep its workers busy (at
# most this many); one batch otherwise (expressions run in parallel within a batch).
MAX_SEGMENT_BATCHES = 4
# An input much shorter than the plan is read again; this many runs at most.
_MAX_RUNS = 50
# A reader waiting for the pipeline to drain goes on after this long without a batch reaching the sink.
_DRAIN_STALL_S = 5.0


class _Plan(BatchSizer):
    """The tuner's batch sizes: segments of `per_segment` batches of one size, smallest first.

    It is the sample run's sizer: the reader asks it before each batch; the writer reports each
    batch written (`observe`), and the sink encodes everything it buffered after a segment's
    last batch (`_SampleSink`), so a segment pays for its own encoding.

    With `drain` (pipelines of expressions, one batch per segment), the reader waits before a
    segment until the sink has taken every earlier batch: each segment starts on an empty
    pipeline, and its time runs from its batch being asked for to it being written. That is
    the same work at every size (the batch through every stage, the encoding included), so the
    rates compare sizes fairly; they are below a full run's, which overlaps batches. A UDF
    stage keeps several batches in flight and would wait for input forever behind a drain, so
    without it a segment's time runs from its first batch written to its last, over the rows
    of all but the first (steady state at the pool's pace).

    A warm-up segment of the smallest size carries the first-batch costs (a worker pool's
    start) and is not measured. The plan is laid out once the input's rows are known (after
    the first batch), within `budget()`: one segment per size, smallest first, then rounds of
    more, up to `repeats` per size, while they fit.
    """

    # Each size is asked for when its batch is read, after the earlier ones were noted (the layout
    # waits for the first batch's size; a drained segment for the sink).
    read_ahead = False

    def __init__(self, sizes: Sequence[int], repeats: int, *, share: float | None, sample_rows: int | None,
                 memory_limit: int | None, per_segment: int = 1, drain: bool = True) -> None:
        super().__init__(sizes[0], memory_limit=memory_limit, adaptive=False, min_rows=1, max_rows=max(sizes))
        self.sizes = list(sizes)
        self.repeats = repeats
        self.share = share
        self.sample_rows = sample_rows
        self.per_segment = per_segment
        self.drain = drain
        # One (size, batches, measured) per segment; `entries` is the size of each batch, in order.
        self.segments: list[tuple[int, int, bool]] = [(sizes[0], per_segment, False)]
        self.entries: list[int] = [sizes[0]] * per_segment
        self._seg_of: list[int] = [0] * per_segment  # batch index -> segment index
        self.issued = 0
        self.observed = 0
        self.planned = False
        self.seen: dict[int, list[tuple[int, float]]] = {s: [] for s in sizes}
        self.peak: dict[int, int] = {}
        self.notes: list[str] = []
        self.runs = 0
        self.cut = False  # a segment ran into the end of the input
        self.stalls = 0  # drains given up after `_DRAIN_STALL_S` (their segments are not comparable)
        self._cond = threading.Condition(self._lock)
        self._last_seen = time.perf_counter()
        self._t0: dict[int, float] = {}  # segment -> when its first batch was asked for
        self._rows: dict[int, int] = {}  # segment -> rows written so far

    def _add(self, size: int, batches: int, measured: bool = True) -> None:
        self._seg_of += [len(self.segments)] * batches
        self.segments.append((size, batches, measured))
        self.entries += [size] * batches

    # -- the reader's side --------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True when every planned batch has been handed out."""
        return self.planned and self.issued >= len(self.entries)

    def __call__(self) -> int:
        if not self.planned and self.issued:
            self._lay_out()
        i = min(self.issued, len(self.entries) - 1)
        seg = self._seg_of[i]
        with self._cond:
            if self.drain and seg not in self._t0:
                # A new segment starts on an empty pipeline. A sink that stalls (a failed run)
                # releases the reader after `_DRAIN_STALL_S` without a batch.
                while self.observed < self.issued:
                    if time.perf_counter() - self._last_seen >= _DRAIN_STALL_S:
                        self.stalls += 1
                        break
                    self._cond.wait(0.02)
                self._t0[seg] = time.perf_counter()
            self.issued += 1
        self.rows = self.entries[i]
        return self.rows

    def budget(self) -> float:
        """Rows tuning may read in all (inf: no limit)."""
        limit = float(self.sample_rows) if self.sample_rows is not None else math.inf
        total = self.input_rows()
        if self.share is not None and total is not None:
            limit = min(limit, max(DEFAULT_MIN_BUDGET_ROWS, DEFAULT_WORK_SHARE * self.share * total))
        return limit

    def _lay_out(self) -> None:
        self.planned = True
        total = self.input_rows()
        left = self.budget() - sum(self.entries)
        fits = []
        for size in self.sizes:
            if total is not None and size * self.per_segment > total:
                self.notes.append(f"batch size {size:,} not measured: the input has only about {total:,} rows")
            elif size * self.per_segment > left and size != self.sizes[0]:  # the smallest is always measured
                self.notes.append(
                    f"batch size {size:,} not measured: past sample_rows={self.sample_rows:,}"
                    if self.budget() == self.sample_rows else
                    f"batch size {size:,} not measured: {'a batch' if self.per_segment == 1 else f'{self.per_segment} batches'} "
                    f"of it would take tuning past "
                    f"{self.share or 0:.0%} of the time a full run of the input's ~{total or 0:,} rows takes")
            else:
                fits.append(size)
                left -= size * self.per_segment
        self._plan_rounds(fits, left)

    def _plan_rounds(self, sizes: list[int], left: float, done: dict[int, int] | None = None) -> None:
        """A segment of each size, then rounds of repeats while they fit (interleaved: drift hits all alike)."""
        count = dict.fromkeys(sizes, 0) if done is None else dict(done)
        if done is None:
            for size in sizes:
                self._add(size, self.per_segment)
                count[size] = 1
        while True:
            more = [s for s in sizes if count[s] < self.repeats and s * self.per_segment <= left]
            for size in more:
                if size * self.per_segment <= left:
                    self._add(size, self.per_segment)
                    count[size] += 1
                    left -= size * self.per_segment
            if not more:
                return

    def next_run(self) -> bool:
        """Before a rerun of a short input: plan what is still missing; False when nothing more can be done."""
        sizes = [s for s in self.sizes if any(seg[0] == s and seg[2] for seg in self.segments)]
        have = {s: len(self.seen[s]) for s in sizes}
        if self.runs >= _MAX_RUNS or all(n >= self.repeats for n in have.values()):
            return False
        # Drop what was not handed out; start again with a warm-up batch.
        while self._seg_of and len(self._seg_of) > self.issued:
            self._seg_of.pop()
            self.entries.pop()
        self.segments = self.segments[:(self._seg_of[-1] + 1) if self._seg_of else 0]
        before = len(self.entries)
        left = self.budget() - sum(self.entries) - self.sizes[0] * self.per_segment
        self._add(self.sizes[0], self.per_segment, measured=False)
        # Largest first: right after the warm-up, a size that ran into the end of the input fits if any can.
        self._plan_rounds([s for s in reversed(sizes) if have[s] < self.repeats], left,
                          done={s: have[s] for s in sizes if have[s] < self.repeats})
        if len(self.entries) == before + self.per_segment:  # nothing fits but the warm-up
            return False
        with self._cond:
            self.observed = self.issued
            self.cut = False
        return True

    # -- the writer's side --------------------------------------------------------------------

    def measured(self) -> int:
        """Segments measured so far."""
        return sum(len(v) for v in self.seen.values())

    def segment_ends(self, i: int) -> bool:
        """True when batch `i` is the last of its segment."""
        return i + 1 >= len(self._seg_of) or self._seg_of[i + 1] != self._seg_of[i]

    def observe(self, rows: int, seconds: float) -> None:
        rss = self._rss()
        with self._cond:
            i = min(self.observed, len(self._seg_of) - 1)
            seg = self._seg_of[i]
            self.observed += 1
            self._last_seen = now = time.perf_counter()
            self._cond.notify_all()
            size, _, measured = self.segments[seg]
            self.peak[size] = max(self.peak.get(size, 0), rss)
            if seg not in self._t0:  # without a drain: the segment's first batch written starts its clock
                self._t0[seg] = now if rows * _SHORT >= size else math.nan
                self.cut = self.cut or rows * _SHORT < size
                self._rows[seg] = 0
                return
            self._rows[seg] = self._rows.get(seg, 0) + rows
            if rows * _SHORT < size:  # the input ended inside the batch: the segment does not count
                self._t0[seg] = math.nan
                self.cut = True
            if measured and self.segment_ends(i) and self._rows[seg] and not math.isnan(self._t0[seg]):
                self.seen[size].append((self._rows[seg], now - self._t0[seg]))


class _Planned(Source):
    """Another source read in the plan's batch sizes, stopping when the plan is done.

    A source that takes a callable size asks the plan itself; another is re-opened at the
    current row whenever the planned size changes.
    """

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.name = inner.name
        self.notes = inner.notes
        self.stable = inner.stable
        self.adaptive_batches = True

    @property
    def schema(self):
        """The inner source's schema."""
        return self.inner.schema

    def splits(self) -> Sequence[Split]:
        """The inner source's splits."""
        return self.inner.splits()

    def total_bytes(self) -> int | None:
        """The inner source's size: the plan's budget is a share of it."""
        return self.inner.total_bytes()

    def describe(self) -> str:
        """The inner description."""
        return self.inner.describe()

    def read(self, split: Split, *, batch_rows, on_reject: RejectFn, skip_rows: int = 0) -> Iterator[Batch]:
        """The inner batches in the plan's sizes, until it is done."""
        plan: _Plan = batch_rows
        pos, size, it = skip_rows, None, None
        try:
            while not plan.done:
                if self.inner.adaptive_batches:
                    if it is None:
                        it = self.inner.read(split, batch_rows=plan, on_reject=on_reject, skip_rows=pos)
                else:
                    want = plan()
                    if want != size:
                        if it is not None:
                            it.close()
                        size, it = want, self.inner.read(split, batch_rows=want, on_reject=on_reject, skip_rows=pos)
                batch = next(it, None)
                if batch is None:
                    return
                pos = batch.first_row + batch.rows_read
                yield batch
        finally:
            if it is not None:
                it.close()


@dataclass(frozen=True)
class _TuneOptions(RunOptions):
    """Run options whose sizer is the tuner's plan."""

    plan: _Plan | None = None

    def sizer(self) -> BatchSizer:
        """The plan (shared by every run of the tuning)."""
        assert self.plan is not None
        return self.plan


@dataclass
class TunePoint:
    """Measurements at one batch size."""

    rows: int
    throughput: float  # median rows/s over the timed segments
    s_per_row: float  # median seconds per row
    peak_rss_bytes: int  # highest peak RSS over the repeats (process and children)
    runs: list[float] = field(default_factory=list)  # rows/s of each timed segment
    fits: bool = True  # peak RSS within the memory limit (always True without one)
    sample_rows: int = 0  # rows timed at this size


@dataclass
class TuneResult:
    """The tuner's measurements and recommendation; shows as a table, plots as PNG.

    Example:
        >>> result = cb.tune(cb.scan_csv("events.csv").sink_parquet("out.parquet"))
        >>> print(result.table()); result.plot("tune.png"); result.recommended
    """

    points: list[TunePoint]
    recommended: int
    sample_rows: int
    repeats: int
    memory_limit: int | None = None
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    rows_read: int = 0  # rows all sample runs read together (what tuning cost)
    runs: int = 1  # sample runs: one, unless the input was shorter than the plan

    def best(self) -> TunePoint:
        """The size with the highest median throughput."""
        return max(self.points, key=lambda p: p.throughput)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary; `batch_rows` is what `batch_size="auto"` starts from."""
        return {"batch_rows": self.recommended, "sample_rows": self.sample_rows, "repeats": self.repeats,
                "memory_limit": self.memory_limit, "elapsed_s": round(self.elapsed_s, 3), "rows_read": self.rows_read,
                "runs": self.runs,
                "points": [asdict(p) for p in self.points], "notes": list(self.notes)}

    def write(self, path: str | os.PathLike) -> Path:
        """Store the recommendation as JSON (for a job file: `tune_file(job)`)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        return path

    def table(self) -> str:
        """A text table: size, median throughput, time per row, peak RSS, and the recommendation."""
        best = self.best().throughput
        lines = [f"{'batch rows':>12}  {'rows/s':>12}  {'vs best':>7}  {'us/row':>8}  {'peak RSS':>9}",
                 f"{'-' * 12}  {'-' * 12}  {'-' * 7}  {'-' * 8}  {'-' * 9}"]
        for p in self.points:
            mark = "  <- recommended" if p.rows == self.recommended else ""
            mark += "" if p.fits else "  (over memory limit)"
            lines.append(f"{p.rows:>12,}  {p.throughput:>12,.0f}  {p.throughput / best:>7.0%}  "
                         f"{p.s_per_row * 1e6:>8.3f}  {p.peak_rss_bytes / 2**20:>6,.0f} MiB{mark}")
        lines.append(f"recommended batch_size = {self.recommended:,} (smallest size within "
                     f"{DEFAULT_TOLERANCE:.0%} of the best throughput that fits memory); "
                     f"up to {self.repeats} timed segments per size, {self.rows_read:,} rows read in "
                     f"{self.elapsed_s:.1f}s ({self.runs} run{'s' if self.runs != 1 else ''})")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def figure(self):
        """A matplotlib Figure: throughput and peak RSS against batch size (log scale)."""
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise MissingDependencyError("plotting needs matplotlib: pip install 'colbatch[notebook]'") from exc
        fig = Figure(figsize=(7, 3.6), dpi=100)
        ax = fig.add_subplot(1, 1, 1)
        xs = [p.rows for p in self.points]
        ax.plot(xs, [p.throughput for p in self.points], "o-", color="#1565c0", label="rows/s (median)")
        ax.axvline(self.recommended, color="#2e7d32", linestyle="--", label=f"recommended {self.recommended:,}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch rows")
        ax.set_ylabel("rows/s", color="#1565c0")
        ax2 = ax.twinx()
        ax2.plot(xs, [p.peak_rss_bytes / 2**20 for p in self.points], "s:", color="#c62828", label="peak RSS")
        ax2.set_ylabel("peak RSS (MiB)", color="#c62828")
        if self.memory_limit:
            ax2.axhline(self.memory_limit / 2**20, color="#c62828", alpha=0.4, label="memory limit")
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="lower right", fontsize="small")
        ax.set_title("colbatch tune: throughput and memory by batch size")
        fig.tight_layout()
        return fig

    def plot(self, path: str | os.PathLike | None = None):
        """Save the plot as PNG at `path` (headless), or return the Figure for a notebook."""
        fig = self.figure()
        if path is not None:
            fig.savefig(os.fspath(path), format="png")
        return fig

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png")
        return buf.getvalue()


def recommend(points: Sequence[TunePoint], tolerance: float = DEFAULT_TOLERANCE) -> int:
    """The smallest size within `tolerance` of the best median throughput among sizes that fit memory."""
    fitting = [p for p in points if p.fits] or list(points)
    best = max(p.throughput for p in fitting)
    return min(p.rows for p in fitting if p.throughput >= best * (1 - tolerance))


def tune(pipeline: Pipeline, *, sizes: Sequence[int] | None = None, sample_rows: int | None = DEFAULT_SAMPLE_ROWS,
         repeats: int = DEFAULT_REPEATS, budget: float | None = DEFAULT_BUDGET,
         write: str | os.PathLike | None = None) -> TuneResult:
    """Run `pipeline` on the head of its input in batches of each size and recommend one.

    Output goes to a temporary directory in the sink's file format (Parquet for
    other sinks, whose cost is then not measured); rejects stay in memory.

    Args:
        pipeline: the job to tune (its sink is never written).
        sizes: batch sizes in rows; default `DEFAULT_SIZES`.
        sample_rows: the most rows tuning may read in all; None leaves it to `budget`.
        repeats: batches measured per size.
        budget: share of a full run's time tuning may take, when the input's size is known
            (its batches get `DEFAULT_WORK_SHARE` of it, at least `DEFAULT_MIN_BUDGET_ROWS` rows);
            None for no limit.
        write: where to store the recommendation as JSON (see `tune_file`).

    Example:
        >>> result = cb.tune(cb.scan_csv("events.csv").sink_parquet("out.parquet"), sample_rows=200_000)
        >>> result.recommended
    """
    if pipeline.sink is None:
        raise ConfigError("the pipeline has no sink; tune runs the job as it will run, so give it one")
    if (sample_rows is not None and sample_rows <= 0) or repeats <= 0:
        raise ConfigError(f"`sample_rows` and `repeats` must be positive, got {sample_rows!r} and {repeats!r}")
    if budget is not None and not 0 < budget <= 1:
        raise ConfigError(f"`budget` must be a share of the input in (0, 1], got {budget!r}")
    chosen = sorted({int(s) for s in sizes}) if sizes else list(DEFAULT_SIZES)
    if chosen[0] <= 0:
        raise ConfigError(f"`sizes` must be positive row counts, got {list(sizes or [])}")
    limit = pipeline.options.memory_limit
    per_segment = _per_segment(pipeline)
    t_start = time.perf_counter()
    plan = _Plan(chosen, repeats, share=budget, sample_rows=sample_rows, memory_limit=limit,
                 per_segment=per_segment, drain=per_segment == 1)
    opts = _TuneOptions(**{f.name: getattr(pipeline.options, f.name) for f in fields(RunOptions)}, plan=plan)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="colbatch-tune-") as tmp:
        sink, note = _sample_sink(pipeline, tmp, plan)
        if note:
            notes.append(note)
        sample = replace(pipeline, source=_Planned(pipeline.source), sink=sink, rejects_sink=None, options=opts)
        rows_read = 0
        while True:
            plan.runs += 1
            before = plan.measured()
            report = sample.run(progress=False, overwrite=True, max_error_rate=None, max_errors=None,
                                on_progress=None, on_warning=None, executor=None)  # tuned here, in this process
            rows_read += report.rows_read
            # Done, or the input ended first: read it again for what is missing while runs add something.
            if (plan.done and not plan.cut) or plan.measured() == before or not plan.next_run():
                break
    if plan.stalls:
        notes.append(f"the pipeline did not drain between sizes {plan.stalls} time(s) within {_DRAIN_STALL_S:g}s; "
                     f"those sizes were timed with earlier batches still in flight")
    points = []
    for size in chosen:
        seen = plan.seen[size]
        if not seen:
            if size in plan.entries and not any(f"{size:,} not measured" in n for n in plan.notes):
                plan.notes.append(f"batch size {size:,} not measured: no whole batch of it came out of the input")
            continue
        rate = statistics.median(r / t for r, t in seen)
        peak = plan.peak.get(size, 0)
        points.append(TunePoint(rows=size, throughput=rate, s_per_row=1 / rate, peak_rss_bytes=peak,
                                runs=[round(r / t, 1) for r, t in seen], fits=limit is None or peak <= limit,
                                sample_rows=sum(r for r, _ in seen)))
    if not points:
        raise ConfigError("no batch size could be measured; give smaller `sizes`, a larger `budget` or more input")
    result = TuneResult(points, recommend(points), sample_rows or 0, repeats, memory_limit=limit,
                        elapsed_s=time.perf_counter() - t_start, notes=notes + plan.notes, rows_read=rows_read,
                        runs=plan.runs)
    if write is not None:
        result.write(write)
    return result


def _per_segment(pipeline: Pipeline) -> int:
    """Batches per segment: one more than the busiest worker pool of the pipeline's UDFs, or one without UDFs.

    A UDF stage takes two batches before it starts, and a pool is only busy with a batch per worker.
    """
    pools = [s.workers if s.resolved_executor() != "threads" else s.concurrency
             for s in pipeline.steps if isinstance(s, MapBatches)]
    return min(MAX_SEGMENT_BATCHES, max(2, 1 + max(pools))) if pools else 1


class _SampleSink(FileSink):
    """A directory of parts in a temp dir that closes its part after each size's last batch.

    The writers buffer rows (row groups) and encode them in the background: without a cut, the
    cost of a segment of small batches would be paid during the next segment. No ledger.
    """

    supports_resume = False

    def __init__(self, path: str, *, format, options, plan: _Plan) -> None:
        super().__init__(path, format=format, options=options, part_rows=1 << 62)
        self.plan = plan

    def fresh(self) -> _SampleSink:
        """A new sink with the same settings and plan."""
        return _SampleSink(self.path, format=self.format, options=self.options, plan=self.plan)

    def write(self, batch: Batch) -> None:
        """Write, then encode everything buffered when the batch is its size's last."""
        super().write(batch)
        if self.plan.segment_ends(self.plan.observed):
            self._finish_unit()


def _sample_sink(pipeline: Pipeline, tmp: str, plan: _Plan) -> tuple[FileSink, str | None]:
    """A sink like the job's in a temp dir: the same file format, or Parquet for other sinks."""
    sink = pipeline.sink
    if isinstance(sink, FileSink):
        return _SampleSink(os.path.join(tmp, "out"), format=sink.format, options=sink.options, plan=plan), None
    return (_SampleSink(os.path.join(tmp, "out"), format="parquet", options=None, plan=plan),
            f"the sample runs write Parquet to a temp dir instead of {sink.describe()}: its cost is not measured")


def tune_job(job_path: str | os.PathLike, *, sizes: Sequence[int] | None = None,
             sample_rows: int | None = DEFAULT_SAMPLE_ROWS, repeats: int = DEFAULT_REPEATS,
             budget: float | None = DEFAULT_BUDGET, write: bool = False) -> tuple[TuneResult, Path | None]:
    """Tune a TOML job file; with `write`, store the recommendation in `JOB.tune.json` beside it."""
    from colbatch.config import load_job

    pipeline = load_job(job_path)
    target = tune_file(job_path) if write else None
    return tune(pipeline, sizes=sizes, sample_rows=sample_rows, repeats=repeats, budget=budget, write=target), target
