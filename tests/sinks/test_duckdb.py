"""DuckDB table sink: modes, hostile identifiers, the table changed once per run, crash safety, job files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest

import colbatch as cb
from colbatch.config import build_job
from colbatch.duck import quote_ident
from tests.conftest import assert_accounting, make_frame

HOSTILE_TABLES = ['a"b', "drop table x; --", "Ünïcode täble", "select", " spaced ", "x'y"]
REPO = Path(__file__).resolve().parents[2]


def _table(db: Path, table: str) -> pl.DataFrame:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.sql(f"SELECT * FROM {quote_ident(table)}").pl()


@pytest.mark.parametrize("table", HOSTILE_TABLES)
def test_duckdb_sink_hostile_table_names_round_trip(tmp_path, table):
    db = tmp_path / "out.duckdb"
    df = make_frame(50)
    report = cb.from_arrow(df).sink_duckdb(db, table).run(progress=False)
    assert_accounting(report)
    assert _table(db, table).sort("id").equals(df)
    with duckdb.connect(str(db), read_only=True) as con:
        tables = con.sql("SELECT table_schema, table_name FROM information_schema.tables ORDER BY ALL").fetchall()
    # the user's schema holds only the table; the ledger (and nothing staged after success) is in `colbatch`
    assert [t for s, t in tables if s == "main"] == [table]
    assert sorted(t for s, t in tables if s == "colbatch") == ["jobs", "units"]


def test_duckdb_sink_hostile_column_names_round_trip(tmp_path):
    db = tmp_path / "out.duckdb"
    df = pl.DataFrame({'we"ird': [1, 2], "semi; colon": ["a", "b"], "it's": [0.5, 1.5]})
    cb.from_arrow(df).sink_duckdb(db, "t").run(progress=False)
    assert _table(db, "t").equals(df)


def test_duckdb_sink_append_adds_rows_and_matches_columns_by_name(tmp_path):
    db = tmp_path / "out.duckdb"
    df = make_frame(20)
    cb.from_arrow(df).sink_duckdb(db, "t").run(progress=False)
    cb.from_arrow(df.select("type", "id", "amount")).sink_duckdb(db, "t", mode="append").run(progress=False)
    got = _table(db, "t")
    assert got.columns == ["id", "amount", "type"]
    assert got.height == 40
    assert got.sort("id").equals(pl.concat([df, df]).sort("id"))


def test_duckdb_sink_replace_swaps_contents(tmp_path):
    db = tmp_path / "out.duckdb"
    cb.from_arrow(make_frame(30)).sink_duckdb(db, "t").run(progress=False)
    cb.from_arrow(make_frame(5)).sink_duckdb(db, "t", mode="replace").run(progress=False)
    assert _table(db, "t").height == 5


def test_duckdb_sink_create_refuses_existing_table(tmp_path):
    db = tmp_path / "out.duckdb"
    cb.from_arrow(make_frame(3)).sink_duckdb(db, "t", mode="create").run(progress=False)
    with pytest.raises(cb.ConfigError, match="already exists"):
        cb.from_arrow(make_frame(3)).sink_duckdb(db, "t", mode="create").run(progress=False)
    assert _table(db, "t").height == 3


def test_duckdb_sink_bad_mode_is_config_error(tmp_path):
    with pytest.raises(cb.ConfigError, match="mode"):
        cb.from_arrow(make_frame(3)).sink_duckdb(tmp_path / "x.duckdb", "t", mode="upsert")  # type: ignore[arg-type]


def test_duckdb_sink_failed_append_keeps_previous_rows(tmp_path):
    db = tmp_path / "out.duckdb"
    cb.from_arrow(make_frame(10)).sink_duckdb(db, "t").run(progress=False)
    df = make_frame(1000)

    def boom(s: pl.Series) -> pl.Series:
        if s.len() and s.max() > 700:
            raise RuntimeError("boom")
        return s

    pipeline = cb.from_batches(lambda: (df.slice(s, 100) for s in range(0, 1000, 100))).with_columns(
        pl.col("id").map_batches(boom, return_dtype=pl.Int64))
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.sink_duckdb(db, "t").run(progress=False, batch_size=100)
    assert _table(db, "t").height == 10


_KILLED_JOB = """
import sys, time
from pathlib import Path
import polars as pl
import colbatch as cb

db, marker = sys.argv[1], Path(sys.argv[2])

def batches():
    for i in range(1000):
        if i == 5:
            time.sleep(1.0)  # let the first batches reach the sink
            marker.write_text("inserting")
            time.sleep(600)
        yield pl.DataFrame({"id": list(range(i * 100, i * 100 + 100))})

cb.from_batches(batches).sink_duckdb(db, "t").run(progress=False)
"""


def test_duckdb_sink_killed_mid_run_leaves_no_partial_commit(tmp_path):
    db = tmp_path / "out.duckdb"
    cb.from_arrow(pl.DataFrame({"id": [-1, -2]})).sink_duckdb(db, "t").run(progress=False)
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(_KILLED_JOB))
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "stderr.txt"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, str(script), str(db), str(marker)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the job never reached the sink"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert sorted(_table(db, "t")["id"].to_list()) == [-2, -1]


def test_duckdb_sink_from_job_file(tmp_path):
    (tmp_path / "in.csv").write_text("id,amount\n1,2.5\n2,-1\n3,4.0\n")
    job = {
        "source": {"path": str(tmp_path / "in.csv")},
        "steps": [{"filter": "amount > 0"}],
        "sink": {"path": str(tmp_path / "out.duckdb"), "table": "my table", "mode": "replace"},
    }
    report = build_job(job).run(progress=False)
    assert_accounting(report)
    assert _table(tmp_path / "out.duckdb", "my table")["id"].to_list() == [1, 3]


def test_duckdb_sink_job_file_without_table_is_config_error(tmp_path):
    (tmp_path / "in.csv").write_text("id\n1\n")
    with pytest.raises(cb.ConfigError, match="table"):
        build_job({"source": {"path": "in.csv"}, "sink": {"path": "out.duckdb"}})


def test_duckdb_sink_part_rows_from_job_file_sets_the_commit_unit(tmp_path):
    (tmp_path / "in.csv").write_text("id\n" + "".join(f"{i}\n" for i in range(50)))
    job = {"source": {"path": str(tmp_path / "in.csv")}, "run": {"batch_size": 10},
           "sink": {"path": str(tmp_path / "out.duckdb"), "table": "t", "part_rows": 20}}
    assert build_job(job).sink.part_rows == 20
    assert build_job(job).run(progress=False).rows_written == 50
    with pytest.raises(cb.ConfigError, match="part_rows"):
        build_job({**job, "sink": {**job["sink"], "part_rows": 0}})
