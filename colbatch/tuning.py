"""The batch-size tuner: run a job on a sample at several batch sizes and recommend one.

Each size runs the job's own source, steps and sink format on the first rows
of the input (`DEFAULT_SAMPLE_BATCHES` batches of that size, at least
`DEFAULT_MIN_SAMPLE_ROWS`), with output in a temporary directory (never the
real sink), `repeats` times. Throughput is the steady rate: rows from the
first batch written to the commit, so start-up and pipeline fill do not
penalise the short runs of small sizes. Tuning takes at most `budget` (10%)
of the time a full run would: sizes whose samples would not fit run fewer
repeats or are left out, with a note. The smallest size within `DEFAULT_TOLERANCE` of
the best that fits the memory limit is recommended. `batch_size="auto"` starts
from a recommendation written next to the job file (`JOB.tune.json`).
"""

from __future__ import annotations

import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from colbatch.batch import Batch, Split
from colbatch.batching import process_rss, tune_file
from colbatch.errors import ConfigError, MissingDependencyError
from colbatch.pipeline import Pipeline
from colbatch.sinks.files import FileSink
from colbatch.sources.base import RejectFn, Source

# The sizes of the benchmark grid, from per-batch-overhead territory to memory-heavy.
DEFAULT_SIZES = (8_192, 32_768, 131_072, 524_288, 1_048_576)
# None: each size's sample is DEFAULT_SAMPLE_BATCHES of its batches, at least DEFAULT_MIN_SAMPLE_ROWS.
DEFAULT_SAMPLE_ROWS: int | None = None
# Three batches: one fills the pipeline, two are measured at the steady rate (two when the budget is short).
DEFAULT_SAMPLE_BATCHES = 3
# Below ~32k rows a sample run is over in a few milliseconds, too short to time on a busy machine.
DEFAULT_MIN_SAMPLE_ROWS = 32_768
# Tuning that costs more than a tenth of the run it tunes is not worth it.
DEFAULT_BUDGET = 0.1
# Inputs too small for a tenth to measure anything may take the time of this many rows (a second or so).
DEFAULT_MIN_BUDGET_ROWS = 400_000
# Three runs per size: the median drops one outlier on a shared machine.
DEFAULT_REPEATS = 3
# Sizes within 5% of the best throughput are equally good (run-to-run noise); the smallest wins (less memory).
DEFAULT_TOLERANCE = 0.05


class _Head(Source):
    """The first `rows` records of another source (whole batches; stops after the one that reaches it)."""

    def __init__(self, inner: Source, rows: int) -> None:
        self.inner = inner
        self.rows = rows
        self.name = inner.name
        self.notes = inner.notes
        self.stable = inner.stable
        self.adaptive_batches = inner.adaptive_batches
        self._left = rows

    @property
    def schema(self):
        """The inner source's schema."""
        return self.inner.schema

    def splits(self) -> Sequence[Split]:
        """The inner source's splits; a new run starts counting rows again."""
        self._left = self.rows
        return self.inner.splits()

    def read(self, split: Split, *, batch_rows, on_reject: RejectFn, skip_rows: int = 0) -> Iterator[Batch]:
        """The inner batches until the row budget is spent."""
        if self._left <= 0:
            return
        for batch in self.inner.read(split, batch_rows=batch_rows, on_reject=on_reject, skip_rows=skip_rows):
            yield batch
            self._left -= batch.rows_read
            if self._left <= 0:
                return

    def total_bytes(self) -> int | None:
        """Unknown: only a head of the input is read."""
        return None

    def describe(self) -> str:
        """The inner description, with the sample size."""
        return f"{self.inner.describe()} (first {self.rows:,} rows)"


