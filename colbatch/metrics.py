"""Per-stage counters and timers, a byte-bounded queue, and a process memory sampler."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from colbatch.procs import tree_rss

# Sampling every 100 ms costs well under 1% CPU and catches RSS peaks of batch-sized allocations.
DEFAULT_SAMPLE_INTERVAL_S = 0.1


@dataclass
class StageMetrics:
    """Rows and time of one stage; `rows_in + rows_created = rows_out + rows_filtered + rows_rejected` must hold."""

    name: str
    rows_in: int = 0
    rows_out: int = 0
    rows_filtered: int = 0
    rows_rejected: int = 0
    # Rows a stage added (a UDF that returns more rows than it got); 0 for every other stage.
    rows_created: int = 0
    bytes_in: int = 0
    busy_s: float = 0.0
    wait_s: float = 0.0
    blocked_s: float = 0.0
    # A UDF on colbatch's worker processes: CPU seconds the workers spent in the user's function
    # and in moving batches (reading and writing Arrow IPC in shared memory); None elsewhere.
    worker_cpu_s: float | None = None
    transport_cpu_s: float | None = None

    def balanced(self) -> bool:
        """True when the accounting invariant holds for this stage."""
        return self.rows_in + self.rows_created == self.rows_out + self.rows_filtered + self.rows_rejected

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, times rounded to microseconds."""
        d = asdict(self)
        for key in ("busy_s", "wait_s", "blocked_s", "worker_cpu_s", "transport_cpu_s"):
            if d[key] is None:
                del d[key]
            else:
                d[key] = round(d[key], 6)
        return d


class ByteQueue:
    """FIFO bounded by item count and total bytes; one oversize item is always admitted.

    `small_items` (more than `max_items`) may wait while they total at most `small_bytes`: two
    10 MB batches are enough to overlap two stages, but two 30 kB batches (API pages, 1,000-row
    UDF batches) are not, each hand-off then waits for the other thread to wake.

    One lock with two conditions (not empty, not full), each woken only by what it waits for, and
    only when a thread waits on it: on the per-batch path of small batches, waking every waiter at
    every put and get showed, and so did `Condition.notify` with nobody waiting (it is Python code).
    """

    def __init__(self, max_items: int, max_bytes: int, *, small_items: int = 0, small_bytes: int = 0) -> None:
        self._items: collections.deque = collections.deque()
        self._bytes = 0
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._small_items = max(small_items, max_items)
        self._small_bytes = min(small_bytes, max_bytes)
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._getters = 0  # threads waiting in `get` / in `put`
        self._putters = 0
        self.max_depth = 0

    def __len__(self) -> int:
        """Items waiting now."""
        return len(self._items)

    def put(self, item: Any, size: int, stop: threading.Event) -> bool:
        """Enqueue; blocks while full. Returns False when `stop` was set while waiting."""
        with self._lock:
            items = self._items
            while items and self._full(len(items), self._bytes + size):
                if stop.is_set():
                    return False
                self._putters += 1
                try:
                    self._not_full.wait(0.1)
                finally:
                    self._putters -= 1
            items.append((item, size))
            self._bytes += size
            if len(items) > self.max_depth:
                self.max_depth = len(items)
            if self._getters:
                self._not_empty.notify()
            return True

    def _full(self, items: int, total: int) -> bool:
        if total > self._max_bytes:
            return True
        return items >= (self._small_items if total <= self._small_bytes else self._max_items)

    def get(self, stop: threading.Event) -> Any:
        """Dequeue; blocks while empty. Returns None when `stop` was set while waiting."""
        with self._lock:
            while not self._items:
                if stop.is_set():
                    return None
                self._getters += 1
                try:
                    self._not_empty.wait(0.1)
                finally:
                    self._getters -= 1
            item, size = self._items.popleft()
            self._bytes -= size
            if self._putters:
                self._not_full.notify()
            return item


@dataclass
class MemorySampler:
    """Samples this process's RSS (plus children) in a background thread."""

    interval_s: float = DEFAULT_SAMPLE_INTERVAL_S
    peak_rss: int = 0
    # The latest sample: a cheap current RSS for checks made after every batch.
    last_rss: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="colbatch-rss", daemon=True)

    def rss(self) -> int:
        """Current RSS of this process and its children, in bytes."""
        return tree_rss(self._proc)

    def sample(self) -> int:
        """Take one sample now."""
        value = self.rss()
        self.last_rss = value
        self.peak_rss = max(self.peak_rss, value)
        if len(self.samples) < 10_000:
            self.samples.append((round(time.perf_counter() - self._t0, 3), value))
        return value

    def start(self) -> MemorySampler:
        """Start sampling."""
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (takes a last sample)."""
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()
