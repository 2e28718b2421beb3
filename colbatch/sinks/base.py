"""The Sink contract and the atomic-publish helpers every file sink uses."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import polars as pl

from colbatch.batch import Batch, Split
from colbatch.ledger import Committed, JobIdentity

if TYPE_CHECKING:
    from colbatch.rejects import RejectParts

TMP_SUFFIX = ".colbatch-tmp"


@dataclass
class SinkResult:
    """What a sink published on commit."""

    rows: int = 0
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    target: str = ""
    # Rows the sink itself refused (sent to `Sink.on_reject`), e.g. a database's constraint violations.
    rejected: int = 0


class Sink(ABC):
    """Receives batches; output becomes visible only on commit.

    Lifecycle:
        open(schema): once, before any write; may create temp files, never final ones.
        write(batch): any number of times; data is buffered or written to temp names.
        commit(): once, after the last write; publishes atomically (temp file,
            fsync, rename) and returns what was published.
        abort(error): instead of commit, on failure; removes temp files; never raises.

    Resume (optional; see `colbatch.ledger`): `begin(job, resume=)` runs before
    `open` and returns what is already committed for the job; the runner then
    sends only rows after that. Batches of one split arrive in `first_row`
    order, splits one after another; `split_done(split, rows)` follows the last
    batch of each split that had any batch, with the split's total source
    records. A sink that supports resume commits some units before `commit()`
    (a part file per split, a database transaction per batch) and records each
    in its ledger atomically with the data.
    """

    name: str = "sink"
    # Transient failures this sink retried during the run (counted in the report).
    retried: int = 0
    # True when the sink keeps a ledger, so `begin(resume=True)` can return committed work.
    supports_resume: bool = False
    # Set by the runner before `open`: where a sink sends rows it refuses (stage `load`), shaped by `reject_frame`.
    on_reject: Callable[[pl.DataFrame], None] | None = None
    # True when the sink drives `reject_units`, making rejects durable with its commit units.
    durable_rejects: bool = False
    # Set by the runner before `open` when rejects are durable (see `colbatch.rejects.RejectParts`):
    # `start` on open, `cut` just before each unit commits (the part's name goes into the unit's
    # ledger entry), `publish` before the ledger says finished, `cleanup` after.
    reject_units: RejectParts | None = None
    # True when the sink needs each row's position in its batch (the runner keeps the row column up to
    # the sink) so rows it refuses can be mapped to their source lines with `Batch.lines_of`.
    needs_rows: bool = False

    def begin(self, job: JobIdentity, *, resume: bool) -> Committed:
        """Before `open`: with `resume`, return the committed work of `job` (raise CheckpointError on mismatch)."""
        return Committed()

    def finished(self, job: JobIdentity) -> bool:
        """True when this output already holds the complete, committed result of this same job."""
        return False

    def split_done(self, split: Split, rows: int) -> None:
        """After the last batch of `split`: `rows` source records of it are now written (not yet committed)."""

    @abstractmethod
    def open(self, schema: pl.Schema) -> None:
        """Prepare to receive batches of `schema`."""

    @abstractmethod
    def write(self, batch: Batch) -> None:
        """Receive one batch."""

    @abstractmethod
    def commit(self) -> SinkResult:
        """Publish everything written, atomically."""

    @abstractmethod
    def abort(self, error: BaseException | None) -> None:
        """Discard everything written; best effort, never raises."""

    def describe(self) -> str:
        """One-line description for reports."""
        return self.name

    def fresh(self) -> Sink:
        """The sink to use for one run: one Pipeline can run any number of times.

        The default is the sink itself, for sinks whose `open` resets all run
        state; sinks with more state return a new instance with the same settings.
        """
        return self


def temp_path(final: str) -> str:
    """Deterministic hidden temp name beside `final`, so readers' globs never match it."""
    head, tail = os.path.split(final)
    return os.path.join(head, f".{tail}{TMP_SUFFIX}")


def fsync_path(path: str) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str, final: str) -> int:
    """fsync `tmp`, rename it over `final`, fsync the directory; returns the file size."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))
    return os.path.getsize(final)


def remove_quietly(path: str) -> None:
    """Delete a file if it exists (abort paths)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return
    except OSError:
        return
