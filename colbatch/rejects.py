"""Rejected rows: one shape for every stage, kept for the report and sent to the rejects sink.

Durable rejects: when the data sink keeps a resume ledger, rejects are not
streamed to the rejects file but held with their position (split index, first
source record of their batch). Just before the data sink commits a unit that
ends at (split, record), it asks for the rejects of every record before that
point (`RejectParts.cut`): they are written to a hidden part file, published
(fsync + rename), and the part's name goes into the unit's ledger entry. A part
the ledger does not list is an orphan of a killed run and is ignored and
removed; a listed part is never rewritten. On the final commit the listed parts
are merged into the rejects file before the ledger says finished, so after any
kill and resume the rejects equal those of an uninterrupted run.
"""

from __future__ import annotations

import glob
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import polars as pl

from colbatch.lazy import numpy as np
from colbatch.schema import cast_with_rejects

if TYPE_CHECKING:
    from colbatch.sinks.base import Sink

REJECT_COLUMNS = ("_source", "_line", "_stage", "_reason", "_raw")
# Where a reject sits in the source: (split index, first record of its batch); orders rejects against units.
Position = tuple[int, int]
PARTS_SUFFIX = ".colbatch-parts"
# Rows kept in memory for `Report.rejects`; the rejects sink receives all of them.
DEFAULT_KEEP_REJECTS = 1000


def reject_frame(
    *,
    source: str,
    lines: np.ndarray | Sequence[int | None],
    stage: str,
    reasons: pl.Series | str,
    values: pl.DataFrame | None = None,
    raw: Sequence[str | None] | None = None,
) -> pl.DataFrame:
    """Build rejects: `_source, _line, _stage, _reason, _raw` plus the row's values as text."""
    n = len(lines)
    if isinstance(reasons, str):
        reasons = pl.Series("_reason", [reasons] * n, dtype=pl.String)
    head = pl.DataFrame(
        {
            "_source": pl.Series([source] * n, dtype=pl.String),
            "_line": pl.Series(lines, dtype=pl.Int64),
            "_stage": pl.Series([stage] * n, dtype=pl.String),
            "_reason": reasons.alias("_reason").cast(pl.String),
            "_raw": pl.Series(list(raw) if raw is not None else [None] * n, dtype=pl.String),
        }
    )
    if values is None or values.width == 0:
        return head
    text = values.select(pl.all().cast(pl.String) if _castable(values) else [_as_text(c) for c in values.columns])
    text = text.select([c for c in text.columns if not c.startswith("_")])
    return pl.concat([head, text], how="horizontal")


def cast_or_reject(
    df: pl.DataFrame,
    schema: Mapping[str, pl.DataType],
    *,
    source: str,
    lines: np.ndarray,
    on_reject: Callable[[pl.DataFrame], None],
) -> tuple[pl.DataFrame, np.ndarray]:
    """Cast `df` to `schema`; rows with values that do not fit go to `on_reject` with stage `cast`.

    `lines` holds the line (or row index) of each row of `df`. Returns the
    cast good rows and their lines.
    """
    cast, reasons = cast_with_rejects(df, schema)
    if reasons is None:
        return cast, lines
    bad = reasons.is_not_null()
    mask = bad.to_numpy()
    on_reject(reject_frame(source=source, lines=lines[mask], stage="cast",
                           reasons=reasons.filter(bad), values=df.filter(bad)))
    return cast.filter(~bad), lines[~mask]


def _castable(df: pl.DataFrame) -> bool:
    return all(not isinstance(t, (pl.List, pl.Struct, pl.Array, pl.Binary)) for t in df.dtypes)


def _as_text(col: str) -> pl.Expr:
    return pl.col(col).map_elements(lambda v: None if v is None else str(v), return_dtype=pl.String)


