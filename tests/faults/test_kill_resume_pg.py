"""kill -9 of a CSV → PostgreSQL load at chosen instants, then resume: every row exactly once."""

from __future__ import annotations

import random
import signal

import polars as pl
import pytest
from psycopg import sql

from colbatch.config import load_job
from tests.faults.test_kill_resume import ROWS_PER_FILE, _inputs, _run_killed
from tests.pg import pg_query

DEFAULT_KILLS = 6
FULL_KILLS = 50


def _job(root, src, dsn, schema, table):
    job = root / f"job-{table}.toml"
    job.write_text(f"""
[source]
path = "{src.as_posix()}/*.csv"
schema = {{ id = "int64", amount = "float64", type = "str" }}
[[steps]]
filter = "amount > 0"
[[steps]]
with_columns = ["amount * 1.1 AS value"]
[sink]
path = "{dsn}"
table = "{table}"
schema = "{schema}"
[run]
batch_size = 1000
progress = false
""")
    return job


def _ids(dsn, schema, table) -> list[int]:
    q = sql.SQL("SELECT id FROM {} ORDER BY id").format(sql.Identifier(schema, table))
    return [r[0] for r in pg_query(dsn, q)]


def _kill_and_resume(tmp_path, dsn, schema, n):
    src = _inputs(tmp_path)
    ref = load_job(_job(tmp_path, src, dsn, schema, "reference")).run()
    expected = _ids(dsn, schema, "reference")
    assert len(expected) == ref.rows_written and ref.batches >= 9
    units = ref.batches  # one unit per batch; set-up transactions (DDL, ledger) also pass the commit points
    arrivals = {"after-write": units, "pg-before-commit": units, "pg-after-commit": units}
    rng = random.Random(5)
    names = sorted(arrivals)
    points = [(p, rng.randint(1, arrivals[p])) for p in names]
    points += [(p, rng.randint(1, arrivals[p])) for p in rng.choices(names, k=n - len(points))]
    for i, (point, nth) in enumerate(points):
        table = f"k{i}"
        job = _job(tmp_path, src, dsn, schema, table)
        assert _run_killed(job, point, nth) == -signal.SIGKILL, f"{point}:{nth} was not reached"
        report = load_job(job).run(resume=True)
        assert report.succeeded
        assert report.rows_read + report.rows_resumed == 3 * ROWS_PER_FILE
        got = _ids(dsn, schema, table)
        assert len(got) == len(set(got)), f"duplicate keys after {point}:{nth}"
        assert got == expected, f"rows differ after {point}:{nth}"


def test_kill_postgres_load_at_random_instants_then_resume_loads_every_row_once(tmp_path, pg_dsn, pg_schema):
    _kill_and_resume(tmp_path, pg_dsn, pg_schema, DEFAULT_KILLS)


@pytest.mark.slow
def test_kill_postgres_load_at_50_instants_then_resume_loads_every_row_once(tmp_path, pg_dsn, pg_schema):
    _kill_and_resume(tmp_path, pg_dsn, pg_schema, FULL_KILLS)
