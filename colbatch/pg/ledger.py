"""The PostgreSQL ledger table: one row per committed unit, written in the unit's own transaction.

Columns: `job_id`, `split`, `first_row`, `row_count` (source records the unit
covers), `rows_loaded`, `rows_rejected`, `complete` (the split is done),
`fingerprint` (of the job definition), `target`, `committed_at`, `rejects` (the
durable rejects part of the unit, see `colbatch.rejects.RejectParts`; added to a
ledger table of an older version when missing).

Rows with a negative `first_row` are not units: `-1` says the job finished
(split `FINISHED_SPLIT`); `-2` is the running job's progress mark for a split
(split `MARK_PREFIX + split`, `row_count` = the end of the records sent to the
sink, committed or not), written outside the unit transactions by the lock's
session so that it survives a killed run; the next run reads it to report
`rows_redone`. (The prefix keeps the marks off real splits for a reader that
does not know them.)
"""

from __future__ import annotations

from typing import Any

from colbatch.errors import CheckpointError
from colbatch.ledger import Committed, JobIdentity, SplitState, contiguous_rows

# One table per database schema, shared by every job that loads into that schema.
DEFAULT_LEDGER_TABLE = "colbatch_ledger"
# The row that says a job finished (committed its last unit): no real split has this id or a negative first row.
FINISHED_SPLIT = "(job finished)"
# `first_row` of a progress mark (records sent to the sink, committed or not); see the module docstring.
MARK_ROW = -2
MARK_PREFIX = "(sent) "


