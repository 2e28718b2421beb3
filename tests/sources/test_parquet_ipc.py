"""Parquet and Arrow IPC sources: corrupt files fail naming the file; schemas unify by name."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

import colbatch as cb
from tests.conftest import assert_accounting, make_frame


def collect(pipeline: cb.Pipeline, **run) -> tuple[cb.Report, pl.DataFrame]:
    got: list[pl.DataFrame] = []
    report = pipeline.foreach_batch(got.append, retries=0).run(progress=False, max_error_rate=None, **run)
    assert_accounting(report)
    return report, (pl.concat(got) if got else pl.DataFrame())


def _write_ipc(path, table: pa.Table) -> None:
    with ipc.new_file(str(path), table.schema) as w:
        w.write_table(table)


@pytest.fixture
def big_parquet(tmp_path):
    df = make_frame(20_000)
    p = tmp_path / "big.parquet"
    pq.write_table(df.to_arrow(), p, row_group_size=2_000)
    return p, df


def test_parquet_reads_all_row_groups(big_parquet):
    p, df = big_parquet
    report, out = collect(cb.scan_parquet(p), batch_size=1_500)
    assert out.equals(df)
    assert report.rows_read == 20_000


def test_truncated_parquet_fails_naming_file(big_parquet, tmp_path):
    p, _ = big_parquet
    bad = tmp_path / "truncated.parquet"
    bad.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(cb.SourceError, match="truncated.parquet"):
        collect(cb.scan_parquet(bad))


def test_parquet_with_corrupt_data_pages_fails_naming_file(big_parquet, tmp_path):
    p, _ = big_parquet
    data = bytearray(p.read_bytes())
    # keep the footer intact (schema readable), scramble the column chunks in the middle
    for i in range(200, len(data) - 4096, 7):
        data[i] ^= 0xFF
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(bytes(data))
    with pytest.raises(cb.SourceError, match="corrupt.parquet"):
        collect(cb.scan_parquet(bad))


def test_not_a_parquet_file_fails_naming_file(write):
    p = write("garbage.parquet", b"this is not parquet at all")
    with pytest.raises(cb.SourceError, match="garbage.parquet"):
        cb.scan_parquet(p)


def test_parquet_schema_drift_across_dir(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "a": ["x", "y"]}), d / "p1.parquet")
    pq.write_table(pa.table({"b": [True], "id": [3]}), d / "p2.parquet")
    report, out = collect(cb.scan_parquet(d))
    assert out.columns == ["id", "a", "b"]
    assert out.rows() == [(1, "x", None), (2, "y", None), (3, None, True)]
    assert any("schema drift" in w for w in report.warnings)


def test_parquet_declared_schema_rejects_with_stage_cast(tmp_path):
    p = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": ["1", "x", "3"]}), p)
    report, out = collect(cb.scan_parquet(p, schema={"id": "int64"}))
    assert out["id"].to_list() == [1, 3]
    assert report.rejects.select("_line", "_stage").rows() == [(1, "cast")]


def test_ipc_file_and_stream_formats(tmp_path):
    df = make_frame(300)
    table = df.to_arrow()
    f = tmp_path / "f.arrow"
    _write_ipc(f, table)
    s = tmp_path / "s.arrows"
    with ipc.new_stream(str(s), table.schema) as w:
        for rb in table.to_batches(max_chunksize=100):
            w.write_batch(rb)
    for path in (f, s):
        report, out = collect(cb.scan_ipc(path), batch_size=64)
        assert out.equals(df)


def test_truncated_ipc_fails_naming_file(tmp_path):
    f = tmp_path / "full.arrow"
    _write_ipc(f, make_frame(5_000).to_arrow())
    bad = tmp_path / "cut.arrow"
    bad.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(cb.SourceError, match="cut.arrow"):
        collect(cb.scan_ipc(bad))


def test_missing_parquet_file(tmp_path):
    with pytest.raises(cb.SourceError, match="nope.parquet"):
        cb.scan_parquet(tmp_path / "nope.parquet")


def test_a_files_column_types_come_through_as_polars_reads_them(tmp_path):
    import datetime as dt
    from decimal import Decimal

    df = pl.DataFrame({
        "i8": pl.Series([1], dtype=pl.Int8), "u64": pl.Series([2], dtype=pl.UInt64), "s": ["a"],
        "ts": pl.Series([dt.datetime(2026, 1, 1)], dtype=pl.Datetime("ms", "UTC")), "d": [dt.date(2026, 1, 2)],
        "dec": pl.Series([Decimal("1.25")], dtype=pl.Decimal(10, 2)), "lst": [[1, 2]],
        "st": [{"a": 1, "b": "x"}], "cat": pl.Series(["k"], dtype=pl.Categorical), "b": [True],
    })
    df.write_parquet(tmp_path / "t.parquet")
    df.write_ipc(tmp_path / "t.arrow")
    expected = pl.read_parquet(tmp_path / "t.parquet").schema
    assert cb.scan_parquet(tmp_path / "t.parquet").source.schema == expected
    assert cb.scan_ipc(tmp_path / "t.arrow").source.schema == pl.read_ipc(tmp_path / "t.arrow").schema
