"""Ledger behaviour: lock, refusal on a changed job, no-op on a finished job, disk full, polling readers."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

import colbatch as cb
from colbatch.ledger import FileLedger
from tests.conftest import data_files, no_temp_files
from tests.faults.test_kill_resume import _inputs, _ledger, _same_rows

JOB_ROWS = 27_000


def _pipeline(src: Path, out: Path, **sink):
    return (cb.scan_csv(f"{src}/*.csv", schema={"id": "int64", "amount": "float64", "type": "str"})
            .filter("amount > 0")
            .with_columns("amount * 1.1 AS value")
            .sink_parquet(out, part_rows=2_000, **sink)
            .with_options(batch_size=1_000, progress=False))


def test_second_run_on_a_locked_output_fails_at_once_naming_it(tmp_path):
    src, out = _inputs(tmp_path), tmp_path / "out"
    holder = FileLedger(str(tmp_path / "x.json"), str(tmp_path / ".out.colbatch-lock"), output=str(out))
    holder.acquire()  # another job holds the output
    try:
        with pytest.raises(cb.CheckpointError, match="locked by another running job") as err:
            _pipeline(src, out).run()
        assert str(out) in str(err.value)
    finally:
        holder.release()
    assert _pipeline(src, out).run().succeeded  # the lock is gone with its holder


def test_finished_job_run_again_is_a_noop_unless_overwrite(tmp_path):
    src, out = _inputs(tmp_path), tmp_path / "out"
    first = _pipeline(src, out).run()
    assert first.rows_written > 0 and not first.skipped
    mtimes = {p: p.stat().st_mtime_ns for p in data_files(out)}
    again = _pipeline(src, out).run()
    assert again.skipped and again.rows_read == 0 and again.rows_written == 0
    assert {p: p.stat().st_mtime_ns for p in data_files(out)} == mtimes
    forced = _pipeline(src, out).run(overwrite=True)
    assert not forced.skipped and forced.rows_written == first.rows_written


def test_resume_refuses_a_changed_job_and_says_what_changed(tmp_path):
    src, out = _inputs(tmp_path), tmp_path / "out"
    with pytest.raises(RuntimeError):
        _pipeline(src, out).with_columns(pl.col("id").map_batches(_fail_late, return_dtype=pl.Int64)).run()
    changed = _pipeline(src, out).filter("amount > 5")
    with pytest.raises(cb.CheckpointError, match="job changed.*`steps`"):
        changed.run(resume=True)
    assert changed.run().succeeded  # without resume it starts over


_calls = {"n": 0}


def _fail_late(s: pl.Series) -> pl.Series:
    _calls["n"] += 1
    if _calls["n"] > 5:
        raise RuntimeError("late failure")
    return s


def test_resume_after_an_exception_keeps_committed_parts_and_completes(tmp_path):
    src = _inputs(tmp_path)
    reference, out = tmp_path / "ref", tmp_path / "out"
    _pipeline(src, reference).run()
    state = {"n": 0}

    def flaky(s: pl.Series) -> pl.Series:
        state["n"] += 1
        if state["n"] == 7:
            raise RuntimeError("transient failure")
        return s

    # the same step (by name) both times, so the job definition is unchanged
    job = _pipeline(src, out).with_columns(pl.col("id").map_batches(flaky, return_dtype=pl.Int64))
    with pytest.raises(RuntimeError, match="transient"):
        job.run()
    committed = len(_ledger(out)["units"])
    assert committed >= 1 and not _ledger(out)["finished"]
    report = job.run(resume=True)
    assert report.rows_resumed > 0 and report.rows_read + report.rows_resumed == JOB_ROWS
    assert _ledger(out)["finished"]
    _same_rows(f"read_parquet('{out}/*.parquet')", f"read_parquet('{reference}/*.parquet')")


def test_reader_polling_the_output_directory_never_sees_a_partial_file(tmp_path):
    src, out = _inputs(tmp_path), tmp_path / "out"
    out.mkdir()
    seen: set[str] = set()
    problems: list[str] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for name in os.listdir(out):
                if name.startswith("."):
                    continue  # hidden temp files are not for readers
                try:
                    pq.read_table(out / name)
                    seen.add(name)
                except FileNotFoundError:
                    continue  # a stale part removed between listdir and open
                except Exception as exc:  # noqa: BLE001 - any unreadable visible file is the failure
                    problems.append(f"{name}: {exc}")

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        report = _pipeline(src, out).run(overwrite=True)
    finally:
        done.set()
        reader.join()
    assert report.succeeded and problems == []
    assert seen <= {p.name for p in data_files(out)}


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up ({proc.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_fails_clearly_publishes_nothing_partial_and_resume_completes(tmp_path, small_fs):
    src = _inputs(tmp_path)
    reference, out = tmp_path / "ref", small_fs / "out"
    _pipeline(src, reference, compression="uncompressed").run()
    with pytest.raises(cb.SinkError, match="No space left|cannot write") as err:
        _pipeline(src, out, compression="uncompressed").run()
    assert "out" in str(err.value)
    ledger = _ledger(out)
    for f in data_files(out):
        pq.ParquetFile(f).metadata  # whatever is visible is whole
    assert sorted(p.name for p in data_files(out)) == sorted(ledger["files"])
    assert not ledger["finished"]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    report = _pipeline(src, out, compression="uncompressed").run(resume=True)
    assert report.succeeded and no_temp_files(small_fs) == []
    _same_rows(f"read_parquet('{out}/*.parquet')", f"read_parquet('{reference}/*.parquet')")


@pytest.mark.parametrize("kind", ["partitioned", "foreach_batch"])
def test_resume_is_refused_for_outputs_without_a_ledger(tmp_path, kind):
    src, out = _inputs(tmp_path), tmp_path / "out"
    scan = cb.scan_csv(f"{src}/*.csv", schema={"id": "int64", "amount": "float64", "type": "str"})
    job = scan.sink_parquet(out, partition_by="type") if kind == "partitioned" else scan.foreach_batch(len)
    with pytest.raises(cb.ConfigError, match="`resume` needs an output with a ledger"):
        job.run(resume=True, progress=False)
    assert not out.exists()
    assert job.run(progress=False).rows_written == JOB_ROWS
