"""Rejected rows: one shape for every stage, kept for the report and sent to the rejects sink."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from colbatch.schema import cast_with_rejects

if TYPE_CHECKING:
    from colbatch.sinks.base import Sink

REJECT_COLUMNS = ("_source", "_line", "_stage", "_reason", "_raw")
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
    """Thread-safe collector: counts rejects per stage, keeps the first few, streams all to a sink."""

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

    @property
    def sink(self) -> Sink | None:
        """The sink every reject is written to, if any."""
        return self._sink

    def open(self) -> None:
        """Open the rejects sink (before the run starts)."""
        if self._sink is not None:
            self._sink.open(pl.Schema(self._schema))
            self._opened = True

    def add(self, frame: pl.DataFrame) -> None:
        """Record rejected rows (already shaped by `reject_frame`)."""
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
            if self._sink is not None:
                from colbatch.batch import Batch, Split

                self._sink.write(Batch(frame, Split(0, "rejects")))

    def frame(self) -> pl.DataFrame:
        """The first rejects kept in memory (all of them when there are few)."""
        with self._lock:
            if not self._kept:
                return pl.DataFrame(schema=self._schema)
            return pl.concat(self._kept)

    def commit(self):
        """Commit the rejects sink; rejects are published even when the run fails."""
        if self._sink is not None and self._opened:
            return self._sink.commit()
        return None

    def abort(self, error: BaseException | None) -> None:
        """Abort the rejects sink (only when the run could not even account for rows)."""
        if self._sink is not None and self._opened:
            self._sink.abort(error)
