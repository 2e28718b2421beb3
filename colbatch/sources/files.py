"""Finding input files and opening them as byte streams (plain, gzip, zstd)."""

from __future__ import annotations

import errno
import glob
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from colbatch.batch import Split
from colbatch.errors import SourceError
from colbatch.lazy import numpy as np

COMPRESSED_SUFFIXES = (".gz", ".gzip", ".zst", ".zstd")


def expand_paths(path: str | os.PathLike | Sequence[str | os.PathLike], *, suffixes: Sequence[str]) -> list[str]:
    """Resolve a file, a directory (its files with `suffixes`) or a glob to a sorted list of files."""
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not items:
        raise SourceError("no input path given", path=None)
    found: list[str] = []
    for item in items:
        text = os.fspath(item)
        if any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                raise SourceError(f"no files match `{text}`", path=text)
            found.extend(matches)
        elif os.path.isdir(text):
            entries = sorted(
                str(p) for p in Path(text).rglob("*")
                if p.is_file() and not p.name.startswith((".", "_")) and _has_suffix(p.name, suffixes)
            )
            if not entries:
                raise SourceError(f"directory `{text}` holds no {'/'.join(suffixes)} files", path=text)
            found.extend(entries)
        elif os.path.isfile(text):
            found.append(text)
        else:
            raise SourceError(f"cannot read `{text}`: no such file or directory", path=text)
    return found


def _has_suffix(name: str, suffixes: Sequence[str]) -> bool:
    base = strip_compression(name.lower())
    return any(base.endswith(s) for s in suffixes)


def strip_compression(name: str) -> str:
    """`events.csv.gz` → `events.csv`."""
    for suffix in COMPRESSED_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def file_splits(paths: Sequence[str]) -> list[Split]:
    """One split per file, ids stable across runs (index and path)."""
    return [Split(i, f"{i:05d}:{p}", p, os.path.getsize(p)) for i, p in enumerate(paths)]


class _CheckedZstdReader(io.RawIOBase):
    """zstd stream (one or more frames) that raises on a truncated frame instead of a short read."""

    def __init__(self, raw: BinaryIO) -> None:
        import zstandard

        self._raw = raw
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._obj = self._new()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        while not self._pending:
            data = self._raw.read(1 << 20)
            if not data:
                if self._in_frame:
                    raise EOFError("zstd stream ended before the end of its frame (truncated file)")
                return 0
            self._pending = self._feed(data)
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            self._in_frame = True
            out.append(self._obj.decompress(data))
            if not self._obj.eof:
                break
            self._in_frame = False
            data = self._obj.unused_data
            self._obj = self._new()
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_stream(path: str) -> BinaryIO:
    """Open `path` for reading decoded bytes; `.gz` and `.zst` are decompressed on the fly."""
    lower = path.lower()
    try:
        if lower.endswith((".gz", ".gzip")):
            import gzip  # ~15 ms to import: only for .gz inputs

            return gzip.open(path, "rb")  # type: ignore[return-value]
        if lower.endswith((".zst", ".zstd")):
            return io.BufferedReader(_CheckedZstdReader(open(path, "rb")), buffer_size=1 << 20)  # type: ignore[return-value]
        return open(path, "rb", buffering=0)  # type: ignore[return-value]
    except OSError as exc:
        raise SourceError(f"cannot open `{path}`: {exc.strerror or exc}", path=path) from exc


# errno values of failures that may pass when tried again (network file systems, flaky disks).
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET,
                              errno.ECONNABORTED, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH,
                              errno.ESTALE, errno.EBUSY})


def is_transient(exc: BaseException) -> bool:
    """True for I/O failures worth retrying: connection loss, timeouts, EIO; never for bad data or missing files."""
    if isinstance(exc, SourceError):
        return bool(getattr(exc, "transient", False))
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def read_failure(path: str, exc: BaseException) -> SourceError:
    """The error for a file that cannot be read to its end."""
    detail = str(exc) or type(exc).__name__
    return SourceError(f"cannot read `{path}`: {detail}", path=path, transient=is_transient(exc))


def read_exact(stream: BinaryIO, size: int) -> bytes:
    """Read up to `size` bytes, looping over short reads; empty only at end of stream."""
    parts = []
    remaining = size
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def readinto_exact(stream: BinaryIO, view: memoryview) -> int:
    """Fill `view` from `stream`, looping over short reads; fewer bytes only at end of stream."""
    n = 0
    while n < len(view):
        got = stream.readinto(view[n:])
        if not got:
            break
        n += got
    return n


def line_offset(block: bytes, n: int) -> int:
    """Byte offset where line `n` (0-based) of `block` starts."""
    if n <= 0:
        return 0
    newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
    return int(newlines[n - 1]) + 1


def ignore_rejects(frame: object) -> None:
    """An `on_reject` for records a resumed run skips: their rejects were recorded by the run that committed them."""
