"""Run profiling and the bottleneck verdict: which resource bounds a job, why, and what to change.

A `Timeline` samples, every `DEFAULT_TIMELINE_INTERVAL_S`, the CPU use of this
process and of its children (UDF workers), the depth of the queues between
stages, rows written and each stage's cumulative busy time; a `GcTimer` adds up
garbage-collector pauses. `diagnose` turns those measurements and the stage
counters into a verdict naming one resource — a step's CPU, source I/O or
decompression, the sink or database, memory — with a one-sentence explanation
and a concrete recommendation.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from colbatch.metrics import StageMetrics
from colbatch.procs import descendant_pids

# Four samples a second: enough for a readable chart of a minute-long job, negligible cost.
DEFAULT_TIMELINE_INTERVAL_S = 0.25
# A long job keeps its first ~40 minutes of samples at full resolution, then stops (bounded report size).
MAX_TIMELINE_SAMPLES = 10_000
# A stage busy at least half of the wall time is the one that bounds the run; below that nothing is saturated.
DEFAULT_SATURATED_SHARE = 0.5
# Peak RSS above 90% of the memory limit means the limit, not a stage, shaped the run.
DEFAULT_MEMORY_NEAR = 0.9
COMPRESSED_SUFFIXES = (".gz", ".zst", ".bz2", ".xz")

Resource = str  # "cpu" | "source" | "decompression" | "sink" | "database" | "memory" | "none"


class GcTimer:
    """Adds up garbage-collector pauses while installed (`gc.callbacks`)."""

    def __init__(self) -> None:
        self.pause_s = 0.0
        self.max_pause_s = 0.0
        self.collections = 0
        self._t0: float | None = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            pause = time.perf_counter() - self._t0
            self._t0 = None
            self.pause_s += pause
            self.max_pause_s = max(self.max_pause_s, pause)
            self.collections += 1

    def __enter__(self) -> GcTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready totals."""
        return {"pause_s": round(self.pause_s, 4), "max_pause_s": round(self.max_pause_s, 4),
                "collections": self.collections}


@dataclass
class Timeline:
    """Samples CPU, queue depths, rows written and stage busy time over a run, in a background thread.

    Args:
        stages: the run's stage counters (read live).
        queues: name → a callable returning that queue's current depth.
        rows: a callable returning rows written so far.
    """

    stages: Sequence[StageMetrics]
    queues: dict[str, Callable[[], int]] = field(default_factory=dict)
    rows: Callable[[], int] = lambda: 0
    interval_s: float = DEFAULT_TIMELINE_INTERVAL_S
    samples: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._children: dict[int, psutil.Process] = {}
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="colbatch-timeline", daemon=True)
        self._cpu0 = self._proc.cpu_times()

    def start(self) -> Timeline:
        """Start sampling."""
        self._proc.cpu_percent(None)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (takes a last sample)."""
        self._stop.set()
        self._thread.join()
        self.sample()

    def _child_cpu(self) -> float:
        total = 0.0
        for pid in descendant_pids(self._proc.pid):
            proc = self._children.get(pid)
            try:
                if proc is None:
                    self._children[pid] = proc = psutil.Process(pid)
                    proc.cpu_percent(None)  # the first call only primes the counter
                    continue
                total += proc.cpu_percent(None)
            except psutil.Error:
                continue
        return total

    def sample(self) -> None:
        """Take one sample now."""
        if len(self.samples) >= MAX_TIMELINE_SAMPLES:
            return
        try:
            cpu = self._proc.cpu_percent(None)
        except psutil.Error:
            cpu = 0.0
        self.samples.append({
            "t": round(time.perf_counter() - self._t0, 3),
            "cpu_main": round(cpu, 1),
            "cpu_children": round(self._child_cpu(), 1),
            "queues": {name: depth() for name, depth in self.queues.items()},
            "rows": self.rows(),
            "busy": {s.name: round(s.busy_s, 3) for s in self.stages},
        })

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def cpu_summary(self, elapsed_s: float) -> dict[str, float]:
        """Average CPU of this process over the run (percent of one core) and mean of its children's samples."""
        now = self._proc.cpu_times()
        used = (now.user - self._cpu0.user) + (now.system - self._cpu0.system)
        kids = [s["cpu_children"] for s in self.samples]
        return {"main_percent": round(100 * used / elapsed_s, 1) if elapsed_s > 0 else 0.0,
                "children_percent": round(sum(kids) / len(kids), 1) if kids else 0.0,
                "cores": os.cpu_count() or 1}


@dataclass
class MemoryFacts:
    """What the run knows about memory: the limit, the peak, and the batch sizer's reactions."""

    limit: int | None = None
    peak_rss: int = 0
    pressure_events: int = 0
    memory_errors: int = 0
    clamped: bool = False


