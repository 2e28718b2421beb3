"""Adaptive batch sizing: grow while throughput improves and memory has room, shrink at once under pressure.

The reader asks a `BatchSizer` for the size of each next batch; the writer
reports each finished batch (`observe`). The controller is a hill climb with
hysteresis: it doubles the size while the median throughput of a window of
batches improves by more than `DEFAULT_HYSTERESIS`, steps back and settles
when it gets worse, and settles on a plateau. Memory pressure (RSS above the
high-water mark of the limit) halves the size immediately and caps it, so the
controller never grows back into the pressure. A settled controller does not
move on a steady workload, so batch sizes never oscillate.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from colbatch.procs import tree_rss

log = logging.getLogger("colbatch")

# 2**17 rows is on the flat part of the throughput curve for typical 5–20 column data (≈10 MB
# of CSV) while keeping a batch far below memory limits: it was the best fixed size of all three
# `bench tune` workloads (CSV → Parquet, a CPU-bound UDF on 2 workers, CSV → PostgreSQL) here.
DEFAULT_START_ROWS = 131_072
# Below ~1k rows per-batch overhead dominates every stage (polars#18705: 33x slower).
DEFAULT_MIN_ROWS = 1_024
# Past ~1M rows throughput is flat for every workload we measured, only memory grows.
DEFAULT_MAX_ROWS = 1_048_576
# Throughput must change by more than 5% to count: run-to-run noise on a shared machine is about that.
DEFAULT_HYSTERESIS = 0.05
# Median of 3 batches per size: robust to one slow batch, still quick to converge.
DEFAULT_WINDOW = 3
# Batches still in flight at the old size when the size changes (queues hold two each side).
DEFAULT_SETTLE_BATCHES = 2
# RSS above 80% of the limit is pressure: the remaining 20% absorbs one batch's transient copies.
DEFAULT_HIGH_WATER = 0.8
# Batches alive at once: two being read (a CSV source parses one ahead), two per queue (x2 queues),
# one in a step, one in the sink, most with about one transient copy; the memory budget is divided
# among them.
DEFAULT_BATCHES_IN_MEMORY = 13
# Shrinking is pointless when the batches hold under a quarter of the memory above the baseline.
DEFAULT_BATCH_SHARE = 0.25
# Without `memory_limit` a run may use half of the memory available at start.
DEFAULT_AVAILABLE_SHARE = 0.5
# At least 8 batches per input: the last batch drains through every stage alone and worker pools
# need several batches in flight, so one batch should be at most ~12% of the run (16 cost 5% on a
# 1M-row UDF run against the best fixed size: its batches were half the best size).
DEFAULT_MIN_BATCHES = 8
# An adaptive size grows no further once a batch would hold this many bytes in memory: past ~10 MiB
# per batch throughput is flat (the engines parallelise within a batch) while peak RSS keeps
# rising with batch size, so peak RSS stays flat as the input grows.
DEFAULT_MAX_GROWTH_BYTES = 16 << 20
# Suffix of the file `colbatch tune --write` stores next to a job file.
TUNE_SUFFIX = ".tune.json"

RssFn = Callable[[], int]


def process_rss() -> int:
    """RSS of this process and its children, in bytes."""
    return tree_rss()


def default_memory_limit(rss: RssFn = process_rss) -> int:
    """A memory budget when none is set: current RSS plus a share of what is available."""
    return rss() + int(psutil.virtual_memory().available * DEFAULT_AVAILABLE_SHARE)


class BatchSizer:
    """Chooses the rows per batch during a run.

    Args:
        start_rows: first batch size (the tuned size, or `DEFAULT_START_ROWS`).
        memory_limit: bytes the whole process (with children) may use; None uses
            `default_memory_limit()`.
        adaptive: False keeps `start_rows` fixed except for memory clamps (a fixed `batch_size`).
        rss: reads the current RSS; injectable so tests can simulate pressure.
        min_rows, max_rows: bounds of the size.
        window: batches measured per size before deciding.
        hysteresis: relative throughput change that counts as better or worse.
        clock: monotonic seconds; injectable for tests.

    Example:
        >>> sizer = BatchSizer(100_000, memory_limit=2 << 30)
        >>> rows = sizer()                    # the reader asks for the next size
        >>> sizer.note_bytes(rows, 8 << 20)    # the reader reports its size in memory
        >>> sizer.observe(rows, 0.1)          # the writer reports a finished batch
    """

    # A reader may ask for the next sizes before the batches it already read are taken (a CSV
    # source parses blocks ahead). A sizer whose sizes depend on that order (the tuner's plan) says no.
    read_ahead = True

    def __init__(self, start_rows: int = DEFAULT_START_ROWS, *, memory_limit: int | None = None,
                 adaptive: bool = True, rss: RssFn = process_rss, min_rows: int = DEFAULT_MIN_ROWS,
                 max_rows: int = DEFAULT_MAX_ROWS, window: int = DEFAULT_WINDOW,
                 hysteresis: float = DEFAULT_HYSTERESIS, clock: Callable[[], float] = time.perf_counter) -> None:
        self.adaptive = adaptive
        self.min_rows = min(min_rows, start_rows)
        self.max_rows = max(max_rows, start_rows) if not adaptive else max_rows
        self.rows = max(self.min_rows, min(int(start_rows), self.max_rows))
        self.requested = int(start_rows)
        self.memory_limit = memory_limit if memory_limit is not None else default_memory_limit(rss)
        self._probe = not adaptive and memory_limit is not None
        self.window = window
        self.hysteresis = hysteresis
        self._rss = rss
        self._clock = clock
        self._t0 = clock()
        self._lock = threading.Lock()
        self._samples: list[float] = []
        # The first batches carry start-up costs and fill the queues: their spacing is not the steady rate.
        self._skip = DEFAULT_SETTLE_BATCHES + 1
        self._prev: tuple[int, float] | None = None  # (rows, median throughput) of the last size measured
        self.settled = not adaptive
        self.bytes_per_row = 0.0
        self.baseline_rss = rss()
        self.pressure_events = 0
        self._since_shrink = DEFAULT_SETTLE_BATCHES
        self.memory_errors = 0
        self.clamped = False
        self.history: list[tuple[float, int]] = [(0.0, self.rows)]
        # The input's size in source bytes, when known (the runner sets it): caps growth by the input's rows.
        self.input_bytes: int | None = None
        self._source_bytes = 0
        self._source_rows = 0

    # -- the reader's side --------------------------------------------------------------------

    def __call__(self) -> int:
        """Rows for the next batch (checks memory first, so pressure shrinks the very next batch)."""
        self.check_memory()
        if self._probe and not self.bytes_per_row:
            # A fixed size under an explicit limit: measure bytes per row on a modest batch first,
            # so a size that cannot fit is never read whole.
            return min(self.rows, DEFAULT_START_ROWS)
        return self.rows

    def check_memory(self) -> bool:
        """Shrink at once when RSS is above the high-water mark; True when it shrank."""
        rss = self._rss()
        if rss <= self.memory_limit * DEFAULT_HIGH_WATER:
            return False
        with self._lock:
            # Freed batches are not always returned to the OS at once: after a shrink, wait for a few
            # batches at the new size before judging again, unless RSS is past the limit itself.
            recent = self._since_shrink < DEFAULT_SETTLE_BATCHES and rss <= self.memory_limit
            # When the batches hold a small share of the memory above the baseline, smaller batches
            # cannot relieve it (the allocator keeps freed pages, or another part of the job holds them).
            batches = self.rows * self.bytes_per_row * DEFAULT_BATCHES_IN_MEMORY
            not_ours = self.bytes_per_row > 0 and batches < (rss - self.baseline_rss) * DEFAULT_BATCH_SHARE
            if self.rows <= self.min_rows or recent or not_ours:
                return False
            self.pressure_events += 1
            self._shrink(f"RSS {rss / 2**20:,.0f} MiB is above {DEFAULT_HIGH_WATER:.0%} of the memory limit "
                         f"{self.memory_limit / 2**20:,.0f} MiB")
        return True

    def on_memory_error(self, rows: int | None = None) -> None:
        """A step raised MemoryError on a batch of `rows` rows: next batches are at most half of that, for good.

        Batches of the old size still in flight that fail too do not shrink the size again
        (without `rows`, the current size is halved).
        """
        with self._lock:
            self.memory_errors += 1
            target = self.rows // 2 if rows is None else min(self.rows, rows // 2)
            self._shrink("a step raised MemoryError", target)

    # -- the writer's side --------------------------------------------------------------------

    def note_bytes(self, rows: int, nbytes: int, source_bytes: int = 0) -> None:
        """Record the in-memory size (and source bytes) of a batch just read; clamps the size to the memory
        budget, and an adaptive size to `DEFAULT_MIN_BATCHES` batches per input."""
        if rows <= 0 or nbytes <= 0:
            return
        with self._lock:
            bpr = nbytes / rows
            self.bytes_per_row = bpr if not self.bytes_per_row else 0.8 * self.bytes_per_row + 0.2 * bpr
            self._clamp_to_budget()
            if source_bytes > 0:
                self._source_bytes += source_bytes
                self._source_rows += rows
                self._clamp_to_input()

    def input_rows(self) -> int | None:
        """The input's rows, estimated from its size and the source bytes per row read so far."""
        if not self.input_bytes or not self._source_bytes:
            return None
        return int(self.input_bytes * self._source_rows / self._source_bytes)

    def _clamp_to_input(self) -> None:
        total = self.input_rows()
        if not self.adaptive or total is None:
            return
        cap = max(self.min_rows, total // DEFAULT_MIN_BATCHES)
        if cap >= self.max_rows:
            return
        self.max_rows = cap
        # The estimate moves a little with every batch; only a real excess shrinks the size.
        if self.rows > cap * (1 + self.hysteresis):
            self._set(cap, f"the input has about {total:,} rows: at least {DEFAULT_MIN_BATCHES} batches")
            if self._prev is not None and self._prev[0] >= cap:
                self._prev = None

    def observe(self, rows: int, seconds: float) -> None:
        """Record one finished batch: `rows` source rows took `seconds` of pipeline time."""
        with self._lock:
            self._since_shrink += 1
            if self.settled or rows <= 0 or seconds <= 0:
                return
            if self._skip > 0:
                self._skip -= 1
                return
            self._samples.append(rows / seconds)
            if len(self._samples) < self.window:
                return
            rate = statistics.median(self._samples)
            self._samples = []
            self._decide(rate)

    # -- decisions ----------------------------------------------------------------------------

    def _decide(self, rate: float) -> None:
        prev = self._prev
        if prev is not None:
            prev_rows, prev_rate = prev
            if rate < prev_rate * (1 - self.hysteresis):
                # Worse than the previous size: go back to it and stay.
                self._set(prev_rows, f"throughput fell from {prev_rate:,.0f} to {rate:,.0f} rows/s")
                self.settled = True
                return
            if rate <= prev_rate * (1 + self.hysteresis):
                # A plateau: the smaller size does as well, so keep the memory and stay there.
                self._set(min(prev_rows, self.rows), "throughput is flat")
                self.settled = True
                return
        if not self._has_room(self.rows * 2) or self.rows >= self.max_rows:
            self.settled = True
            return
        self._prev = (self.rows, rate)
        self._set(min(self.max_rows, self.rows * 2), f"throughput {rate:,.0f} rows/s, memory has room")

    def _has_room(self, rows: int) -> bool:
        if not self.bytes_per_row:
            return True
        if rows * self.bytes_per_row > DEFAULT_MAX_GROWTH_BYTES:
            return False
        cap = self.budget_rows()
        if cap is not None and rows > cap:
            return False
        need = rows * self.bytes_per_row * DEFAULT_BATCHES_IN_MEMORY
        return self._rss() + need - self._batch_memory() <= self.memory_limit * DEFAULT_HIGH_WATER

    def _batch_memory(self) -> float:
        return self.rows * self.bytes_per_row * DEFAULT_BATCHES_IN_MEMORY

    def budget_rows(self) -> int | None:
        """Most rows per batch the memory limit allows, from the measured bytes per row (None before any batch)."""
        if not self.bytes_per_row:
            return None
        budget = self.memory_limit * DEFAULT_HIGH_WATER - self.baseline_rss
        return max(self.min_rows, int(budget / (self.bytes_per_row * DEFAULT_BATCHES_IN_MEMORY)))

    def _clamp_to_budget(self) -> None:
        cap = self.budget_rows()
        # The bytes-per-row estimate moves a little with every batch; only a real excess re-clamps.
        if cap is None or self.rows <= cap * (1 + self.hysteresis):
            return
        if not self.clamped and not self.adaptive:
            log.warning("batch_size=%d does not fit memory_limit=%d MiB (about %.0f bytes per row); using %d rows",
                        self.requested, self.memory_limit >> 20, self.bytes_per_row, cap)
        self.clamped = True
        self.max_rows = min(self.max_rows, cap)
        self._set(cap, "memory budget")
        self._since_shrink = 0

    def _shrink(self, why: str, target: int | None = None) -> None:
        # Halving goes below `min_rows` only for MemoryError (pressure stops at it): a batch that
        # does not fit must get smaller, however slow.
        new = max(1, self.rows // 2 if target is None else target)
        self.max_rows = min(self.max_rows, new)
        self._set(new, why)
        self._samples = []
        self._prev = None
        self._since_shrink = 0
        # Growth is capped at the new size, so there is no way back into the pressure: stay.
        self.settled = True

    def _set(self, rows: int, why: str) -> None:
        rows = max(1, int(rows))
        if rows == self.rows:
            return
        log.debug("batch size %d -> %d rows: %s", self.rows, rows, why)
        self.rows = rows
        self._skip = DEFAULT_SETTLE_BATCHES
        self.history.append((round(self._clock() - self._t0, 3), rows))


def tune_file(job_path: str | os.PathLike) -> Path:
    """Where `colbatch tune --write` stores the recommendation for a job file."""
    p = Path(job_path)
    return p.with_name(p.name.removesuffix(".toml") + TUNE_SUFFIX)


def load_tuned_rows(path: str | os.PathLike | None) -> int | None:
    """The recommended batch rows stored in a tune file, or None when there is none or it is unreadable."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        rows = int(data["batch_rows"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rows if rows > 0 else None
