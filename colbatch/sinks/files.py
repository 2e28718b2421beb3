"""File sinks: Parquet, CSV (optionally gzip/zstd) and JSONL; one file or a directory of parts.

A path with a file suffix gives one file; any other path is a directory that
receives deterministic part files, one or more per split
(`part-00000-0000.parquet`: split 0, its first part). Everything is written
under hidden temp names and published by fsync + rename, so readers never see
a partial file.

Resume: the sink keeps a JSON ledger beside its output (`colbatch.ledger`).
In directory mode each part is a commit unit: it is published as soon as it
is full (`part_rows`) or its split ends, then recorded in the ledger, so a
killed run redoes at most the part it was writing. A single file is one unit,
published and recorded on commit.
"""

from __future__ import annotations

import copy
import glob
import os
from dataclasses import dataclass
from typing import Any, Literal

import polars as pl

from colbatch import faults
from colbatch.batch import Batch, Split
from colbatch.errors import CheckpointError, ConfigError, SinkError
from colbatch.ledger import Committed, FileLedger, JobIdentity, SplitState, refusal
from colbatch.manifest import write_manifest
from colbatch.schema import align
from colbatch.sinks.base import TMP_SUFFIX, Sink, SinkResult, publish, remove_quietly, temp_path
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
# Rows per part file in directory mode. A part is the unit a resumed run redoes, so it
# bounds lost work (~1M rows is seconds of work) while keeping files big enough for readers.
DEFAULT_PART_ROWS = 1_000_000
LEDGER_SUFFIX = ".colbatch.json"


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
    # Opt-in CSV formula-injection guard: prefix `'` to text cells a spreadsheet would evaluate.
    escape_formulas: bool = False


