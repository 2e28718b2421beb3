"""kill -9 of a CSV → PostgreSQL load at chosen instants, then resume: every row once, the same rejects.

The input has bad rows of every kind: lines the CSV reader cannot parse (an extra field) or cast
(`n/a` amounts), amounts a `validate` step rejects, and rows the server refuses at load: a
`NOT NULL` column and a `CHECK` that the client-side screen evaluates, and a `CHECK` it cannot
(`num_nonnulls`), which COPY itself finds. After kill + resume, the table and the rejects file
must equal those of an uninterrupted run, and the resume redoes at most the unit in flight.
"""

from __future__ import annotations

import random
import signal
import threading
from pathlib import Path

import polars as pl
import pytest
from psycopg import sql

import colbatch.faults
from colbatch.config import load_job
from colbatch.pg.ledger import MARK_ROW
from colbatch.sinks.postgres import DEFAULT_STREAMS, PostgresSink
from tests.conftest import no_temp_files
from tests.faults.test_kill_resume import BATCH, ROWS_PER_FILE, _inputs, _run_killed, _steps, same_rejects
from tests.pg import pg_query

DEFAULT_KILLS = 6
FULL_KILLS = 50
TABLE = "events"
# Records i with i % PARSE_EVERY == PARSE_AT get an extra field: the CSV reader rejects the line (stage `parse`).
PARSE_EVERY, PARSE_AT = 500, 250
# Records with i % NULL_EVERY == NULL_AT have an empty `type`, so `category` is null: NOT NULL refuses them at load.
NULL_EVERY, NULL_AT = 307, 11
DDL = ("CREATE TABLE {} (id bigint, amount double precision, type text, value double precision, "
       "category text NOT NULL, CONSTRAINT screened CHECK (id % 101 <> 3), "
       "CONSTRAINT unscreened CHECK (num_nonnulls(id, value) = 2 AND id % 211 <> 8))")


def _pg_inputs(root: Path) -> Path:
    src = _inputs(root, bad=True)
    for path in sorted(src.glob("*.csv")):
        lines = path.read_text().splitlines()
        for n in range(1, len(lines)):  # line n holds record id = first id of the file + n - 1
            i = int(lines[n].split(",", 1)[0])
            if i % PARSE_EVERY == PARSE_AT:
                lines[n] += ",extra"
            elif i % NULL_EVERY == NULL_AT:
                head, _ = lines[n].rsplit(",", 1)
                lines[n] = head + ","
        path.write_text("\n".join(lines) + "\n")
    return src


def _rejects(root: Path, schema: str) -> Path:
    return root / f"rejects-{schema}.parquet"


def _job(root: Path, src: Path, dsn: str, schema: str) -> Path:
    job = root / f"job-{schema}.toml"
    job.write_text(f"""
[source]
path = "{src.as_posix()}/*.csv"
schema = {{ id = "int64", amount = "float64", type = "str" }}
{_steps(True)}
[sink]
path = "{dsn}"
table = "{TABLE}"
schema = "{schema}"
[rejects]
path = "{_rejects(root, schema).as_posix()}"
[run]
batch_size = {BATCH}
max_error_rate = 0.5
progress = false
""")
    return job


