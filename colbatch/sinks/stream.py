"""Feed batches to one of Polars' streaming writers (parallel encoding) from a queue."""

from __future__ import annotations

import queue
import threading
from typing import Any

import polars as pl
from polars.io.plugins import register_io_source

from colbatch.errors import SinkError

_END = object()
_ABORT = object()
# Frames waiting for the encoder; two keeps the encoder busy while the next batch is produced.
DEFAULT_WRITER_QUEUE = 2


class _Aborted(Exception):
    """Raised inside the writer thread to stop Polars without publishing."""


class PolarsStreamWriter:
    """Writes a stream of DataFrames to one file with `LazyFrame.sink_<kind>`, in a background thread.

    Polars pulls frames from our queue through an IO-source plugin, so
    compression and encoding run on Polars' thread pool while the caller
    produces the next batch.
    """

    def __init__(self, path: str, schema: pl.Schema, kind: str, options: dict[str, Any]) -> None:
        self.path = path
        self.schema = schema
        self._queue: queue.Queue = queue.Queue(maxsize=DEFAULT_WRITER_QUEUE)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(kind, options), name=f"colbatch-{kind}-writer",
                                        daemon=True)
        self._thread.start()

    def _frames(self, with_columns, predicate, n_rows, batch_size):
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted()
            yield item if with_columns is None else item.select(with_columns)

    def _run(self, kind: str, options: dict[str, Any]) -> None:
        lf = register_io_source(self._frames, schema=self.schema)
        try:
            getattr(lf, f"sink_{kind}")(self.path, **options)
        except BaseException as exc:  # handed to the caller's thread in _check
            self._error = exc

    def _put(self, item: object) -> None:
        while True:
            self._check()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _check(self) -> None:
        if self._error is not None and not isinstance(self._error, _Aborted):
            raise SinkError(f"cannot write `{self.path}`: {self._error}", path=self.path) from self._error
        if not self._thread.is_alive() and self._error is None:
            raise SinkError(f"writer of `{self.path}` stopped unexpectedly", path=self.path)

    def write(self, df: pl.DataFrame) -> None:
        """Queue one frame (blocks while the encoder is behind: backpressure)."""
        self._put(df)

    def close(self) -> None:
        """Finish the file; raises SinkError when writing failed."""
        self._put(_END)
        self._thread.join()
        if self._error is not None:
            raise SinkError(f"cannot write `{self.path}`: {self._error}", path=self.path) from self._error

    def abort(self) -> None:
        """Stop writing without finishing the file; never raises."""
        if not self._thread.is_alive():
            return
        while not self._queue.empty():
            self._queue.get_nowait()
        try:
            self._queue.put(_ABORT, timeout=5)
        except queue.Full:
            return
        self._thread.join(timeout=30)
