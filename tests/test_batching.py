"""Adaptive batch sizing: shrink under memory pressure and on MemoryError, grow on throughput, no oscillation."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import polars as pl
import pytest

import colbatch as cb
from colbatch.batch import Split
from colbatch.batching import DEFAULT_START_ROWS, BatchSizer, load_tuned_rows, tune_file
from colbatch.runner import RunOptions
from colbatch.steps import Step, StepResult
from tests.conftest import SCHEMA, assert_accounting, make_frame

MB = 1 << 20


class FakeRss:
    """An injectable RSS reader: tests set `value` to simulate memory use."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self) -> int:
        return self.value


def _feed(sizer: BatchSizer, rate_of, n: int) -> None:
    """Run `n` batches through the controller; `rate_of(rows)` is the throughput at that size."""
    for _ in range(n):
        rows = sizer()
        sizer.observe(rows, rows / rate_of(rows))


def test_sizer_shrinks_at_once_under_memory_pressure_and_stays_down():
    rss = FakeRss(100 * MB)
    sizer = BatchSizer(100_000, memory_limit=1000 * MB, rss=rss)
    assert sizer() == 100_000
    rss.value = 900 * MB  # above the 80% high-water mark
    assert sizer() == 50_000
    assert sizer() == 50_000  # gives the smaller batches time to free memory...
    rss.value = 1100 * MB
    assert sizer() == 25_000  # ...unless RSS is past the limit itself
    rss.value = 200 * MB
    _feed(sizer, lambda rows: rows * 10.0, 30)  # throughput would reward growth...
    assert sizer.rows == 25_000  # ...but it never grows back into the pressure
    assert sizer.pressure_events == 2
    assert [rows for _, rows in sizer.history] == [100_000, 50_000, 25_000]


def test_sizer_does_not_shrink_when_batches_are_not_what_holds_the_memory():
    rss = FakeRss(100 * MB)
    sizer = BatchSizer(10_000, memory_limit=1000 * MB, rss=rss)
    sizer.note_bytes(10_000, 10_000 * 100)  # 12 batches x 1 MB: a tiny share of the 800 MB above baseline
    rss.value = 900 * MB
    assert sizer() == 10_000
    assert sizer.pressure_events == 0


def test_sizer_grows_while_throughput_improves_then_settles_on_the_plateau():
    sizer = BatchSizer(8_192, memory_limit=1 << 40, rss=FakeRss(100 * MB))
    # Throughput rises up to 65,536 rows, flat beyond: a typical curve.
    _feed(sizer, lambda rows: min(rows, 65_536) * 20.0, 80)
    assert sizer.settled
    assert sizer.rows == 65_536
    assert [rows for _, rows in sizer.history] == [8_192, 16_384, 32_768, 65_536, 131_072, 65_536]


def test_sizer_steps_back_when_a_larger_size_is_slower():
    sizer = BatchSizer(16_384, memory_limit=1 << 40, rss=FakeRss(100 * MB))
    _feed(sizer, lambda rows: rows * 30.0 if rows <= 32_768 else 5e5, 60)
    assert sizer.rows == 32_768
    assert sizer.settled


def test_sizer_does_not_oscillate_on_a_steady_noisy_workload():
    rnd = random.Random(7)
    sizer = BatchSizer(100_000, memory_limit=1 << 40, rss=FakeRss(100 * MB))
    _feed(sizer, lambda rows: 1e6 * (1 + rnd.uniform(-0.03, 0.03)), 500)
    sizes = [rows for _, rows in sizer.history]
    assert len(sizes) <= 3, sizes  # at most one probe up and one step back
    assert sizer.rows == 100_000


def test_sizer_grows_only_while_memory_has_room():
    rss = FakeRss(760 * MB)
    sizer = BatchSizer(10_000, memory_limit=1000 * MB, rss=rss)
    sizer.note_bytes(10_000, 10_000 * 100)  # 100 bytes per row: 12 batches of 80k rows would need 96 MB
    _feed(sizer, lambda rows: rows * 50.0, 40)
    # 40 MB are left below the 800 MB high-water mark: 20k rows (24 MB for 12 batches) fit, 40k rows
    # (48 MB) would not, although 40k rows are far below the byte ceiling (4 MB a batch).
    assert [rows for _, rows in sizer.history] == [10_000, 20_000]
    assert sizer.settled


