"""map_batches: executors agree, failures become rejects, dead and slow workers are survived, state is per worker."""

from __future__ import annotations

import multiprocessing
import os
import signal
import textwrap
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest

import colbatch as cb
from colbatch.config import build_job
from colbatch.runner import check_accounting
from tests.conftest import assert_accounting, make_frame

BATCH = 100  # 1,000 rows in 10 batches


def pipeline(df: pl.DataFrame | None = None) -> cb.Pipeline:
    return cb.from_arrow((make_frame() if df is None else df).to_arrow())


def run(p: cb.Pipeline, out: Path, **options) -> tuple[cb.Report, pl.DataFrame]:
    report = p.sink_parquet(out).run(progress=False, batch_size=BATCH, **options)
    check_accounting(report)
    return report, pl.read_parquet(out)


# -- user functions: module level so that worker processes import them ---------------------------


def add_label(df: pl.DataFrame) -> pl.DataFrame:
    """Per-row Python work: the kind of function that needs map_batches."""
    labels = [f"{t}-{int(a * 100) % 7}" for t, a in zip(df["type"].to_list(), df["amount"].to_list())]
    return df.with_columns(pl.Series("label", labels, dtype=pl.String))


def expected_labels() -> pl.DataFrame:
    return add_label(make_frame())


def fail_on_fourth_batch(df: pl.DataFrame) -> pl.DataFrame:
    if df["id"].is_between(301, 400).any():
        raise ValueError("bad batch")
    return df


def fail_on_multiples_of_97(df: pl.DataFrame) -> pl.DataFrame:
    if (df["id"] % 97 == 0).any():
        raise ValueError("id is a multiple of 97")
    return df


def _attempt(name: str) -> int:
    """Count this call in a file under $CB_TEST_DIR (shared by all worker processes)."""
    path = Path(os.environ["CB_TEST_DIR"]) / name
    with open(path, "a") as fh:
        fh.write("x")
    return path.stat().st_size


def kill_on_row_500(df: pl.DataFrame) -> pl.DataFrame:
    if (df["id"] == 500).any():
        _attempt("kills")
        os.kill(os.getpid(), signal.SIGKILL)
    return df


def exit_once_on_row_500(df: pl.DataFrame) -> pl.DataFrame:
    if (df["id"] == 500).any() and _attempt("exits") == 1:
        os._exit(3)
    return df


def hang_on_row_500(df: pl.DataFrame) -> pl.DataFrame:
    if (df["id"] == 500).any():
        _attempt("hangs")
        time.sleep(600)
    return df


def keep_positive(df: pl.DataFrame) -> pl.DataFrame:
    return df.filter(pl.col("amount") > 0)


def duplicate_rows(df: pl.DataFrame) -> pl.DataFrame:
    return pl.concat([df, df])


class PidTagger:
    """Stateful UDF: records each `__init__` in a file named after its process."""

    def __init__(self) -> None:
        _attempt(f"init-{os.getpid()}")
        self.pid = os.getpid()

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(pl.lit(self.pid, dtype=pl.Int64).alias("pid"))


def _flush_on_close(closing: threading.Event, pid: int) -> None:
    # A non-daemon thread, which the interpreter waits for at exit: it works on after `__del__`.
    closing.wait()
    for _ in range(2_000):
        _attempt(f"flushing-{pid}")
    _attempt(f"flushed-{pid}")


class ClosingTagger(PidTagger):
    """Stateful UDF with cleanup: a finalizer, an atexit handler and a non-daemon thread, each leaving a file."""

    def __init__(self) -> None:
        super().__init__()
        import atexit

        atexit.register(_attempt, f"atexit-{os.getpid()}")
        self._closing = threading.Event()
        threading.Thread(target=_flush_on_close, args=(self._closing, self.pid), daemon=False).start()

    def __del__(self) -> None:
        _attempt(f"del-{self.pid}")
        self._closing.set()


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch) -> Path:
    d = tmp_path / "scratch"
    d.mkdir()
    monkeypatch.setenv("CB_TEST_DIR", str(d))  # workers inherit the environment
    return d


