"""PostgreSQL source against the real server: types, key-range splits, resume, job file, round trip."""

from __future__ import annotations

import polars as pl
import pytest
from psycopg import sql

import colbatch as cb
from colbatch.config import build_job
from tests.conftest import assert_accounting, make_frame
from tests.pg import pg_frame, pg_query
from tests.sinks.test_postgres import ALL_TYPES


def _collect(pipeline: cb.Pipeline, **run) -> tuple[cb.Report, pl.DataFrame]:
    parts: list[pl.DataFrame] = []
    report = pipeline.foreach_batch(parts.append, retries=0).run(progress=False, **run)
    return report, (pl.concat(parts) if parts else pl.DataFrame())


def test_postgres_source_reads_back_sink_types(pg_dsn, pg_schema):
    df = ALL_TYPES.select("i16", "i32", "i64", "f64", "b", "s", "bin", "d", "ts", "tstz", "tm", "dec")
    cb.from_arrow(df).sink_postgres(pg_dsn, "types", schema=pg_schema).run(progress=False)
    report, got = _collect(cb.scan_postgres(pg_dsn, table="types", schema=pg_schema))
    assert_accounting(report)
    assert got.schema == df.schema
    assert got.sort("i16", nulls_last=True).equals(df.sort("i16", nulls_last=True))


def test_postgres_source_key_range_splits_are_deterministic_and_cover_all_rows(pg_dsn, pg_schema):
    df = make_frame(1000)
    cb.from_arrow(df).sink_postgres(pg_dsn, "e", schema=pg_schema).run(progress=False)
    src = cb.scan_postgres(pg_dsn, f'SELECT * FROM "{pg_schema}".e WHERE amount > 0', partition_on="id", partitions=4)
    again = cb.scan_postgres(pg_dsn, f'SELECT * FROM "{pg_schema}".e WHERE amount > 0', partition_on="id", partitions=4)
    assert [s.id for s in src.source.splits()] == [s.id for s in again.source.splits()]
    assert len(src.source.splits()) == 4
    report, got = _collect(src, batch_size=70)
    assert_accounting(report)
    want = df.filter(pl.col("amount") > 0)
    assert got["id"].to_list() == want["id"].to_list()  # split order, key order within a split


def test_postgres_source_resume_skips_rows_by_key(pg_dsn, pg_schema):
    df = make_frame(1000)
    cb.from_arrow(df).sink_postgres(pg_dsn, "e", schema=pg_schema).run(progress=False)
    source = cb.scan_postgres(pg_dsn, table="e", schema=pg_schema, partition_on="id", partitions=2).source
    split = source.splits()[1]
    batches = list(source.read(split, batch_rows=100, on_reject=lambda f: None, skip_rows=150))
    ids = pl.concat([b.data for b in batches])["id"].to_list()
    assert ids == list(range(651, 1001)) and batches[0].first_row == 150


def test_postgres_source_to_sink_round_trip_and_job_file(pg_dsn, pg_schema):
    df = make_frame(500)
    cb.from_arrow(df).sink_postgres(pg_dsn, "a", schema=pg_schema).run(progress=False)
    job = {"source": {"path": pg_dsn, "table": "a", "schema": pg_schema, "partition_on": "id", "partitions": 3},
           "steps": [{"filter": "amount > 0"}],
           "sink": {"path": pg_dsn, "table": "b", "schema": pg_schema, "mode": "create"}}
    report = build_job(job).run(progress=False)
    assert_accounting(report)
    got = pg_frame(pg_dsn, pg_schema, "b", order_by="id")
    assert got.equals(df.filter(pl.col("amount") > 0))
    assert report.rows_filtered == 500 - got.height


def test_postgres_source_errors_name_the_problem(pg_dsn, pg_schema):
    with pytest.raises(cb.ConfigError, match="exactly one of"):
        cb.scan_postgres(pg_dsn)
    with pytest.raises(cb.SourceError, match="describing its columns"):
        cb.scan_postgres(pg_dsn, "SELECT * FROM no_such_table_here")
    pg_query(pg_dsn, sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier(pg_schema, "z")))
    with pytest.raises(cb.ConfigError, match="`nope`"):
        cb.scan_postgres(pg_dsn, table="z", schema=pg_schema, partition_on="nope", partitions=2)


def test_postgres_source_numeric_nan_is_a_cast_reject_not_a_null(pg_dsn, pg_schema):
    pg_query(pg_dsn, sql.SQL("CREATE TABLE {} (id int, v numeric(8,3))").format(sql.Identifier(pg_schema, "nan")))
    pg_query(pg_dsn, sql.SQL("INSERT INTO {} VALUES (1, 1.5), (2, 'NaN'), (3, NULL), (4, -2.25)")
             .format(sql.Identifier(pg_schema, "nan")))
    report, got = _collect(cb.scan_postgres(pg_dsn, f'SELECT * FROM "{pg_schema}".nan ORDER BY id'),
                           max_error_rate=None)
    assert_accounting(report)
    assert got.schema["v"] == pl.Decimal(8, 3) and got["id"].to_list() == [1, 3, 4]
    assert report.rejects.select("_line", "_stage", "id").rows() == [(1, "cast", "2")]