def test_sizer_grows_no_further_than_the_byte_ceiling():
    from colbatch.batching import DEFAULT_MAX_GROWTH_BYTES

    sizer = BatchSizer(25_000, memory_limit=1 << 40, rss=FakeRss(100 * MB))
    sizer.note_bytes(25_000, 25_000 * 100)  # 100 bytes per row: the ceiling is at ~168k rows
    _feed(sizer, lambda rows: rows * 20.0, 60)  # throughput would keep improving with size
    assert [rows for _, rows in sizer.history] == [25_000, 50_000, 100_000]
    assert sizer.settled
    assert 100_000 * 100 <= DEFAULT_MAX_GROWTH_BYTES < 200_000 * 100


def test_sizer_keeps_at_least_8_batches_per_input():
    sizer = BatchSizer(100_000, memory_limit=1 << 40, rss=FakeRss(100 * MB))
    sizer.input_bytes = 400_000 * 80  # 400k rows of 80 source bytes
    rows = sizer()
    sizer.note_bytes(rows, rows * 100, rows * 80)
    assert sizer.input_rows() == 400_000
    assert sizer.rows == 50_000
    _feed(sizer, lambda rows: rows * 20.0, 60)  # growth would pay, but not past 1/8 of the input
    assert [rows for _, rows in sizer.history] == [100_000, 50_000]
    fixed = BatchSizer(100_000, memory_limit=1 << 40, adaptive=False, rss=FakeRss(100 * MB))
    fixed.input_bytes = 400_000 * 80
    fixed.note_bytes(100_000, 100_000 * 100, 100_000 * 80)
    assert fixed.rows == 100_000  # a fixed size is the user's choice


def test_memory_error_halves_the_size():
    sizer = BatchSizer(64_000, memory_limit=1 << 40, rss=FakeRss(0))
    sizer.on_memory_error()
    assert sizer.rows == 32_000
    assert sizer.memory_errors == 1
    _feed(sizer, lambda rows: rows * 100.0, 30)
    assert sizer.rows == 32_000


def test_fixed_batch_size_that_cannot_fit_is_clamped_with_one_warning(caplog):
    sizer = BatchSizer(1_000_000, memory_limit=400 * MB, adaptive=False, rss=FakeRss(100 * MB))
    with caplog.at_level(logging.WARNING, logger="colbatch"):
        for _ in range(5):
            rows = sizer()
            sizer.note_bytes(rows, rows * 100)
    assert sizer.rows < 1_000_000
    assert sizer.rows * 100 * 12 <= 400 * MB * 0.8
    assert len([r for r in caplog.records if "does not fit memory_limit" in r.message]) == 1


def test_fixed_batch_size_that_fits_is_kept():
    sizer = BatchSizer(5_000, memory_limit=1 << 40, adaptive=False, rss=FakeRss(0))
    sizer.note_bytes(5_000, 5_000 * 100)
    _feed(sizer, lambda rows: rows * 100.0, 20)
    assert sizer.rows == 5_000
    assert len(sizer.history) == 1


class _Box:
    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __call__(self) -> int:
        return self.rows


@pytest.mark.parametrize("kind", ["csv", "ndjson"])
@pytest.mark.parametrize("skip", [0, 1, 777, 5_000, 20_000])
def test_text_sources_change_size_within_a_split_and_keep_skip_rows_exact(tmp_path, kind, skip):
    df = make_frame(20_000)
    if kind == "csv":
        path = tmp_path / "in.csv"
        df.write_csv(path)
        source = cb.scan_csv(path, schema=SCHEMA).source
    else:
        path = tmp_path / "in.jsonl"
        df.write_ndjson(path)
        source = cb.scan_ndjson(path, schema=SCHEMA).source
    box = _Box(3_000)
    batches = []
    for batch in source.read(source.splits()[0], batch_rows=box, on_reject=lambda f: None, skip_rows=skip):
        batches.append(batch)
        box.rows = 20_000 if len(batches) == 2 else 3_000
    got = pl.concat([b.data for b in batches]) if batches else pl.DataFrame(schema=df.schema)
    assert got.equals(df.slice(skip))
    rows = sorted({b.data.height for b in batches})
    if skip == 0:
        assert len(rows) >= 2  # the size really changed within the split
    # first_row/rows_read tile the split from 0 with no gap or overlap
    pos = 0
    for b in batches:
        assert b.first_row <= max(pos, skip)
        pos = b.first_row + b.rows_read
    assert pos == 20_000 or not batches


