"""Alerts while a job runs: the `on_progress` and `on_warning` hooks, and warnings worth a person's attention.

The runner calls `Alerts.after_batch` for every batch the sink took. Three
warnings are raised, each at most once per run, as a log warning
(logger `colbatch`), a line in `report.warnings` and a call of `on_warning`:

* `error_rate`: rejected rows passed half of `max_error_rate` (or of `max_errors`),
  so the run is on its way to being stopped;
* `memory`: RSS (process and workers) passed `DEFAULT_MEMORY_NEAR` of the memory
  limit (`memory_limit`, or the budget the run chose without one);
* `throughput`: the rate over the last few batches fell below
  `DEFAULT_DROP_FACTOR` of the run's pace (see `ThroughputDrop`).

`on_progress` gets a `Progress` snapshot after the first batch, then at most
every `DEFAULT_PROGRESS_INTERVAL_S`, and once more when the run succeeded.
An exception raised by a hook stops the run like any other error (the
outputs are not committed), which is how a hook can abort a job.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("colbatch")

WarningKind = Literal["error_rate", "memory", "throughput"]

# Half of an error threshold: early enough to look at the rejects before the run is stopped.
DEFAULT_ERROR_SHARE = 0.5
# RSS above 90% of the limit: one more batch-sized allocation may hit the limit or the OOM killer.
DEFAULT_MEMORY_NEAR = 0.9
# A sharp drop is the recent rate under a third of the run's median; batch-to-batch noise on a
# busy shared machine stays well inside 3x, a stalled database or a UDF gone slow does not.
DEFAULT_DROP_FACTOR = 1 / 3
# The first batches fill the queues and start the workers: their spacing is not the steady rate.
DEFAULT_WARMUP_BATCHES = 3
# Batches after the warm-up a drop needs before it is judged, so a short run never warns.
DEFAULT_BASELINE_BATCHES = 8
# The recent rate is over the last 5 batches, leaving out the slowest: one slow batch (a GC pause, a
# row-group flush, a tiny last batch of a file) is not a drop; a lasting slowdown is.
DEFAULT_ROLLING_BATCHES = 5
# ... and at least a quarter of the run's time since the warm-up, so a drop must last to count.
DEFAULT_WINDOW_SHARE = 0.25
# ... and at least half a second: a run too short to show a lasting drop never warns.
DEFAULT_MIN_WINDOW_S = 0.5
# Windows of up to this many batches leave their slowest batch out.
DEFAULT_TRIM_BELOW = 32
# Twice a second: smooth enough for a progress display, negligible cost.
DEFAULT_PROGRESS_INTERVAL_S = 0.5
# The error rate is judged only after this many rows (as the runner's threshold is).
DEFAULT_RATE_MIN_ROWS = 100


@dataclass(frozen=True)
class Progress:
    """A snapshot of a running job, passed to `on_progress`.

    `rows_per_s` is the recent rate (the last few batches); `fraction` is the share
    of the input bytes read, None when the source's size is unknown.
    """

    elapsed_s: float
    rows_read: int
    rows_written: int
    rows_filtered: int
    rows_rejected: int
    batches: int
    batch_rows: int
    rows_per_s: float
    rss_bytes: int
    bytes_read: int
    total_bytes: int | None
    done: bool = False

    @property
    def fraction(self) -> float | None:
        """Share of the input read so far (0..1), or None when the input size is unknown."""
        if not self.total_bytes:
            return None
        # Bytes read count records, not a header or a trailing newline: a finished run is all of it.
        return 1.0 if self.done else min(1.0, self.bytes_read / self.total_bytes)


@dataclass(frozen=True)
class RunWarning:
    """A warning raised during a run, passed to `on_warning` (also logged and kept in `report.warnings`).

    `value` is what was measured and `threshold` what it passed: a rejected share or count,
    RSS bytes, or rows/s.
    """

    kind: WarningKind
    message: str
    value: float
    threshold: float
    elapsed_s: float


class ThroughputDrop:
    """Detects a sharp, lasting drop of throughput from per-batch (rows, seconds).

    Rates are ratios of sums, not medians of per-batch rates: batches leaving a worker pool
    arrive in bursts (two at once, then a pause), which makes single-batch rates swing both
    ways while the pace is steady. After `warmup` batches, the recent rate (rows / seconds of
    the last `rolling` batches, or more to span `DEFAULT_WINDOW_SHARE` of the run's time, but the
    slowest) is compared with the run's pace (rows / seconds of all
    batches since the warm-up, once there are `baseline` of them): under `factor` of it
    is a drop. Fed durations rather than a clock, it is deterministic to test.
    """

    def __init__(self, *, factor: float = DEFAULT_DROP_FACTOR, warmup: int = DEFAULT_WARMUP_BATCHES,
                 baseline: int = DEFAULT_BASELINE_BATCHES, rolling: int = DEFAULT_ROLLING_BATCHES,
                 min_window_s: float = DEFAULT_MIN_WINDOW_S) -> None:
        self.factor = factor
        self.min_window_s = min_window_s
        self.warmup = warmup
        self.baseline = baseline
        self.rolling = rolling
        self._recent: deque[tuple[int, float]] = deque()
        self._before = [0, 0.0, 0]  # rows, seconds and batches older than the recent window
        self._recent_s = 0.0
        self._recent_rows = 0
        self._seen = 0
        self.rate = 0.0
        self.median = 0.0  # the run's pace since the warm-up (rows/s)

    def add(self, rows: int, seconds: float) -> bool:
        """Record one batch; True when the recent rate is now under `factor` of the run's pace."""
        self._seen += 1
        if self._seen <= self.warmup or rows <= 0 or seconds <= 0:
            return False
        self._recent.append((rows, seconds))
        self._recent_s += seconds
        self._recent_rows += rows
        # The window keeps at least `rolling` batches and a quarter of the run's time since the warm-up:
        # outputs of a pool arrive in waves (32 threads: 32 batches at once, then a pause), and a
        # window shorter than a wave would judge the pause alone.
        total_s = self._recent_s + self._before[1]
        span = max(DEFAULT_WINDOW_SHARE * total_s, self.min_window_s)
        while len(self._recent) > self.rolling and self._recent_s - self._recent[0][1] >= span:
            old_rows, old_seconds = self._recent.popleft()
            self._recent_s -= old_seconds
            self._recent_rows -= old_rows
            self._before[0] += old_rows
            self._before[1] += old_seconds
            self._before[2] += 1
        if (self._before[2] + len(self._recent) < max(self.baseline, self.rolling) or not self._before[2]
                or self._recent_s < self.min_window_s):
            return False
        rows_in, seconds_in = self._recent_rows, self._recent_s
        if len(self._recent) <= DEFAULT_TRIM_BELOW:
            # The slowest batch of a short window is left out: one hiccup is not a lasting drop (a long
            # window dilutes it anyway, and skipping the scan keeps the cost per batch constant).
            slow_rows, slow_seconds = min(self._recent, key=lambda b: b[0] / b[1])
            rows_in, seconds_in = rows_in - slow_rows, seconds_in - slow_seconds
        self.rate = rows_in / seconds_in if seconds_in > 0 else float("inf")
        self.median = (self._before[0] + self._recent_rows) / (self._before[1] + self._recent_s)
        return self.rate < self.median * self.factor


