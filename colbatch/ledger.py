"""What each sink has committed, so a killed job resumes exactly once.

A job is named by a `JobIdentity`: `job_id` names the output (the same output
is the same job), `fingerprint` hashes the job's definition (source, steps,
sink options). The ledger lives with the output: a JSON file next to file
outputs, a table in the same database (written in the same transaction as the
data) for database sinks. Its content is a `Committed`: for every split, how
many leading source records (`first_row` order, rejected records included)
have their output committed, and whether the split is complete.

On resume the runner asks the sink for its `Committed`, skips complete splits,
reads the others from `skip_rows = rows`, and never sends a sink a row twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from colbatch.errors import CheckpointError

# Bump when the ledger's JSON shape changes incompatibly; older ledgers then refuse to resume.
LEDGER_VERSION = 1


@dataclass(frozen=True)
class JobIdentity:
    """Names a job for its ledger.

    Attributes:
        job_id: stable name of the job's output (same output, same job).
        fingerprint: hash of the job definition; resuming a changed job is refused.
        description: human-readable definition, stored for the refusal message.
    """

    job_id: str
    fingerprint: str
    description: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class SplitState:
    """Committed progress of one split: `rows` leading source records are done."""

    rows: int = 0
    complete: bool = False


@dataclass
class Committed:
    """What a sink reports as committed for a job (empty for a fresh run)."""

    splits: dict[str, SplitState] = field(default_factory=dict)
    finished: bool = False
    # Records an interrupted run had sent its sink past the committed point: the work a resume redoes.
    redone: int = 0

    @property
    def rows(self) -> int:
        """Source records already committed, over all splits."""
        return sum(s.rows for s in self.splits.values())

    def skip_for(self, split_id: str) -> int | None:
        """Records of `split_id` to skip, or None when the split is complete."""
        state = self.splits.get(split_id)
        if state is None:
            return 0
        return None if state.complete else state.rows

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (no pickle at rest)."""
        return {"finished": self.finished,
                "splits": {k: {"rows": v.rows, "complete": v.complete} for k, v in self.splits.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Committed:
        """Inverse of `to_json`."""
        splits = {str(k): SplitState(int(v["rows"]), bool(v["complete"])) for k, v in data.get("splits", {}).items()}
        return cls(splits=splits, finished=bool(data.get("finished", False)))


def contiguous_rows(ranges: Iterable[tuple[int, int]]) -> int:
    """Length of the prefix `[0, n)` covered by `(first_row, row_count)` ranges."""
    end = 0
    for first, count in sorted(ranges):
        if first > end:
            break
        end = max(end, first + count)
    return end


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value."""
    blob = json.dumps(value, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class OutputLock:
    """The lock that keeps two runs off one output, and the holder's progress mark.

    The lock is an `flock` on a hidden side file: the kernel drops it when the
    process dies, so a killed run never leaves a stale lock. While it holds the
    lock, a run notes in the same file how far its sink has got (`note`, one
    small `pwrite` per batch, not fsynced: it only has to survive the process,
    not the machine). The next run reads the note before taking over, so a
    resumed run can say how many records it had to redo (`Committed.redone`).
    """

    def __init__(self, path: str, *, output: str) -> None:
        self.path = path
        self.output = output
        self._fd: int | None = None
        self._width = 0
        self.previous: dict[str, Any] = {}

    def acquire(self) -> None:
        """Take the lock or fail at once naming the output; remember the previous holder's progress mark."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(f"output `{self.output}` is locked by another running job; wait for it to "
                                  f"finish (lock file `{self.path}`)", path=self.output) from None
        self.previous = _parse_mark(os.pread(fd, 1 << 16, 0))
        os.ftruncate(fd, 0)
        self._fd, self._width = fd, 0
        self._put({"pid": os.getpid()})

    def note(self, split: str, end_row: int) -> None:
        """Record that the sink has been sent the records of `split` before `end_row` (not yet committed)."""
        if self._fd is not None:
            self._put({"pid": os.getpid(), "split": split, "end_row": end_row})

    def _put(self, mark: dict[str, Any]) -> None:
        # One pwrite of the whole mark, padded over the previous one: a killed writer leaves
        # the old mark or the new one, never a mix (JSON ignores the trailing blanks).
        blob = json.dumps(mark, separators=(",", ":")).encode()
        self._width = max(self._width, len(blob))
        assert self._fd is not None
        os.pwrite(self._fd, blob.ljust(self._width), 0)

    def redone(self, committed: Committed) -> int:
        """Records the previous holder had sent its sink beyond what is committed (work a resume redoes)."""
        split, end = self.previous.get("split"), self.previous.get("end_row")
        if not isinstance(split, str) or not isinstance(end, int):
            return 0
        skip = committed.skip_for(split)
        return 0 if skip is None else max(0, end - skip)

    def release(self) -> None:
        """Drop the lock (the file stays; removing it would race with the next run)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _parse_mark(blob: bytes) -> dict[str, Any]:
    try:
        mark = json.loads(blob.decode() or "{}")
    except ValueError:  # a lock file of an older version (a bare pid): no progress known
        return {}
    return mark if isinstance(mark, dict) else {}


class FileLedger:
    """The JSON ledger of a file output, plus the `OutputLock` that keeps two runs off one output.

    The ledger is rewritten atomically (temp file, fsync, rename) after every
    committed unit, so a reader of it sees the state before or after a unit,
    never half of one.
    """

    def __init__(self, path: str, lock_path: str, *, output: str) -> None:
        self.path = path
        self.lock_path = lock_path
        self.output = output
        self.lock = OutputLock(lock_path, output=output)

    def acquire(self) -> None:
        """Take the output's lock or fail at once naming the output."""
        self.lock.acquire()

    def release(self) -> None:
        """Drop the lock."""
        self.lock.release()

    def load(self) -> dict[str, Any] | None:
        """The ledger's content, or None when there is none; a malformed ledger raises CheckpointError."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"ledger `{self.path}` cannot be read: {exc}; delete it and run with --overwrite",
                                  path=self.path) from exc
        required = {"version": int, "job_id": str, "fingerprint": str, "finished": bool, "splits": dict,
                    "units": list}
        bad = [k for k, t in required.items() if not isinstance(data.get(k) if isinstance(data, dict) else None, t)]
        if bad or data.get("version") != LEDGER_VERSION:
            raise CheckpointError(f"ledger `{self.path}` is not a colbatch ledger of version {LEDGER_VERSION} "
                                  f"(bad keys: {', '.join(bad) or 'version'}); delete it and run with --overwrite",
                                  path=self.path)
        return data

    def save(self, data: dict[str, Any]) -> None:
        """Replace the ledger atomically."""
        from colbatch.sinks.base import publish, temp_path  # sinks.base imports this module

        tmp = temp_path(self.path)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"version": LEDGER_VERSION, **data}, fh, indent=1, sort_keys=True, default=str)
        publish(tmp, self.path)


def refusal(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Which parts of a job definition changed, for the refusal to resume."""
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"`{k}`" for k in changed) or "the definition"