@dataclass
class OutOfMemoryAbove(Step):
    """A test step that raises MemoryError on batches larger than `limit` rows; counts its calls."""

    limit: int = 100
    calls: list = field(default_factory=list)
    kind: str = field(default="oom", init=False)

    def apply(self, df: pl.DataFrame) -> StepResult:
        self.calls.append(df.height)
        if df.height > self.limit:
            raise MemoryError(f"{df.height} rows")
        return StepResult(df)


def test_memory_error_in_a_step_retries_the_batch_in_halves_with_exact_accounting(tmp_path):
    df = make_frame(1000)
    path = tmp_path / "in.csv"
    df.write_csv(path)
    oom = OutOfMemoryAbove(limit=150, name="oom")
    rejects = tmp_path / "rejects.parquet"
    pipeline = cb.scan_csv(path, schema=SCHEMA).validate("amount > 0", name="pos")._add(oom)
    pipeline = pipeline.validate("id % 7 <> 0", name="not7")
    out = tmp_path / "out.parquet"
    report = pipeline.sink_parquet(out).sink_rejects(rejects).run(progress=False, batch_size=400, max_error_rate=None)
    assert_accounting(report)
    written = pl.read_parquet(out)
    rej = pl.read_parquet(rejects)
    assert written["id"].is_unique().all()
    expected = df.filter((pl.col("amount") > 0) & (pl.col("id") % 7 != 0))
    assert written.sort("id").equals(expected)
    # Every rejected row once, with its true file line (line = id + 1 under the header).
    assert rej.height == df.height - expected.height
    assert rej["_line"].is_unique().all()
    bad = df.filter(~((pl.col("amount") > 0) & (pl.col("id") % 7 != 0)))
    assert sorted(rej["_line"].to_list()) == sorted((bad["id"] + 1).to_list())
    assert max(oom.calls) > 150  # it did fail, and was retried smaller
    assert report.batch_rows < 400
    assert report.to_dict()["batch_sizes"][0] == [0.0, 400]


def udf_out_of_memory_above_150_rows(df: pl.DataFrame) -> pl.DataFrame:
    """A UDF that raises MemoryError on batches of more than 150 rows (module level: workers import it)."""
    if df.height > 150:
        raise MemoryError(f"{df.height} rows")
    return df.with_columns((pl.col("amount") * 2).alias("doubled"))


@pytest.mark.parametrize("executor, workers", [("inline", 1), ("processes", 2)])
def test_memory_error_in_a_udf_retries_the_batch_smaller_with_exact_accounting(tmp_path, executor, workers):
    df = make_frame(1000)
    path = tmp_path / "in.csv"
    df.write_csv(path)
    out, rejects = tmp_path / "out.parquet", tmp_path / "rejects.parquet"
    report = (cb.scan_csv(path, schema=SCHEMA)
              .validate("amount > 0", name="pos")
              .map_batches(udf_out_of_memory_above_150_rows, executor=executor, workers=workers)
              .validate("id % 7 <> 0", name="not7")
              .sink_parquet(out).sink_rejects(rejects)
              .run(progress=False, batch_size=400, max_error_rate=None))
    assert_accounting(report)
    expected = df.filter((pl.col("amount") > 0) & (pl.col("id") % 7 != 0)).with_columns(
        (pl.col("amount") * 2).alias("doubled"))
    written = pl.read_parquet(out)
    assert written["id"].is_unique().all()
    assert written.sort("id").equals(expected)
    # No row was rejected for the MemoryError; the others once each, with their true file lines.
    rej = pl.read_parquet(rejects)
    assert "udf" not in report.rejects_by_stage
    bad = df.filter(~((pl.col("amount") > 0) & (pl.col("id") % 7 != 0)))
    assert sorted(rej["_line"].to_list()) == sorted((bad["id"] + 1).to_list())
    udf_stage = next(s for s in report.stages if s.name.startswith("udf"))
    assert udf_stage.rows_in == udf_stage.rows_out == df.filter(pl.col("amount") > 0).height
    # The sizer shrank below the failing size, so later batches were read smaller.
    assert report.batch_rows <= 200
    assert report.bottleneck["resource"] == "memory"
    assert "raised MemoryError" in report.bottleneck["verdict"]


