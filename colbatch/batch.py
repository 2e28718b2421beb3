"""The unit of data and of restart: splits and batches with their provenance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import polars as pl

from colbatch.lazy import numpy as np
from colbatch.lazy import pyarrow as pa


@dataclass(frozen=True, slots=True)
class Split:
    """A deterministic slice of a source: a file, a row group, a byte range or a query partition.

    `(split.id, first_row, row_count)` names the same rows on every run.
    """

    index: int
    id: str
    path: str | None = None
    size_bytes: int | None = None


@dataclass(slots=True)
class Batch:
    """Rows in Arrow memory (viewed as a Polars DataFrame) plus where they came from.

    Attributes:
        data: the rows.
        split: the split the rows were read from.
        first_row: index within the split of the first record (rejected records count).
        rows_read: records consumed from the split for this batch (good + rejected at read).
        first_line: 1-based line in the file of the first record, for text formats.
        bytes_read: input bytes consumed (compressed size is not known; decoded bytes).
        line_fn: maps row positions of `data` (as read) to file lines when records span lines.
    """

    data: pl.DataFrame
    split: Split
    first_row: int = 0
    rows_read: int = 0
    first_line: int | None = None
    bytes_read: int = 0
    line_fn: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)

    @property
    def num_rows(self) -> int:
        """Number of rows in the batch."""
        return self.data.height

    def to_arrow(self) -> pa.RecordBatch | pa.Table:
        """The rows as Arrow (zero-copy)."""
        return self.data.to_arrow()

    def lines_of(self, positions: np.ndarray) -> np.ndarray | None:
        """File line numbers (or row indices for non-text sources) of rows at `positions`."""
        if self.line_fn is not None:
            return self.line_fn(positions)
        if self.first_line is not None:
            return positions + self.first_line
        return positions + self.first_row