# -- executors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("executor", ["inline", "threads", "processes", "thread_pool", "process_pool"])
def test_every_executor_gives_the_same_output_in_order(executor, tmp_path):
    pools = {"thread_pool": lambda: ThreadPoolExecutor(3),
             "process_pool": lambda: ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))}
    pool = pools[executor]() if executor in pools else None
    try:
        report, out = run(pipeline().map_batches(add_label, workers=2, executor=pool or executor), tmp_path / "o.parquet")
    finally:
        if pool is not None:
            pool.shutdown()
    assert out.equals(expected_labels())
    assert_accounting(report)
    udf = report.stages[1]
    assert udf.name == "udf:add_label" and udf.rows_in == udf.rows_out == 1000


def test_unordered_output_has_every_row(tmp_path):
    _, out = run(pipeline().map_batches(add_label, workers=2, ordered=False), tmp_path / "o.parquet")
    assert out.sort("id").equals(expected_labels())


def test_function_defined_in_main_like_a_notebook_runs_on_processes(tmp_path):
    namespace = {"__name__": "__main__"}
    exec(textwrap.dedent("""
        import polars as pl
        FACTOR = 3
        def triple(df):
            return df.with_columns((pl.col("id") * FACTOR).alias("x"))
    """), namespace)
    fn = namespace["triple"]
    assert fn.__module__ == "__main__"
    _, out = run(pipeline().map_batches(fn, workers=2, executor="processes"), tmp_path / "o.parquet")
    assert out["x"].to_list() == [i * 3 for i in range(1, 1001)]


def test_stateful_udf_initialises_once_per_worker(tmp_path, scratch):
    schema = {"id": "int64", "amount": "float64", "type": "str", "pid": "int64"}
    _, out = run(pipeline().map_batches(PidTagger, workers=2, schema=schema), tmp_path / "o.parquet")
    inits = {int(p.name.split("-")[1]): p.stat().st_size for p in scratch.glob("init-*")}
    assert set(out["pid"].unique()) == set(inits)
    assert all(count == 1 for count in inits.values()), inits
    assert os.getpid() not in inits and 1 <= len(inits) <= 2


def test_a_stateful_udfs_finalizer_threads_and_atexit_handlers_run_when_its_workers_exit(tmp_path, scratch):
    # Workers skip the interpreter's module teardown when they finish, not the user's cleanup.
    schema = {"id": "int64", "amount": "float64", "type": "str", "pid": "int64"}
    report, out = run(pipeline().map_batches(ClosingTagger, workers=2, schema=schema), tmp_path / "o.parquet")
    assert_accounting(report)
    pids = {int(p.name.split("-")[1]) for p in scratch.glob("init-*")}
    assert pids and set(out["pid"].unique()) == pids and os.getpid() not in pids
    assert {int(p.name.split("-")[1]) for p in scratch.glob("del-*")} == pids
    assert {int(p.name.split("-")[1]) for p in scratch.glob("atexit-*")} == pids
    assert {int(p.name.split("-")[1]) for p in scratch.glob("flushed-*")} == pids
    assert all((scratch / f"flushing-{pid}").stat().st_size == 2_000 for pid in pids)


def test_threads_respect_the_concurrency_limit(tmp_path):
    lock, state = threading.Lock(), {"now": 0, "max": 0}

    def slow(df: pl.DataFrame) -> pl.DataFrame:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.02)
        with lock:
            state["now"] -= 1
        return df

    run(pipeline().map_batches(slow, executor="threads", concurrency=3), tmp_path / "o.parquet")
    assert 1 <= state["max"] <= 3


def tag_pid(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.lit(os.getpid(), dtype=pl.Int64).alias("pid"))


@pytest.mark.parametrize(("batch_size", "inline"), [(10_000, True), (BATCH, False)])
def test_small_input_runs_inline_and_larger_input_on_workers(tmp_path, batch_size, inline):
    p = pipeline().map_batches(tag_pid, workers=2).sink_parquet(tmp_path / "o.parquet")
    report = p.run(progress=False, batch_size=batch_size)
    pids = set(pl.read_parquet(tmp_path / "o.parquet")["pid"].unique())
    assert report.rows_written == 1000
    assert (pids == {os.getpid()}) == inline and len(pids) <= 2


