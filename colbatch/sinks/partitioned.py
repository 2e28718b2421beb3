"""Hive-partitioned Parquet output (`key=value/part-00000.parquet`), traversal-safe and atomic.

No resume: parts are published together on commit and no ledger is kept, so
`run(resume=True)` / `--resume` is refused with a ConfigError (a killed run
leaves only hidden temp files, which the next run replaces).
"""

from __future__ import annotations

import glob
import hashlib
import os
from urllib.parse import quote

import polars as pl

from colbatch.batch import Batch
from colbatch.duck import hive_type
from colbatch.errors import ConfigError, SinkError
from colbatch.lazy import pyarrow_parquet as pq
from colbatch.manifest import write_manifest
from colbatch.schema import align
from colbatch.sinks.base import Sink, SinkResult, publish, remove_quietly, temp_path
from colbatch.sinks.files import DEFAULT_PARQUET_COMPRESSION
from colbatch.steps import ROW_COL

NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
# Escaped values longer than this become prefix~hash, so `key=value` stays under NAME_MAX (255).
MAX_VALUE_NAME = 160


def partition_dir(value: object) -> str:
    """Escape one partition value into a safe directory name (no `/`, no `..`, no hidden names)."""
    if value is None or value == "":
        return NULL_PARTITION
    text = quote(str(value), safe=" -_,@+~")
    if text == "" or text.startswith("."):
        text = "%2E" + text[1:] if text else "%00"
    if len(text) > MAX_VALUE_NAME:
        # File systems cap a name at 255 bytes: keep a readable prefix plus a hash that keeps
        # distinct values apart. The exact value is in the file's own column.
        digest = hashlib.sha256(str(value).encode("utf-8", "surrogatepass")).hexdigest()[:16]
        prefix = str(value)[:MAX_VALUE_NAME - 17]
        while len(quote(prefix, safe=" -_,@+~")) > MAX_VALUE_NAME - 17:
            prefix = prefix[:-1]  # cut whole characters, never inside an escape or a UTF-8 sequence
        cut = quote(prefix, safe=" -_,@+~")
        text = cut + "~" + digest
    return text


class PartitionedParquetSink(Sink):
    """One Parquet part per partition and split, under `key=value` directories."""

    name = "parquet (partitioned)"

    def __init__(self, path: str | os.PathLike, *, partition_by: list[str], compression: str | None = None,
                 row_group_size: int | None = None) -> None:
        if not partition_by:
            raise ConfigError("`partition_by` must name at least one column")
        self.path = os.fspath(path)
        self.partition_by = list(partition_by)
        self.compression = compression or DEFAULT_PARQUET_COMPRESSION
        self.row_group_size = row_group_size
        self._schema: pl.Schema | None = None
        self._writers: dict[tuple, tuple[pq.ParquetWriter, str, str]] = {}
        self._done: list[tuple[str, str]] = []
        self._split: int | None = None
        self._rows = 0

    def fresh(self) -> PartitionedParquetSink:
        """A new sink with the same settings and no run state."""
        return PartitionedParquetSink(self.path, partition_by=self.partition_by, compression=self.compression,
                                      row_group_size=self.row_group_size)

    def describe(self) -> str:
        """One-line description for reports."""
        return f"parquet {self.path} partitioned by {', '.join(self.partition_by)}"

    def open(self, schema: pl.Schema) -> None:
        """Check the partition columns exist."""
        missing = [c for c in self.partition_by if c not in schema]
        if missing:
            raise ConfigError(f"partition column `{missing[0]}` is not in the output; columns: {', '.join(schema)}")
        self._schema = pl.Schema({c: t for c, t in schema.items() if c != ROW_COL})
        os.makedirs(self.path, exist_ok=True)

    def _close_split(self) -> None:
        for writer, tmp, final in self._writers.values():
            writer.close()
            self._done.append((tmp, final))
        self._writers = {}

    def write(self, batch: Batch) -> None:
        """Split the batch by partition values and append each part to its file."""
        assert self._schema is not None
        if batch.split.index != self._split:
            self._close_split()
            self._split = batch.split.index
        df = align(batch.data.select([c for c in batch.data.columns if c in self._schema]), self._schema)
        for key, part in df.partition_by(self.partition_by, as_dict=True, maintain_order=True).items():
            entry = self._writers.get(key)
            if entry is None:
                rel = os.path.join(*(f"{partition_dir(k)}={partition_dir(v)}" for k, v in zip(self.partition_by, key)))
                directory = os.path.join(self.path, rel)
                if not os.path.abspath(directory).startswith(os.path.abspath(self.path) + os.sep):
                    raise SinkError(f"partition value {key!r} escapes the output directory", value=key)
                os.makedirs(directory, exist_ok=True)
                final = os.path.join(directory, f"part-{batch.split.index:05d}.parquet")
                tmp = temp_path(final)
                table = part.to_arrow()
                writer = pq.ParquetWriter(tmp, table.schema, compression=self.compression)
                entry = (writer, tmp, final)
                self._writers[key] = entry
            # Partition columns stay in the file too: directory names cannot hold every value
            # exactly (length limits), the file can; hive readers take the directory's value.
            table = part.to_arrow()
            entry[0].write_table(table, row_group_size=self.row_group_size)
            self._rows += part.height

    def commit(self) -> SinkResult:
        """Close all parts and publish each one by fsync + rename."""
        self._close_split()
        files, size = [], 0
        for tmp, final in self._done:
            size += publish(tmp, final)
            files.append(final)
        self._done = []
        # Before stale parts go, so a reader following the manifest never meets a missing file.
        assert self._schema is not None
        types = {c: t for c in self.partition_by if (t := hive_type(self._schema[c])) is not None}
        write_manifest(self.path, format="parquet", files=files, partition_by=self.partition_by,
                       partition_types=types, rows=self._rows)
        self._remove_stale(set(files))
        return SinkResult(rows=self._rows, files=files, bytes=size, target=self.path)

    def _remove_stale(self, keep: set[str]) -> None:
        """Delete part files of earlier runs so readers see exactly this run's output."""
        for old in glob.glob(os.path.join(glob.escape(self.path), "**", "part-*.parquet"), recursive=True):
            if old not in keep:
                remove_quietly(old)
        for root, dirs, files in os.walk(self.path, topdown=False):
            if root != self.path and not dirs and not files:
                os.rmdir(root)

    def abort(self, error: BaseException | None) -> None:
        """Close writers and delete temp files; never raises."""
        for writer, tmp, _final in self._writers.values():
            try:
                writer.close()
            except Exception:  # the file is deleted next; a close error changes nothing
                remove_quietly(tmp)
            remove_quietly(tmp)
        for tmp, _final in self._done:
            remove_quietly(tmp)
        self._writers = {}
        self._done = []
