"""colbatch's process pool: a busy worker holds its next task; losing the worker loses only the current one."""

from __future__ import annotations

import os
import signal
import time

import polars as pl
import pytest

from colbatch.lazy import cloudpickle
from colbatch.udf.procpool import ProcessPool, TaskTimeout, WorkerLost


def tag_or_die(df: pl.DataFrame) -> pl.DataFrame:
    """Dies on a batch whose first id is negative, hangs on -2, widens on 7, else tags its rows with the pid."""
    first = df["id"][0]
    if first == -1:
        os.kill(os.getpid(), signal.SIGKILL)
    if first == -2:
        time.sleep(600)
    if first == 7:  # an answer far larger than its batch: the worker asks for a larger segment
        return df.with_columns(pl.lit("x" * 4_000_000).alias("big"), pl.lit(os.getpid()).alias("pid"))
    return df.with_columns(pl.lit(None, dtype=pl.String).alias("big"), pl.lit(os.getpid()).alias("pid"))


def batch(first: int, rows: int = 100) -> pl.DataFrame:
    return pl.DataFrame({"id": [first, *range(first + 1, first + rows)]})


@pytest.fixture
def pool():
    pools: list[ProcessPool] = []

    def make(workers: int = 1, **kw) -> ProcessPool:
        pools.append(ProcessPool(cloudpickle.dumps(tag_or_die), workers, **kw))
        return pools[-1]

    yield make
    for p in pools:
        p.shutdown()


def test_one_worker_runs_many_tasks_in_order_through_alternating_and_growing_segments(pool):
    p = pool(1)
    firsts = [1, 100, 7, 200, 7, 300, 400]
    futures = [p.submit(batch(f, rows)) for f, rows in zip(firsts, [100, 5000, 10, 100, 50_000, 10, 100])]
    outs = [f.result(timeout=60) for f in futures]
    assert [o["id"][0] for o in outs] == firsts
    assert [o["big"][0] is not None for o in outs] == [f == 7 for f in firsts]
    assert len({o["pid"][0] for o in outs}) == 1 and p.stats.workers_started == 1
    # Seven tasks queued at once for one worker: some were sent ahead, into the second segment pair.
    assert all(seg is not None for seg in (*p._slots[0].inp, *p._slots[0].out))


def test_a_worker_killed_with_a_task_held_ahead_loses_only_the_task_it_ran(pool):
    p = pool(1)
    doomed, held = p.submit(batch(-1)), p.submit(batch(10))  # the second is sent ahead to the same worker
    with pytest.raises(WorkerLost):
        doomed.result(timeout=60)
    out = held.result(timeout=60)
    assert out["id"].to_list() == list(range(10, 110))
    assert p.stats.workers_lost == 1 and p.stats.workers_started == 2


def test_a_timed_out_task_loses_its_worker_and_the_task_held_ahead_runs_on_the_next(pool):
    p = pool(1, timeout=1.0)
    warm = p.submit(batch(1))
    warm.result(timeout=60)  # the worker is up: the timeout, not start-up, ends the next task
    hung, held = p.submit(batch(-2)), p.submit(batch(20))
    with pytest.raises(TaskTimeout):
        hung.result(timeout=60)
    assert held.result(timeout=60)["id"][0] == 20
    assert p.stats.workers_lost == 1


def test_tasks_spread_over_idle_workers_before_any_is_held_ahead(pool):
    p = pool(2)
    outs = [f.result(timeout=60) for f in [p.submit(batch(i * 100)) for i in range(2)]]
    assert len({o["pid"][0] for o in outs}) == 2
