"""PostgreSQL sink against the real server: types, modes, exactly-once resume, bad rows, retries, identifiers."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import polars as pl
import pytest
from psycopg import sql

import colbatch as cb
from colbatch.config import build_job
from colbatch.pg import mask_dsn
from colbatch.pg.retry import is_data_error, is_transient
from tests.conftest import assert_accounting, make_frame
from tests.pg import pg_frame, pg_query


def _ident(schema: str, table: str) -> sql.Identifier:
    return sql.Identifier(schema, table)


def _count(dsn, schema, table) -> int:
    return pg_query(dsn, sql.SQL("SELECT count(*) FROM {}").format(_ident(schema, table)))[0][0]


ALL_TYPES = pl.DataFrame({
    "i8": pl.Series([1, None, -128], dtype=pl.Int8), "i16": pl.Series([1, None, -32768], dtype=pl.Int16),
    "i32": pl.Series([2**31 - 1, None, -5], dtype=pl.Int32), "i64": pl.Series([2**63 - 1, None, -(2**63)], dtype=pl.Int64),
    "u8": pl.Series([255, None, 0], dtype=pl.UInt8), "u16": pl.Series([65535, None, 0], dtype=pl.UInt16),
    "u32": pl.Series([2**32 - 1, None, 0], dtype=pl.UInt32), "u64": pl.Series([2**63 - 1, None, 0], dtype=pl.UInt64),
    "f32": pl.Series([1.5, None, float("inf")], dtype=pl.Float32), "f64": [1e-300, None, float("-inf")],
    "b": [True, None, False], "s": ["ü\"; DROP", None, ""], "cat": pl.Series(["a", None, "b"], dtype=pl.Categorical),
    "bin": [b"\x00\xff", None, b""], "d": [dt.date(2020, 2, 29), None, dt.date(1900, 1, 1)],
    "ts": [dt.datetime(2024, 1, 1, 1, 2, 3, 456789), None, dt.datetime(1970, 1, 1)],
    "tstz": pl.Series([dt.datetime(2024, 6, 1, 12), None, dt.datetime(1999, 12, 31, 23, 59, 59)]).dt.replace_time_zone("UTC"),
    "tm": [dt.time(23, 59, 59, 999999), None, dt.time(0)], "du": [dt.timedelta(days=2, microseconds=7), None, dt.timedelta(0)],
    "st": [{"x": 1, "y": "a"}, None, {"x": None, "y": "q\"uote"}], "li": [[1, 2], None, []],
    "dec": pl.Series([decimal.Decimal("-12345678901234567890.0123456789"), None, decimal.Decimal("0")],
                     dtype=pl.Decimal(38, 10)),
})


def test_postgres_sink_round_trips_every_supported_type(pg_dsn, pg_schema):
    report = cb.from_arrow(ALL_TYPES).sink_postgres(pg_dsn, "types", schema=pg_schema).run(progress=False)
    assert_accounting(report)
    assert report.rows_written == 3 and report.rows_rejected == 0
    got = pg_query(pg_dsn, sql.SQL("SELECT * FROM {} ORDER BY i8 NULLS LAST").format(_ident(pg_schema, "types")))
    rows = {c: [r[i] for r in got] for i, c in enumerate(ALL_TYPES.columns)}
    for col in ALL_TYPES.columns:
        want = ALL_TYPES[col].to_list()
        if col == "cat":
            want = ["a", None, "b"]
        want = [want[2], want[0], want[1]]  # ORDER BY i8 NULLS LAST puts the rows in order 2, 0, 1
        assert rows[col] == want, col


def test_postgres_sink_uint64_above_bigint_is_rejected_at_load(pg_dsn, pg_schema):
    df = pl.DataFrame({"u": pl.Series([1, 2**64 - 1], dtype=pl.UInt64)})
    report = cb.from_arrow(df).sink_postgres(pg_dsn, "u", schema=pg_schema).run(progress=False, max_error_rate=None)
    assert_accounting(report)
    assert report.rows_written == 1 and report.rows_rejected == 1
    assert report.rejects["_stage"].to_list() == ["load"] and "22003" in report.rejects["_reason"][0]


def test_postgres_create_refuses_an_existing_table(pg_dsn, pg_schema):
    df = make_frame(10)
    cb.from_arrow(df).sink_postgres(pg_dsn, "t", schema=pg_schema, mode="create").run(progress=False)
    with pytest.raises(cb.SinkError, match="already exists"):
        cb.from_arrow(df).sink_postgres(pg_dsn, "t", schema=pg_schema, mode="create").run(progress=False)
    assert _count(pg_dsn, pg_schema, "t") == 10


def test_postgres_append_adds_rows_and_checks_compatibility_naming_the_column(pg_dsn, pg_schema):
    df = make_frame(10)
    cb.from_arrow(df).sink_postgres(pg_dsn, "t", schema=pg_schema).run(progress=False)
    cb.from_arrow(df).sink_postgres(pg_dsn, "t", schema=pg_schema, mode="append").run(progress=False)
    assert _count(pg_dsn, pg_schema, "t") == 20
    bad = df.with_columns(pl.col("amount").cast(pl.String))
    with pytest.raises(cb.SchemaError, match="`amount`"):
        cb.from_arrow(bad).sink_postgres(pg_dsn, "t", schema=pg_schema).run(progress=False)
    with pytest.raises(cb.SchemaError, match="`extra`"):
        cb.from_arrow(df.with_columns(extra=pl.lit(1))).sink_postgres(pg_dsn, "t", schema=pg_schema).run(progress=False)
    assert _count(pg_dsn, pg_schema, "t") == 20


def test_postgres_append_casts_to_narrower_existing_columns(pg_dsn, pg_schema):
    pg_query(pg_dsn, sql.SQL("CREATE TABLE {} (id integer, amount real, type varchar(10))").format(_ident(pg_schema, "n")))
    report = cb.from_arrow(make_frame(50)).sink_postgres(pg_dsn, "n", schema=pg_schema).run(progress=False)
    assert report.rows_written == 50
    assert pg_query(pg_dsn, sql.SQL("SELECT sum(id) FROM {}").format(_ident(pg_schema, "n")))[0][0] == 1275


def test_postgres_replace_is_atomic_and_failed_replace_keeps_old_table(pg_dsn, pg_schema):
    cb.from_arrow(make_frame(10)).sink_postgres(pg_dsn, "t", schema=pg_schema).run(progress=False)
    df = make_frame(300)

    def failing():
        yield df.slice(0, 100)
        yield df.slice(100, 100)
        raise RuntimeError("source died")

    with pytest.raises(Exception, match="source died"):
        cb.from_batches(failing).sink_postgres(pg_dsn, "t", schema=pg_schema, mode="replace").run(progress=False)
    assert _count(pg_dsn, pg_schema, "t") == 10
    report = cb.from_arrow(df).sink_postgres(pg_dsn, "t", schema=pg_schema, mode="replace").run(progress=False,
                                                                                                batch_size=100)
    assert_accounting(report)
    assert _count(pg_dsn, pg_schema, "t") == 300
    tables = pg_query(pg_dsn, "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (pg_schema,))
    assert [t[0] for t in tables] == ["colbatch_ledger", "t"]


def test_postgres_upsert_updates_and_inserts_and_last_duplicate_wins(pg_dsn, pg_schema):
    base = pl.DataFrame({"id": [1, 2, 3], "v": ["a", "b", "c"]})
    cb.from_arrow(base).sink_postgres(pg_dsn, "u", schema=pg_schema, mode="create", key="id").run(progress=False)
    change = pl.DataFrame({"id": [2, 4, 4, 3], "v": ["B", "x", "D", "C"]})
    report = cb.from_arrow(change).sink_postgres(pg_dsn, "u", schema=pg_schema, mode="upsert", key="id").run(progress=False)
    assert_accounting(report)
    got = pg_frame(pg_dsn, pg_schema, "u", order_by="id")
    assert got.rows() == [(1, "a"), (2, "B"), (3, "C"), (4, "D")]


def test_postgres_upsert_isolates_rows_failing_in_the_merge(pg_dsn, pg_schema):
    pg_query(pg_dsn, sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, v text NOT NULL)").format(_ident(pg_schema, "u")))
    df = pl.DataFrame({"id": list(range(2000)), "v": ["ok"] * 2000}).with_columns(
        v=pl.when(pl.col("id") == 1234).then(None).otherwise(pl.col("v")))
    pipeline = cb.from_arrow(df).sink_postgres(pg_dsn, "u", schema=pg_schema, mode="upsert", key="id")
    report = pipeline.run(progress=False)
    assert_accounting(report)
    assert report.rows_written == 1999 and report.rejects["id"].to_list() == ["1234"]
    assert "23502" in report.rejects["_reason"][0]
    assert pipeline.sink.stats.attempts <= 30  # bisection of 2,000 rows: about 2 x log2(2000)


def test_postgres_one_bad_row_in_10k_is_isolated_in_few_round_trips(pg_dsn, pg_schema):
    pg_query(pg_dsn, sql.SQL("CREATE TABLE {} (id bigint, amount double precision CHECK (amount > -1000), "
                             "type text)").format(_ident(pg_schema, "c")))
    df = make_frame(10_000).with_columns(amount=pl.when(pl.col("id") == 7777).then(-5000.0).otherwise(pl.col("amount")))
    pipeline = cb.from_arrow(df).sink_postgres(pg_dsn, "c", schema=pg_schema)
    report = pipeline.run(progress=False, batch_size=10_000)
    assert_accounting(report)
    assert report.rows_written == 9_999 and report.rows_rejected == 1
    rej = report.rejects.row(0, named=True)
    assert rej["_stage"] == "load" and rej["id"] == "7777" and rej["_line"] == 7776
    assert "SQLSTATE 23514" in rej["_reason"] and "check constraint" in rej["_reason"]
    assert pipeline.sink.stats.statements <= 30, pipeline.sink.stats
    ids = pg_query(pg_dsn, sql.SQL("SELECT count(DISTINCT id), max(id) FROM {}").format(_ident(pg_schema, "c")))[0]
    assert ids == (9_999, 10_000)


def test_postgres_sparse_bad_rows_are_all_isolated(pg_dsn, pg_schema):
    pg_query(pg_dsn, sql.SQL("CREATE TABLE {} (id bigint UNIQUE, amount double precision CHECK (amount > -1000), "
                             "type text NOT NULL)").format(_ident(pg_schema, "c")))
    df = make_frame(20_000).with_columns(
        amount=pl.when(pl.col("id") % 997 == 0).then(-5000.0).otherwise(pl.col("amount")),
        type=pl.when(pl.col("id") % 1999 == 0).then(None).otherwise(pl.col("type")))
    report = cb.from_arrow(df).sink_postgres(pg_dsn, "c", schema=pg_schema).run(progress=False, batch_size=5000)
    assert_accounting(report)
    bad = df.filter((pl.col("id") % 997 == 0) | (pl.col("id") % 1999 == 0))["id"].to_list()
    assert sorted(int(i) for i in report.rejects["id"]) == bad
    assert _count(pg_dsn, pg_schema, "c") == 20_000 - len(bad)


def test_encoded_rows_payload_spans_chunks_byte_for_byte():
    from colbatch.pg.copy import EncodedRows, conform
    from colbatch.pg.types import check_compatible, pg_type_for

    df = make_frame(1000).with_columns(type=pl.when(pl.col("id") % 7 == 0).then(None).otherwise(pl.col("type")))
    typnames = {c: pg_type_for(c, d) for c, d in df.schema.items()}
    found = check_compatible(df.schema, typnames, target="t")
    types = [found[c] for c in df.columns]
    cast, _ = conform(df, types)
    whole = EncodedRows(cast, types, list(typnames.values()), chunk_rows=10_000)
    chunked = EncodedRows(cast, types, list(typnames.values()), chunk_rows=64)
    for lo, hi in [(0, 1000), (0, 64), (63, 65), (100, 900), (999, 1000), (640, 640)]:
        assert b"".join(chunked.payload(lo, hi)) == b"".join(whole.payload(lo, hi)), (lo, hi)
    assert len(list(chunked.payload(0, 1000))) == 16  # one slice per chunk spanned
    rows = [b"".join(whole.payload(i, i + 1)) for i in range(1000)]
    assert all(r[:2] == df.width.to_bytes(2, "big") for r in rows)  # every row starts with its field count
    assert b"".join(rows) == b"".join(whole.payload(0, 1000))


def test_postgres_bad_rows_across_encoding_chunks_are_all_isolated(pg_dsn, pg_schema, monkeypatch):
    import colbatch.pg.copy

    monkeypatch.setattr(colbatch.pg.copy, "CHUNK_ROWS", 700)  # units of 5,000 rows span 8 chunks
    pg_query(pg_dsn, sql.SQL("CREATE TABLE {} (id bigint UNIQUE, amount double precision CHECK (amount > -1000), "
                             "type text NOT NULL)").format(_ident(pg_schema, "c")))
    df = make_frame(20_000).with_columns(
        amount=pl.when((pl.col("id") % 701 == 0) | (pl.col("id") == 1400)).then(-5000.0).otherwise(pl.col("amount")))
    report = cb.from_arrow(df).sink_postgres(pg_dsn, "c", schema=pg_schema).run(progress=False, batch_size=5000)
    assert_accounting(report)
    bad = df.filter((pl.col("id") % 701 == 0) | (pl.col("id") == 1400))["id"].to_list()
    assert sorted(int(i) for i in report.rejects["id"]) == bad
    loaded = pg_frame(pg_dsn, pg_schema, "c", order_by="id")["id"].to_list()
    assert loaded == [i for i in df["id"].to_list() if i not in set(bad)]


def test_postgres_resume_skips_committed_units_and_refuses_a_changed_job(pg_dsn, pg_schema):
    df = make_frame(1000)
    calls = {"n": 0}

    def flaky():
        for start in range(0, 1000, 100):
            if start == 500 and calls["n"] == 0:
                calls["n"] += 1
                raise RuntimeError("crash")
            yield df.slice(start, 100)

    pipeline = cb.from_batches(flaky, name="flaky").sink_postgres(pg_dsn, "r", schema=pg_schema)
    with pytest.raises(RuntimeError):
        pipeline.run(progress=False, batch_size=100)
    done = _count(pg_dsn, pg_schema, "r")  # units queued behind the failure may or may not be committed
    assert 0 <= done <= 500 and done % 100 == 0
    with pytest.raises(cb.CheckpointError, match="different job definition"):
        pipeline.filter(pl.col("id") > 0).run(progress=False, batch_size=100, resume=True)
    report = pipeline.run(progress=False, batch_size=100, resume=True)
    assert_accounting(report)
    assert report.rows_resumed == done and report.rows_written == 1000 - done
    got = pg_frame(pg_dsn, pg_schema, "r", order_by="id")
    assert got["id"].to_list() == list(range(1, 1001))
    again = pipeline.run(progress=False, batch_size=100, resume=True)
    assert again.rows_written == 0 and _count(pg_dsn, pg_schema, "r") == 1000


CHILD = textwrap.dedent("""
    import sys, polars as pl, colbatch as cb
    dsn, schema, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    df = pl.DataFrame({"id": pl.int_range(0, n, eager=True), "v": pl.int_range(0, n, eager=True).cast(pl.String)})
    pipeline = cb.from_batches(lambda: (df.slice(s, 5000) for s in range(0, n, 5000)), name="kill-test")
    pipeline.sink_postgres(dsn, "k", schema=schema).run(progress=False, batch_size=5000, resume="--resume" in sys.argv)
