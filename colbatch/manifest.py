"""The output manifest: a JSON file beside each output listing exactly the files its last commit published.

Readers (`cb.open_output`, `python -m colbatch query`) read the files the
manifest lists and nothing else, so a temp file, a stale part or a part of a
run that is still writing is never read.

The manifest of output `X` (a file such as `out/events.parquet` or a directory
such as `out/events/`) is `X.manifest.json`, next to it. It sits beside rather
than inside a directory because Polars' `read_parquet(directory)` refuses a
directory holding files of another extension.

Readers ignore keys they do not know: the resume ledger extends this JSON.

Example:
    >>> m = read_manifest("out/events.parquet")
    >>> m.paths()          # absolute paths of the committed files
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from colbatch.errors import ConfigError
from colbatch.sinks.base import publish

MANIFEST_SUFFIX = ".manifest.json"
# Bump when a key changes meaning; new keys do not need a bump (readers ignore unknown keys).
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """What one commit of an output published.

    Attributes:
        output: The output path as given to the sink (file or directory).
        format: `parquet`, `csv` or `ndjson`.
        files: Committed files, relative to the manifest's directory.
        partition_by: Hive partition columns, in directory order (empty when not partitioned).
        rows: Rows in the committed files.
        base: Directory the relative `files` are resolved against.
        extra: Keys this version does not know, kept so a rewrite does not drop them.
    """

    output: str
    format: str
    files: tuple[str, ...]
    partition_by: tuple[str, ...] = ()
    rows: int = 0
    base: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def paths(self) -> list[str]:
        """Absolute paths of the committed files."""
        return [os.path.normpath(os.path.join(self.base, f)) for f in self.files]

    @property
    def name(self) -> str:
        """A view name for the output: the file or directory name without suffixes (`events`)."""
        base = os.path.basename(os.path.normpath(self.output))
        return base.split(".", 1)[0] or "output"


def manifest_path(output: str | os.PathLike) -> str:
    """Where the manifest of `output` lives: `output` + `.manifest.json`."""
    return os.path.normpath(os.fspath(output)) + MANIFEST_SUFFIX


def write_manifest(output: str | os.PathLike, *, format: str, files: Sequence[str],
                   partition_by: Sequence[str] = (), partition_types: Mapping[str, str] | None = None,
                   rows: int = 0) -> str:
    """Atomically write the manifest of `output` (temp file, fsync, rename); returns its path.

    Args:
        output: The output file or directory.
        format: `parquet`, `csv` or `ndjson`.
        files: The files the commit published (absolute or relative to the current directory).
        partition_by: Hive partition columns.
        partition_types: DuckDB type of each partition column, for readers (missing ones are inferred).
        rows: Rows written.
    """
    path = manifest_path(output)
    base = os.path.dirname(os.path.abspath(path))
    body = {
        "version": MANIFEST_VERSION,
        "output": os.path.basename(os.path.normpath(os.fspath(output))),
        "format": format,
        "files": [os.path.relpath(os.path.abspath(f), base) for f in files],
        "partition_by": list(partition_by),
        "partition_types": dict(partition_types or {}),
        "rows": rows,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.colbatch-tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(body, fh, indent=2)
        fh.write("\n")
    publish(tmp, path)
    return path


def find_manifest(path: str | os.PathLike) -> str | None:
    """The manifest file for `path` (an output, or a manifest itself), or None when there is none."""
    text = os.path.normpath(os.fspath(path))
    if text.endswith(MANIFEST_SUFFIX) and os.path.isfile(text):
        return text
    candidate = manifest_path(text)
    return candidate if os.path.isfile(candidate) else None


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read the manifest of an output (give the output's path or the manifest's).

    Raises:
        ConfigError: when there is no manifest (the output was never committed by colbatch) or it is not valid.
    """
    found = find_manifest(path)
    if found is None:
        raise ConfigError(f"no committed output at `{path}`: `{manifest_path(path)}` does not exist", path=str(path))
    try:
        with open(found, encoding="utf-8") as fh:
            body = json.load(fh)
        known = {"output", "format", "files", "partition_by", "rows"}
        return Manifest(
            output=os.path.join(os.path.dirname(found), str(body["output"])),
            format=str(body["format"]),
            files=tuple(str(f) for f in body["files"]),
            partition_by=tuple(str(c) for c in body.get("partition_by", ())),
            rows=int(body.get("rows", 0)),
            base=os.path.dirname(os.path.abspath(found)),
            extra={k: v for k, v in body.items() if k not in known},
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"manifest `{found}` is not valid: {exc}", path=found) from exc

