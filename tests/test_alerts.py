"""Run hooks and alerts: on_progress snapshots; error-rate, memory and throughput-drop warnings, once each."""

from __future__ import annotations

import logging
import random

import polars as pl
import pytest

import colbatch as cb
from colbatch.alerts import DEFAULT_ROLLING_BATCHES, Alerts, Progress, ThroughputDrop
from colbatch.batching import process_rss
from tests.conftest import SCHEMA, assert_accounting, make_frame


def _warnings(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def _frame_with_bad_every(n: int, every: int) -> pl.DataFrame:
    """`make_frame(n)` with every `every`-th amount made non-positive and all others positive."""
    df = make_frame(n)
    return df.with_columns(amount=pl.when(pl.col("id") % every == 0).then(-1.0).otherwise(pl.col("amount").abs() + 1))


# -- on_progress --------------------------------------------------------------------------------


def test_progress_hook_gets_growing_snapshots_and_a_final_done_one(tmp_path):
    path = tmp_path / "in.csv"
    _frame_with_bad_every(6000, 100).write_csv(path)
    seen: list[cb.Progress] = []
    report = (cb.scan_csv(path, schema=SCHEMA).validate("amount > 0").sink_parquet(tmp_path / "o.parquet")
              .run(progress=False, batch_size=500, on_progress=seen.append))
    assert_accounting(report)
    assert len(seen) >= 2
    assert seen[0].batches == 1 and not seen[0].done
    assert [p.done for p in seen].count(True) == 1 and seen[-1].done
    last = seen[-1]
    assert (last.rows_read, last.rows_written, last.rows_rejected) == (6000, 5940, 60)
    assert last.fraction == pytest.approx(1.0)
    assert last.total_bytes == path.stat().st_size
    assert last.rss_bytes > 0 and last.rows_per_s > 0 and last.batch_rows == 500
    for a, b in zip(seen, seen[1:]):
        assert b.rows_read >= a.rows_read and b.elapsed_s >= a.elapsed_s


def test_no_final_progress_call_when_the_run_fails(tmp_path):
    seen: list[cb.Progress] = []
    df = _frame_with_bad_every(2000, 2)
    with pytest.raises(cb.ErrorThresholdExceeded):
        cb.from_arrow(df).validate("amount > 0").sink_parquet(tmp_path / "o.parquet").run(
            progress=False, batch_size=200, max_error_rate=0.1, on_progress=seen.append)
    assert not any(p.done for p in seen)


# -- error rate -----------------------------------------------------------------------------------


def test_error_rate_past_half_its_threshold_warns_once(tmp_path, caplog):
    got: list[cb.RunWarning] = []
    df = _frame_with_bad_every(8000, 16)  # 6.25% rejected: past half of 10%, under 10%
    with caplog.at_level(logging.WARNING, logger="colbatch"):
        report = (cb.from_arrow(df).validate("amount > 0", name="positive").sink_parquet(tmp_path / "o.parquet")
                  .run(progress=False, batch_size=500, max_error_rate=0.1, on_warning=got.append))
    assert report.succeeded and report.rows_rejected == 500
    assert [w.kind for w in got] == ["error_rate"]
    assert got[0].threshold == pytest.approx(0.05)
    assert 0.05 < got[0].value <= 0.1
    assert "max_error_rate=0.1" in got[0].message
    assert len(_warnings(caplog, "more than half of max_error_rate")) == 1
    assert any("more than half of max_error_rate" in w for w in report.warnings)


def test_error_rate_under_half_its_threshold_does_not_warn(tmp_path):
    got: list[cb.RunWarning] = []
    df = _frame_with_bad_every(8000, 50)  # 2% rejected, under half of 10%
    report = cb.from_arrow(df).validate("amount > 0").sink_parquet(tmp_path / "o.parquet").run(
        progress=False, batch_size=500, max_error_rate=0.1, on_warning=got.append)
    assert report.rows_rejected == 160
    assert [w for w in got if w.kind == "error_rate"] == []


def test_errors_past_half_of_max_errors_warn(tmp_path):
    got: list[cb.RunWarning] = []
    df = _frame_with_bad_every(6000, 100)  # 60 rejected; max_errors=100 warns past 50
    report = cb.from_arrow(df).validate("amount > 0").sink_parquet(tmp_path / "o.parquet").run(
        progress=False, batch_size=500, max_error_rate=None, max_errors=100, on_warning=got.append)
    assert report.rows_rejected == 60
    assert [w.kind for w in got] == ["error_rate"]
    assert got[0].value > 50 and got[0].threshold == 50
    assert "max_errors=100" in got[0].message


def test_a_warning_hook_that_raises_stops_the_run_uncommitted(tmp_path):
    def stop(warning: cb.RunWarning) -> None:
        raise RuntimeError(f"stopped on {warning.kind}")

    out = tmp_path / "o.parquet"
    df = _frame_with_bad_every(8000, 16)
    with pytest.raises(RuntimeError, match="stopped on error_rate"):
        cb.from_arrow(df).validate("amount > 0").sink_parquet(out).run(
            progress=False, batch_size=500, max_error_rate=0.1, on_warning=stop)
    assert not out.exists()


# -- memory -------------------------------------------------------------------------------------------


def test_rss_near_the_memory_limit_warns_once(tmp_path, caplog):
    got: list[cb.RunWarning] = []
    path = tmp_path / "in.csv"
    make_frame(20_000).write_csv(path)
    limit = int(process_rss() * 1.05)  # the process alone is already past 90% of it
    with caplog.at_level(logging.WARNING, logger="colbatch"):
        report = cb.scan_csv(path, schema=SCHEMA).sink_parquet(tmp_path / "o.parquet").run(
            progress=False, batch_size=2_000, memory_limit=limit, on_warning=got.append)
    assert report.succeeded and report.rows_written == 20_000
    memory = [w for w in got if w.kind == "memory"]
    assert len(memory) == 1
    assert memory[0].value > memory[0].threshold == pytest.approx(0.9 * limit)
    assert "memory_limit" in memory[0].message
    assert len(_warnings(caplog, "of memory_limit")) == 1


def test_rss_far_below_the_memory_limit_does_not_warn(tmp_path):
    got: list[cb.RunWarning] = []
    report = cb.from_arrow(make_frame(20_000)).foreach_batch(lambda d: None).run(
        progress=False, batch_size=2_000, memory_limit=process_rss() * 4, on_warning=got.append)
    assert report.succeeded
    assert [w for w in got if w.kind == "memory"] == []


# -- throughput ------------------------------------------------------------------------------------


def _feed(detector: ThroughputDrop, seconds: list[float], rows: int = 1000) -> list[int]:
    """Batch indexes at which the detector reports a drop."""
    return [i for i, s in enumerate(seconds) if detector.add(rows, s)]


def test_drop_detector_is_quiet_on_a_steady_noisy_run():
    rnd = random.Random(3)
    # +-50% batch-to-batch jitter, and a few isolated 10x hiccups (GC pauses, flushes).
    seconds = [0.01 * rnd.uniform(0.5, 1.5) for _ in range(500)]
    for i in range(20, 500, 37):
        seconds[i] = 0.1
    seconds[0:3] = [0.5, 0.5, 0.5]  # warm-up: queue filling, workers starting
    assert _feed(ThroughputDrop(min_window_s=0), seconds) == []


def test_drop_detector_fires_within_a_few_batches_of_a_sharp_drop():
    seconds = [0.01] * 40 + [0.05] * 20  # 5x slower from batch 40 on
    hits = _feed(ThroughputDrop(min_window_s=0), seconds)
    assert hits and 40 <= hits[0] <= 45  # within five batches


def test_drop_detector_ignores_a_mild_slowdown_and_short_runs():
    assert _feed(ThroughputDrop(min_window_s=0), [0.01] * 40 + [0.025] * 40) == []  # 2.5x: not sharp
    assert _feed(ThroughputDrop(min_window_s=0), [0.01] * 5 + [1.0] * 5) == []  # too short to have a pace


def test_drop_detector_is_quiet_on_outputs_arriving_in_waves():
    """32 threads: 32 batches arrive together, then a pause; the pace is steady, and so is the detector."""
    wave = [0.0001] * 31 + [0.01]
    assert _feed(ThroughputDrop(), wave * 60) == []
    assert _feed(ThroughputDrop(), wave * 3) == []  # and a run of a few waves is too short to judge


def test_drop_detector_needs_half_a_second_of_slowdown():
    assert _feed(ThroughputDrop(), [0.01] * 200 + [0.05] * 8) == []  # 0.4 s of slow batches: not yet
    hits = _feed(ThroughputDrop(), [0.01] * 200 + [0.05] * 30)
    assert hits and 205 <= hits[0] <= 215


def test_drop_detector_judges_rates_not_batch_times():
    # The batch size doubles (as the sizer grows it) while the rate stays: no drop.
    seconds = [0.01] * 20 + [0.02] * 20
    rows = [1000] * 20 + [2000] * 20
    detector = ThroughputDrop(min_window_s=0)
    assert [i for i, (r, s) in enumerate(zip(rows, seconds)) if detector.add(r, s)] == []


_SLOW_FROM_BATCH = 25


class GetsSlow:
    """A UDF that turns CPU-heavy after `_SLOW_FROM_BATCH` batches (real work, no sleeping)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        self.calls += 1
        if self.calls > _SLOW_FROM_BATCH:
            # Per-row Python work: ~70-300 ms per batch against about a millisecond before, a contrast
            # far beyond what a busy machine's scheduling hiccups do to the fast batches.
            total = 0
            for v in df["id"].to_list():
                for k in range(2000):
                    total += (v * k) % 7
            return df.with_columns(pl.lit(total).alias("work"))
        return df.with_columns(pl.lit(0).alias("work"))


def test_a_udf_that_becomes_slow_raises_a_throughput_warning_once(caplog):
    got: list[cb.RunWarning] = []
    with caplog.at_level(logging.WARNING, logger="colbatch"):
        report = (cb.from_arrow(make_frame(45 * 1000)).map_batches(GetsSlow(), schema={**SCHEMA, "work": "int64"})
                  .foreach_batch(lambda d: None)
                  .run(progress=False, batch_size=1000, on_warning=got.append))
    assert report.succeeded and report.rows_written == 45_000
    drops = [w for w in got if w.kind == "throughput"]
    assert len(drops) == 1, got
    assert drops[0].value < drops[0].threshold
    assert len(_warnings(caplog, "throughput dropped")) == 1
    assert any("throughput dropped" in w for w in report.warnings)


# -- per-batch cost -----------------------------------------------------------------------------


def _progress(read: int, rejected: int) -> Progress:
    return Progress(elapsed_s=1.0, rows_read=read, rows_written=read - rejected, rows_filtered=0,
                    rows_rejected=rejected, batches=1, batch_rows=100, rows_per_s=0.0, rss_bytes=0, bytes_read=0,
                    total_bytes=None)


def test_checks_after_each_batch_build_a_snapshot_only_when_they_warn():
    """The per-batch checks read cheap counters; a `Progress` is built only for a warning (or a progress call)."""
    state = {"read": 0, "rejected": 0, "snapshots": 0}

    def snapshot(done: bool) -> Progress:
        state["snapshots"] += 1
        return _progress(state["read"], state["rejected"])

    alerts = Alerts(snapshot, counts=lambda: (state["read"], state["rejected"], 0), max_error_rate=0.2,
                    max_errors=None, memory_limit=None)
    for _ in range(50):
        state["read"] += 100
        alerts.after_batch(100, 0.01)
    assert state["snapshots"] == 0 and not alerts.raised
    state["rejected"] = 2_000  # 40% of the 5,000 rows read: past half of max_error_rate
    alerts.after_batch(100, 0.01)
    assert list(alerts.raised) == ["error_rate"] and state["snapshots"] == 1
    assert alerts.raised["error_rate"].elapsed_s == 1.0  # taken from the snapshot


def test_recent_rate_covers_the_last_rolling_batches():
    alerts = Alerts(lambda done: _progress(0, 0), counts=lambda: (0, 0, 0), max_error_rate=None, max_errors=None,
                    memory_limit=None)
    assert alerts.recent_rate == 0.0
    for rows in range(1, 11):  # 1, 2, ... 10 rows, each batch one second
        alerts.after_batch(rows, 1.0)
    last = list(range(11 - DEFAULT_ROLLING_BATCHES, 11))
    assert alerts.recent_rate == pytest.approx(sum(last) / len(last))