class PgLedger:
    """Reads and writes the ledger table `schema.name` through a caller's connection and transaction."""

    def __init__(self, schema: str | None, name: str = DEFAULT_LEDGER_TABLE) -> None:
        from psycopg import sql

        self.ident = sql.Identifier(schema, name) if schema else sql.Identifier(name)

    def ensure(self, conn: Any) -> None:
        """Create the ledger table if missing (its own transaction; racing creators are tolerated)."""
        import psycopg
        from psycopg import sql

        ddl = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (job_id text NOT NULL, split text NOT NULL, first_row bigint NOT NULL, "
            "row_count bigint NOT NULL, rows_loaded bigint NOT NULL DEFAULT 0, rows_rejected bigint NOT NULL DEFAULT 0, "
            "complete boolean NOT NULL DEFAULT false, fingerprint text NOT NULL, target text NOT NULL, "
            "committed_at timestamptz NOT NULL DEFAULT now(), rejects text, "
            "PRIMARY KEY (job_id, split, first_row))"
        ).format(self.ident)
        for attempt in range(3):
            try:
                conn.execute(ddl)
                conn.commit()
                self._upgrade(conn)
                return
            except psycopg.errors.UniqueViolation:  # two sessions created it at once; the other one won
                conn.rollback()
                if attempt == 2:
                    raise

    def _upgrade(self, conn: Any) -> None:
        """Add the `rejects` column to a ledger table of an older version (ALTER only when it is missing)."""
        from psycopg import sql

        found = conn.execute("SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'rejects' "
                             "AND NOT attisdropped", (self.ident.as_string(conn),)).fetchone()
        conn.commit()
        if found is None:  # checked first: ALTER TABLE takes an exclusive lock even when it has nothing to do
            conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS rejects text").format(self.ident))
            conn.commit()

    def committed(self, conn: Any, job: JobIdentity) -> Committed:
        """What the ledger holds for `job`; CheckpointError when it was written by a different job definition."""
        from psycopg import sql

        rows = conn.execute(sql.SQL("SELECT split, first_row, row_count, complete, fingerprint FROM {} "
                                    "WHERE job_id = %s AND first_row >= 0").format(self.ident),
                            (job.job_id,)).fetchall()
        conn.commit()
        prints = {r[4] for r in rows}
        if prints - {job.fingerprint}:
            raise CheckpointError(
                f"the ledger of job `{job.job_id}` was written by a different job definition "
                f"(fingerprint {sorted(prints)[0]}, now {job.fingerprint}); run without resume to start over",
                job_id=job.job_id)
        ranges: dict[str, list[tuple[int, int]]] = {}
        complete: set[str] = set()
        for split, first, count, done, _ in rows:
            ranges.setdefault(split, []).append((first, count))
            if done:
                complete.add(split)
        return Committed(splits={s: SplitState(contiguous_rows(r), s in complete) for s, r in ranges.items()})

    def reject_parts(self, conn: Any, job_id: str) -> list[str]:
        """The durable rejects parts the committed units of `job_id` name, in a stable order."""
        from psycopg import sql

        rows = conn.execute(sql.SQL("SELECT rejects FROM {} WHERE job_id = %s AND first_row >= 0 AND rejects IS NOT "
                                    "NULL ORDER BY rejects").format(self.ident), (job_id,)).fetchall()
        return [r[0] for r in rows]

    def take_marks(self, conn: Any, job_id: str) -> dict[str, int]:
        """Read and delete the progress marks a previous run of `job_id` left: split → end of records sent."""
        from psycopg import sql

        rows = conn.execute(sql.SQL("DELETE FROM {} WHERE job_id = %s AND first_row = %s RETURNING split, row_count")
                            .format(self.ident), (job_id, MARK_ROW)).fetchall()
        return {split.removeprefix(MARK_PREFIX): end for split, end in rows}

    def mark(self, conn: Any, job: JobIdentity, target: str, split: str, end_row: int) -> None:
        """Note (on an autocommit connection, outside the unit transactions) that records before `end_row` were sent."""
        from psycopg import sql

        conn.execute(sql.SQL(
            "INSERT INTO {} (job_id, split, first_row, row_count, fingerprint, target) VALUES (%s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (job_id, split, first_row) DO UPDATE SET row_count = EXCLUDED.row_count").format(self.ident),
            (job.job_id, MARK_PREFIX + split, MARK_ROW, end_row, job.fingerprint, target))

    def forget(self, conn: Any, job_id: str) -> None:
        """Delete a job's rows (a fresh run, or a finished `replace`) in the caller's transaction."""
        from psycopg import sql

        conn.execute(sql.SQL("DELETE FROM {} WHERE job_id = %s").format(self.ident), (job_id,))

    def record(self, cur: Any, job: JobIdentity, target: str, split: str, first_row: int, row_count: int,
               loaded: int, rejected: int, *, complete: bool = False, rejects: str | None = None) -> None:
        """Record a unit and the name of its rejects part in the caller's transaction (the one that loaded its rows)."""
        from psycopg import sql

        cur.execute(sql.SQL(
            "INSERT INTO {} AS l (job_id, split, first_row, row_count, rows_loaded, rows_rejected, complete, "
            "fingerprint, target, rejects) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (job_id, split, first_row) DO UPDATE SET complete = l.complete OR EXCLUDED.complete, "
            "rejects = coalesce(l.rejects, EXCLUDED.rejects)").format(self.ident),
            (job.job_id, split, first_row, row_count, loaded, rejected, complete, job.fingerprint, target, rejects))

    def has_unit(self, cur: Any, job_id: str, split: str, first_row: int) -> bool:
        """True when the unit is already committed (its commit succeeded though the client saw an error)."""
        from psycopg import sql

        return cur.execute(sql.SQL("SELECT 1 FROM {} WHERE job_id = %s AND split = %s AND first_row = %s")
                           .format(self.ident), (job_id, split, first_row)).fetchone() is not None

    def finish(self, cur: Any, job: JobIdentity, target: str) -> None:
        """Record that `job` finished (its progress marks go), in the caller's transaction (its last one)."""
        from psycopg import sql

        cur.execute(sql.SQL("DELETE FROM {} WHERE job_id = %s AND first_row = %s").format(self.ident),
                    (job.job_id, MARK_ROW))
        self.record(cur, job, target, FINISHED_SPLIT, -1, 0, 0, 0, complete=True)

    def is_finished(self, conn: Any, job: JobIdentity) -> bool:
        """True when the ledger holds the finished row of this same job definition."""
        from psycopg import sql

        if conn.execute("SELECT to_regclass(%s)", (self.ident.as_string(conn),)).fetchone()[0] is None:
            return False
        return conn.execute(sql.SQL("SELECT 1 FROM {} WHERE job_id = %s AND split = %s AND fingerprint = %s")
                            .format(self.ident), (job.job_id, FINISHED_SPLIT, job.fingerprint)).fetchone() is not None
