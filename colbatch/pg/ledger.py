"""The PostgreSQL ledger table: one row per committed unit, written in the unit's own transaction.

Columns: `job_id`, `split`, `first_row`, `row_count` (source records the unit
covers), `rows_loaded`, `rows_rejected`, `complete` (the split is done),
`fingerprint` (of the job definition), `target`, `committed_at`.
"""

from __future__ import annotations

from typing import Any

from colbatch.errors import CheckpointError
from colbatch.ledger import Committed, JobIdentity, SplitState, contiguous_rows

# One table per database schema, shared by every job that loads into that schema.
DEFAULT_LEDGER_TABLE = "colbatch_ledger"
# The row that says a job finished (committed its last unit): no real split has this id or a negative first row.
FINISHED_SPLIT = "(job finished)"


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
            "committed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (job_id, split, first_row))"
        ).format(self.ident)
        for attempt in range(3):
            try:
                conn.execute(ddl)
                conn.commit()
                return
            except psycopg.errors.UniqueViolation:  # two sessions created it at once; the other one won
                conn.rollback()
                if attempt == 2:
                    raise

    def committed(self, conn: Any, job: JobIdentity) -> Committed:
        """What the ledger holds for `job`; CheckpointError when it was written by a different job definition."""
        from psycopg import sql

        rows = conn.execute(sql.SQL("SELECT split, first_row, row_count, complete, fingerprint FROM {} "
                                    "WHERE job_id = %s AND split <> %s").format(self.ident),
                            (job.job_id, FINISHED_SPLIT)).fetchall()
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

    def forget(self, conn: Any, job_id: str) -> None:
        """Delete a job's rows (a fresh run, or a finished `replace`) in the caller's transaction."""
        from psycopg import sql

        conn.execute(sql.SQL("DELETE FROM {} WHERE job_id = %s").format(self.ident), (job_id,))

    def record(self, cur: Any, job: JobIdentity, target: str, split: str, first_row: int, row_count: int,
               loaded: int, rejected: int, *, complete: bool = False) -> None:
        """Record a unit in the caller's transaction (the one that loaded its rows)."""
        from psycopg import sql

        cur.execute(sql.SQL(
            "INSERT INTO {} AS l (job_id, split, first_row, row_count, rows_loaded, rows_rejected, complete, fingerprint, "
            "target) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (job_id, split, first_row) DO UPDATE "
            "SET complete = l.complete OR EXCLUDED.complete").format(self.ident),
            (job.job_id, split, first_row, row_count, loaded, rejected, complete, job.fingerprint, target))

    def has_unit(self, cur: Any, job_id: str, split: str, first_row: int) -> bool:
        """True when the unit is already committed (its commit succeeded though the client saw an error)."""
        from psycopg import sql

        return cur.execute(sql.SQL("SELECT 1 FROM {} WHERE job_id = %s AND split = %s AND first_row = %s")
                           .format(self.ident), (job_id, split, first_row)).fetchone() is not None

    def finish(self, cur: Any, job: JobIdentity, target: str) -> None:
        """Record that `job` finished, in the caller's transaction (its last one)."""
        self.record(cur, job, target, FINISHED_SPLIT, -1, 0, 0, 0, complete=True)

    def is_finished(self, conn: Any, job: JobIdentity) -> bool:
        """True when the ledger holds the finished row of this same job definition."""
        from psycopg import sql

        if conn.execute("SELECT to_regclass(%s)", (self.ident.as_string(conn),)).fetchone()[0] is None:
            return False
        return conn.execute(sql.SQL("SELECT 1 FROM {} WHERE job_id = %s AND split = %s AND fingerprint = %s")
                            .format(self.ident), (job.job_id, FINISHED_SPLIT, job.fingerprint)).fetchone() is not None
