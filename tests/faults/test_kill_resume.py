"""kill -9 at chosen instants of a multi-batch job, then resume: the output equals an uninterrupted run.

The input holds bad rows (unparseable amounts, rejected at read; amounts over a cap, rejected by a
`validate` step), so the rejects after kill + resume must equal those of an uninterrupted run too.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from colbatch.config import load_job
from tests.conftest import data_files, no_temp_files

REPO = Path(__file__).resolve().parents[2]
ROWS_PER_FILE = 9_000
BATCH = 1_000
PART_ROWS = 2_000
DEFAULT_KILLS = 20
FULL_KILLS = 100


# Every BAD_EVERY-th row of the bad input has an amount that does not parse (rejected at read).
BAD_EVERY = 97
# The bad input's `validate` step rejects amounts at or over this cap.
CAP = 170


def _inputs(root: Path, *, bad: bool = False) -> Path:
    src = root / "in"
    src.mkdir()
    for f in range(3):
        start = f * ROWS_PER_FILE
        ids = range(start, start + ROWS_PER_FILE)
        amounts = [f"{((i * 37) % 200) - 20 + 0.25}" for i in ids]
        if bad:
            amounts = ["n/a" if i % BAD_EVERY == 5 else a for i, a in zip(ids, amounts)]
        df = pl.DataFrame({"id": ids, "amount": amounts, "type": [("click", "view", "buy")[i % 3] for i in ids]})
        df.write_csv(src / f"part{f}.csv")
    return src


def _steps(bad: bool) -> str:
    cap = f'[[steps]]\nvalidate = "amount < {CAP}"\nname = "cap"\n' if bad else ""
    return f"""{cap}[[steps]]
filter = "amount > 0"
[[steps]]
with_columns = ["amount * 1.1 AS value", "upper(type) AS category"]
"""


def _rejects_path(out: Path) -> Path:
    return out.parent / f"rejects-{out.name}.parquet"


def _job(root: Path, src: Path, out: Path, fmt: str = "parquet", *, bad: bool = False) -> Path:
    sink = 'format = "csv"\ncompression = "gzip"' if fmt == "csv.gz" else ""
    rejects = f'[rejects]\npath = "{_rejects_path(out).as_posix()}"\n' if bad else ""
    job = root / f"job-{out.name}.toml"
    job.write_text(f"""
