"""The Source contract: a lazy, re-iterable producer of batches in deterministic order."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import polars as pl

from colbatch.batch import Batch, Split

RejectFn = Callable[[pl.DataFrame], None]
# Rows per batch: a fixed count, or a callable asked before each batch (the adaptive `BatchSizer`).
BatchRows = int | Callable[[], int]


def rows_of(batch_rows: BatchRows) -> int:
    """The rows for the next batch: the count itself, or the callable's current answer."""
    return int(batch_rows()) if callable(batch_rows) else int(batch_rows)


@dataclass
class ReadNotes:
    """What a source noticed while planning or reading: schema drift, renamed columns."""

    warnings: list[str] = field(default_factory=list)


class Source(ABC):
    """Lazy, re-iterable producer of record batches in deterministic order.

    Lifecycle: `schema` and `splits()` are known before any data is read (a
    source may sniff a sample); `read(split)` may be called for any split, in
    any order, any number of times, and yields the same rows each time.
    Rows that cannot be parsed or cast are passed to `on_reject` (shaped by
    `colbatch.rejects.reject_frame`) and never yielded; a split that cannot be
    read at all raises `SourceError` naming it.
    """

    name: str = "source"
    notes: ReadNotes
    # True when the same description means the same rows on every run (files, tables), so a
    # finished ledger proves the output is current; in-memory data and iterators are not.
    stable: bool = True
    # True when `read` accepts a callable `batch_rows` and asks it before each batch, so the
    # size can change within a split; other sources get one count per split.
    adaptive_batches: bool = False
    # True when reading only slices data already in memory (no I/O, no parsing): the runner then
    # reads in its transform thread instead of a thread of its own, one hand-off less per batch.
    in_memory: bool = False

    @property
    @abstractmethod
    def schema(self) -> pl.Schema:
        """Columns and types of every batch this source yields."""

    @abstractmethod
    def splits(self) -> Sequence[Split]:
        """The units of parallelism and restart, in order."""

    @abstractmethod
    def read(self, split: Split, *, batch_rows: int, on_reject: RejectFn, skip_rows: int = 0) -> Iterator[Batch]:
        """Yield the batches of `split`, about `batch_rows` rows each, skipping the first `skip_rows` records."""

    def total_bytes(self) -> int | None:
        """Total input size when known, for progress bars."""
        sizes = [s.size_bytes for s in self.splits()]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]

    def describe(self) -> str:
        """One-line description for reports."""
        return self.name
