"""Runner: error thresholds, rejects on failure, report contents."""

from __future__ import annotations

import json
import threading

import polars as pl
import pytest

import colbatch as cb
from colbatch.metrics import ByteQueue
from tests.conftest import assert_accounting, make_frame


def _dirty(n: int = 1000, every: int = 10) -> pl.DataFrame:
    return pl.DataFrame({"id": list(range(n)), "amount": [-1.0 if i % every == 0 else 1.0 for i in range(n)]})


def test_max_errors_aborts_with_counts_threshold_and_rejects_path(tmp_path):
    rej = tmp_path / "rejects.parquet"
    out = tmp_path / "o.parquet"
    with pytest.raises(cb.ErrorThresholdExceeded) as info:
        (cb.from_arrow(_dirty()).validate("amount > 0", name="pos").sink_parquet(out).sink_rejects(rej)
         .run(progress=False, max_errors=5, max_error_rate=None, batch_size=100))
    msg = str(info.value)
    assert "max_errors=5" in msg
    assert "rows rejected" in msg
    assert str(rej) in msg
    assert not out.exists()
    assert rej.exists()  # rejects are published even when the run fails
    written = pl.read_parquet(rej)
    assert written.height >= 6
    assert set(written["_stage"]) == {"validate"}
    report = info.value.report
    assert report.status == "failed"
    assert report.rows_rejected == written.height


def test_max_error_rate_aborts_at_end(tmp_path):
    rej = tmp_path / "rejects.csv"
    with pytest.raises(cb.ErrorThresholdExceeded) as info:
        (cb.from_arrow(_dirty(50, every=2)).validate("amount > 0", name="pos")
         .sink_parquet(tmp_path / "o.parquet").sink_rejects(rej).run(progress=False, max_error_rate=0.1))
    msg = str(info.value)
    assert "25 of 50 rows rejected" in msg
    assert "max_error_rate=0.1" in msg
    assert str(rej) in msg
    assert rej.exists()
    assert not (tmp_path / "o.parquet").exists()


def test_default_error_rate_is_ten_percent(tmp_path):
    ok = cb.from_arrow(_dirty(1000, every=20)).validate("amount > 0").foreach_batch(lambda d: None).run(progress=False)
    assert ok.rows_rejected == 50
    with pytest.raises(cb.ErrorThresholdExceeded, match="report.rejects"):
        cb.from_arrow(_dirty(1000, every=5)).validate("amount > 0").foreach_batch(lambda d: None).run(progress=False)


def test_raise_on_error_false_returns_failed_report(tmp_path):
    report = (cb.from_arrow(_dirty()).validate("amount > 0").foreach_batch(lambda d: None)
              .run(progress=False, max_errors=1, raise_on_error=False))
    assert report.status == "failed"
    assert "max_errors=1" in report.error
    assert report.to_dict()["error_type"] == "ErrorThresholdExceeded"


def test_unknown_run_option_is_config_error():
    with pytest.raises(cb.ConfigError, match="unknown run option"):
        cb.from_arrow(make_frame(3)).foreach_batch(lambda d: None).run(bogus=1)


def test_memory_limit_accepts_a_size_string_as_job_files_do():
    pipeline = cb.from_arrow(make_frame(1000)).foreach_batch(lambda d: None)
    assert pipeline.with_options(memory_limit="512MiB").options.memory_limit == 512 << 20
    assert pipeline.with_options(memory_limit=1 << 30).options.memory_limit == 1 << 30
    report = pipeline.run(progress=False, memory_limit="1GB", batch_size=100)
    assert_accounting(report)
    assert report.rows_written == 1000


def test_memory_limit_that_is_no_size_is_config_error():
    with pytest.raises(cb.ConfigError, match=r"`memory_limit` must be a size like \"2GB\" or a byte count, got 'lots'"):
        cb.from_arrow(make_frame(3)).foreach_batch(lambda d: None).run(memory_limit="lots")


REPORT_KEYS = {"status", "error", "rows_read", "rows_written", "rows_filtered", "rows_rejected", "elapsed_s",
               "peak_rss_bytes", "stages", "bottleneck"}


def test_report_json_keys(tmp_path):
    report = (cb.from_arrow(_dirty(1000, every=50)).validate("amount > 0", name="pos").filter("id < 900")
              .sink_parquet(tmp_path / "o.parquet").run(progress=False, batch_size=100))
    assert_accounting(report)
    path = tmp_path / "r.json"
    report.save_json(path)
    data = json.loads(path.read_text())
    assert REPORT_KEYS <= set(data)
    assert data["status"] == "succeeded" and data["error"] is None
    assert data["rows_read"] == 1000
    assert data["rows_rejected"] == 20
    assert data["rows_filtered"] == 1000 - 900 - 2  # ids 900 and 950 were already rejected
    assert data["rows_written"] == 1000 - 20 - data["rows_filtered"]
    assert data["peak_rss_bytes"] > 0
    assert data["elapsed_s"] >= 0
    for st in data["stages"]:
        assert {"busy_s", "wait_s"} <= set(st), st
    assert [s["name"] for s in data["stages"]][0] == "read"
    assert [s["name"] for s in data["stages"]][-1] == "write"
    assert "verdict" in data["bottleneck"]
    assert data["outputs"] == [str(tmp_path / "o.parquet")]