class FileSink(Sink):
    """Writes batches to a Parquet/CSV/JSONL file or a directory of part files, atomically."""

    supports_resume = True
    durable_rejects = True

    def __init__(self, path: str | os.PathLike, *, format: Format, options: FileSinkOptions | None = None,
                 part_rows: int = DEFAULT_PART_ROWS) -> None:
        self.path = os.fspath(path)
        self.format = format
        self.name = format
        self.options = options or FileSinkOptions()
        self.part_rows = part_rows
        self.single = format_of(self.path) is not None or self.path.endswith(PART_SUFFIX[format])
        self._schema: pl.Schema | None = None
        self._writer: PolarsStreamWriter | None = None
        self._pending: list[tuple[str, str]] = []
        self._rows = 0
        # The unit being written: its split, first source record, end record, output rows.
        self._unit: dict[str, Any] | None = None
        self._ledger: FileLedger | None = None
        self._job: JobIdentity | None = None
        self._units: list[dict[str, Any]] = []
        self._done: Committed = Committed()
        # Beside the output (`out.parquet.colbatch.json`, `out.colbatch.json` for a directory
        # `out/`), so readers that expand the output directory see only data files.
        head, tail = os.path.split(os.path.normpath(self.path))
        self._ledger_path = os.path.join(head, f"{tail}{LEDGER_SUFFIX}")
        self._lock_path = os.path.join(head, f".{tail}.colbatch-lock")

    def fresh(self) -> FileSink:
        """A new sink with the same settings and no run state."""
        return FileSink(self.path, format=self.format, options=self.options, part_rows=self.part_rows)

    # -- ledger -----------------------------------------------------------------------------

    @property
    def ledger_path(self) -> str:
        """Where this output's ledger (and manifest of committed files) lives."""
        return self._ledger_path

    def finished(self, job: JobIdentity) -> bool:
        """True when the ledger says this same job already completed and its files are all there."""
        data = FileLedger(self._ledger_path, self._lock_path, output=self.path).load()
        if data is None or not data["finished"] or data["fingerprint"] != job.fingerprint:
            return False
        return all(os.path.exists(self._final(u["file"])) for u in data["units"])

    def begin(self, job: JobIdentity, *, resume: bool) -> Committed:
        """Lock the output; with `resume`, return what the ledger says is committed."""
        ledger = FileLedger(self._ledger_path, self._lock_path, output=self.path)
        ledger.acquire()
        self._ledger, self._job = ledger, job
        try:
            data = ledger.load() if resume else None
            if data is not None and data["fingerprint"] != job.fingerprint:
                raise CheckpointError(
                    f"cannot resume into `{self.path}`: the job changed since its ledger was written "
                    f"({refusal(data.get('definition', {}), job.description)} differ); run without resume "
                    f"to start over", path=self.path)
        except BaseException:
            self._release()
            raise
        if data is None:
            self._units, self._done = [], Committed()
        else:
            self._units = list(data["units"])
            self._done = Committed.from_json(data)
            self._done.finished = False
        committed = copy.deepcopy(self._done)
        if resume:
            committed.redone = ledger.lock.redone(committed)
        return committed

    def _save_ledger(self, *, finished: bool = False) -> None:
        assert self._ledger is not None and self._job is not None
        self._done.finished = finished
        self._ledger.save({"job_id": self._job.job_id, "fingerprint": self._job.fingerprint,
                           "definition": dict(self._job.description), "format": self.format,
                           "files": [u["file"] for u in self._units], "units": self._units,
                           **self._done.to_json()})

    def _release(self) -> None:
        if self._ledger is not None:
            self._ledger.release()

    def _final(self, name: str) -> str:
        return self.path if self.single else os.path.join(self.path, name)

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
        if self._ledger is not None:
            if not self._units:
                self._save_ledger()  # a fresh run: the old ledger no longer describes the output
            self._remove_leftovers()
        if self.reject_units is not None:
            self.reject_units.start(keep=[u["rejects"] for u in self._units if u.get("rejects")])
        if self.single:
            self._start(Batch(pl.DataFrame(schema=self._schema), Split(0, "")))

    def _remove_leftovers(self) -> None:
        """Delete temp files of killed runs and, in directory mode, parts the ledger does not list."""
        if self.single:
            remove_quietly(temp_path(self.path))
            return
        for tmp in glob.glob(os.path.join(glob.escape(self.path), f".*{TMP_SUFFIX}")):
            remove_quietly(tmp)
        self._remove_stale({self._final(u["file"]) for u in self._units})

    def _part_name(self, split: Split) -> str:
        seq = sum(1 for u in self._units if u["split"] == split.id)
        seq += sum(1 for _tmp, final in self._pending if os.path.basename(final).startswith(f"part-{split.index:05d}-"))
        return f"part-{split.index:05d}-{seq:04d}{self._part_suffix()}"

    def _part_suffix(self) -> str:
        """`.parquet`, `.csv`, `.csv.gz`, `.jsonl.zst`, ...: compressed text parts say so."""
        compression = self.options.compression if self.format != "parquet" else None
        return PART_SUFFIX[self.format] + {"gzip": ".gz", "zstd": ".zst"}.get(compression or "", "")

    def _start(self, batch: Batch) -> None:
        final = self.path if self.single else os.path.join(self.path, self._part_name(batch.split))
        tmp = temp_path(final)
        remove_quietly(tmp)
        assert self._schema is not None
        self._writer = PolarsStreamWriter(tmp, self._schema, self.format, self._writer_options())
        self._unit = {"file": os.path.basename(final), "split": batch.split.id, "first_row": batch.first_row,
                      "end_row": batch.first_row, "rows": 0, "tmp": tmp, "final": final,
                      "split_index": batch.split.index}

    def _finish_unit(self, *, complete: bool = False) -> None:
        """Close the current file; in directory mode with a ledger, publish it and record it."""
        unit, self._unit = self._unit, None
        if unit is None:
            return
        writer, self._writer = self._writer, None
        assert writer is not None
        try:
            writer.close()
        except BaseException:
            remove_quietly(unit["tmp"])
            raise
        if self.reject_units is not None:
            # The unit's rejects are published first; the ledger entry that commits the unit names them.
            unit["rejects"] = self.reject_units.cut(None if self.single else unit["split_index"], unit["end_row"])
        if self.single or self._ledger is None:
            self._pending.append((unit["tmp"], unit["final"]))
            self._record(unit, complete)
            return
        faults.point("before-publish")
        publish(unit["tmp"], unit["final"])
        faults.point("before-ledger")
        self._record(unit, complete)
        self._save_ledger()
        faults.point("after-ledger")

    def _record(self, unit: dict[str, Any], complete: bool) -> None:
        entry = {k: unit[k] for k in ("file", "split", "first_row", "end_row", "rows")}
        if unit.get("rejects"):
            entry["rejects"] = unit["rejects"]
        self._units.append(entry)
        if not self.single:
            state = self._done.splits.setdefault(unit["split"], SplitState())
            state.rows = unit["end_row"]
            state.complete = complete

    def split_done(self, split: Split, rows: int) -> None:
        """The split ended: its last part is complete (published now in directory mode)."""
        if self._unit is not None and self._unit["split"] == split.id and not self.single:
            self._unit["end_row"] = rows
            self._finish_unit(complete=True)
        elif self.single:
            state = self._done.splits.setdefault(split.id, SplitState())
            state.rows, state.complete = rows, True

    def write(self, batch: Batch) -> None:
        """Send rows to the current file; in directory mode a new split or a full part starts a new part."""
        assert self._schema is not None
        unit = self._unit
        if unit is not None and not self.single and (unit["split"] != batch.split.id or unit["rows"] >= self.part_rows):
            self._finish_unit()
            unit = None
        if unit is None:
            self._start(batch)
            unit = self._unit
            assert unit is not None
        if not self.single:
            unit["end_row"] = batch.first_row + batch.rows_read
        df = batch.data
        if df.schema != self._schema:
            df = align(df.select([c for c in df.columns if c in self._schema]), self._schema)
            df = df.cast(dict(self._schema))
        if self.options.escape_formulas and self.format == "csv":
            df = escape_formulas(df)
        if df.height:
            assert self._writer is not None
            self._writer.write(df)
            self._rows += df.height
            unit["rows"] += df.height
        if self._ledger is not None:
            self._ledger.lock.note(batch.split.id, batch.first_row + batch.rows_read)

    def commit(self) -> SinkResult:
        """Finish files, publish what is pending by fsync + rename, mark the ledger finished.

        Stale parts of older runs are removed. The output's files are all the
        ledger's units (including those a resumed run committed earlier).
        """
        self._finish_unit()
        for tmp, final in self._pending:
            faults.point("before-publish")
            publish(tmp, final)
        self._pending = []
        finals = sorted({self._final(u["file"]) for u in self._units}) if self._units else [self.path]
        # The manifest (what readers follow) before the ledger says finished: a kill between
        # the two leaves an unfinished ledger, so the next run redoes the commit.
        write_manifest(self.path, format=self.format, files=finals, rows=sum(u["rows"] for u in self._units))
        if self.reject_units is not None:
            # Before the ledger says finished: a kill in between redoes this merge, from the same parts.
            self.reject_units.publish([u["rejects"] for u in self._units if u.get("rejects")])
        if self._ledger is not None:
            faults.point("before-ledger")
            self._save_ledger(finished=True)
            self._release()
        if self.reject_units is not None:
            self.reject_units.cleanup()
        if not self.single:
            self._remove_stale(set(finals))
        size = sum(os.path.getsize(f) for f in finals if os.path.exists(f))
        return SinkResult(rows=self._rows, files=finals, bytes=size, target=self.path)

    def _remove_stale(self, keep: set[str]) -> None:
        for old in glob.glob(os.path.join(glob.escape(self.path), f"part-*{self._part_suffix()}")):
            if old not in keep:
                remove_quietly(old)

    def abort(self, error: BaseException | None) -> None:
        """Stop the writer and delete temp files; never raises."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        if self._unit is not None:
            remove_quietly(self._unit["tmp"])
            self._unit = None
        for tmp, _final in self._pending:
            remove_quietly(tmp)
        self._pending = []
        self._release()


# Cells starting with these are evaluated as formulas by spreadsheet programs (OWASP CSV injection).
FORMULA_START = r"^[=+\-@\t\r]"


def escape_formulas(df: pl.DataFrame) -> pl.DataFrame:
    """Prefix `'` to text cells that start like a spreadsheet formula (`= + - @`, tab, CR)."""
    text = [c for c, t in df.schema.items() if t == pl.String]
    if not text:
        return df
    return df.with_columns(
        pl.when(pl.col(c).str.contains(FORMULA_START)).then(pl.lit("'") + pl.col(c)).otherwise(pl.col(c)).alias(c)
        for c in text
    )
