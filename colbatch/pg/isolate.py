"""Load one unit of rows with binary COPY inside a transaction, isolating bad rows (the pgloader approach).

The whole unit is tried first under a savepoint. When the server rejects it
with a data error (SQLSTATE class 22 or 23), the attempt is rolled back to the
savepoint and the rows are split up and retried until every bad row is alone:

* when the error names the failing row (`COPY t, line N` in its context), that
  row is rejected at once, the rows before it are loaded as one piece, and the
  rest is retried in pieces about twice the size of the clean run just seen,
  so sparse bad rows cost a few round trips each, not a bisection each;
* otherwise (an upsert's merge failed, say) the piece is halved (bisection).

Good rows stay loaded; the caller commits them together with the ledger row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from colbatch.pg.copy import HEADER, TRAILER, EncodedRows
from colbatch.pg.retry import copy_line, is_data_error, sqlstate

SAVEPOINT = "SAVEPOINT colbatch_unit"
# Pieces after a failure are never smaller than this: a round trip costs about as much as sending ~1k rows.
MIN_PIECE_ROWS = 1024


@dataclass
class LoadStats:
    """Round trips spent by the loader: COPY attempts and all statements."""

    attempts: int = 0
    statements: int = 0
    failed_attempts: int = 0
    # Rows the client-side screen (`colbatch.pg.screen`) set apart to be COPYed on their own.
    suspects: int = 0


@dataclass
class BadRow:
    """A row the server refused: its index in the unit, SQLSTATE and message."""

    index: int
    sqlstate: str
    message: str


@dataclass
class UnitResult:
    """Outcome of a unit: rows loaded and rows refused."""

    loaded: int = 0
    bad: list[BadRow] = field(default_factory=list)


class IsolatingLoader:
    """COPYs row ranges of an encoded unit through `cursor`, splitting around bad rows.

    Args:
        copy_sql: the `COPY ... FROM STDIN (FORMAT BINARY)` statement.
        after_copy: statements run after each successful COPY in the same savepoint (an upsert's merge).
        stats: counters shared across units (tests and the benchmark read them).
    """

    def __init__(self, copy_sql: Any, *, after_copy: Callable[[Any], None] | None = None,
                 stats: LoadStats | None = None) -> None:
        self.copy_sql = copy_sql
        self.after_copy = after_copy
        self.stats = stats or LoadStats()

    def load(self, cur: Any, rows: EncodedRows, pieces: Sequence[tuple[int, int]] | None = None) -> UnitResult:
        """Load all good rows of `rows` in the cursor's open transaction; never commits.

        Args:
            cur: a cursor whose transaction is open.
            rows: the unit, encoded.
            pieces: row ranges to try first, in order, covering `rows` (default: all rows at once);
                e.g. the rows a screen passed, then its suspects.
        """
        result = UnitResult()
        n = len(rows)
        if n == 0:
            return result
        self._exec(cur, SAVEPOINT)
        pending = [p for p in reversed(pieces or [(0, n)]) if p[1] > p[0]]
        while pending:
            lo, hi = pending.pop()
            error = self._attempt(cur, rows, lo, hi)
            if error is None:
                result.loaded += hi - lo
                continue
            line = copy_line(error)
            if hi - lo == 1:
                result.bad.append(_bad(lo, error))
            elif line is not None and 1 <= line <= hi - lo:
                bad = lo + line - 1
                result.bad.append(_bad(bad, error))
                step = max(2 * (bad - lo + 1), MIN_PIECE_ROWS)
                tail = [(s, min(s + step, hi)) for s in range(bad + 1, hi, step)]
                pending.extend(reversed(tail))
                if bad > lo:
                    pending.append((lo, bad))
            else:
                mid = (lo + hi) // 2
                pending.append((mid, hi))
                pending.append((lo, mid))
        result.bad.sort(key=lambda b: b.index)
        return result

    def _attempt(self, cur: Any, rows: EncodedRows, lo: int, hi: int) -> BaseException | None:
        """One COPY of rows `[lo, hi)`; returns the data error, or None after a new savepoint."""
        self.stats.attempts += 1
        self.stats.statements += 1
        try:
            with cur.copy(self.copy_sql) as copy:
                copy.write(HEADER)
                for piece in rows.payload(lo, hi):
                    copy.write(piece)
                copy.write(TRAILER)
            if self.after_copy is not None:
                self.after_copy(cur)
                self.stats.statements += 1
        except Exception as exc:
            if not is_data_error(exc):
                raise
            self.stats.failed_attempts += 1
            self._exec(cur, "ROLLBACK TO SAVEPOINT colbatch_unit")
            return exc
        # Release and re-take in one round trip, so nesting (and subtransactions) stay shallow.
        self._exec(cur, "RELEASE SAVEPOINT colbatch_unit; " + SAVEPOINT)
        return None

    def _exec(self, cur: Any, statement: str) -> None:
        self.stats.statements += 1
        cur.execute(statement)


def _bad(index: int, error: BaseException) -> BadRow:
    diag = getattr(error, "diag", None)
    message = getattr(diag, "message_primary", None) or str(error).splitlines()[0]
    detail = getattr(diag, "message_detail", None)
    return BadRow(index, sqlstate(error) or "", f"{message} ({detail})" if detail else message)