def test_summary_and_html_contain_counts(tmp_path):
    report = (cb.from_arrow(_dirty(1234, every=10)).validate("amount > 0", name="pos")
              .foreach_batch(lambda d: None).run(progress=False, max_error_rate=None))
    text = report.summary()
    html = report._repr_html_()
    for needle in ("1,234", "1,110", "124"):
        assert needle in text
        assert needle in html
    assert "validate 124" in text
    assert str(report) == text


def test_report_rejects_frame_keeps_first_thousand():
    report = (cb.from_arrow(_dirty(5000, every=2)).validate("amount > 0")
              .foreach_batch(lambda d: None).run(progress=False, max_error_rate=None, batch_size=500))
    assert report.rows_rejected == 2500
    assert report.rejects.height == 1000
    assert report.rejects.columns[:5] == ["_source", "_line", "_stage", "_reason", "_raw"]


class _FlakyPages:
    """An API-like source: the first `failures` attempts lose the connection after two pages."""

    def __init__(self, failures: int, exc: type[Exception] = ConnectionResetError) -> None:
        self.failures = failures
        self.exc = exc
        self.attempts = 0

    def __call__(self):
        self.attempts += 1
        attempt = self.attempts
        for page in range(10):
            if page == 2 and attempt <= self.failures:
                raise self.exc("connection reset by peer")
            yield {"page": [page] * 50, "item": list(range(page * 50, page * 50 + 50))}


def test_transient_read_failures_are_retried_without_losing_or_repeating_rows(tmp_path):
    pages = _FlakyPages(failures=2)
    report = (cb.from_batches(pages).sink_parquet(tmp_path / "o.parquet")
              .run(progress=False, retry_backoff_s=0.0))
    assert_accounting(report)
    assert report.retries == 2 and pages.attempts == 3
    assert pl.read_parquet(tmp_path / "o.parquet")["item"].to_list() == list(range(500))


def test_data_errors_are_not_retried(tmp_path):
    pages = _FlakyPages(failures=5, exc=ValueError)
    with pytest.raises(ValueError):
        cb.from_batches(pages).sink_parquet(tmp_path / "o.parquet").run(progress=False, retry_backoff_s=0.0)
    assert pages.attempts == 1


def test_persistent_transient_failure_gives_up_after_the_retry_limit(tmp_path):
    pages = _FlakyPages(failures=100)
    with pytest.raises(ConnectionResetError):
        cb.from_batches(pages).sink_parquet(tmp_path / "o.parquet").run(progress=False, retry_backoff_s=0.0,
                                                                         read_retries=3)
    assert pages.attempts == 4


@pytest.mark.parametrize("attempt", [1, 2, 3, 5])
def test_backoff_is_exponential_with_jitter_within_bounds(attempt):
    from colbatch.runner import backoff_delay

    delays = {backoff_delay(0.5, attempt) for _ in range(50)}
    ceiling = 0.5 * 2 ** (attempt - 1)
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(delays) > 1  # jittered, not in lock step


# -- the queues between stages -------------------------------------------------------------------


def test_byte_queue_hands_items_over_in_order_between_threads_and_bounds_its_depth():
    q, stop = ByteQueue(max_items=1, max_bytes=1 << 20), threading.Event()
    got: list[int] = []

    def consume() -> None:
        while (item := q.get(stop)) is not None:
            got.append(item)

    consumer = threading.Thread(target=consume)
    consumer.start()
    for i in range(1, 501):  # the producer blocks while the one slot is taken, the consumer while it is empty
        assert q.put(i, 1, stop)
    while len(q):  # until the consumer has taken the last item
        pass
    stop.set()
    consumer.join()
    assert got == list(range(1, 501)) and q.max_depth == 1


def test_byte_queue_holds_more_small_items_than_its_depth_and_only_as_many_large_ones():
    stopped = threading.Event()
    stopped.set()  # a put that would block returns False at once

    def admitted(q: ByteQueue, size: int) -> int:
        n = 0
        while n < 100 and q.put(n, size, stopped):
            n += 1
        return n

    assert admitted(ByteQueue(2, 1 << 20, small_items=5, small_bytes=1000), 100) == 5
    # Past `small_bytes` the plain depth applies again: a 600-byte item and a second one, no third.
    assert admitted(ByteQueue(2, 1 << 20, small_items=5, small_bytes=1000), 600) == 2
    assert admitted(ByteQueue(2, 1 << 20), 100) == 2  # no small-item allowance: the depth is strict
    assert admitted(ByteQueue(2, 250, small_items=5, small_bytes=1000), 100) == 2  # bytes still bound it


