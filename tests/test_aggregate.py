"""The DuckDB aggregate stage: results equal DuckDB's own, accounting, every sink, aborts, job files."""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

import colbatch as cb
from colbatch.aggregate import aggregate_sql
from colbatch.config import build_job
from tests.conftest import make_frame, no_temp_files

Q1 = """
SELECT l_returnflag, l_linestatus,
       sum(l_quantity) AS sum_qty,
       sum(l_extendedprice) AS sum_base_price,
       sum(l_extendedprice * (1 - l_discount)) AS sum_disc_price,
       sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) AS sum_charge,
       avg(l_quantity) AS avg_qty,
       avg(l_extendedprice) AS avg_price,
       avg(l_discount) AS avg_disc,
       count(*) AS count_order
FROM {table}
WHERE l_shipdate <= DATE '1998-12-01' - INTERVAL 90 DAY
GROUP BY l_returnflag, l_linestatus
ORDER BY l_returnflag, l_linestatus
"""


def assert_accounting_aggregated(report: cb.Report) -> None:
    """Every stage balances and read = aggregated + filtered + rejected."""
    assert report.rows_aggregated is not None
    assert report.rows_read == report.rows_aggregated + report.rows_filtered + report.rows_rejected, report.summary()
    for stage in report.stages:
        assert stage.balanced(), (stage.name, stage)
    assert report.accounting_ok()


def _lineitem(path: Path, n: int = 30_000) -> Path:
    rng = np.random.default_rng(7)
    start = dt.date(1992, 1, 1)
    df = pl.DataFrame({
        "l_orderkey": np.arange(n, dtype=np.int64),
        "l_quantity": rng.integers(1, 51, n).astype(np.float64),
        "l_extendedprice": np.round(rng.uniform(900, 105_000, n), 2),
        "l_discount": np.round(rng.integers(0, 11, n) / 100, 2),
        "l_tax": np.round(rng.integers(0, 9, n) / 100, 2),
        "l_returnflag": pl.Series(["A", "N", "R"]).gather(rng.integers(0, 3, n)),
        "l_linestatus": pl.Series(["F", "O"]).gather(rng.integers(0, 2, n)),
        "l_shipdate": pl.Series([start + dt.timedelta(days=int(d)) for d in rng.integers(0, 2526, n)]),
    })
    df.write_csv(path)
    return path


def test_tpch_q1_shaped_aggregate_equals_duckdb_direct(tmp_path):
    src = _lineitem(tmp_path / "lineitem.csv")
    out = tmp_path / "q1.parquet"
    report = (cb.scan_csv(src, schema={"l_shipdate": "date"})
              .aggregate(Q1.format(table="input"))
              .sink_parquet(out)
              .run(progress=False, batch_size=4_000))
    assert_accounting_aggregated(report)
    assert report.rows_aggregated == 30_000
    assert report.rows_written == 6
    got = pl.read_parquet(out)
    table = f"read_csv('{str(src).replace(chr(39), chr(39) * 2)}')"
    expected = duckdb.sql(Q1.format(table=table)).pl()
    assert got["count_order"].sum() < 30_000  # the date filter dropped rows
    assert_frame_equal(got, expected, check_dtypes=False, rel_tol=1e-9, abs_tol=1e-6)


def test_polars_shaped_aggregate_equals_polars_group_by(tmp_path):
    df = make_frame(5_000)
    aggs = [pl.col("amount").sum().alias("total"), pl.col("amount").mean().alias("mean"), pl.len().alias("n"),
            pl.col("amount").min().alias("lo"), pl.col("amount").max().alias("hi"),
            pl.col("id").n_unique().alias("ids"), pl.col("amount").std().alias("sd")]
    got: list[pl.DataFrame] = []
    report = cb.from_arrow(df).aggregate(by=["type"], aggs=aggs).foreach_batch(got.append).run(
        progress=False, batch_size=333)
    assert_accounting_aggregated(report)
    expected = df.group_by("type").agg(aggs).sort("type")
    assert_frame_equal(pl.concat(got).sort("type"), expected, check_dtypes=False, rel_tol=1e-9)


def test_aggregate_sql_translation_quotes_names():
    sql = aggregate_sql(['my "key"'], [pl.col("a b").sum().alias('t"x'), pl.len(), "max(c) AS m"])
    assert sql == ('SELECT "my ""key""", sum("a b") AS "t""x", count(*) AS "len", max(c) AS m '
                   'FROM "input" GROUP BY "my ""key"""')


def test_aggregate_untranslatable_expression_is_config_error():
    with pytest.raises(cb.ConfigError, match="SQL string"):
        aggregate_sql(["k"], [(pl.col("a") * 2).sum()])


def test_aggregate_with_rejects_upstream_keeps_accounting(write):
    text = "id,amount,type\n1,2.5,a\n2,oops,b\n3,-1,a\n4,4.0,b\n5,x,a\n6,1.0,a\n7,3,b,extra\n8,2,c\n"
    src = write("in.csv", text)
    report = (cb.scan_csv(src, schema={"id": "int64", "amount": "float64"})
              .validate("amount > 0", name="positive")
              .filter("type <> 'c'")
              .aggregate("SELECT type, sum(amount) AS total, count(*) AS n FROM input GROUP BY type ORDER BY type")
              .sink_csv("out.csv")
              .run(progress=False, max_error_rate=1.0))
    assert_accounting_aggregated(report)
    assert report.rows_read == 8
    assert report.rows_rejected == 4  # oops, x (cast), the ragged line (parse), -1 (validate)
    assert report.rows_filtered == 1
    assert report.rows_aggregated == 3
    assert [s.name for s in report.stages][-2:] == ["aggregate", "write"]
    assert pl.read_csv("out.csv").rows() == [("a", 3.5, 2), ("b", 4.0, 1)]


