"""Newline-delimited JSON source: blocks of lines parsed by Polars, bad lines isolated precisely."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence

import polars as pl

from colbatch.lazy import numpy as np
from colbatch.batch import Batch, Split
from colbatch.errors import ConfigError
from colbatch.rejects import cast_or_reject, reject_frame
from colbatch.schema import align, infer_text_types, parse_schema
from colbatch.sources.base import BatchRows, ReadNotes, RejectFn, Source, rows_of
from colbatch.sources.csv import DEFAULT_INFER_BYTES, _blocks
from colbatch.sources.files import (
    expand_paths,
    file_splits,
    ignore_rejects,
    line_offset,
    open_stream,
    read_exact,
    read_failure,
)


log = logging.getLogger("colbatch")


class NdjsonSource(Source):
    """JSON Lines files (optionally `.gz`/`.zst`); one split per file, one record per line."""

    name = "ndjson"
    adaptive_batches = True

    def __init__(
        self,
        path: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        schema: dict | None = None,
        infer_bytes: int = DEFAULT_INFER_BYTES,
    ) -> None:
        self.paths = expand_paths(path, suffixes=(".jsonl", ".ndjson", ".json"))
        self.declared = parse_schema(schema)
        self.notes = ReadNotes()
        self._avg_row_bytes = 64
        self._schema = self._infer(infer_bytes)

    def describe(self) -> str:
        """One-line description for reports."""
        return f"ndjson {self.paths[0]}" + (f" (+{len(self.paths) - 1} files)" if len(self.paths) > 1 else "")

    @property
    def schema(self) -> pl.Schema:
        """Union of the keys seen in each file's sample; declared types win."""
        return self._schema

    def splits(self) -> list[Split]:
        """One split per file."""
        return file_splits(self.paths)

    def _infer(self, infer_bytes: int) -> pl.Schema:
        types: dict[str, pl.DataType] = {}
        seen: list[tuple[str, list[str]]] = []
        for path in self.paths:
            with open_stream(path) as stream:
                try:
                    sample = read_exact(stream, infer_bytes)
                except (OSError, EOFError) as exc:
                    raise read_failure(path, exc) from exc
            if len(sample) == infer_bytes:
                sample = sample[: sample.rfind(b"\n") + 1]
            lines = [ln for ln in sample.split(b"\n") if ln.strip()]
            good = []
            for ln in lines:
                try:
                    if isinstance(json.loads(ln), dict):
                        good.append(ln)
                except ValueError:
                    continue
            if not good:
                continue
            df = pl.read_ndjson(b"\n".join(good), infer_schema_length=None)
            self._avg_row_bytes = max(8, len(sample) // max(1, len(lines)))
            seen.append((path, df.columns))
            for name, dtype in infer_text_types(df).items():
                types.setdefault(name, dtype)
        if len({tuple(c) for _, c in seen}) > 1:
            self.notes.warnings.append("schema drift: input files have different keys; matched by name, missing keys are null")
        if self.declared:
            for name in self.declared:
                if types and name not in types:
                    raise ConfigError(f"declared column `{name}` is not in any input file; keys: {', '.join(types)}")
            types.update(self.declared)
        return pl.Schema(types)

    def read(self, split: Split, *, batch_rows: BatchRows, on_reject: RejectFn, skip_rows: int = 0) -> Iterator[Batch]:
        """Yield batches of about `batch_rows` lines of one file (a callable is asked before each block)."""
        path = split.path or ""

        def block_bytes() -> int:
            return max(64 << 10, rows_of(batch_rows) * self._avg_row_bytes)

        line = 1
        row = 0
        with open_stream(path) as stream:
            try:
                for block, _quoted in _blocks(stream, block_bytes, b"\x00\x01"):
                    nlines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
                    skipping = row < skip_rows
                    df, rejected, line_fn = self._parse(block, path, line, ignore_rejects if skipping else on_reject)
                    consumed = df.height + rejected
                    if not skipping:
                        yield Batch(df, split, first_row=row, rows_read=consumed, first_line=line,
                                    bytes_read=len(block), line_fn=line_fn)
                    elif row + consumed > skip_rows:
                        # one record per line: resume at line `line + skip` of this block
                        skip = skip_rows - row
                        tail = block[line_offset(block, skip):]
                        df, rejected, line_fn = self._parse(tail, path, line + skip, on_reject)
                        yield Batch(df, split, first_row=skip_rows, rows_read=df.height + rejected,
                                    first_line=line + skip, bytes_read=len(tail), line_fn=line_fn)
                    row += consumed
                    line += nlines
            except (OSError, EOFError) as exc:
                raise read_failure(path, exc) from exc

    def _parse(self, block: bytes, path: str, line: int, on_reject: RejectFn):
        if b"\n\n" not in block and not block.startswith(b"\n") and b"\r\n\r\n" not in block:
            try:
                df = pl.read_ndjson(block, schema=self._schema)
                if df.height == block.count(b"\n") + (0 if block.endswith(b"\n") else 1):
                    return df, 0, None
            except pl.exceptions.PolarsError as exc:
                log.debug("`%s` near line %d: fast parse failed (%s); isolating bad lines", path, line, exc)
        return self._parse_slow(block, path, line, on_reject)

    def _parse_slow(self, block: bytes, path: str, line: int, on_reject: RejectFn):
        lines = block.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        good: list[bytes] = []
        good_lines: list[int] = []
        bad_lines, bad_raw, bad_reason = [], [], []
        for i, raw in enumerate(lines):
            text = None
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    raise ValueError("blank line")
                obj = json.loads(text)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                good.append(raw)
                good_lines.append(line + i)
            except UnicodeDecodeError as exc:
                bad_lines.append(line + i)
                bad_raw.append(raw.decode("utf-8", errors="replace"))
                bad_reason.append(f"invalid UTF-8 byte at position {exc.start} of the line")
            except ValueError as exc:
                bad_lines.append(line + i)
                bad_raw.append(text)
                bad_reason.append(f"malformed JSON: {exc}")
        if bad_lines:
            on_reject(reject_frame(source=path, lines=bad_lines, stage="parse",
                                   reasons=pl.Series(bad_reason, dtype=pl.String), raw=bad_raw))
        if not good:
            return pl.DataFrame(schema=self._schema), len(bad_lines), None
        loose = pl.read_ndjson(b"\n".join(good), infer_schema_length=None)
        loose = loose.with_columns(
            [pl.col(c).cast(pl.String) if not isinstance(t, (pl.List, pl.Struct)) else pl.col(c).map_elements(
                json.dumps, return_dtype=pl.String) for c, t in loose.schema.items()
             if c in self._schema and t != self._schema[c] and t != pl.Null]
        )
        loose = loose.select([c for c in loose.columns if c in self._schema])
        loose = align(loose.with_columns([pl.col(c).cast(pl.String) for c, t in loose.schema.items() if t == pl.Null]),
                      {c: loose.schema.get(c, pl.String()) for c in self._schema})
        lines_arr = np.asarray(good_lines, dtype=np.int64)
        cast, lines_arr = cast_or_reject(loose, self._schema, source=path, lines=lines_arr, on_reject=on_reject)
        rejected = len(bad_lines) + len(good_lines) - len(lines_arr)
        return align(cast, self._schema), rejected, (lambda pos, _l=lines_arr: _l[pos])