# -- failures -----------------------------------------------------------------------------------


def test_exception_rejects_that_batch_and_keeps_the_others(tmp_path):
    report, out = run(pipeline().map_batches(fail_on_fourth_batch, workers=2), tmp_path / "o.parquet",
                      max_error_rate=0.5)
    assert out["id"].to_list() == [i for i in range(1, 1001) if not 301 <= i <= 400]
    assert report.rows_rejected == 100 and report.rejects_by_stage == {"udf": 100}
    rej = report.rejects
    assert rej["_line"].to_list() == list(range(300, 400))  # row index in the source
    reason = rej["_reason"][0]
    assert "fail_on_fourth_batch" in reason and "ValueError" in reason and "bad batch" in reason
    assert_accounting(report)


def test_isolate_rows_rejects_only_the_failing_rows(tmp_path):
    report, out = run(pipeline().filter(pl.col("id") > 10).map_batches(fail_on_multiples_of_97, isolate_rows=True),
                      tmp_path / "o.parquet")
    bad = [i for i in range(11, 1001) if i % 97 == 0]
    assert report.rows_rejected == len(bad)
    assert sorted(report.rejects["id"].cast(pl.Int64).to_list()) == bad
    assert sorted(report.rejects["_line"].to_list()) == [i - 1 for i in bad]
    assert out["id"].to_list() == [i for i in range(11, 1001) if i % 97]
    assert report.rows_filtered == 10


def test_worker_killed_with_sigkill_is_retried_then_rejected(tmp_path, scratch):
    report, out = run(pipeline().map_batches(kill_on_row_500, workers=2, retries=2), tmp_path / "o.parquet",
                      max_error_rate=0.5)
    assert (scratch / "kills").stat().st_size == 3  # first attempt + 2 retries
    assert report.rows_rejected == 100
    assert out["id"].to_list() == [i for i in range(1, 1001) if not 401 <= i <= 500]
    assert "WorkerLost" in report.rejects["_reason"][0] and "died" in report.rejects["_reason"][0]


def test_worker_that_dies_once_is_replaced_and_nothing_is_lost(tmp_path, scratch):
    report, out = run(pipeline().map_batches(exit_once_on_row_500, workers=2, retries=1), tmp_path / "o.parquet")
    assert (scratch / "exits").stat().st_size == 2
    assert report.rows_rejected == 0 and out["id"].to_list() == list(range(1, 1001))


def test_batch_over_timeout_is_killed_retried_and_rejected(tmp_path, scratch):
    report, out = run(pipeline().map_batches(hang_on_row_500, workers=2, timeout=1, retries=1),
                      tmp_path / "o.parquet", max_error_rate=0.5)
    assert (scratch / "hangs").stat().st_size == 2
    assert report.rows_rejected == 100 and out.height == 900
    assert "TaskTimeout" in report.rejects["_reason"][0]


def test_too_many_udf_failures_stop_the_job(tmp_path):
    with pytest.raises(cb.ErrorThresholdExceeded):
        pipeline().map_batches(fail_on_fourth_batch).sink_parquet(tmp_path / "o.parquet").run(
            progress=False, batch_size=BATCH, max_errors=10)
    assert not (tmp_path / "o.parquet").exists()


def test_wrong_return_type_is_the_users_error(tmp_path):
    report = pipeline().map_batches(lambda df: df.to_dict(), schema={"id": "int64"}).sink_parquet(
        tmp_path / "o.parquet").run(progress=False, batch_size=BATCH, max_error_rate=None)
    assert report.rows_rejected == 1000
    assert "must return a polars DataFrame" in report.rejects["_reason"][0]


def test_schema_probe_failure_is_a_udf_error(tmp_path):
    def broken(df):
        raise KeyError("no such column")

    with pytest.raises(cb.UdfError, match="broken"):
        pipeline().map_batches(broken).sink_parquet(tmp_path / "o.parquet").run(progress=False)


