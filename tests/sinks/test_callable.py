"""foreach_batch sink: retries with exponential backoff, SinkError when retries run out."""

from __future__ import annotations

from dataclasses import replace

import polars as pl
import pytest

import colbatch as cb
from colbatch.sinks.callable import CallableSink
from tests.conftest import assert_accounting, make_frame


class Flaky:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.delivered: list[pl.DataFrame] = []

    def __call__(self, df: pl.DataFrame) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"transient failure {self.calls}")
        self.delivered.append(df)


def test_retries_then_succeeds():
    fn = Flaky(failures=2)
    report = cb.from_arrow(make_frame(100)).foreach_batch(fn, retries=3, backoff_s=0.0).run(progress=False)
    assert_accounting(report)
    assert fn.calls == 3
    assert pl.concat(fn.delivered).equals(make_frame(100))
    assert report.rows_written == 100


def test_backoff_doubles_between_attempts():
    fn = Flaky(failures=3)
    delays: list[float] = []
    pipeline = cb.from_arrow(make_frame(10))
    pipeline = replace(pipeline, sink=CallableSink(fn, retries=3, backoff_s=1.0, sleep=delays.append))
    report = pipeline.run(progress=False)
    assert report.status == "succeeded"
    assert len(delays) == 3
    # jitter is 0.5x..1.5x of backoff * 2**attempt
    for attempt, d in enumerate(delays):
        assert 0.5 * 2 ** attempt <= d <= 1.5 * 2 ** attempt


def test_retries_exhausted_raise_sink_error():
    fn = Flaky(failures=10)
    with pytest.raises(cb.SinkError, match="failed 3 times") as info:
        cb.from_arrow(make_frame(10)).foreach_batch(fn, retries=2, backoff_s=0.0).run(progress=False)
    assert fn.calls == 3
    assert "transient failure 3" in str(info.value)
    assert info.value.report.status == "failed"
    assert isinstance(info.value.__cause__, ConnectionError)


def test_zero_retries_fails_first_time():
    fn = Flaky(failures=1)
    with pytest.raises(cb.SinkError):
        cb.from_arrow(make_frame(10)).foreach_batch(fn, retries=0).run(progress=False)
    assert fn.calls == 1


def test_each_batch_delivered_once_in_order():
    fn = Flaky(failures=0)
    report = cb.from_arrow(make_frame(1000)).foreach_batch(fn).run(progress=False, batch_size=128)
    assert_accounting(report)
    assert [d.height for d in fn.delivered] == [128] * 7 + [104]
    assert pl.concat(fn.delivered)["id"].to_list() == list(range(1, 1001))