[source]
path = "{src.as_posix()}/*.csv"
schema = {{ id = "int64", amount = "float64", type = "str" }}
{_steps(bad)}
[sink]
path = "{out.as_posix()}"
{sink}
part_rows = {PART_ROWS}
{rejects}
[run]
batch_size = {BATCH}
max_error_rate = 0.5
progress = false
""")
    return job


def _run_killed(job: Path, point: str, nth: int) -> int:
    env = {**os.environ, "COLBATCH_FAULT": f"{point}:{nth}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "colbatch", "run", str(job), "--resume", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode


def _same_rows(a: str, b: str) -> None:
    con = duckdb.connect()
    for x, y in ((a, b), (b, a)):
        extra = con.sql(f"SELECT count(*) FROM (SELECT * FROM {x} EXCEPT ALL SELECT * FROM {y})").fetchall()[0][0]
        assert extra == 0, f"{extra} rows of {x} missing from {y}"


def same_rejects(got: Path, expected: Path) -> None:
    """The rejects files hold the same multiset of rows, and no durable reject part is left over."""
    assert got.exists(), f"no rejects file {got}"
    _same_rows(f"read_parquet('{got}')", f"read_parquet('{expected}')")
    assert pq.ParquetFile(got).metadata.num_rows == pq.ParquetFile(expected).metadata.num_rows > 0
    assert [p.name for p in got.parent.iterdir() if p.name.endswith(".colbatch-parts")] == []


def max_unit_records(units: list[dict]) -> int:
    """The most source records one commit unit of a ledger covers: what a resume may redo at most."""
    return max(u["end_row"] - u["first_row"] for u in units)


def _check_output(out: Path, reference: Path, fmt: str) -> None:
    assert no_temp_files(out.parent) == []
    files = data_files(out)
    listed = sorted(out / f for f in _ledger(out)["files"])
    assert files == listed, "orphan or missing part files"
    if fmt == "parquet":
        for f in files:
            pq.ParquetFile(f).metadata  # raises on a torn footer
        _same_rows(f"read_parquet('{out}/*.parquet')", f"read_parquet('{reference}/*.parquet')")
    else:
        for f in files:
            with gzip.open(f, "rb") as fh:
                while fh.read(1 << 20):
                    pass  # raises on a truncated or corrupt member
        _same_rows(f"read_csv('{out}/*.csv.gz')", f"read_csv('{reference}/*.csv.gz')")


def _kill_points(n: int, seed: int, *, batches: int, units: int) -> list[tuple[str, int]]:
    """`n` (point, arrival) pairs; arrivals per point are those of the uninterrupted run."""
    arrivals = {"after-write": batches, "before-publish": units, "before-ledger": units + 1, "after-ledger": units}
    rng = random.Random(seed)
    names = sorted(arrivals)
    chosen = [(name, rng.randint(1, arrivals[name])) for name in names]  # every point at least once
    chosen += [(name, rng.randint(1, arrivals[name])) for name in rng.choices(names, k=n - len(chosen))]
    return chosen


def _ledger(out: Path) -> dict:
    return json.loads(Path(f"{out}.colbatch.json").read_text())


def _kill_and_resume(tmp_path: Path, n: int, *, fmt: str = "parquet", bad: bool = True) -> None:
    src = _inputs(tmp_path, bad=bad)
    reference = tmp_path / "reference"
    ref_job = _job(tmp_path, src, reference, fmt, bad=bad)
    ref = load_job(ref_job).run()
    units = len(_ledger(reference)["units"])
    assert units >= 6 and ref.batches >= 9, "the job must span several parts and batches"
    assert not bad or {"cast", "validate"} <= set(ref.rejects_by_stage), ref.rejects_by_stage
    most = max_unit_records(_ledger(reference)["units"])
    killed = 0
    for i, (point, nth) in enumerate(_kill_points(n, seed=7, batches=ref.batches, units=units)):
        out = tmp_path / f"out{i}"
        job = _job(tmp_path, src, out, fmt, bad=bad)
        code = _run_killed(job, point, nth)
        assert code == -signal.SIGKILL, f"{point}:{nth} was not reached (exit {code})"
        killed += 1
        final = point == "before-ledger" and nth > units
        if point != "after-write" and not final:
            # at most one unit is lost: the one being published when the process died
            assert len(_ledger(out)["units"]) == (nth if point == "after-ledger" else nth - 1)
        report = load_job(job).run(resume=True)
        assert report.succeeded
        assert report.rows_read + report.rows_resumed == 3 * ROWS_PER_FILE
        # resume redoes at most the one unit the killed run was writing, and nothing after a unit committed
        assert 0 <= report.rows_redone <= most, f"{point}:{nth} redid {report.rows_redone} records"
        if point == "after-ledger" or final:
            assert report.rows_redone == 0, f"{point}:{nth} redid {report.rows_redone} records"
        else:
            assert report.rows_redone > 0, f"{point}:{nth}: the unit in flight was not measured"
        _check_output(out, reference, fmt)
        if bad:
            same_rejects(_rejects_path(out), _rejects_path(reference))
    assert killed == n


def test_kill_at_random_instants_then_resume_gives_the_uninterrupted_rows(tmp_path):
    _kill_and_resume(tmp_path, DEFAULT_KILLS)


def test_kill_then_resume_csv_gz_output_passes_gzip_check_and_equals_uninterrupted_run(tmp_path):
    _kill_and_resume(tmp_path, 8, fmt="csv.gz")


@pytest.mark.slow
def test_kill_at_100_instants_then_resume_gives_the_uninterrupted_rows(tmp_path):
    _kill_and_resume(tmp_path, FULL_KILLS)