def test_aggregate_result_reaches_every_sink(sink_case):
    df = make_frame()
    pipeline = cb.from_arrow(df).aggregate("SELECT type, count(*) AS id, sum(amount) AS amount FROM input GROUP BY ALL")
    report = sink_case.attach(pipeline).run(progress=False, batch_size=100)
    assert_accounting_aggregated(report)
    expected = df.group_by("type").agg(pl.len().cast(pl.Int64).alias("id"), pl.col("amount").sum()).sort("type")
    got = sink_case.read().select("type", pl.col("id").cast(pl.Int64), "amount").sort("type")
    assert_frame_equal(got, expected, rel_tol=1e-9)
    assert no_temp_files(sink_case.target) == []


def _boom(s: pl.Series) -> pl.Series:
    if s.len() and s.max() > 500:
        raise RuntimeError("boom in a step")
    return s


def test_aggregate_abort_on_step_error_leaves_no_output_and_no_spill_dir(tmp_path):
    df = make_frame()
    before = set(os.listdir(tempfile.gettempdir()))
    pipeline = (cb.from_batches(lambda: (df.slice(s, 100) for s in range(0, 1000, 100)))
                .with_columns(pl.col("id").map_batches(_boom, return_dtype=pl.Int64))
                .aggregate("SELECT type, sum(amount) AS total FROM input GROUP BY type")
                .sink_parquet(tmp_path / "out" / "agg.parquet"))
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.run(progress=False, batch_size=100)
    assert not (tmp_path / "out" / "agg.parquet").exists()
    assert no_temp_files(tmp_path) == []
    leftover = {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("colbatch-duckdb-")}
    assert leftover == set()


def test_aggregate_runtime_error_in_query_fails_cleanly(tmp_path):
    df = pl.DataFrame({"x": ["1", "2", "three"]})
    with pytest.raises(cb.SinkError, match="aggregate query failed"):
        cb.from_arrow(df).aggregate("SELECT sum(CAST(x AS INTEGER)) AS s FROM input").sink_parquet(
            tmp_path / "o.parquet").run(progress=False)
    assert not (tmp_path / "o.parquet").exists()
    assert no_temp_files(tmp_path) == []


def test_aggregate_unknown_column_is_config_error_naming_columns(tmp_path):
    with pytest.raises(cb.ConfigError, match="nope") as info:
        cb.from_arrow(make_frame(10)).aggregate("SELECT sum(nope) FROM input").sink_parquet(
            tmp_path / "o.parquet").run(progress=False)
    assert "amount" in str(info.value)


def test_aggregate_schema_is_planned_without_reading():
    schema = cb.from_arrow(make_frame(10)).aggregate("SELECT type, count(*) AS n FROM input GROUP BY type").schema()
    assert dict(schema) == {"type": pl.String, "n": pl.Int64}


def test_aggregate_spills_to_the_given_temp_directory_under_a_small_limit(tmp_path):
    n = 1_500_000  # ~60 MB of hash table: does not fit in 16 MB
    df = pl.DataFrame({"k": np.arange(n, dtype=np.int64), "v": np.ones(n)})
    pipeline = (cb.from_arrow(df)
                .aggregate("SELECT k, sum(v) AS s, count(*) AS c FROM input GROUP BY k")
                .sink_parquet(tmp_path / "o.parquet"))
    report = pipeline.run(progress=False, memory_limit=16 << 20, threads=1, temp_directory=str(tmp_path / "spill"))
    assert_accounting_aggregated(report)
    out = pl.read_parquet(tmp_path / "o.parquet")
    assert out.height == n and out["c"].sum() == n
    # The same run with a spill "directory" that cannot be created fails: the limit forced spilling there.
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(cb.SinkError, match="not_a_dir"):
        pipeline.run(progress=False, memory_limit=16 << 20, threads=1, temp_directory=str(blocker))


def test_aggregate_from_job_file(tmp_path):
    (tmp_path / "in.csv").write_text("id,amount,type\n1,2.5,a\n2,-1,b\n3,4.0,a\n4,1.0,b\n")
    job = {
        "source": {"path": str(tmp_path / "in.csv")},
        "steps": [{"filter": "amount > 0"}],
        "aggregate": {"sql": "SELECT type, sum(amount) AS total FROM input GROUP BY ALL ORDER BY type"},
        "sink": {"path": str(tmp_path / "out.parquet")},
        "run": {"memory_limit": "256MB", "threads": 1, "temp_directory": str(tmp_path / "t")},
    }
    pipeline = build_job(job)
    assert pipeline.options.threads == 1 and pipeline.options.memory_limit == 256 << 20
    report = pipeline.run(progress=False)
    assert_accounting_aggregated(report)
    assert pl.read_parquet(tmp_path / "out.parquet").rows() == [("a", 6.5), ("b", 1.0)]


@pytest.mark.parametrize("bad", [{"sql": 1}, {"query": "SELECT 1"}, "SELECT 1"])
def test_aggregate_job_file_errors(tmp_path, bad):
    (tmp_path / "in.csv").write_text("id\n1\n")
    with pytest.raises(cb.ConfigError, match="aggregate"):
        build_job({"source": {"path": str(tmp_path / "in.csv")}, "aggregate": bad,
                   "sink": {"path": str(tmp_path / "o.parquet")}})


def test_aggregate_needs_sql_or_by_aggs():
    with pytest.raises(cb.ConfigError, match="either"):
        cb.from_arrow(make_frame(3)).aggregate()
    with pytest.raises(cb.ConfigError, match="either"):
        cb.from_arrow(make_frame(3)).aggregate("SELECT 1", by=["type"])
