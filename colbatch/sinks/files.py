"""File sinks: Parquet, CSV (optionally gzip/zstd) and JSONL; one file or a directory of parts.

A path with a file suffix gives one file; any other path is a directory that
receives one deterministic part file per split (`part-00000.parquet`, ...).
Everything is written under hidden temp names and published on commit by
fsync + rename, so readers never see a partial file.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any, Literal

import polars as pl

from colbatch.batch import Batch
from colbatch.errors import ConfigError, SinkError
from colbatch.manifest import write_manifest
from colbatch.schema import align
from colbatch.sinks.base import Sink, SinkResult, publish, remove_quietly, temp_path
from colbatch.sinks.stream import PolarsStreamWriter
from colbatch.steps import ROW_COL

Format = Literal["parquet", "csv", "ndjson"]
# zstd level 3 is Parquet's common default: near-gzip ratio at several times the speed.
DEFAULT_PARQUET_COMPRESSION = "zstd"
FILE_SUFFIXES = {
    "parquet": (".parquet", ".pq"),
    "csv": (".csv", ".csv.gz", ".csv.zst", ".tsv"),
    "ndjson": (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".jsonl.zst", ".json"),
}
PART_SUFFIX = {"parquet": ".parquet", "csv": ".csv", "ndjson": ".jsonl"}


def format_of(path: str) -> Format | None:
    """The file format named by a path's suffix, or None for a directory-like path."""
    lower = path.lower()
    for fmt, suffixes in FILE_SUFFIXES.items():
        if lower.endswith(suffixes):
            return fmt  # type: ignore[return-value]
    return None


@dataclass
class FileSinkOptions:
    """Writer options shared by the file formats."""

    compression: str | None = None
    compression_level: int | None = None
    row_group_size: int | None = None
    separator: str = ","
    include_header: bool = True


class FileSink(Sink):
    """Writes batches to a Parquet/CSV/JSONL file or a directory of part files, atomically."""

    def __init__(self, path: str | os.PathLike, *, format: Format, options: FileSinkOptions | None = None) -> None:
        self.path = os.fspath(path)
        self.format = format
        self.name = format
        self.options = options or FileSinkOptions()
        self.single = format_of(self.path) is not None or self.path.endswith(PART_SUFFIX[format])
        self._schema: pl.Schema | None = None
        self._writer: PolarsStreamWriter | None = None
        self._split: int | None = None
        self._pending: list[tuple[str, str]] = []
        self._rows = 0
        self._split_rows: dict[int, int] = {}

    def describe(self) -> str:
        """One-line description for reports."""
        return f"{self.format} {self.path}"

    def _writer_options(self) -> dict[str, Any]:
        o = self.options
        if self.format == "parquet":
            opts: dict[str, Any] = {"compression": o.compression or DEFAULT_PARQUET_COMPRESSION}
            if o.compression_level is not None:
                opts["compression_level"] = o.compression_level
            if o.row_group_size is not None:
                opts["row_group_size"] = o.row_group_size
            return opts
        compression = o.compression
        lower = self.path.lower()
        if compression is None:
            compression = "gzip" if lower.endswith(".gz") else "zstd" if lower.endswith(".zst") else "uncompressed"
        opts = {"compression": compression, "check_extension": False}
        if self.format == "csv":
            opts.update(separator=o.separator, include_header=o.include_header)
        return opts

    def open(self, schema: pl.Schema) -> None:
        """Check the target and remember the schema; files are created lazily."""
        self._schema = pl.Schema({c: t for c, t in schema.items() if c != ROW_COL})
        target_dir = os.path.dirname(os.path.abspath(self.path)) if self.single else self.path
        try:
            os.makedirs(target_dir, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot create output directory `{target_dir}`: {exc.strerror}", path=target_dir) from exc
        if self.single and os.path.isdir(self.path):
            raise ConfigError(f"sink path `{self.path}` is a directory; give a file name or drop the suffix")
        if self.single:
            self._start(self.path)

    def _start(self, final: str) -> None:
        tmp = temp_path(final)
        remove_quietly(tmp)
        assert self._schema is not None
        self._writer = PolarsStreamWriter(tmp, self._schema, self.format, self._writer_options())
        self._pending.append((tmp, final))

    def _finish_current(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def write(self, batch: Batch) -> None:
        """Send rows to the current file; a new split starts a new part in directory mode."""
        assert self._schema is not None
        if not self.single and batch.split.index != self._split:
            self._finish_current()
            self._split = batch.split.index
            self._start(os.path.join(self.path, f"part-{batch.split.index:05d}{PART_SUFFIX[self.format]}"))
        df = batch.data
        if df.schema != self._schema:
            df = align(df.select([c for c in df.columns if c in self._schema]), self._schema)
            df = df.cast(dict(self._schema))
        if df.height:
            assert self._writer is not None
            self._writer.write(df)
            self._rows += df.height

    def commit(self) -> SinkResult:
        """Finish files, then publish each by fsync + rename; stale parts of older runs are removed."""
        self._finish_current()
        files, size = [], 0
        for tmp, final in self._pending:
            size += publish(tmp, final)
            files.append(final)
        self._pending = []
        # After the parts, before stale parts go: a reader following the manifest sees the old or
        # the new set of files, never a mix and never a missing file.
        write_manifest(self.path, format=self.format, files=files, rows=self._rows)
        if not self.single:
            self._remove_stale(set(files))
        return SinkResult(rows=self._rows, files=files, bytes=size, target=self.path)

    def _remove_stale(self, keep: set[str]) -> None:
        for old in glob.glob(os.path.join(glob.escape(self.path), f"part-*{PART_SUFFIX[self.format]}")):
            if old not in keep:
                remove_quietly(old)

    def abort(self, error: BaseException | None) -> None:
        """Stop the writer and delete temp files; never raises."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        for tmp, _final in self._pending:
            remove_quietly(tmp)
        self._pending = []