def diagnose(stages: Sequence[StageMetrics], elapsed_s: float, *, source: str, sink: str,
             udfs: dict[str, int] | None = None, memory: MemoryFacts | None = None,
             cpu: dict[str, float] | None = None, gc_pause_s: float = 0.0) -> dict[str, Any]:
    """The bottleneck verdict: the resource that bounds the run, why, and what to change.

    Args:
        stages: stage counters of the run (read, steps, write).
        elapsed_s: wall time of the run.
        source, sink: their descriptions (file names tell compression; the sink name tells a database).
        udfs: stage name → workers, for the `map_batches` stages.
        memory: the limit, the peak and the sizer's shrink events.
        cpu: averages from `Timeline.cpu_summary`.
        gc_pause_s: total garbage-collector pause time.

    Returns:
        `resource`, `stage`, `verdict` (what bounds it), `explanation` (one sentence why),
        `recommendation` (one change), `busy_share` per stage, plus the inputs used.
    """
    udfs = udfs or {}
    memory = memory or MemoryFacts()
    cores = int((cpu or {}).get("cores", os.cpu_count() or 1))
    if elapsed_s <= 0 or not stages:
        return {"resource": "none", "stage": None, "verdict": "too short to tell", "explanation": "",
                "recommendation": "", "busy_share": {}}
    share = {s.name: round(min(1.0, s.busy_s / elapsed_s), 3) for s in stages}
    name = max(share, key=share.__getitem__)
    pct = share[name] * 100
    extra = {"busy_share": share, "cpu": cpu or {}, "gc_pause_s": round(gc_pause_s, 4)}
    near = memory.limit is not None and memory.peak_rss >= DEFAULT_MEMORY_NEAR * memory.limit
    if memory.memory_errors or memory.pressure_events or near or memory.clamped:
        limit = f"memory_limit {memory.limit / 2**20:,.0f} MiB" if memory.limit else "the available memory"
        what = []
        if memory.memory_errors:
            what.append(f"{memory.memory_errors} batch(es) raised MemoryError and were retried in halves")
        if memory.pressure_events or memory.clamped:
            what.append("batches were shrunk to fit")
        if near:
            what.append(f"peak RSS reached {memory.peak_rss / 2**20:,.0f} MiB")
        return {"resource": "memory", "stage": name,
                "verdict": f"memory is the limit: {', '.join(what)} against {limit}",
                "explanation": "small batches that fit the limit pay per-batch overhead in every stage, and "
                               "RSS near the limit risks the job being killed",
                "recommendation": "raise memory_limit, drop unused columns early with select, or use fewer "
                                  "UDF workers (each holds batches in memory)", **extra}
    if pct < DEFAULT_SATURATED_SHARE * 100:
        return {"resource": "none", "stage": name,
                "verdict": f"no stage is saturated (the busiest, `{name}`, is busy {pct:.0f}% of the time)",
                "explanation": "the job is short, or its stages wait on each other or on I/O outside colbatch",
                "recommendation": "nothing to tune; for a short job, start-up dominates", **extra}
    if name == "read":
        if any(source.lower().endswith(s) or f"{s} " in source.lower() for s in COMPRESSED_SUFFIXES):
            return {"resource": "decompression", "stage": name,
                    "verdict": f"reading is busy {pct:.0f}% of the time inflating compressed input ({source})",
                    "explanation": "one compressed file is inflated on one core, so the other stages wait for it",
                    "recommendation": "split the input into several files (or store it uncompressed or as "
                                      "Parquet) so it can be read in parallel", **extra}
        return {"resource": "source", "stage": name,
                "verdict": f"reading and parsing the source is busy {pct:.0f}% of the time ({source})",
                "explanation": "text parsing costs more per row than every step and the sink together",
                "recommendation": "convert the input to Parquet once (it parses several times faster than "
                                  "CSV/JSON), or split it into several files", **extra}
    if name == "write":
        low = sink.lower()
        if low.startswith(("postgresql", "postgres")) or "postgresql" in low:
            return {"resource": "database", "stage": name,
                    "verdict": f"the PostgreSQL sink blocks {pct:.0f}% of the time ({sink})",
                    "explanation": "the database ingests rows slower than colbatch produces them (WAL, indexes, "
                                   "constraints)",
                    "recommendation": "load into an UNLOGGED staging table or drop indexes during the load, then "
                                      "rebuild them", **extra}
        if low.startswith("duckdb") or ".duckdb" in low:
            return {"resource": "database", "stage": name,
                    "verdict": f"the DuckDB sink is busy {pct:.0f}% of the time ({sink})",
                    "explanation": "inserting into the table is slower than producing the rows",
                    "recommendation": "write Parquet and query it with DuckDB instead of loading a table",
                    **extra}
        if low.startswith("foreach_batch") or "foreach_batch" in low:
            return {"resource": "sink", "stage": name,
                    "verdict": f"the foreach_batch function is busy {pct:.0f}% of the time ({sink})",
                    "explanation": "every batch waits for your sink function, so the rest of the job idles",
                    "recommendation": "make the function send larger batches or call it concurrently (a thread "
                                      "pool inside it)", **extra}
        return {"resource": "sink", "stage": name,
                "verdict": f"the sink is busy {pct:.0f}% of the time ({sink})",
                "explanation": "encoding and compressing the output is slower than producing it",
                "recommendation": "a lighter codec (compression=\"lz4\" or \"snappy\") writes faster", **extra}
    if name in udfs:
        workers = udfs[name]
        advice = (f"set workers={max(2, cores)} to run it on {max(2, cores)} processes" if workers < max(2, cores)
                  else "it already uses every core: vectorise it with Polars expressions, or scale out with Dask")
        return {"resource": "cpu", "stage": name,
                "verdict": f"udf `{name.split(':', 1)[-1]}` is busy {pct:.0f}% of the time on {workers} worker(s)",
                "explanation": "the Python function is CPU-bound and every other stage waits for it",
                "recommendation": advice, **extra}
    return {"resource": "cpu", "stage": name,
            "verdict": f"step `{name}` is busy {pct:.0f}% of the time",
            "explanation": "its expressions cost more per row than reading and writing",
            "recommendation": "simplify the step's expressions (avoid map_elements and string work per row) or "
                              "filter rows before it", **extra}