def test_untyped_output_column_asks_for_a_schema(tmp_path):
    def untyped(df):
        return df.with_columns(pl.Series("tag", ["x"] * df.height))

    with pytest.raises(cb.UdfError, match="schema="):
        pipeline().map_batches(untyped).sink_parquet(tmp_path / "o.parquet").run(progress=False)
    report, out = run(pipeline().map_batches(untyped, schema={"id": "int64", "amount": "float64", "type": "str",
                                                              "tag": "str"}), tmp_path / "o.parquet")
    assert out["tag"].unique().to_list() == ["x"]


# -- accounting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("executor", ["inline", "threads", "processes"])
def test_rejects_of_a_step_after_the_udf_name_their_source_rows(executor, tmp_path):
    p = (pipeline().filter(pl.col("id") % 2 == 0).map_batches(add_label, executor=executor, workers=2)
         .validate(pl.col("id") % 10 != 0, name="no_tens"))
    report, out = run(p, tmp_path / "o.parquet")
    assert sorted(report.rejects["_line"].to_list()) == [i - 1 for i in range(10, 1001, 10)]  # row index = id - 1
    assert out.columns == [*make_frame().columns, "label"] and out.height == 400


def test_udf_that_drops_rows_counts_them_as_filtered(tmp_path):
    report, out = run(pipeline().map_batches(keep_positive, workers=2), tmp_path / "o.parquet")
    positive = make_frame().filter(pl.col("amount") > 0)
    assert out.equals(positive)
    assert report.rows_filtered == 1000 - positive.height
    assert_accounting(report)


def test_udf_that_adds_rows_reports_them_created(tmp_path):
    report, out = run(pipeline().map_batches(duplicate_rows).validate(pl.col("amount") > -100),
                      tmp_path / "o.parquet")
    assert out.height == 2000 and report.rows_written == 2000
    udf = report.stages[1]
    assert (udf.rows_in, udf.rows_out, udf.rows_created) == (1000, 2000, 1000)
    assert report.accounting_ok()


# -- configuration ------------------------------------------------------------------------------


def test_job_file_udf_step_runs_on_workers(tmp_path):
    df = make_frame()
    df.write_csv(tmp_path / "in.csv")
    job = {
        "source": {"path": str(tmp_path / "in.csv"), "schema": {"id": "int64", "amount": "float64"}},
        "steps": [{"udf": "tests.test_udf:add_label", "workers": 2, "retries": 0, "name": "label"}],
        "sink": {"path": str(tmp_path / "o.parquet")},
        "run": {"batch_size": BATCH},
    }
    report = build_job(job).run(progress=False)
    assert report.stages[1].name == "udf:label"
    assert pl.read_parquet(tmp_path / "o.parquet").equals(expected_labels())


@pytest.mark.parametrize(("step", "needle"), [
    ({"udf": "tests.test_udf"}, "package.module:function"),
    ({"udf": "tests.test_udf:nope"}, "nope"),
    ({"udf": "tests.test_udf:add_label", "workers": 0}, "workers"),
    ({"udf": "tests.test_udf:add_label", "executor": "gpu"}, "gpu"),
    ({"udf": "tests.test_udf:add_label", "bogus": 1}, "bogus"),
])
def test_bad_udf_step_is_a_config_error_naming_it(step, needle, tmp_path):
    make_frame().write_csv(tmp_path / "in.csv")
    job = {"source": {"path": str(tmp_path / "in.csv")}, "steps": [step], "sink": {"path": "o.parquet"}}
    with pytest.raises(cb.ConfigError, match=needle):
        build_job(job)


# -- Dask ---------------------------------------------------------------------------------------