def test_small_batches_queue_ahead_of_a_slow_sink_unless_the_depth_is_set():
    frame = make_frame(40_000)
    ahead = threading.Event()

    def pages():
        for i in range(40):
            if i == 30:
                ahead.set()
            yield frame.slice(i * 1_000, 1_000)

    waited: list[bool] = []

    def slow_sink(df: pl.DataFrame) -> None:
        if not waited:  # the first write waits until the source has produced 30 of its 40 batches
            waited.append(ahead.wait(timeout=30))

    report = cb.from_batches(pages).foreach_batch(slow_sink, retries=0).run(progress=False, batch_size=1_000)
    assert_accounting(report)
    assert waited == [True] and report.rows_written == 40_000

    # With `queue_items` set, the queues hold that many: the source cannot get far ahead.
    produced: list[int] = []

    def counted():
        for i in range(40):
            produced.append(i)
            yield frame.slice(i * 1_000, 1_000)

    leads: list[int] = []

    def record_lead(df: pl.DataFrame) -> None:
        leads.append(len(produced) - len(leads))

    report = (cb.from_batches(counted).foreach_batch(record_lead, retries=0)
              .with_options(queue_items=1).run(progress=False, batch_size=1_000))
    assert_accounting(report)
    # In flight at a write: one in the sink, one in each of two queues, one in the transform
    # thread, one being put by the read thread, one just produced by the source.
    assert max(leads) <= 6


def test_byte_queue_releases_a_blocked_put_or_get_when_stopped():
    stop = threading.Event()
    full = ByteQueue(max_items=1, max_bytes=1 << 20)
    assert full.put("a", 1, stop)
    results: dict[str, object] = {}
    putter = threading.Thread(target=lambda: results.update(put=full.put("b", 1, stop)))
    getter = threading.Thread(target=lambda: results.update(get=ByteQueue(1, 1).get(stop)))
    putter.start()
    getter.start()
    stop.set()
    putter.join()
    getter.join()
    assert results == {"put": False, "get": None}


def test_in_memory_data_is_read_in_the_transform_thread_and_iterators_in_a_read_thread():
    # Slicing a table in memory overlaps nothing: it is done where the steps run, one hand-off less
    # per batch. A user iterator may do I/O (API pages), so it keeps a thread of its own.
    frame = make_frame(20_000)
    seen: dict[str, set[str]] = {}

    def threads_at_first_batch(name: str):
        def write(df: pl.DataFrame) -> None:
            seen.setdefault(name, {t.name for t in threading.enumerate()})
        return write

    in_memory = (cb.from_arrow(frame.to_arrow()).filter(pl.col("id") % 3 != 0)
                 .foreach_batch(threads_at_first_batch("table"), retries=0)
                 .run(progress=False, batch_size=1_000))
    readers: set[str] = set()

    def pages():
        # The iterator itself names the threads it runs in: by the first write, a read thread may
        # already have read all 20 small batches into the queues and ended. (Its first page is
        # taken for the schema, in the calling thread.)
        for i in range(20):
            if i:
                readers.add(threading.current_thread().name)
            yield frame.slice(i * 1_000, 1_000)

    iterated = (cb.from_batches(pages)
                .foreach_batch(threads_at_first_batch("iterator"), retries=0)
                .run(progress=False, batch_size=1_000))
    for report in (in_memory, iterated):
        assert_accounting(report)
        assert report.rows_read == 20_000 and report.batches == 20
    assert in_memory.rows_written + in_memory.rows_filtered == 20_000 and in_memory.rows_filtered > 0
    assert "colbatch-transform" in seen["table"] and "colbatch-read" not in seen["table"]
    assert readers == {"colbatch-read"}


def test_a_udf_failing_on_in_memory_data_stops_the_job_at_its_threshold_and_leaves_no_output(tmp_path):
    def explode(df: pl.DataFrame) -> pl.DataFrame:
        if df.height and df["id"].max() >= 5_000:
            raise RuntimeError("boom in the step")
        return df

    out = tmp_path / "o.parquet"
    with pytest.raises(cb.ErrorThresholdExceeded):
        (cb.from_arrow(make_frame(10_000).to_arrow())
         .map_batches(explode, executor="inline")
         .sink_parquet(out).run(progress=False, batch_size=1_000, max_errors=10))
    assert not out.exists()
