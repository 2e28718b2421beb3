"""Worker processes forked from the zygote: fresh per job, with the driver's context as of now, crash-safe."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

import colbatch as cb
from colbatch.runner import check_accounting
from colbatch.udf import zygote
from tests.conftest import make_frame

pytestmark = pytest.mark.skipif(not zygote.enabled(), reason="the worker zygote needs Linux pidfds")

BATCH = 100  # 1,000 rows in 10 batches


def run(p: cb.Pipeline, out: Path, **options) -> tuple[cb.Report, pl.DataFrame]:
    report = p.sink_parquet(out).run(progress=False, batch_size=BATCH, **options)
    check_accounting(report)
    return report, pl.read_parquet(out)


def worker_facts(df: pl.DataFrame) -> pl.DataFrame:
    """Who ran the batch and what it saw; a group-by and sort use Polars' thread pool in the worker."""
    import numpy as np

    big = pl.DataFrame({"k": np.arange(200_000) % 97, "v": np.arange(200_000)})
    top = big.group_by("k").agg(pl.col("v").sum()).sort("v")["v"][-1]
    return df.with_columns(
        pl.lit(os.getpid(), dtype=pl.Int64).alias("pid"),
        pl.lit(os.getppid(), dtype=pl.Int64).alias("ppid"),
        pl.lit(os.environ.get("CB_ZYGOTE_PROBE", ""), dtype=pl.String).alias("probe"),
        pl.lit(os.getcwd(), dtype=pl.String).alias("cwd"),
        pl.lit(float(np.random.random()), dtype=pl.Float64).alias("draw"),
        pl.lit(int(top), dtype=pl.Int64).alias("top"),
    )


FACTS = {"pid": "int64", "ppid": "int64", "probe": "str", "cwd": "str", "draw": "float64", "top": "int64"}


def facts(tmp_path: Path, name: str, **kw) -> pl.DataFrame:
    p = cb.from_arrow(make_frame().to_arrow()).map_batches(worker_facts, workers=kw.pop("workers", 2),
                                                           executor="processes",
                                                           schema={**make_frame().schema, **FACTS})
    _, out = run(p, tmp_path / f"{name}.parquet", **kw)
    return out


def test_workers_are_forked_from_the_zygote_and_run_polars_threads(tmp_path):
    out = facts(tmp_path, "a")
    assert zygote.ZYGOTE.pid is not None
    assert set(out["ppid"].unique()) == {zygote.ZYGOTE.pid}
    assert os.getpid() not in set(out["pid"])
    expected = pl.DataFrame({"k": [i % 97 for i in range(200_000)], "v": range(200_000)})
    assert set(out["top"].unique()) == {expected.group_by("k").agg(pl.col("v").sum())["v"].max()}
    assert out.height == 1000


def test_a_forked_worker_sees_the_drivers_environment_cwd_and_path_of_now(tmp_path, monkeypatch):
    facts(tmp_path, "warm")  # the zygote runs from here on
    started = zygote.ZYGOTE.pid
    module_dir = tmp_path / "late_modules"
    module_dir.mkdir()
    (module_dir / "cb_late_udf.py").write_text(textwrap.dedent("""
        import polars as pl

        def tag(df):
            return df.with_columns(pl.lit("late", dtype=pl.String).alias("tag"))
    """))
    monkeypatch.setenv("CB_ZYGOTE_PROBE", "set-after-the-zygote-started")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(module_dir))
    out = facts(tmp_path, "b")
    assert zygote.ZYGOTE.pid == started  # the same zygote: the context travelled with each fork
    assert set(out["probe"]) == {"set-after-the-zygote-started"}
    assert set(out["cwd"]) == {str(tmp_path)}
    import cb_late_udf

    p = cb.from_arrow(make_frame().to_arrow()).map_batches(cb_late_udf.tag, workers=2,
                                                           schema={**make_frame().schema, "tag": "str"})
    _, tagged = run(p, tmp_path / "c.parquet")
    sys.modules.pop("cb_late_udf")
    assert set(tagged["tag"]) == {"late"}