class Alerts:
    """Checks a run after every batch: progress calls, error-rate, memory and throughput warnings.

    Args:
        snapshot: builds a `Progress` from the runner's counters (only when a check or a progress
            call needs one: building it for every batch showed on the per-batch path of small batches).
        counts: `(rows_read, rows_rejected, rss_bytes)` now, cheaply, for the checks made after
            every batch.
        max_error_rate, max_errors: the run's thresholds (None: not checked).
        memory_limit: bytes the run may use; `explicit_limit` says whether the user set it.
        on_progress, on_warning: the user's hooks, or None.
        clock: monotonic seconds; injectable for tests.
    """

    def __init__(self, snapshot: Callable[[bool], Progress], *, counts: Callable[[], tuple[int, int, int]],
                 max_error_rate: float | None, max_errors: int | None, memory_limit: int | None,
                 explicit_limit: bool = True,
                 on_progress: Callable[[Progress], object] | None = None,
                 on_warning: Callable[[RunWarning], object] | None = None,
                 progress_interval_s: float = DEFAULT_PROGRESS_INTERVAL_S,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self._snapshot = snapshot
        self._counts = counts
        self.max_error_rate = max_error_rate
        self.max_errors = max_errors
        self.memory_limit = memory_limit
        self.explicit_limit = explicit_limit
        self.on_progress = on_progress
        self.on_warning = on_warning
        self.progress_interval_s = progress_interval_s
        self._clock = clock
        self._last_progress: float | None = None
        self.drop = ThroughputDrop()
        self._recent: deque[tuple[int, float]] = deque()
        self._recent_rows = 0
        self._recent_s = 0.0
        self.raised: dict[str, RunWarning] = {}

    @property
    def recent_rate(self) -> float:
        """Rows/s over the last few batches (0 before the first)."""
        return self._recent_rows / self._recent_s if self._recent_s > 0 else 0.0

    @property
    def messages(self) -> list[str]:
        """The warnings raised so far, as text, in the order they were raised."""
        return [w.message for w in self.raised.values()]

    def after_batch(self, rows: int, seconds: float) -> None:
        """One batch reached the sink: `rows` source rows, `seconds` since the previous one."""
        dropped = self.drop.add(rows, seconds)
        recent = self._recent
        recent.append((rows, seconds))
        self._recent_rows += rows
        self._recent_s += seconds
        if len(recent) > DEFAULT_ROLLING_BATCHES:
            old_rows, old_s = recent.popleft()
            self._recent_rows -= old_rows
            self._recent_s -= old_s
        read, rejected, rss = self._counts()
        self._check_errors(read, rejected)
        self._check_memory(rss)
        if dropped and "throughput" not in self.raised:
            self._warn("throughput", f"throughput dropped to {self.drop.rate:,.0f} rows/s over the last "
                                     f"{DEFAULT_ROLLING_BATCHES} batches, under {self.drop.factor:.0%} of this run's "
                                     f"pace ({self.drop.median:,.0f} rows/s); see report.bottleneck for the stage "
                                     "that slowed down", self.drop.rate, self.drop.median * self.drop.factor)
        if self.on_progress is not None:
            now = self._clock()
            if self._last_progress is None or now - self._last_progress >= self.progress_interval_s:
                self._last_progress = now
                self.on_progress(self._snapshot(False))

    def finish(self) -> None:
        """The run succeeded: a last progress call with `done=True`."""
        if self.on_progress is not None:
            self.on_progress(self._snapshot(True))

    def _check_errors(self, read: int, rejected: int) -> None:
        if "error_rate" in self.raised:
            return
        if self.max_errors is not None and rejected > self.max_errors * DEFAULT_ERROR_SHARE:
            self._warn("error_rate", f"{rejected:,} rows rejected, more than half of max_errors={self.max_errors:,}; "
                                     "the run stops past it (the rejects say why rows failed)",
                       rejected, self.max_errors * DEFAULT_ERROR_SHARE)
        elif (self.max_error_rate is not None and read >= DEFAULT_RATE_MIN_ROWS
              and rejected / read > self.max_error_rate * DEFAULT_ERROR_SHARE):
            self._warn("error_rate", f"{rejected:,} of {read:,} rows rejected ({rejected / read:.1%}), more than half "
                                     f"of max_error_rate={self.max_error_rate:g}; the run stops past it "
                                     "(the rejects say why rows failed)",
                       rejected / read, self.max_error_rate * DEFAULT_ERROR_SHARE)

    def _check_memory(self, rss: int) -> None:
        if "memory" in self.raised or not self.memory_limit or not rss:
            return
        near = self.memory_limit * DEFAULT_MEMORY_NEAR
        if rss > near:
            limit = "memory_limit" if self.explicit_limit else "the memory budget (no memory_limit set)"
            self._warn("memory", f"RSS {rss / 2**20:,.0f} MiB is above {DEFAULT_MEMORY_NEAR:.0%} of "
                                 f"{limit} {self.memory_limit / 2**20:,.0f} MiB; batches shrink to fit, "
                                 "but a larger limit or fewer columns would be faster",
                       rss, near)

    def _warn(self, kind: WarningKind, message: str, value: float, threshold: float) -> None:
        warning = RunWarning(kind, message, float(value), float(threshold), round(self._snapshot(False).elapsed_s, 3))
        self.raised[kind] = warning
        log.warning("%s", message)
        if self.on_warning is not None:
            self.on_warning(warning)