def _fresh_schema(dsn: str, name: str) -> None:
    pg_query(dsn, sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    pg_query(dsn, sql.SQL(DDL).format(sql.Identifier(name, TABLE)))


def _check_table(dsn: str, schema: str, reference: str) -> None:
    got, ref = sql.Identifier(schema, TABLE), sql.Identifier(reference, TABLE)
    for x, y in ((got, ref), (ref, got)):
        extra = pg_query(dsn, sql.SQL("SELECT count(*) FROM (SELECT * FROM {} EXCEPT ALL SELECT * FROM {}) d")
                         .format(x, y))[0][0]
        assert extra == 0, f"{extra} rows of {x.as_string(None)} missing from {y.as_string(None)}"
    n, keys = pg_query(dsn, sql.SQL("SELECT count(*), count(DISTINCT id) FROM {}").format(got))[0]
    assert n == keys > 0, f"{n - keys} duplicate keys"
    ledger = sql.Identifier(schema, "colbatch_ledger")
    marks, finished = pg_query(dsn, sql.SQL("SELECT count(*) FILTER (WHERE first_row = %s), "
                                            "count(*) FILTER (WHERE first_row = -1) FROM {}").format(ledger),
                               (MARK_ROW,))[0]
    assert (marks, finished) == (0, 1), "a finished job keeps its finished row and no progress mark"


def _most_records_per_unit(dsn: str, schema: str) -> int:
    """The most source records one unit of the ledger covers: what a resume may redo at most."""
    ledger = sql.Identifier(schema, "colbatch_ledger")
    return pg_query(dsn, sql.SQL("SELECT max(row_count) FROM {} WHERE first_row >= 0").format(ledger))[0][0]


def _reference_arrivals(job: Path, monkeypatch) -> tuple[object, list[tuple[str, bool]]]:
    """Run the job uninterrupted, recording each fault-point arrival and whether a unit was being written."""
    seen: list[tuple[str, bool]] = []
    in_unit = {"on": False}
    write = PostgresSink.write

    def recording_write(self, batch):
        in_unit["on"] = True
        try:
            write(self, batch)
        finally:
            in_unit["on"] = False

    def unit() -> bool:  # in a write, or in a thread of the parallel COPY streams
        return in_unit["on"] or threading.current_thread().name.startswith("colbatch-copy")

    monkeypatch.setattr(colbatch.faults, "point", lambda name: seen.append((name, unit())))
    monkeypatch.setattr(PostgresSink, "write", recording_write)
    report = load_job(job).run()
    monkeypatch.undo()
    return report, seen


def _kill_and_resume(tmp_path: Path, dsn: str, base: str, n: int, monkeypatch) -> None:
    src = _pg_inputs(tmp_path)
    reference = f"{base}_ref"
    schemas = [reference]
    try:
        _fresh_schema(dsn, reference)
        ref, seen = _reference_arrivals(_job(tmp_path, src, dsn, reference), monkeypatch)
        assert ref.succeeded and ref.batches >= 9
        assert {"parse", "cast", "validate", "load"} <= set(ref.rejects_by_stage), ref.rejects_by_stage
        # The rejects file, not the report's first 1,000: load rejects come when their unit commits.
        everything = pl.read_parquet(_rejects(tmp_path, reference))
        loads = everything.filter(everything["_stage"] == "load")["_reason"].to_list()
        for rule in ('"screened"', '"unscreened"', "not-null"):
            assert any(rule in r for r in loads), f"no load reject for {rule}"
        per_point: dict[str, list[bool]] = {}
        for name, unit in seen:
            per_point.setdefault(name, []).append(unit)
        assert len(per_point["after-write"]) == ref.batches
        commits = len(per_point["pg-before-commit"])  # units, set-up, split closings and the job's last commit
        assert commits == len(per_point["pg-after-commit"]) > ref.batches
        assert per_point["before-publish"] == [False]  # the rejects file is published once, at the end
        most = _most_records_per_unit(dsn, reference)
        rng = random.Random(5)
        in_unit = [k + 1 for k, unit in enumerate(per_point["pg-before-commit"]) if unit]
        assert len(in_unit) == ref.batches
        points = [("after-write", rng.randint(1, ref.batches)), ("before-publish", 1)]
        points += [(p, rng.choice(in_unit)) for p in ("pg-before-commit", "pg-after-commit")]  # a unit's commit
        points += [("pg-before-commit", commits), ("pg-after-commit", commits)]  # both sides of the last commit
        names = sorted(per_point)
        points += [(p, rng.randint(1, len(per_point[p]))) for p in rng.choices(names, k=n - len(points))]
        redid = 0
        for i, (point, nth) in enumerate(points):
            schema = f"{base}_k{i}"
            schemas.append(schema)
            _fresh_schema(dsn, schema)
            job = _job(tmp_path, src, dsn, schema)
            assert _run_killed(job, point, nth) == -signal.SIGKILL, f"{point}:{nth} was not reached"
            report = load_job(job).run(resume=True)
            assert report.succeeded, report.error
            if point == "pg-after-commit" and nth == commits:
                assert report.skipped  # killed after the job was marked finished: running it again is a no-op
            else:
                assert report.rows_read + report.rows_resumed == 3 * ROWS_PER_FILE
            # the units in flight when the process died are redone (one per COPY stream at most), and nothing else
            assert 0 <= report.rows_redone <= DEFAULT_STREAMS * most, f"{point}:{nth} redid {report.rows_redone}"
            if point == "pg-before-commit" and per_point[point][nth - 1]:
                assert report.rows_redone > 0, f"{point}:{nth}: the unit in flight was not measured"
                redid += 1
            elif not per_point[point][nth - 1] and point != "after-write":  # set-up, split closing, the end
                assert report.rows_redone == 0, f"{point}:{nth} redid {report.rows_redone} records"
            _check_table(dsn, schema, reference)
            same_rejects(_rejects(tmp_path, schema), _rejects(tmp_path, reference))
        assert redid > 0
        assert no_temp_files(tmp_path) == []
    finally:
        for schema in schemas:
            pg_query(dsn, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_kill_postgres_load_at_random_instants_then_resume_loads_every_row_and_reject_once(
        tmp_path, pg_dsn, pg_schema, monkeypatch):
    _kill_and_resume(tmp_path, pg_dsn, pg_schema, DEFAULT_KILLS, monkeypatch)


@pytest.mark.slow
def test_kill_postgres_load_at_50_instants_then_resume_loads_every_row_and_reject_once(
        tmp_path, pg_dsn, pg_schema, monkeypatch):
    _kill_and_resume(tmp_path, pg_dsn, pg_schema, FULL_KILLS, monkeypatch)

