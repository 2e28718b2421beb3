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

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
