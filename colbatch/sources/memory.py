"""In-memory sources: Arrow tables and readers, and any Python iterator of batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import polars as pl

from colbatch.lazy import numpy as np
from colbatch.lazy import pyarrow as pa
from colbatch.batch import Batch, Split
from colbatch.errors import ConfigError, SourceError
from colbatch.rejects import cast_or_reject
from colbatch.schema import align, from_arrow_schema, parse_schema
from colbatch.sources.base import ReadNotes, RejectFn, Source


# Widest frame `slicer` cuts column by column (see there).
CUT_MAX_COLUMNS = 32
try:
    from polars._plr import PyDataFrame as _PyDataFrame
except ImportError:  # another Polars layout: plain `DataFrame.slice`
    _PyDataFrame = None
# Whether `slicer`'s column-wise cut equals `DataFrame.slice`, by the frame's column types.
_CUT_MATCHES: dict[tuple, bool] = {}


def slicer(frame: pl.DataFrame) -> Callable[[int, int], pl.DataFrame]:
    """`frame.slice`, or the same slices cut column by column, which keeps the GIL.

    `DataFrame.slice` releases the GIL, so every batch cut from a frame in memory handed the GIL
    to whichever thread waited for it (a pool of I/O threads, the writer) and waited to get it
    back: ~30 us of CPU per batch in the transform thread, against ~5 us for slicing the columns
    (`Series.slice` keeps the GIL) and putting them together. That needs Polars' internal frame
    constructor; where it is missing or gives another frame than `frame.slice` for these column
    types (checked once per set of types), this is `frame.slice`. So is it past `CUT_MAX_COLUMNS`:
    the column-wise cut costs ~0.5 us a column against ~0.2 us for `DataFrame.slice`, and from
    ~64 columns the difference is about what a hand-off of the GIL costs (~20-30 us of CPU).
    """
    if _PyDataFrame is None or not 0 < frame.width <= CUT_MAX_COLUMNS:
        return frame.slice
    columns = [s._s for s in frame.get_columns()]

    def cut(offset: int, length: int) -> pl.DataFrame:
        return pl.DataFrame._from_pydf(_PyDataFrame([c.slice(offset, length) for c in columns]))

    key = tuple(frame.dtypes)
    ok = _CUT_MATCHES.get(key)
    if ok is None:
        start = max(0, frame.height - 3)
        try:
            probe = cut(start, 2)
        except (AttributeError, TypeError, ValueError):
            ok = False
        else:
            expected = frame.slice(start, 2)
            ok = probe.schema == expected.schema and probe.equals(expected)
        if len(_CUT_MATCHES) >= 256:
            _CUT_MATCHES.clear()
        _CUT_MATCHES[key] = ok
    return cut if ok else frame.slice


def to_frame(item: Any) -> pl.DataFrame:
    """Turn one item of a user iterator into a DataFrame (Arrow batch/table, DataFrame, dict(s))."""
    if isinstance(item, pl.DataFrame):
        return item
    if isinstance(item, (pa.RecordBatch, pa.Table)):
        return pl.DataFrame(item)
    if isinstance(item, Mapping):
        values = list(item.values())
        if values and all(isinstance(v, (list, tuple)) for v in values):
            return pl.DataFrame(dict(item), strict=False)
        return pl.DataFrame([dict(item)], strict=False)
    if isinstance(item, list) and all(isinstance(r, Mapping) for r in item):
        return pl.DataFrame(item, strict=False, infer_schema_length=None)
    if type(item).__module__.startswith("pandas") and type(item).__name__ == "DataFrame":
        return pl.from_pandas(item)
    raise ConfigError(
        f"cannot turn a `{type(item).__name__}` into a batch; yield Arrow batches, Polars DataFrames, dicts or lists of dicts"
    )


class IterableSource(Source):
    """One split fed by an iterator factory; re-iterable when given a callable or a re-iterable object."""

    name = "iterator"
    stable = False

    def __init__(
        self,
        factory: Callable[[], Iterable[Any]],
        *,
        schema: Mapping | pl.Schema | None,
        label: str,
        reiterable: bool,
        in_memory: bool = False,
    ) -> None:
        self._factory = factory
        self.label = label
        self.reiterable = reiterable
        self.in_memory = in_memory
        self.notes = ReadNotes()
        self._peeked: list[pl.DataFrame] = []
        self._iterator: Iterator[Any] | None = None
        declared = parse_schema(dict(schema)) if schema is not None else None
        if declared is None:
            self._iterator = iter(factory())
            for item in self._iterator:
                frame = to_frame(item)
                self._peeked.append(frame)
                if frame.height or frame.width:
                    break
            declared = dict(self._peeked[-1].schema) if self._peeked else {}
            self._cast = False
        else:
            self._cast = True
        self._schema = pl.Schema(declared)

    @property
    def schema(self) -> pl.Schema:
        """Declared, or taken from the first batch."""
        return self._schema

    def splits(self) -> list[Split]:
        """A single split."""
        return [Split(0, f"00000:{self.label}", None, None)]

    def describe(self) -> str:
        """One-line description for reports."""
        return self.label

    def _items(self) -> Iterator[pl.DataFrame]:
        if self._iterator is not None:
            it, self._iterator = self._iterator, None
            yield from self._peeked
            self._peeked = []
            for item in it:
                yield to_frame(item)
            return
        if not self.reiterable and self._peeked == [] and getattr(self, "_used", False):
            raise SourceError(f"`{self.label}` is a one-shot iterator and was already consumed; pass a callable to re-read it")
        self._used = True
        for item in self._factory():
            yield to_frame(item)

    def read(self, split: Split, *, batch_rows: int, on_reject: RejectFn, skip_rows: int = 0) -> Iterator[Batch]:
        """Yield the iterator's items, re-chunked to at most `batch_rows` rows."""
        row = 0
        for frame in self._items():
            height = frame.height
            if row + height <= skip_rows:
                row += height
                continue
            # Slices share their frame's schema: one that already matches needs no cast per batch.
            matches = frame.schema == self._schema
            # A resumed read starts at `skip_rows`, the batches after it are whole.
            cut = slicer(frame)
            for start in range(max(0, skip_rows - row), height, batch_rows):
                part = cut(start, batch_rows)
                good = part if matches else self._conform(part, row + start, on_reject)
                yield Batch(good, split, first_row=row + start, rows_read=part.height,
                            bytes_read=part.estimated_size())
            row += height

    def _conform(self, df: pl.DataFrame, first_row: int, on_reject: RejectFn) -> pl.DataFrame:
        """The frame in the source's schema: unknown columns dropped, values that do not fit rejected."""
        extra = [c for c in df.columns if c not in self._schema]
        if extra:
            self.notes.warnings.append(f"schema drift: `{self.label}` yielded unknown columns {extra} (dropped)")
            df = df.drop(extra)
        rows = np.arange(first_row, first_row + df.height, dtype=np.int64)
        cast, _ = cast_or_reject(df, self._schema, source=self.label, lines=rows, on_reject=on_reject)
        return align(cast, self._schema)


def arrow_source(data: pa.Table | pa.RecordBatchReader | pa.RecordBatch | pl.DataFrame) -> IterableSource:
    """Source over an Arrow table, record batch, reader, or a Polars DataFrame."""
    if isinstance(data, pa.RecordBatchReader):
        schema = from_arrow_schema(data.schema)
        return IterableSource(lambda: iter(data), schema=schema, label="arrow reader", reiterable=False)
    if isinstance(data, (pa.Table, pa.RecordBatch)):
        frame = pl.DataFrame(data)
    elif isinstance(data, pl.DataFrame):
        frame = data
    else:
        raise ConfigError(f"`from_arrow` takes a pyarrow Table, RecordBatch or RecordBatchReader, got `{type(data).__name__}`")
    return IterableSource(lambda: [frame], schema=frame.schema, label="arrow table", reiterable=True, in_memory=True)