@dataclass
class TunePoint:
    """Measurements at one batch size."""

    rows: int
    throughput: float  # median rows/s over the repeats
    s_per_row: float  # median seconds per row
    peak_rss_bytes: int  # highest peak RSS over the repeats (process and children)
    runs: list[float] = field(default_factory=list)  # rows/s of each repeat
    fits: bool = True  # peak RSS within the memory limit (always True without one)
    sample_rows: int = 0  # rows per run at this size


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

    def best(self) -> TunePoint:
        """The size with the highest median throughput."""
        return max(self.points, key=lambda p: p.throughput)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary; `batch_rows` is what `batch_size="auto"` starts from."""
        return {"batch_rows": self.recommended, "sample_rows": self.sample_rows, "repeats": self.repeats,
                "memory_limit": self.memory_limit, "elapsed_s": round(self.elapsed_s, 3), "rows_read": self.rows_read,
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
                     f"up to {self.repeats} runs per size, {self.rows_read:,} rows read in {self.elapsed_s:.1f}s")
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
    """Run `pipeline` on the first rows of its input at each batch size and recommend one.

    Output goes to a temporary directory in the sink's file format (Parquet for
    other sinks, whose cost is then not measured); rejects stay in memory.

    Args:
        pipeline: the job to tune (its sink is never written).
        sizes: batch sizes in rows; default `DEFAULT_SIZES` (up to `sample_rows` when given).
        sample_rows: rows read per run (whole batches: a run may read a little more); None reads
            `DEFAULT_SAMPLE_BATCHES` batches of each size, at least `DEFAULT_MIN_SAMPLE_ROWS`.
        repeats: runs per size; the median counts.
        budget: share of a full run's time tuning may take in all (at least the time of
            `DEFAULT_MIN_BUDGET_ROWS` rows), when the input's size is known; None for no limit.
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
    if sizes:
        chosen = sorted({int(s) for s in sizes})
    elif sample_rows is None:
        chosen = list(DEFAULT_SIZES)
    else:
        chosen = [s for s in DEFAULT_SIZES if s <= sample_rows] or [sample_rows]
    if chosen[0] <= 0:
        raise ConfigError(f"`sizes` must be positive row counts, got {list(sizes or [])}")
    limit = pipeline.options.memory_limit
    notes: list[str] = []
    t_start = time.perf_counter()
    points = []
    with tempfile.TemporaryDirectory(prefix="colbatch-tune-") as tmp:
        sink, note = _sample_sink(pipeline, tmp)
        if note:
            notes.append(note)
        plan = _Budget(pipeline.source.total_bytes(), budget)
        measured: dict[int, tuple[int, list[float], int]] = {}  # size -> (sample rows, rates, peak RSS)

        def measure(rows: int, n: int) -> None:
            before = process_rss()
            rate, report = _steady_rate(replace(pipeline, source=_Head(pipeline.source, n), sink=sink,
                                                rejects_sink=None), rows)
            plan.spent(report, rate)
            _, rates, peak = measured.get(rows, (n, [], 0))
            measured[rows] = (n, [*rates, rate], max(peak, report.peak_rss_bytes, before))

        # Breadth first: every size once (the budget allowing), then repeats, fastest sizes first: under
        # a short budget the repeats go where they decide the recommendation.
        for rows in chosen:
            n = _sample_for(rows, sample_rows, plan)
            if n is None:
                notes.append(f"batch size {rows:,} not measured: its sample would take tuning past "
                             f"{budget:.0%} of the time a full run of the input's ~{plan.input_rows:,.0f} rows takes")
                continue
            measure(rows, n)
        for _ in range(repeats - 1):
            ranked = sorted(measured, key=lambda r: -statistics.median(measured[r][1]))
            for rows in ranked:
                if plan.fits(measured[rows][0]):
                    measure(rows, measured[rows][0])
        for rows in sorted(measured):
            n, rates, peak = measured[rows]
            med = statistics.median(rates)
            points.append(TunePoint(rows=rows, throughput=med, s_per_row=1 / med if med else float("inf"),
                                    peak_rss_bytes=peak, runs=[round(r, 1) for r in rates],
                                    fits=limit is None or peak <= limit, sample_rows=n))
    if not points:
        raise ConfigError("no batch size could be measured; give smaller `sizes` or a larger `budget`")
    result = TuneResult(points, recommend(points), sample_rows or 0, repeats, memory_limit=limit,
                        elapsed_s=time.perf_counter() - t_start, notes=notes, rows_read=plan.rows)
    if write is not None:
        result.write(write)
    return result