def test_dask_local_cluster_output_is_identical_to_a_local_run(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    _, local = run(pipeline().map_batches(add_label), tmp_path / "local.parquet")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with distributed.Client(cluster) as client:
            report, remote = run(pipeline().map_batches(add_label, executor=client), tmp_path / "dask.parquet")
            workers = client.run(os.getpid)
    assert remote.equals(local)
    assert len(workers) == 2 and os.getpid() not in workers.values()
    assert_accounting(report)



def test_a_failed_pool_dispatcher_fails_its_batches_and_the_job_instead_of_hanging(tmp_path, monkeypatch):
    """A bug in the pool's own thread must surface as an error: a batch retried onto a pool with no
    dispatcher would wait for an answer forever."""
    from colbatch.udf import procpool

    def broken_answer(self, slot, task, msg):
        raise RuntimeError("dispatcher bug")

    monkeypatch.setattr(procpool.ProcessPool, "_answer", broken_answer)
    outcome: dict[str, BaseException] = {}

    def job() -> None:
        try:
            pipeline().map_batches(add_label, workers=2, retries=2).sink_parquet(tmp_path / "o.parquet").run(
                progress=False, batch_size=BATCH)
        except BaseException as exc:  # the assertion below says which
            outcome["error"] = exc

    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    runner.join(timeout=120)  # a guard against the hang this test is about, not a speed check
    assert not runner.is_alive(), "the job hung after the pool's dispatcher failed"
    error = outcome.get("error")
    assert error is not None and "dispatcher failed" in str(error) and "dispatcher bug" in str(error)
    assert not (tmp_path / "o.parquet").exists()


# -- transport ----------------------------------------------------------------------------------


def test_transport_round_trips_strings_and_does_not_ship_a_slices_whole_buffer():
    from colbatch.udf.transport import Segment, ipc_size, read_ipc, to_arrow, write_ipc

    big = pl.DataFrame({"s": [f"a string longer than twelve bytes {i}" for i in range(200_000)],
                        "n": pl.int_range(200_000, eager=True)}).rechunk()
    part = big.slice(100_000, 1_000)
    table = to_arrow(part)
    assert ipc_size(table) < 20 * part.estimated_size()  # not the 200,000-row buffer behind the views
    seg = Segment(ipc_size(table))
    try:
        n = write_ipc(table, seg.shm.buf)
        assert seg.read(n).equals(part)
        whole = to_arrow(big.head(5_000))
        m = write_ipc(whole, seg.shm.buf)
        assert read_ipc(seg.shm.buf, m, copy=True).equals(big.head(5_000))
    finally:
        seg.release()



def spin_then_label(df: pl.DataFrame) -> pl.DataFrame:
    """A UDF that burns a known amount of CPU per batch (about 20 ms) before labelling it."""
    end = time.thread_time() + 0.02
    while time.thread_time() < end:
        pass
    return add_label(df)


def test_a_process_udf_stage_reports_its_workers_cpu_in_the_function_and_in_transport(tmp_path):
    report, _ = run(pipeline().map_batches(spin_then_label, workers=2, executor="processes"), tmp_path / "o.parquet")
    udf = report.stages[1].to_dict()
    assert udf["worker_cpu_s"] >= 0.02 * report.batches  # every batch's spin, counted in the workers
    assert 0 < udf["transport_cpu_s"] < udf["worker_cpu_s"]
    # Stages that are not a process pool carry neither field.
    assert "worker_cpu_s" not in report.stages[0].to_dict() and "transport_cpu_s" not in report.stages[-1].to_dict()
    inline, _ = run(pipeline().map_batches(spin_then_label, executor="inline"), tmp_path / "i.parquet")
    assert "worker_cpu_s" not in inline.stages[1].to_dict()


def test_a_udf_stage_that_fails_to_close_fails_the_run_instead_of_hanging_it(tmp_path, monkeypatch):
    from colbatch.udf.stage import UdfStage

    def broken_close(self):
        raise RuntimeError("closing the UDF stage failed")

    monkeypatch.setattr(UdfStage, "close", broken_close)
    report = (pipeline().map_batches(add_label, executor="inline").sink_parquet(tmp_path / "o.parquet")
              .run(progress=False, batch_size=BATCH, raise_on_error=False))
    assert not report.succeeded and "closing the UDF stage failed" in report.error
    assert not (tmp_path / "o.parquet").exists()
