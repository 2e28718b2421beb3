"""kill -9 of a CSV → DuckDB table load at chosen instants, then resume: every row once, the same rejects."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import duckdb
import polars as pl
import pytest

import colbatch as cb
from colbatch.config import load_job
from colbatch.duck import quote_literal
from tests.conftest import no_temp_files
from tests.faults.test_kill_resume import (
    BATCH, PART_ROWS, ROWS_PER_FILE, _inputs, _job, _ledger, _rejects_path, _run_killed, _steps, max_unit_records,
    same_rejects,
)

DEFAULT_KILLS = 10
FULL_KILLS = 50
TABLE = 'events "loaded"'


def _db_job(root: Path, src: Path, db: Path) -> Path:
    job = root / f"job-{db.stem}.toml"
    job.write_text(f"""
[source]
path = "{src.as_posix()}/*.csv"
schema = {{ id = "int64", amount = "float64", type = "str" }}
{_steps(True)}
[sink]
path = "{db.as_posix()}"
table = '{TABLE}'
part_rows = {PART_ROWS}
[rejects]
path = "{_rejects_path(db).as_posix()}"
[run]
batch_size = {BATCH}
max_error_rate = 0.5
progress = false
""")
    return job


def _tables(db: Path) -> dict[str, list[str]]:
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.sql("SELECT schema_name, table_name FROM duckdb_tables() ORDER BY ALL").fetchall()
    out: dict[str, list[str]] = {}
    for schema, table in rows:
        out.setdefault(schema, []).append(table)
    return out


def _check_table(db: Path, reference: Path) -> None:
    con = duckdb.connect()
    con.execute(f"ATTACH {quote_literal(str(db))} AS got (READ_ONLY)")
    con.execute(f"ATTACH {quote_literal(str(reference))} AS ref (READ_ONLY)")
    t = '"events ""loaded"""'
    for x, y in (("got", "ref"), ("ref", "got")):
        sql = f"SELECT count(*) FROM (SELECT * FROM {x}.{t} EXCEPT ALL SELECT * FROM {y}.{t})"
        extra = con.execute(sql).fetchall()[0][0]
        assert extra == 0, f"{extra} rows of {x} missing from {y}"
    n, keys = con.execute(f"SELECT count(*), count(DISTINCT id) FROM got.{t}").fetchall()[0]
    assert n == keys > 0, f"{n - keys} duplicate keys"
    # nothing staged is left, and the ledger keeps only the finished job (no units)
    assert con.execute("SELECT count(*) FROM got.colbatch.units").fetchall()[0][0] == 0
    assert con.execute("SELECT bool_and(finished) FROM got.colbatch.jobs").fetchall()[0][0]
    con.close()
    assert _tables(db) == {"colbatch": ["jobs", "units"], "main": [TABLE]}


def _kill_and_resume(tmp_path: Path, n: int) -> None:
    src = _inputs(tmp_path, bad=True)
    reference = tmp_path / "reference.duckdb"
    ref = load_job(_db_job(tmp_path, src, reference)).run()
    assert ref.succeeded and ref.batches >= 9 and {"cast", "validate"} <= set(ref.rejects_by_stage)
    # the same source, steps, batch size and part_rows cut the same units into a Parquet directory
    parts = tmp_path / "parts"
    load_job(_job(tmp_path, src, parts, bad=True)).run()
    ledger_units = _ledger(parts)["units"]
    units, most = len(ledger_units), max_unit_records(ledger_units)
    assert units >= 6
    # arrivals in an uninterrupted run; the last commit of each point is the final swap into the table
    arrivals = {"after-write": ref.batches, "duckdb-before-commit": units + 1, "duckdb-after-commit": units + 1}
    rng = random.Random(11)
    names = sorted(arrivals)
    points = [(p, rng.randint(1, arrivals[p])) for p in names]
    points += [(p, arrivals[p]) for p in names if p != "after-write"]  # the final swap, both sides of its commit
    points += [(p, rng.randint(1, arrivals[p])) for p in rng.choices(names, k=n - len(points))]
    for i, (point, nth) in enumerate(points):
        db = tmp_path / f"k{i}.duckdb"
        job = _db_job(tmp_path, src, db)
        assert _run_killed(job, point, nth) == -signal.SIGKILL, f"{point}:{nth} was not reached"
        report = load_job(job).run(resume=True)
        assert report.succeeded, report.error
        if point == "duckdb-after-commit" and nth == units + 1:
            assert report.skipped  # the kill came after the job was committed: running it again is a no-op
        else:
            assert report.rows_read + report.rows_resumed == 3 * ROWS_PER_FILE
        assert 0 <= report.rows_redone <= most, f"{point}:{nth} redid {report.rows_redone} records"
        if point == "duckdb-after-commit" or nth == units + 1:
            assert report.rows_redone == 0, f"{point}:{nth} redid {report.rows_redone} records"
        else:
            assert report.rows_redone > 0, f"{point}:{nth}: the unit in flight was not measured"
        _check_table(db, reference)
        same_rejects(_rejects_path(db), _rejects_path(reference))
    assert no_temp_files(tmp_path) == []