class _Budget:
    """How much tuning may still spend: `share` of the time a full run would take.

    A full run's time is the input's rows (estimated from its bytes and the bytes per row read
    so far) at the best rate measured; a sample's time is its rows at the last size's rate plus
    the fixed cost per run seen so far (start-up, pipeline fill, commit).
    Inputs too small for a share to measure anything get `DEFAULT_MIN_BUDGET_ROWS` rows' worth.
    """

    def __init__(self, total_bytes: int | None, share: float | None, clock=time.perf_counter) -> None:
        self.total_bytes = total_bytes
        self.share = share
        self.rows = 0
        self.bytes = 0
        self.best_rate = 0.0
        self.last_rate = 0.0
        self.runs = 0
        self.work_s = 0.0  # the runs' rows at their steady rates: the rest of the time spent is fixed cost
        self._clock = clock
        self._t0 = clock()

    @property
    def input_rows(self) -> float:
        """The input's rows, estimated from the bytes per row read so far (inf while unknown)."""
        if not self.total_bytes or not self.rows or not self.bytes:
            return float("inf")
        return self.total_bytes / (self.bytes / self.rows)

    def fits(self, sample: int) -> bool:
        """True when a run of `sample` rows fits what is left (the first run of all always does)."""
        if self.share is None or not self.rows or self.best_rate <= 0:
            return True
        allowed_s = max(self.share * self.input_rows, DEFAULT_MIN_BUDGET_ROWS) / self.best_rate
        spent_s = self._clock() - self._t0
        fixed_s = max(0.0, spent_s - self.work_s) / self.runs if self.runs else 0.0
        return spent_s + fixed_s + sample / (self.last_rate or self.best_rate) <= allowed_s

    def spent(self, report, rate: float) -> None:
        """Count a sample run's rows, bytes and rate."""
        self.rows += report.rows_read
        self.bytes += report.stages[0].bytes_in if report.stages else 0
        self.last_rate = rate
        self.best_rate = max(self.best_rate, rate)
        self.runs += 1
        self.work_s += report.rows_read / rate if rate > 0 else 0.0


def _sample_for(rows: int, sample_rows: int | None, plan: _Budget) -> int | None:
    """Rows of one sample run at `rows` per batch: `sample_rows`, or as many batches as fit (None: none fit)."""
    if sample_rows is not None:
        return sample_rows if plan.fits(sample_rows) else None
    for batches in range(DEFAULT_SAMPLE_BATCHES, 1, -1):
        n = max(DEFAULT_MIN_SAMPLE_ROWS, batches * rows)
        if plan.fits(n):
            return n
    return None


def _steady_rate(sample: Pipeline, rows: int):
    """Run `sample` at `rows` per batch; rows/s from the first batch written to the commit, and the report.

    Start-up and the first batch (which fills the pipeline) are left out: they cost the same
    per run whatever the size, and would make short runs of small sizes look slower than they are.
    """
    seen = []
    report = sample.run(batch_size=rows, progress=False, overwrite=True, max_error_rate=None, on_progress=seen.append)
    first = seen[0] if seen else None
    if (first is None or first.done or report.elapsed_s <= first.elapsed_s
            or report.rows_written <= first.rows_written):  # one batch: nothing after the first to time
        return (report.rows_read / report.elapsed_s if report.elapsed_s > 0 else 0.0), report
    # Source rows behind the output rows written after the first batch (filters keep the ratio).
    steady = report.rows_read * (report.rows_written - first.rows_written) / report.rows_written
    return steady / (report.elapsed_s - first.elapsed_s), report


def _sample_sink(pipeline: Pipeline, tmp: str) -> tuple[FileSink, str | None]:
    """A sink like the job's in a temp dir: the same file format, or Parquet for other sinks."""
    sink = pipeline.sink
    if isinstance(sink, FileSink):
        name = os.path.basename(os.path.normpath(sink.path)) or "out"
        return FileSink(os.path.join(tmp, name), format=sink.format, options=sink.options,
                        part_rows=sink.part_rows), None
    return (FileSink(os.path.join(tmp, "out.parquet"), format="parquet"),
            f"the sample runs write Parquet to a temp dir instead of {sink.describe()}: its cost is not measured")


def tune_job(job_path: str | os.PathLike, *, sizes: Sequence[int] | None = None,
             sample_rows: int | None = DEFAULT_SAMPLE_ROWS, repeats: int = DEFAULT_REPEATS,
             budget: float | None = DEFAULT_BUDGET, write: bool = False) -> tuple[TuneResult, Path | None]:
    """Tune a TOML job file; with `write`, store the recommendation in `JOB.tune.json` beside it."""
    from colbatch.config import load_job

    pipeline = load_job(job_path)
    target = tune_file(job_path) if write else None
    return tune(pipeline, sizes=sizes, sample_rows=sample_rows, repeats=repeats, budget=budget, write=target), target