""")


def test_postgres_sigkill_mid_load_then_resume_gives_every_row_once(pg_dsn, pg_schema, tmp_path):
    n = 400_000
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + str(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))}
    child = subprocess.Popen([sys.executable, str(script), pg_dsn, pg_schema, str(n)], env=env)
    ledger = sql.SQL("SELECT count(*) FROM {} WHERE row_count > 0").format(_ident(pg_schema, "colbatch_ledger"))
    units = 0
    try:
        while child.poll() is None and units < 5:
            try:
                units = pg_query(pg_dsn, ledger)[0][0]
            except Exception:  # the ledger table does not exist yet
                units = 0
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the load finished before it could be killed"
    before = _count(pg_dsn, pg_schema, "k")
    assert 0 < before < n and before % 5000 == 0  # only whole units are visible
    subprocess.run([sys.executable, str(script), pg_dsn, pg_schema, str(n), "--resume"], env=env, check=True)
    stats = pg_query(pg_dsn, sql.SQL("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM {}").format(
        _ident(pg_schema, "k")))[0]
    assert stats == (n, n, 0, n - 1)
    assert pg_query(pg_dsn, ledger)[0][0] == n // 5000


def test_postgres_terminated_connection_is_retried_without_duplicates(pg_dsn, pg_schema):
    df = make_frame(2000)
    holder = {}

    def batches():
        for i, start in enumerate(range(0, 2000, 200)):
            if i == 4:  # the sink has committed units by now: kill its backend between or during units
                pid = holder["sink"]._conn.info.backend_pid
                pg_query(pg_dsn, "SELECT pg_terminate_backend(%s)", (pid,))
            yield df.slice(start, 200)

    pipeline = cb.from_batches(batches, name="terminate").sink_postgres(pg_dsn, "t", schema=pg_schema, backoff_s=0.01)
    holder["sink"] = pipeline.sink
    report = pipeline.with_options(queue_items=1).run(progress=False, batch_size=200)
    assert_accounting(report)
    assert pipeline.sink.reconnects >= 1
    got = pg_frame(pg_dsn, pg_schema, "t", order_by="id")
    assert got["id"].to_list() == list(range(1, 2001))


def test_postgres_parallel_streams_load_every_unit_once_in_order(pg_dsn, pg_schema):
    df = make_frame(20_000).with_columns(amount=pl.when(pl.col("id") % 1999 == 0).then(-5000.0)
                                         .otherwise(pl.col("amount")))
    pg_query(pg_dsn, sql.SQL("CREATE TABLE {} (id bigint, amount double precision CHECK (amount > -1000), "
                             "type text)").format(_ident(pg_schema, "p")))
    pipeline = cb.from_arrow(df).sink_postgres(pg_dsn, "p", schema=pg_schema)
    report = pipeline.run(progress=False, batch_size=1000)
    assert_accounting(report)
    assert pipeline.sink.streams == 2  # no unique index, no trigger: two COPY streams
    assert report.rejects["id"].cast(pl.Int64).to_list() == list(range(1999, 20_001, 1999))
    assert pg_frame(pg_dsn, pg_schema, "p", order_by="id")["id"].to_list() == [
        i for i in range(1, 20_001) if i % 1999]
    ledger = pg_query(pg_dsn, sql.SQL("SELECT count(*), sum(row_count) FROM {} WHERE first_row >= 0 AND NOT complete")
                      .format(_ident(pg_schema, "colbatch_ledger")))[0]
    assert ledger == (20, 20_000)


@pytest.mark.parametrize("ddl, why", [("id bigint PRIMARY KEY, amount float8, type text", "unique"),
                                      ("id bigint, amount float8, type text, EXCLUDE (id WITH =)", "exclusion")])
def test_postgres_tables_where_units_could_wait_on_each_other_load_on_one_stream(pg_dsn, pg_schema, ddl, why):
    pg_query(pg_dsn, sql.SQL("CREATE TABLE {} (" + ddl + ")").format(_ident(pg_schema, "one")))
    pipeline = cb.from_arrow(make_frame(3000)).sink_postgres(pg_dsn, "one", schema=pg_schema)
    report = pipeline.run(progress=False, batch_size=1000)
    assert report.rows_written == 3000 and pipeline.sink.streams == 1, why
    upsert = cb.from_arrow(make_frame(3000)).sink_postgres(pg_dsn, "one", schema=pg_schema, mode="upsert", key="id")
    if why == "unique":
        upsert.run(progress=False, batch_size=1000)
        assert upsert.sink.streams == 1
    single = cb.from_arrow(make_frame(3000)).sink_postgres(pg_dsn, "plain", schema=pg_schema, streams=1)
    single.run(progress=False, batch_size=1000)
    assert single.sink.streams == 1 and _count(pg_dsn, pg_schema, "plain") == 3000
    with pytest.raises(cb.ConfigError, match="streams"):
        cb.from_arrow(make_frame(1)).sink_postgres(pg_dsn, "plain", schema=pg_schema, streams=0)


def test_postgres_a_failed_unit_on_parallel_streams_leaves_a_prefix_and_resumes_exactly(pg_dsn, pg_schema,
                                                                                      monkeypatch):
    from colbatch.pg.isolate import IsolatingLoader

    load = IsolatingLoader.load
    calls = {"n": 0, "fail": True}

    def failing_load(self, cur, rows, pieces=None):
        calls["n"] += 1
        if calls["fail"] and calls["n"] == 6:
            raise RuntimeError("the sixth unit breaks")
        return load(self, cur, rows, pieces)

    monkeypatch.setattr(IsolatingLoader, "load", failing_load)
    df = make_frame(10_000)
    pipeline = cb.from_arrow(df).sink_postgres(pg_dsn, "f", schema=pg_schema)
    with pytest.raises(cb.ColbatchError):
        pipeline.run(progress=False, batch_size=1000)
    assert pipeline.sink.streams == 2
    ids = pg_frame(pg_dsn, pg_schema, "f", order_by="id")["id"].to_list()
    assert ids == list(range(1, len(ids) + 1)) and len(ids) % 1000 == 0 and len(ids) <= 5000  # a prefix of units
    calls["fail"] = False
    report = cb.from_arrow(df).sink_postgres(pg_dsn, "f", schema=pg_schema).run(progress=False, batch_size=1000,
                                                                                 resume=True)
    assert report.succeeded and report.rows_resumed == len(ids)
    assert pg_frame(pg_dsn, pg_schema, "f", order_by="id")["id"].to_list() == list(range(1, 10_001))


def test_postgres_terminated_stream_connections_are_retried_without_duplicates(pg_dsn, pg_schema):
    df = make_frame(4000)
    holder = {}

    def batches():
        for i, start in enumerate(range(0, 4000, 200)):
            if i == 6:  # units are in flight on both streams: end every session of the load but the lock's
                lock = holder["sink"]._lock_conn.info.backend_pid
                pg_query(pg_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE application_name = 'colbatch' AND pid <> %s", (lock,))
            yield df.slice(start, 200)

    pipeline = cb.from_batches(batches, name="streams").sink_postgres(pg_dsn, "t", schema=pg_schema, backoff_s=0.01)
    holder["sink"] = pipeline.sink
    report = pipeline.run(progress=False, batch_size=200)
    assert_accounting(report)
    assert pipeline.sink.streams == 2 and pipeline.sink.reconnects >= 1
    assert pg_frame(pg_dsn, pg_schema, "t", order_by="id")["id"].to_list() == list(range(1, 4001))


def test_postgres_errors_are_classified_for_retry():
    import psycopg

    assert is_transient(psycopg.errors.AdminShutdown("x")) and is_transient(psycopg.errors.SerializationFailure("x"))
    assert is_transient(psycopg.errors.DeadlockDetected("x")) and is_transient(psycopg.OperationalError("lost"))
    assert not is_transient(psycopg.errors.CheckViolation("x")) and is_data_error(psycopg.errors.CheckViolation("x"))
    assert is_data_error(psycopg.errors.NumericValueOutOfRange("x")) and not is_data_error(psycopg.errors.SyntaxError("x"))


HOSTILE = ['a"; DROP TABLE sentinel;--', "with space", "ünïcødé ☃", "select", "Mixed\"Case", "x" * 63]


@pytest.mark.parametrize("name", HOSTILE)
def test_postgres_hostile_identifiers_round_trip_and_sentinel_survives(pg_dsn, pg_schema, name):
    pg_query(pg_dsn, sql.SQL("CREATE TABLE {} (x int)").format(_ident(pg_schema, "sentinel")))
    df = pl.DataFrame({name: [1, 2], "ok": ["a", "b"]})
    report = cb.from_arrow(df).sink_postgres(pg_dsn, name, schema=pg_schema, mode="create", key=name).run(progress=False)
    assert report.rows_written == 2
    got = pg_frame(pg_dsn, pg_schema, name, order_by=name)
    assert got.columns == [name, "ok"] and got[name].to_list() == [1, 2]
    back = cb.scan_postgres(pg_dsn, table=name, schema=pg_schema, partition_on=name, partitions=2)
    out = back.foreach_batch(lambda d: None).run(progress=False)
    assert out.rows_read == 2
    assert _count(pg_dsn, pg_schema, "sentinel") == 0


def test_postgres_identifier_over_63_bytes_fails_clearly(pg_dsn):
    with pytest.raises(cb.ConfigError, match="at most 63 bytes"):
        cb.from_arrow(make_frame(1)).sink_postgres(pg_dsn, "é" * 32)
    with pytest.raises(cb.ConfigError, match="at most 63 bytes"):
        cb.from_arrow(pl.DataFrame({"y" * 64: [1]})).sink_postgres(pg_dsn, "t").run(progress=False)


def test_postgres_password_never_appears_in_outputs(pg_dsn, pg_schema, tmp_path, caplog):
    canary = "CanaryPw-7f3a"
    base = pg_dsn.split("://", 1)[1].split("@", 1)
    dsn = f"postgresql://{base[0].split(':')[0]}:{canary}@{base[1]}"
    assert canary not in mask_dsn(dsn) and canary not in mask_dsn(f"host=x password={canary} user=y")
    pg_query(pg_dsn, sql.SQL("CREATE TABLE {} (id bigint, amount double precision CHECK (amount > 0), type text)")
             .format(_ident(pg_schema, "p")))
    caplog.set_level(logging.DEBUG)
    pipeline = cb.from_arrow(make_frame(200)).sink_postgres(dsn, "p", schema=pg_schema).sink_rejects(tmp_path / "rej.csv")
    report = pipeline.run(progress=False, max_error_rate=None)
    assert report.rows_rejected > 0
    texts = [repr(pipeline.sink), pipeline.sink.describe(), json.dumps(report.to_dict(), default=str),
             (tmp_path / "rej.csv").read_text(), caplog.text, str(report)]
    bad_port = dsn.replace(":5432", ":1")
    with pytest.raises(cb.ColbatchError) as err:
        cb.from_arrow(make_frame(1)).sink_postgres(bad_port, "p", retries=0).run(progress=False)
    texts.append(str(err.value))
    with pytest.raises(cb.ColbatchError) as err2:
        cb.scan_postgres(dsn, "SELECT nonsense FROM nowhere")
    texts.append(str(err2.value))
    for text in texts:
        assert canary not in text
    rows = pg_query(pg_dsn, sql.SQL("SELECT * FROM {}").format(_ident(pg_schema, "colbatch_ledger")))
    assert canary not in repr(rows)


def test_postgres_job_file_sink(pg_dsn, pg_schema, tmp_path):
    p = tmp_path / "in.csv"
    make_frame(100).write_csv(p)
    job = {"source": {"path": str(p)}, "sink": {"path": pg_dsn, "table": "j", "schema": pg_schema, "mode": "upsert",
                                                 "key": "id"}}
    report = build_job(job).run(progress=False)
    report2 = build_job(job).run(progress=False, overwrite=True)
    assert report.rows_written == report2.rows_written == 100
    assert _count(pg_dsn, pg_schema, "j") == 100
    with pytest.raises(cb.ConfigError, match="needs a `table`"):
        build_job({"source": {"path": str(p)}, "sink": {"path": pg_dsn}})
    with pytest.raises(cb.ConfigError, match="`mode`"):
        build_job({"source": {"path": str(p)}, "sink": {"path": pg_dsn, "table": "j", "mode": "merge"}})


def _check_table(dsn, schema, name="c"):
    pg_query(dsn, sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, amount double precision CHECK (amount > -1000), "
                          "type text)").format(_ident(schema, name)))


def test_postgres_load_reject_lines_are_source_lines_after_filter_and_validate(pg_dsn, pg_schema, tmp_path):
    _check_table(pg_dsn, pg_schema)
    df = make_frame(3000).with_columns(amount=pl.when(pl.col("id").is_in([1500, 2999])).then(-5000.0)
                                       .otherwise(pl.col("amount")))
    path = tmp_path / "in.csv"
    df.write_csv(path)  # header on line 1: id N is on line N + 1
    pipeline = (cb.scan_csv(path, schema={"id": "int64", "amount": "float64", "type": "str"})
                .filter(pl.col("id") % 3 != 1)                          # drops ids 1, 4, 7, ... before the sink
                .validate(pl.col("id") != 1001, name="not_1001")        # and rejects id 1001
                .sink_postgres(pg_dsn, "c", schema=pg_schema))
    report = pipeline.run(progress=False, batch_size=1000)
    assert_accounting(report)
    rej = report.rejects.sort("_line")
    assert rej.select("id", "_line", "_stage").rows() == [("1001", 1002, "validate"), ("1500", 1501, "load"),
                                                          ("2999", 3000, "load")]
    assert rej["_source"].to_list() == [str(path)] * 3
    assert all("SQLSTATE 23514" in r for r in rej.filter(pl.col("_stage") == "load")["_reason"])
    assert report.rows_filtered == 1000 and report.rows_written == 1997


def _double(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(amount=pl.col("amount") * 2)


def test_postgres_load_reject_lines_survive_a_filter_then_a_udf(pg_dsn, pg_schema, tmp_path):
    _check_table(pg_dsn, pg_schema)
    df = make_frame(500).with_columns(amount=pl.when(pl.col("id") == 400).then(-5000.0).otherwise(pl.col("amount")))
    path = tmp_path / "in.csv"
    df.write_csv(path)
    report = (cb.scan_csv(path, schema={"id": "int64", "amount": "float64", "type": "str"})
              .filter(pl.col("id") > 100)
              .map_batches(_double)
              .sink_postgres(pg_dsn, "c", schema=pg_schema).run(progress=False))
    assert_accounting(report)
    assert report.rejects.select("id", "_line", "_stage").rows() == [("400", 401, "load")]


def test_postgres_screen_sends_suspects_apart_and_the_server_judges_them(pg_dsn, pg_schema):
    pg_query(pg_dsn, sql.SQL("CREATE TABLE {} (id bigint, code varchar(3) NOT NULL, amount numeric(5,2) "
                             "CHECK (amount <> 13))").format(_ident(pg_schema, "s")))
    n = 5000
    bad = {100: ("abc", 1000), 200: (None, 1), 300: ("abcd", 1), 400: ("ab", 13)}
    codes = [bad.get(i, ("x", 1))[0] for i in range(n)]
    codes[500] = "ab   "  # longer than 3, but PostgreSQL drops trailing spaces: a suspect that loads
    df = pl.DataFrame({"id": range(n), "code": codes,
                       "amount": pl.Series([bad.get(i, ("", 1))[1] for i in range(n)]).cast(pl.Decimal(10, 2))})
    pipeline = cb.from_arrow(df).sink_postgres(pg_dsn, "s", schema=pg_schema)
    report = pipeline.run(progress=False, batch_size=n)
    assert_accounting(report)
    states = dict(zip((int(i) for i in report.rejects["id"]), report.rejects["_reason"]))
    assert sorted(states) == [100, 200, 300, 400]
    assert states[100].startswith("SQLSTATE 22003") and states[200].startswith("SQLSTATE 23502")
    assert states[300].startswith("SQLSTATE 22001") and states[400].startswith("SQLSTATE 23514")
    assert "check constraint" in states[400]
    assert pipeline.sink.stats.suspects == 5 and pipeline.sink.stats.attempts <= 7, pipeline.sink.stats
    assert pg_query(pg_dsn, sql.SQL("SELECT code FROM {} WHERE id = 500").format(_ident(pg_schema, "s"))) == [("ab ",)]
    assert _count(pg_dsn, pg_schema, "s") == n - 4


def test_postgres_errors_the_screen_cannot_see_are_isolated_by_the_server_line(pg_dsn, pg_schema):
    # A duplicate key and a CHECK that DuckDB cannot evaluate (num_nonnulls) are found by COPY itself.
    pg_query(pg_dsn, sql.SQL("CREATE TABLE {} (id bigint UNIQUE, a int, b int CHECK (num_nonnulls(a, b) > 0))")
             .format(_ident(pg_schema, "u")))
    df = pl.DataFrame({"id": pl.int_range(0, 10_000, eager=True), "a": pl.Series([1] * 10_000),
                       "b": pl.Series([1] * 10_000)})
    df = df.with_columns(id=pl.when(pl.col("id") == 6000).then(10).otherwise(pl.col("id")),
                         a=pl.when(pl.col("id") == 8000).then(None).otherwise(pl.col("a")),
                         b=pl.when(pl.col("id") == 8000).then(None).otherwise(pl.col("b")))
    pipeline = cb.from_arrow(df).sink_postgres(pg_dsn, "u", schema=pg_schema)
    report = pipeline.run(progress=False, batch_size=10_000)
    assert_accounting(report)
    reasons = dict(zip(report.rejects["_line"].to_list(), report.rejects["_reason"]))
    assert sorted(reasons) == [6000, 8000]  # row indices of an in-memory source
    assert reasons[6000].startswith("SQLSTATE 23505") and reasons[8000].startswith("SQLSTATE 23514")
    assert pipeline.sink.stats.suspects == 0 and pipeline.sink.stats.statements <= 30, pipeline.sink.stats


def test_postgres_decimal_round_trips_through_numeric(pg_dsn, pg_schema):
    values = [decimal.Decimal(v) for v in ("-98765432109876543210.1234567890", "0", "1E-10", "-0.0000000001",
                                           "12345678901234567890123456.7")] + [None]
    df = pl.DataFrame({"id": range(6), "d": pl.Series(values, dtype=pl.Decimal(38, 10)),
                       "small": pl.Series([decimal.Decimal("-1.5"), None, decimal.Decimal("0"), decimal.Decimal("99.99"),
                                           decimal.Decimal("0.01"), decimal.Decimal("-99.99")], dtype=pl.Decimal(4, 2))})
    report = cb.from_arrow(df).sink_postgres(pg_dsn, "n", schema=pg_schema, mode="create").run(progress=False)
    assert report.rows_written == 6 and report.rows_rejected == 0
    types = pg_query(pg_dsn, "SELECT column_name, numeric_precision, numeric_scale FROM information_schema.columns "
                             "WHERE table_schema = %s AND table_name = 'n' AND data_type = 'numeric' ORDER BY 1",
                     (pg_schema,))
    assert types == [("d", 38, 10), ("small", 4, 2)]
    got = pg_query(pg_dsn, sql.SQL("SELECT d, small FROM {} ORDER BY id").format(_ident(pg_schema, "n")))
    assert [r[0] for r in got] == values and [r[1] for r in got] == df["small"].to_list()
    back = []
    cb.scan_postgres(pg_dsn, table="n", schema=pg_schema).foreach_batch(back.append).run(progress=False)
    back_df = pl.concat(back).sort("id")
    assert back_df.schema == df.schema and back_df.equals(df)


def test_postgres_decimal_and_integers_into_an_existing_numeric_column(pg_dsn, pg_schema):
    pg_query(pg_dsn, sql.SQL("CREATE TABLE {} (k numeric, v numeric(6,2))").format(_ident(pg_schema, "e")))
    df = pl.DataFrame({"k": pl.Series([2**63 - 1, -1, None], dtype=pl.Int64),
                       "v": pl.Series(["1234.5", "12345.67", "-0.004"]).cast(pl.Decimal(12, 3))})
    report = cb.from_arrow(df).sink_postgres(pg_dsn, "e", schema=pg_schema).run(progress=False, max_error_rate=None)
    assert_accounting(report)
    assert report.rows_rejected == 1 and report.rejects["_reason"][0].startswith("SQLSTATE 22003")
    got = pg_query(pg_dsn, sql.SQL("SELECT k, v FROM {} ORDER BY k NULLS LAST").format(_ident(pg_schema, "e")))
    assert got == [(decimal.Decimal(2**63 - 1), decimal.Decimal("1234.50")), (None, decimal.Decimal("0.00"))]
    assert report.rejects["k"].to_list() == ["-1"]
    with pytest.raises(cb.SchemaError, match="`v`"):
        cb.from_arrow(pl.DataFrame({"v": [1.5]})).sink_postgres(pg_dsn, "e", schema=pg_schema).run(progress=False)


def test_postgres_finished_job_is_a_no_op_unless_overwrite(pg_dsn, pg_schema, tmp_path):
    path = tmp_path / "in.csv"
    make_frame(100).write_csv(path)
    for mode, after_overwrite in (("append", 200), ("replace", 100)):
        table = f"f_{mode}"
        pipeline = cb.scan_csv(path).sink_postgres(pg_dsn, table, schema=pg_schema, mode=mode)
        first = pipeline.run(progress=False)
        assert first.rows_written == 100 and not first.skipped
        again = pipeline.run(progress=False)
        assert again.skipped and again.rows_written == 0 and "already holds" in again.warnings[0]
        assert pipeline.run(progress=False, resume=True).skipped
        assert _count(pg_dsn, pg_schema, table) == 100
        forced = pipeline.run(progress=False, overwrite=True)
        assert forced.rows_written == 100 and not forced.skipped
        assert _count(pg_dsn, pg_schema, table) == after_overwrite
    # A changed job is not "finished": it runs.
    changed = cb.scan_csv(path).filter(pl.col("id") > 50).sink_postgres(pg_dsn, "f_append", schema=pg_schema)
    assert changed.run(progress=False).rows_written == 50 and _count(pg_dsn, pg_schema, "f_append") == 250


def test_postgres_second_run_on_a_locked_table_fails_at_once(pg_dsn, pg_schema):
    df = make_frame(600)
    seen = {}

    def batches():
        yield df.slice(0, 200)
        # The first run holds the table now: a second run against it must fail at once.
        second = cb.from_arrow(df).sink_postgres(pg_dsn, "l", schema=pg_schema)
        with pytest.raises(cb.CheckpointError, match="locked by another running job") as err:
            second.run(progress=False)
        seen["error"] = str(err.value)
        # Another table is not locked.
        assert cb.from_arrow(df).sink_postgres(pg_dsn, "other", schema=pg_schema).run(progress=False).rows_written == 600
        yield df.slice(200, 400)

    report = cb.from_batches(batches, name="locker").sink_postgres(pg_dsn, "l", schema=pg_schema).run(progress=False)
    assert report.rows_written == 600 and "`" + pg_schema + ".l`" in seen["error"]
    assert _count(pg_dsn, pg_schema, "l") == 600
    # Released at the end of the run, and after a failed one.
    assert cb.from_arrow(df).sink_postgres(pg_dsn, "l", schema=pg_schema).run(progress=False).rows_written == 600

    def failing():
        yield df.slice(0, 100)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        cb.from_batches(failing, name="dies").sink_postgres(pg_dsn, "l", schema=pg_schema).run(progress=False)
    assert cb.from_arrow(df).sink_postgres(pg_dsn, "l", schema=pg_schema).run(progress=False).rows_written == 600


def _rejects_table(dsn, schema, name):
    pg_query(dsn, sql.SQL("CREATE TABLE {} (id bigint, amount double precision, type text, "
                          "CONSTRAINT not_97 CHECK (id % 97 <> 0))").format(_ident(schema, name)))


def test_postgres_load_rejects_are_cut_into_parts_named_by_the_units_ledger_rows(pg_dsn, pg_schema, tmp_path):
    _rejects_table(pg_dsn, pg_schema, "d")
    df = make_frame(2000)
    rejects = tmp_path / "rejects.parquet"
    pipeline = (cb.from_batches(lambda: (df.slice(s, 200) for s in range(0, 2000, 200)), name="durable")
                .validate(pl.col("id") % 250 != 1, name="not_1")
                .sink_postgres(pg_dsn, "d", schema=pg_schema).sink_rejects(rejects))
    report = pipeline.run(progress=False, batch_size=200)
    assert_accounting(report)
    got = pl.read_parquet(rejects).sort("_line")
    assert got.filter(pl.col("_stage") == "load")["id"].to_list() == [str(i) for i in range(97, 2001, 97)]
    assert got.filter(pl.col("_stage") == "validate")["id"].to_list() == [str(i) for i in range(1, 2001, 250)]
    assert all("SQLSTATE 23514" in r for r in got.filter(pl.col("_stage") == "load")["_reason"])
    assert report.rows_rejected == got.height == 20 + 8 and report.rejects_by_stage == {"load": 20, "validate": 8}
    ledger = _ident(pg_schema, "colbatch_ledger")
    units = pg_query(pg_dsn, sql.SQL("SELECT first_row, rows_rejected, rejects FROM {} WHERE first_row >= 0 "
                                     "AND row_count > 0 ORDER BY first_row").format(ledger))
    assert len(units) == 10 and all(name is not None for _, _, name in units)  # every unit here has rejects
    assert [n for _, n, _ in units] == [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]  # load rejects per unit (97, 194, ...)
    assert not any(p.name.endswith(".colbatch-parts") for p in tmp_path.iterdir())  # merged, then removed


def test_postgres_unit_retried_after_its_rejects_part_was_cut_keeps_each_reject_once(
        pg_dsn, pg_schema, tmp_path, monkeypatch):
    from colbatch.pg.ledger import PgLedger

    _rejects_table(pg_dsn, pg_schema, "r")
    df = make_frame(2000)
    record = PgLedger.record
    terminated = []

    def record_after_losing_the_connection(self, cur, *args, **kwargs):
        # The unit's part is published by now; the server ends the session before the ledger row is written.
        if kwargs.get("rejects") and not terminated:
            pid = cur.connection.info.backend_pid
            terminated.append(pg_query(pg_dsn, "SELECT pg_terminate_backend(%s)", (pid,)))
        return record(self, cur, *args, **kwargs)

    monkeypatch.setattr(PgLedger, "record", record_after_losing_the_connection)
    rejects = tmp_path / "rejects.parquet"
    pipeline = (cb.from_batches(lambda: (df.slice(s, 500) for s in range(0, 2000, 500)), name="retried")
                .sink_postgres(pg_dsn, "r", schema=pg_schema, backoff_s=0.01).sink_rejects(rejects))
    report = pipeline.run(progress=False, batch_size=500)
    assert_accounting(report)
    assert terminated and pipeline.sink.reconnects >= 1
    assert sorted(pl.read_parquet(rejects)["id"].cast(pl.Int64).to_list()) == list(range(97, 2001, 97))
    assert report.rows_rejected == 20 and _count(pg_dsn, pg_schema, "r") == 2000 - 20


def test_postgres_ledger_of_an_older_version_gains_the_rejects_column_and_resumes(pg_dsn, pg_schema):
    df = make_frame(1000)
    fail = {"on": True}

    def batches():
        for start in range(0, 1000, 100):
            if start == 500 and fail["on"]:
                raise RuntimeError("crash")
            yield df.slice(start, 100)

    pipeline = cb.from_batches(batches, name="old-ledger").sink_postgres(pg_dsn, "o", schema=pg_schema)
    with pytest.raises(RuntimeError):
        pipeline.run(progress=False, batch_size=100)
    ledger = _ident(pg_schema, "colbatch_ledger")
    # The ledger as an older version left it: no `rejects` column.
    pg_query(pg_dsn, sql.SQL("ALTER TABLE {} DROP COLUMN rejects").format(ledger))
    done = _count(pg_dsn, pg_schema, "o")
    assert done > 0
    fail["on"] = False
    report = pipeline.run(progress=False, batch_size=100, resume=True)
    assert report.rows_resumed == done and report.rows_written == 1000 - done
    assert pg_frame(pg_dsn, pg_schema, "o", order_by="id")["id"].to_list() == list(range(1, 1001))
    columns = pg_query(pg_dsn, "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND "
                               "table_name = 'colbatch_ledger' AND column_name = 'rejects'", (pg_schema,))
    assert columns == [("rejects",)]