class RejectCollector:
    """Thread-safe collector: counts rejects per stage, keeps the first few, streams all to a sink.

    With `durable()` (a data sink with a ledger) rejects are held with their
    position until the data sink cuts them into a part with the unit they belong to; rejects
    without a position (a sink's own load rejects) are published at the end.
    """

    def __init__(self, sink: Sink | None, *, columns: Sequence[str], keep: int = DEFAULT_KEEP_REJECTS) -> None:
        self._sink = sink
        self._columns = [*REJECT_COLUMNS, *[c for c in columns if c not in REJECT_COLUMNS]]
        self._schema = {c: (pl.Int64 if c == "_line" else pl.String) for c in self._columns}
        self._keep = keep
        self._kept: list[pl.DataFrame] = []
        self._kept_rows = 0
        self._lock = threading.Lock()
        self.by_stage: Counter[str] = Counter()
        self.total = 0
        self._opened = False
        self._parts: RejectParts | None = None
        # Durable mode: rejects waiting for the unit they belong to, and those whose batch is not known yet.
        self._pending: list[tuple[Position, pl.DataFrame]] = []
        self._untagged: list[pl.DataFrame] = []

    @property
    def sink(self) -> Sink | None:
        """The sink every reject is written to, if any."""
        return self._sink

    def durable(self) -> RejectParts | None:
        """Switch to durable rejects (before `open`); None when there is no rejects file to make durable."""
        from colbatch.sinks.files import FileSink

        if not isinstance(self._sink, FileSink) or not self._sink.single:
            return None
        self._parts = RejectParts(self, self._sink)
        return self._parts

    def drop_parts(self) -> None:
        """Remove durable reject parts a finished job left (killed after it was marked finished, before cleanup)."""
        from colbatch.sinks.files import FileSink

        if isinstance(self._sink, FileSink) and self._sink.single:
            RejectParts(self, self._sink).cleanup()

    def open(self) -> None:
        """Open the rejects sink (before the run starts); durable rejects open it at publish time."""
        if self._sink is not None and self._parts is None:
            self._sink.open(pl.Schema(self._schema))
            self._opened = True

    def add(self, frame: pl.DataFrame, at: Position | None = None) -> None:
        """Record rejected rows (already shaped by `reject_frame`) of the batch at `at`, if known."""
        if frame.height == 0:
            return
        frame = frame.select(
            [pl.col(c).cast(t) if c in frame.columns else pl.lit(None, dtype=t).alias(c) for c, t in self._schema.items()]
        )
        with self._lock:
            for stage, count in frame["_stage"].value_counts().iter_rows():
                self.by_stage[stage] += count
            self.total += frame.height
            if self._kept_rows < self._keep:
                part = frame.head(self._keep - self._kept_rows)
                self._kept.append(part)
                self._kept_rows += part.height
            if self._parts is not None:
                if at is None:
                    self._untagged.append(frame)
                else:
                    self._pending.append((at, frame))
            elif self._sink is not None:
                from colbatch.batch import Batch, Split

                self._sink.write(Batch(frame, Split(0, "rejects")))

    def take(self, before: Position | None) -> list[pl.DataFrame]:
        """Remove and return the held rejects of batches before `before` (all of them for None)."""
        with self._lock:
            if before is None:
                taken = [f for _, f in self._pending] + self._untagged
                self._pending, self._untagged = [], []
                return taken
            taken = [f for at, f in self._pending if at < before]
            self._pending = [(at, f) for at, f in self._pending if at >= before]
            return taken

    def frame(self) -> pl.DataFrame:
        """The first rejects kept in memory (all of them when there are few)."""
        with self._lock:
            if not self._kept:
                return pl.DataFrame(schema=self._schema)
            return pl.concat(self._kept)

    @property
    def schema(self) -> dict[str, pl.DataType]:
        """Column types of the rejects (all text but `_line`)."""
        return dict(self._schema)

    def commit(self):
        """Commit the rejects sink; rejects are published even when the run fails."""
        if self._parts is not None:
            return self._parts.result if self._parts.result is not None else self._parts.publish_unfinished()
        if self._sink is not None and self._opened:
            return self._sink.commit()
        return None

    def abort(self, error: BaseException | None) -> None:
        """Abort the rejects sink (only when the run could not even account for rows)."""
        if self._sink is not None and self._opened:
            self._sink.abort(error)


class RejectParts:
    """Durable rejects of one run: hidden part files cut per data unit, merged into the rejects file at the end.

    The data sink drives it: `start(keep)` when it opens (the parts its ledger
    lists), `cut(split, end_row)` just before it commits a unit (the returned
    name goes into the unit's ledger entry), `publish(parts)` before its ledger
    says finished, `cleanup()` after.
    """

    def __init__(self, collector: RejectCollector, sink: Sink) -> None:
        self.collector = collector
        self.sink = sink
        final = os.fspath(sink.path)  # type: ignore[attr-defined]
        head, tail = os.path.split(os.path.normpath(final))
        self.dir = os.path.join(head, f".{tail}{PARTS_SUFFIX}")
        self.result = None
        self._kept: list[str] = []
        self._made: list[str] = []

    def start(self, keep: Sequence[str]) -> None:
        """Keep the parts a resumed ledger lists; remove every other part and temp file (orphans of a killed run)."""
        from colbatch.sinks.base import remove_quietly

        os.makedirs(self.dir, exist_ok=True)
        self._kept = [k for k in keep if k]
        for path in glob.glob(os.path.join(glob.escape(self.dir), "*")) + glob.glob(
                os.path.join(glob.escape(self.dir), ".*")):
            if os.path.basename(path) not in self._kept:
                remove_quietly(path)

    def cut(self, split_index: int | None, end_row: int = 0) -> str | None:
        """Publish the held rejects of records before (split, end_row) (all for None) as a part; its name or None."""
        from colbatch.sinks.base import publish, temp_path

        frames = self.collector.take(None if split_index is None else (split_index, end_row))
        if not frames:
            return None
        name = "rejects-all.parquet" if split_index is None else f"rejects-{split_index:05d}-{end_row:012d}.parquet"
        final = os.path.join(self.dir, name)
        tmp = temp_path(final)
        os.makedirs(self.dir, exist_ok=True)
        pl.concat(frames).write_parquet(tmp)
        publish(tmp, final)
        self._made.append(name)
        return name

    def publish(self, parts: Sequence[str]):
        """Write the rejects file from the listed parts (and any rejects still held), atomically."""
        from colbatch.batch import Batch, Split

        self.sink.open(pl.Schema(self.collector.schema))
        try:
            for name in parts:
                if name:
                    self.sink.write(Batch(pl.read_parquet(os.path.join(self.dir, name)), Split(0, "rejects")))
            rest = self.collector.take(None)
            if rest:
                self.sink.write(Batch(pl.concat(rest), Split(0, "rejects")))
            self.result = self.sink.commit()
        except BaseException as exc:
            self.sink.abort(exc)
            raise
        return self.result

    def publish_unfinished(self):
        """A run that failed: show every reject it knows of (the resumed run rewrites the file exactly)."""
        parts = [p for p in dict.fromkeys([*self._kept, *self._made]) if os.path.exists(os.path.join(self.dir, p))]
        return self.publish(parts)

    def cleanup(self) -> None:
        """After the data ledger says finished: the parts are merged, remove them."""
        shutil.rmtree(self.dir, ignore_errors=True)
