"""Callable sink: push each batch to a user function (an API, a queue) with retries and backoff."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import polars as pl

from colbatch.batch import Batch
from colbatch.errors import SinkError
from colbatch.sinks.base import Sink, SinkResult
from colbatch.steps import ROW_COL

log = logging.getLogger("colbatch")
# Three retries with 0.5 s doubling backoff ride out a typical transient API error (~4 s in all).
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 0.5


class CallableSink(Sink):
    """Calls `fn(df)` once per batch; a failing call is retried with exponential backoff and jitter.

    Delivery is at-least-once from the callee's point of view: a call that
    failed after the callee acted may be repeated. Nothing is buffered, so
    `commit` has nothing to publish.
    """

    name = "foreach_batch"

    def __init__(self, fn: Callable[[pl.DataFrame], Any], *, retries: int = DEFAULT_RETRIES,
                 backoff_s: float = DEFAULT_BACKOFF_S, sleep: Callable[[float], None] = time.sleep) -> None:
        self.fn = fn
        self.retries = retries
        self.backoff_s = backoff_s
        self._sleep = sleep
        self._rows = 0
        self.calls = 0

    def describe(self) -> str:
        """One-line description for reports."""
        return f"foreach_batch {getattr(self.fn, '__name__', type(self.fn).__name__)}"

    def open(self, schema: pl.Schema) -> None:
        """Nothing to prepare."""
        self._rows = 0
        self.retried = 0

    def write(self, batch: Batch) -> None:
        """Call the function, retrying on exceptions."""
        df = batch.data
        if ROW_COL in df.columns:  # checked first: an eager drop costs ~0.1 ms, a lot for small API batches
            df = df.drop(ROW_COL)
        attempt = 0
        while True:
            self.calls += 1
            try:
                self.fn(df)
                self._rows += df.height
                return
            except Exception as exc:
                if attempt >= self.retries:
                    raise SinkError(
                        f"`foreach_batch` function failed {attempt + 1} times on a batch of {df.height} rows: {exc}",
                        attempts=attempt + 1,
                    ) from exc
                delay = self.backoff_s * (2 ** attempt) * (0.5 + random.random())
                log.warning("foreach_batch call failed (%s); retry %d/%d in %.2fs", exc, attempt + 1, self.retries, delay)
                self.retried += 1
                self._sleep(delay)
                attempt += 1

    def commit(self) -> SinkResult:
        """Everything was delivered in `write`."""
        return SinkResult(rows=self._rows, target=self.describe())

    def abort(self, error: BaseException | None) -> None:
        """Nothing to undo: delivered batches are the callee's."""
        self._rows = 0