def test_workers_of_different_jobs_draw_different_random_numbers(tmp_path):
    # Every fork starts from the zygote's state: NumPy's global generator is reseeded in each worker.
    first, second = facts(tmp_path, "one", workers=1), facts(tmp_path, "two", workers=1)
    assert first["pid"][0] != second["pid"][0] and {first["ppid"][0], second["ppid"][0]} == {zygote.ZYGOTE.pid}
    assert first["draw"][0] != second["draw"][0]


def test_an_import_time_setting_changed_in_the_driver_restarts_the_zygote(tmp_path, monkeypatch):
    facts(tmp_path, "warm")
    before = zygote.ZYGOTE.pid
    monkeypatch.setenv("POLARS_MAX_THREADS", "1")
    out = facts(tmp_path, "after")
    assert zygote.ZYGOTE.pid not in (None, before)
    assert set(out["ppid"]) == {zygote.ZYGOTE.pid}


def test_a_killed_zygote_is_replaced_on_the_next_job(tmp_path):
    facts(tmp_path, "warm")
    dead = zygote.ZYGOTE.pid
    os.kill(dead, signal.SIGKILL)
    out = facts(tmp_path, "after")
    assert zygote.ZYGOTE.pid not in (None, dead)
    assert set(out["ppid"]) == {zygote.ZYGOTE.pid} and out.height == 1000


def kill_on_row_500(df: pl.DataFrame) -> pl.DataFrame:
    if (df["id"] == 500).any():
        os.kill(os.getpid(), signal.SIGKILL)
    return df


def test_a_forked_worker_killed_mid_batch_reports_its_signal(tmp_path):
    report, out = run(cb.from_arrow(make_frame().to_arrow()).map_batches(kill_on_row_500, workers=2, retries=1),
                      tmp_path / "o.parquet", max_error_rate=0.5)
    assert report.rows_rejected == 100 and out.height == 900
    assert "exit code -9" in report.rejects["_reason"][0]


def shout(df: pl.DataFrame) -> pl.DataFrame:
    if df.height:  # the schema probe runs on an empty frame in the driver
        # One write per line: two workers' lines must not interleave in the shared stderr.
        print(f"worker-says-{df['id'][0]}\n", end="", file=sys.stderr, flush=True)
    return df


def test_a_forked_workers_output_goes_to_the_drivers_stderr_of_now(tmp_path, capfd):
    facts(tmp_path, "warm")  # the zygote was started before this capture
    capfd.readouterr()
    run(cb.from_arrow(make_frame().to_arrow()).map_batches(shout, workers=2), tmp_path / "o.parquet")
    err = capfd.readouterr().err
    assert {f"worker-says-{i}" for i in range(1, 1001, BATCH)} <= set(err.split())


def test_switched_off_workers_are_fresh_interpreters(tmp_path, monkeypatch):
    monkeypatch.setenv("COLBATCH_UDF_ZYGOTE", "0")
    out = facts(tmp_path, "fresh")
    assert set(out["ppid"]) == {os.getpid()}


def test_a_zygote_that_cannot_start_leaves_workers_as_fresh_interpreters(tmp_path, monkeypatch, caplog):
    from colbatch.udf import procpool

    broken = zygote._Zygote()

    def start_a_zygote_that_dies(self) -> None:
        import socket
        import subprocess

        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        theirs.close()
        self._ctrl, self._env = ours, zygote._import_env()

    monkeypatch.setattr(zygote._Zygote, "_start", start_a_zygote_that_dies)
    monkeypatch.setattr(zygote, "ZYGOTE", broken)
    monkeypatch.setattr(procpool, "_zygote_failed", False)
    out = facts(tmp_path, "fallback")
    assert set(out["ppid"]) == {os.getpid()} and out.height == 1000
    assert procpool._zygote_failed
    assert "fresh interpreters" in caplog.text
    broken.stop()


