"""Behaviour shared by every source and every sink (the invariants of DESIGN.md)."""

from __future__ import annotations

import polars as pl
import pytest

import colbatch as cb
from tests.conftest import assert_accounting, data_files, make_frame, no_temp_files, sorted_rows


def _collect(pipeline: cb.Pipeline, **run) -> tuple[cb.Report, pl.DataFrame]:
    got: list[pl.DataFrame] = []
    report = pipeline.foreach_batch(got.append, retries=0).run(progress=False, **run)
    return report, (pl.concat(got) if got else pl.DataFrame())


# -- every source -------------------------------------------------------------------------


def test_source_identity_run_reads_all_rows(source_case):
    report, out = _collect(source_case.make())
    assert_accounting(report)
    assert report.status == "succeeded"
    assert report.rows_read == 1000
    assert report.rows_written == 1000
    assert report.rows_rejected == 0
    assert_frame = sorted_rows(out)
    assert assert_frame.equals(sorted_rows(source_case.expected))


def test_source_small_batches_read_all_rows(source_case):
    report, out = _collect(source_case.make(), batch_size=97)
    assert_accounting(report)
    assert report.rows_written == 1000
    assert sorted_rows(out).equals(sorted_rows(source_case.expected))


def test_source_filter_with_columns_matches_polars(source_case):
    pipeline = (
        source_case.make()
        .filter(pl.col("amount") > 0)
        .with_columns((pl.col("amount") * 1.1).alias("value"), pl.col("type").str.to_uppercase().alias("category"))
    )
    report, out = _collect(pipeline)
    assert_accounting(report)
    expected = (
        source_case.expected.filter(pl.col("amount") > 0)
        .with_columns((pl.col("amount") * 1.1).alias("value"), pl.col("type").str.to_uppercase().alias("category"))
    )
    assert report.rows_filtered == source_case.expected.height - expected.height > 0
    assert report.rows_written == expected.height
    cols = ["id", "amount", "type", "value", "category"]
    assert out.select(cols).sort("id").equals(expected.select(cols).sort("id"))


# -- every sink ---------------------------------------------------------------------------


def test_sink_output_equals_input(sink_case):
    df = make_frame()
    report = sink_case.attach(cb.from_arrow(df.to_arrow())).run(progress=False)
    assert_accounting(report)
    assert report.rows_written == df.height
    got = sink_case.read()
    assert sorted_rows(got).equals(sorted_rows(df))
    assert no_temp_files(sink_case.target) == []


def test_sink_output_equals_input_over_several_files(sink_case, tmp_path):
    df = make_frame()
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, start in enumerate(range(0, 1000, 400)):
        df.slice(start, 400).write_csv(inputs / f"part{i}.csv")
    report = sink_case.attach(cb.scan_csv(inputs, schema={"id": "int64", "amount": "float64"})).run(
        progress=False, batch_size=64)
    assert_accounting(report)
    assert report.rows_written == 1000
    assert sorted_rows(sink_case.read()).equals(sorted_rows(df))


def _boom(s: pl.Series) -> pl.Series:
    if s.len() and s.max() > 500:
        raise RuntimeError("boom in a step")
    return s


@pytest.mark.parametrize("how", ["step_exception", "error_threshold"])
def test_sink_abort_leaves_no_file(sink_case, how):
    df = make_frame()
    if how == "step_exception":
        pipeline = cb.from_batches(lambda: (df.slice(s, 100) for s in range(0, 1000, 100))).with_columns(
            pl.col("id").map_batches(_boom, return_dtype=pl.Int64))
        expected_error: type[BaseException] = RuntimeError
        run = {}
    else:
        pipeline = cb.from_batches(lambda: (df.slice(s, 100) for s in range(0, 1000, 100))).validate(
            pl.col("amount") > 0, name="positive")
        expected_error = cb.ErrorThresholdExceeded
        run = {"max_errors": 5}
    with pytest.raises(expected_error):
        sink_case.attach(pipeline).run(progress=False, batch_size=100, **run)
    assert no_temp_files(sink_case.target) == []
    if sink_case.kind == "duckdb":  # the database file may exist; the table must not
        assert sink_case.read().is_empty()
    elif sink_case.kind != "foreach_batch":
        published = data_files(sink_case.target)
        assert published == []


@pytest.mark.parametrize("kind", ["parquet_file", "parquet_dir", "parquet_partitioned", "csv", "csv_gz", "jsonl"])
def test_named_sink_abort_leaves_no_file(kind, tmp_path):
    """`test_<sink>_abort_leaves_no_file` for every file sink, by name."""
    df = make_frame()
    out = tmp_path / "out"
    pipeline = cb.from_batches(lambda: (df.slice(s, 100) for s in range(0, 1000, 100))).with_columns(
        pl.col("id").map_batches(_boom, return_dtype=pl.Int64))
    target = {
        "parquet_file": lambda p: p.sink_parquet(out / "x.parquet"),
        "parquet_dir": lambda p: p.sink_parquet(out / "x"),
        "parquet_partitioned": lambda p: p.sink_parquet(out / "x", partition_by="type"),
        "csv": lambda p: p.sink_csv(out / "x.csv"),
        "csv_gz": lambda p: p.sink_csv(out / "x.csv.gz"),
        "jsonl": lambda p: p.sink_ndjson(out / "x.jsonl"),
    }[kind]
    with pytest.raises(RuntimeError, match="boom"):
        target(pipeline).run(progress=False, batch_size=100)
    assert (data_files(out) if out.exists() else []) == []


def test_foreach_batch_abort_raises_and_reports(tmp_path):
    df = make_frame()
    calls: list[int] = []

    def fn(batch: pl.DataFrame) -> None:
        calls.append(batch.height)
        if len(calls) == 3:
            raise ValueError("downstream down")

    with pytest.raises(cb.SinkError, match="downstream down") as info:
        cb.from_arrow(df).foreach_batch(fn, retries=0).run(progress=False, batch_size=100)
    report = info.value.report
    assert report.status == "failed"
    assert "downstream down" in report.error