def test_memory_error_of_a_udf_on_one_row_rejects_that_row_only(tmp_path):
    def oom_on_id_5(df: pl.DataFrame) -> pl.DataFrame:
        if (df["id"] == 5).any():
            raise MemoryError("row 5 is too big")
        return df

    report = (cb.from_arrow(make_frame(40)).map_batches(oom_on_id_5).foreach_batch(lambda d: None)
              .run(progress=False, batch_size=16, max_error_rate=None))
    assert_accounting(report)
    assert report.rows_written == 39
    assert report.rejects["_reason"].str.contains("MemoryError").all()
    assert report.rejects.height == 1


def test_memory_error_on_a_single_row_is_raised():
    oom = OutOfMemoryAbove(limit=0, name="oom")
    with pytest.raises(MemoryError):
        cb.from_arrow(make_frame(4))._add(oom).foreach_batch(lambda d: None).run(progress=False)


def test_auto_run_reports_batch_sizes_over_time(tmp_path):
    path = tmp_path / "in.csv"
    make_frame(5000).write_csv(path)
    report = cb.scan_csv(path, schema=SCHEMA).sink_parquet(tmp_path / "o.parquet").run(progress=False)
    d = report.to_dict()
    assert d["batch_sizes"][0] == [0.0, DEFAULT_START_ROWS]
    assert "batches:" in report.summary()
    assert_accounting(report)


def test_job_file_starts_from_the_tuned_size(tmp_path):
    job = tmp_path / "job.toml"
    make_frame(10).write_csv(tmp_path / "in.csv")
    job.write_text(f'[source]\npath = "{tmp_path / "in.csv"}"\n[sink]\npath = "{tmp_path / "o.parquet"}"\n')
    tune_file(job).write_text('{"batch_rows": 12345}')
    assert tune_file(job).name == "job.tune.json"
    assert load_tuned_rows(tune_file(job)) == 12345
    from colbatch.config import load_job

    assert load_job(job).options.batch_rows() == 12345
    assert load_job(job).options.sizer().rows == 12345
    assert RunOptions(batch_size=500, tuned_rows=12345).batch_rows() == 500


def _big_csv(path, n: int) -> None:
    pl.DataFrame({
        "id": pl.int_range(0, n, eager=True),
        "a": pl.int_range(0, n, eager=True).cast(pl.Float64) / 3,
        "s": pl.int_range(0, n, eager=True).cast(pl.String) + "_padding_text_for_width",
    }).write_csv(path)


def test_fixed_batch_size_is_clamped_under_memory_limit_in_a_run(tmp_path, caplog):
    path = tmp_path / "in.csv"
    _big_csv(path, 200_000)
    from colbatch.batching import process_rss

    limit = process_rss() + (16 << 20)
    with caplog.at_level(logging.WARNING, logger="colbatch"):
        report = (cb.scan_csv(path).sink_parquet(tmp_path / "o.parquet")
                  .run(progress=False, batch_size=1_000_000, memory_limit=limit))
    assert_accounting(report)
    assert report.rows_written == 200_000
    assert report.batch_sizes[0][1] == 1_000_000
    assert report.batch_rows < 200_000
    assert report.batches > 2
    assert len([r for r in caplog.records if "does not fit memory_limit" in r.message]) == 1


def test_memory_limit_holds_where_fixed_large_batches_exceed_it(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "in.csv"
    _big_csv(path, 4_000_000)
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, json, psutil, colbatch as cb\n"
        "base = psutil.Process().memory_info().rss\n"
        "opts = {'batch_size': 2_000_000}\n"
        "if sys.argv[2] != 'none': opts['memory_limit'] = int(sys.argv[2])\n"
        "r = cb.scan_csv(sys.argv[1]).with_columns('a * 2 AS b').sink_parquet(sys.argv[1] + '.parquet')"
        ".run(progress=False, overwrite=True, **opts)\n"
        "print(json.dumps([base, r.peak_rss_bytes]))\n")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"}

    def run(limit):
        out = subprocess.run([sys.executable, str(script), str(path), limit], capture_output=True, text=True,
                             env=env, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    import json

    base, unbounded = run("none")
    limit = 250 << 20
    assert unbounded > base + limit, "the workload must need more than the limit with fixed batches"
    base, bounded = run(str(limit))
    assert bounded <= limit + base, (bounded >> 20, base >> 20)
    print(f'baseline {base >> 20} MiB, fixed 2M rows: peak {unbounded >> 20} MiB, limit 250 MiB: peak {bounded >> 20} MiB')