def test_kill_duckdb_load_at_random_instants_then_resume_loads_every_row_once(tmp_path):
    _kill_and_resume(tmp_path, DEFAULT_KILLS)


@pytest.mark.slow
def test_kill_duckdb_load_at_50_instants_then_resume_loads_every_row_once(tmp_path):
    _kill_and_resume(tmp_path, FULL_KILLS)


def _pipeline(src: Path, db: Path, *, cap: int = 170):
    return (cb.scan_csv(f"{src}/*.csv", schema={"id": "int64", "amount": "float64", "type": "str"})
            .validate(f"amount < {cap}", name="cap")
            .sink_duckdb(db, "t", part_rows=PART_ROWS)
            .with_options(batch_size=BATCH, progress=False, max_error_rate=0.5))


def test_duckdb_second_run_on_a_locked_table_fails_at_once_naming_it(tmp_path):
    src, db = _inputs(tmp_path), tmp_path / "out.duckdb"
    from colbatch.ledger import OutputLock, digest

    holder = OutputLock(str(tmp_path / f".out.duckdb.{digest('t')}.colbatch-lock"), output="x")
    holder.acquire()  # another job holds the table
    try:
        with pytest.raises(cb.CheckpointError, match="locked by another running job") as err:
            _pipeline(src, db).run()
        assert str(db) in str(err.value)
    finally:
        holder.release()
    assert _pipeline(src, db).run().succeeded


def test_duckdb_finished_job_run_again_is_a_noop_unless_overwrite(tmp_path):
    src, db = _inputs(tmp_path), tmp_path / "out.duckdb"
    first = _pipeline(src, db).run()
    assert first.rows_written > 0 and not first.skipped
    again = _pipeline(src, db).run()
    assert again.skipped and again.rows_read == 0 and again.rows_written == 0
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM t").fetchall()[0][0] == first.rows_written  # appended once, not twice
    forced = _pipeline(src, db).run(overwrite=True)
    assert not forced.skipped and forced.rows_written == first.rows_written
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM t").fetchall()[0][0] == 2 * first.rows_written  # append mode, forced


def test_duckdb_resume_refuses_a_changed_job_and_says_what_changed(tmp_path):
    src, db = _inputs(tmp_path), tmp_path / "out.duckdb"
    calls = {"n": 0}

    def fail_late(s: pl.Series) -> pl.Series:
        calls["n"] += 1
        if calls["n"] > 8:
            raise RuntimeError("late failure")
        return s

    with pytest.raises(RuntimeError, match="late failure"):
        _pipeline(src, db).with_columns(pl.col("id").map_batches(fail_late, return_dtype=pl.Int64)).run()
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM colbatch.units").fetchall()[0][0] >= 2  # committed units are staged
        # the target table does not exist yet: a failed run leaves it as it was
        assert con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 't'").fetchall()[0][0] == 0
    flaky = pl.col("id").map_batches(fail_late, return_dtype=pl.Int64)
    with pytest.raises(cb.CheckpointError, match="job changed.*`steps`"):
        _pipeline(src, db, cap=100).with_columns(flaky).run(resume=True)
    calls["n"] = -1000
    resumed = _pipeline(src, db).with_columns(flaky).run(resume=True)
    assert resumed.rows_resumed > 0 and resumed.rows_read + resumed.rows_resumed == 3 * ROWS_PER_FILE
    reference = _pipeline(src, tmp_path / "ref.duckdb").run()
    with duckdb.connect(str(db), read_only=True) as con:
        got = con.execute("SELECT count(*), count(DISTINCT id) FROM t").fetchall()[0]
    assert got == (reference.rows_written, reference.rows_written)