def test_a_forked_driver_gets_its_own_zygote_and_does_not_keep_the_parents_alive(tmp_path):
    facts(tmp_path, "warm")
    parent_zygote = zygote.ZYGOTE.pid
    ctrl_fd = zygote.ZYGOTE._ctrl.fileno()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports whether it still holds the parent's control socket
        try:
            os.close(read_end)
            try:
                os.fstat(ctrl_fd)
                held = b"held"
            except OSError:
                held = b"closed"
            os.write(write_end, held + (b" none" if zygote.ZYGOTE.pid is None else b" some"))
        finally:
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 64)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert answer == b"closed none"
    assert zygote.ZYGOTE.pid == parent_zygote


def _double(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns((pl.col("id") * 2).alias("id2"))


def test_a_job_with_a_process_udf_starts_the_zygote_before_its_first_batch(tmp_path):
    zygote.ZYGOTE.stop()
    seen: list[int | None] = []

    def pages():
        for i in range(5):
            seen.append(zygote.ZYGOTE.pid)  # input of unknown size: the run started the zygote already
            yield {"id": list(range(i * 100, (i + 1) * 100))}

    p = cb.from_batches(pages, schema={"id": "int64"}).map_batches(
        _double, workers=2, schema={"id": "int64", "id2": "int64"})
    _, out = run(p, tmp_path / "pre.parquet")
    assert seen[0] is not None and set(seen) == {seen[0]}
    assert out["id2"].to_list() == [2 * i for i in range(500)]


@pytest.mark.parametrize("where", ["memory", "file"])
def test_a_small_input_does_not_start_the_zygote_ahead(tmp_path, where):
    # One small batch runs inline: the stage never needs a worker, and the run does not start one.
    zygote.ZYGOTE.stop()
    if where == "file":
        make_frame().write_parquet(tmp_path / "in.parquet")
        p = cb.scan_parquet(tmp_path / "in.parquet")
    else:
        p = cb.from_arrow(make_frame().to_arrow())
    report = (p.map_batches(_double, workers=2, schema={**make_frame().schema, "id2": "int64"})
              .sink_parquet(tmp_path / "small.parquet").run(progress=False))
    check_accounting(report)
    assert report.rows_written == 1000
    assert zygote.ZYGOTE.pid is None


@pytest.mark.parametrize(("step", "run_table", "starts"), [
    ('udf = "my_udfs:clean"\nworkers = 2', "", True),
    ('udf = "my_udfs:clean"\nexecutor = "processes"', "", True),
    ('udf = "my_udfs:clean"\nworkers = 2\nexecutor = "threads"', "", False),
    ('udf = "my_udfs:clean"', "", False),
    ('udf = "my_udfs:clean"\nworkers = 2', '[run]\nexecutor = "tcp://127.0.0.1:1"\n', False),
    ('filter = "x > 0"', "", False),
])
def test_the_cli_starts_the_zygote_before_loading_a_job_that_needs_workers(tmp_path, step, run_table, starts):
    from colbatch.cli import _prestart_workers

    zygote.ZYGOTE.stop()
    job = tmp_path / "job.toml"
    job.write_text(f'[source]\npath = "in.csv"\n\n[[steps]]\n{step}\n\n[sink]\npath = "out.parquet"\n{run_table}')
    _prestart_workers(str(job))
    assert (zygote.ZYGOTE.pid is not None) is starts


def test_the_cli_leaves_an_unreadable_job_file_to_the_loader(tmp_path):
    from colbatch.cli import _prestart_workers

    zygote.ZYGOTE.stop()
    bad = tmp_path / "bad.toml"
    bad.write_text("[[steps]\nudf = ")
    _prestart_workers(str(bad))
    _prestart_workers(str(tmp_path / "missing.toml"))
    assert zygote.ZYGOTE.pid is None


def test_prestart_is_off_with_the_zygote(monkeypatch):
    zygote.ZYGOTE.stop()
    monkeypatch.setenv("COLBATCH_UDF_ZYGOTE", "0")
    zygote.prestart()
    assert zygote.ZYGOTE.pid is None
