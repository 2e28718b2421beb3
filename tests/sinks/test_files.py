"""File sinks: Parquet options, partitioning safety, deterministic parts, atomic replace, rejects output."""

from __future__ import annotations

import gzip
import os

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

import colbatch as cb
from tests.conftest import assert_accounting, data_files, make_frame, no_temp_files


def test_parquet_default_compression_is_zstd(tmp_path):
    out = tmp_path / "o.parquet"
    report = cb.from_arrow(make_frame()).sink_parquet(out).run(progress=False)
    assert_accounting(report)
    meta = pq.ParquetFile(out).metadata
    codecs = {meta.row_group(i).column(j).compression for i in range(meta.num_row_groups)
              for j in range(meta.num_columns)}
    assert codecs == {"ZSTD"}
    assert report.outputs == [str(out)]


def test_parquet_explicit_compression(tmp_path):
    out = tmp_path / "o.parquet"
    cb.from_arrow(make_frame()).sink_parquet(out, compression="snappy").run(progress=False)
    assert pq.ParquetFile(out).metadata.row_group(0).column(0).compression == "SNAPPY"


def test_row_group_size_honoured(tmp_path):
    out = tmp_path / "o.parquet"
    cb.from_arrow(make_frame(1000)).sink_parquet(out, row_group_size=100).run(progress=False)
    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == 1000
    assert meta.num_row_groups >= 10
    assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) <= 100


def test_partitioned_row_group_size_honoured(tmp_path):
    out = tmp_path / "p"
    cb.from_arrow(make_frame(1000)).sink_parquet(out, partition_by="type", row_group_size=50).run(progress=False)
    for f in out.rglob("*.parquet"):
        meta = pq.ParquetFile(f).metadata
        assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) <= 50
        assert meta.row_group(0).column(0).compression == "ZSTD"


HOSTILE = ["../x", "../../x", "a/b", ".", "..", "ünï code", None, "%2E", "/abs", "..\\win", "x=y", "a\x00b",
           "z" * 300, "é" * 200, "z" * 299]


def test_partition_by_hostile_values_stays_inside_and_reads_back(tmp_path):
    out = tmp_path / "root" / "p"
    df = pl.DataFrame({"k": HOSTILE, "v": list(range(len(HOSTILE)))})
    report = cb.from_arrow(df).sink_parquet(out, partition_by="k").run(progress=False)
    assert_accounting(report)
    root = os.path.realpath(out)
    for dirpath, _dirs, files in os.walk(tmp_path):
        for f in (f for f in files if not f.endswith(".manifest.json")):  # the manifest sits beside the root
            assert os.path.realpath(os.path.join(dirpath, f)).startswith(root + os.sep), (dirpath, f)
    assert all(not p.name.startswith(".") for p in out.iterdir())
    assert len(list(out.iterdir())) == len(HOSTILE)  # one directory per distinct value
    glob = str(out).replace("'", "''") + "/**/*.parquet"
    # the files hold the exact values; directory names hold them too unless too long for a file name
    back = duckdb.sql(f"SELECT k, v FROM read_parquet('{glob}', hive_partitioning=false) ORDER BY v").fetchall()
    assert back == [(k, v) for v, k in enumerate(HOSTILE)]
    hive = duckdb.sql(f"SELECT k, v FROM read_parquet('{glob}', hive_partitioning=true) ORDER BY v").fetchall()
    assert [k for k, _v in hive] == [k if k is None or len(k) < 100 else hive[v][0] for v, k in enumerate(HOSTILE)]
    assert all(len(name.encode()) <= 255 for _d, dirs, _f in os.walk(out) for name in dirs)


def test_partition_by_empty_string_reads_back_as_empty_or_null(tmp_path):
    out = tmp_path / "p"
    cb.from_arrow(pl.DataFrame({"k": ["", "a"], "v": [1, 2]})).sink_parquet(out, partition_by="k").run(progress=False)
    glob = str(out) + "/**/*.parquet"
    back = duckdb.sql(f"SELECT k FROM read_parquet('{glob}', hive_partitioning=true) WHERE v = 1").fetchall()[0][0]
    assert back in ("", None)


def test_partition_by_unknown_column_is_config_error(tmp_path):
    with pytest.raises(cb.ConfigError, match="nope"):
        cb.from_arrow(make_frame()).sink_parquet(tmp_path / "p", partition_by="nope").run(progress=False)


def _three_files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    df = make_frame(900)
    for i in range(3):
        df.slice(i * 300, 300).write_csv(d / f"f{i}.csv")
    return d, df


def test_directory_mode_part_names_deterministic(tmp_path):
    d, df = _three_files(tmp_path)
    out = tmp_path / "out"
    names = []
    for _ in range(2):
        report = cb.scan_csv(d).sink_parquet(out).run(progress=False, batch_size=50, overwrite=True)
        assert_accounting(report)
        names.append([p.name for p in data_files(out)])
    assert names[0] == names[1] == ["part-00000-0000.parquet", "part-00001-0000.parquet", "part-00002-0000.parquet"]
    assert pl.read_parquet(out / "part-00001-0000.parquet")["id"].to_list() == list(range(301, 601))


def test_rerun_replaces_single_file_output(tmp_path):
    out = tmp_path / "o.parquet"
    cb.from_arrow(make_frame(1000)).sink_parquet(out).run(progress=False)
    cb.from_arrow(make_frame(10)).sink_parquet(out).run(progress=False)
    assert pl.read_parquet(out).height == 10
    assert no_temp_files(tmp_path) == []


def test_rerun_replaces_directory_output_and_removes_stale_parts(tmp_path):
    d, _ = _three_files(tmp_path)
    out = tmp_path / "out"
    cb.scan_csv(d).sink_parquet(out).run(progress=False)
    os.remove(d / "f2.csv")
    cb.scan_csv(d).sink_parquet(out).run(progress=False)
    assert [p.name for p in data_files(out)] == ["part-00000-0000.parquet", "part-00001-0000.parquet"]
    assert pl.read_parquet(out).height == 600


def test_rerun_replaces_partitioned_output(tmp_path):
    out = tmp_path / "p"
    cb.from_arrow(pl.DataFrame({"k": ["a", "b"], "v": [1, 2]})).sink_parquet(out, partition_by="k").run(progress=False)
    cb.from_arrow(pl.DataFrame({"k": ["a"], "v": [3]})).sink_parquet(out, partition_by="k").run(progress=False)
    glob = str(out) + "/**/*.parquet"
    assert duckdb.sql(f"SELECT k, v FROM read_parquet('{glob}', hive_partitioning=true)").fetchall() == [("a", 3)]


def test_csv_gz_sink_is_gzip(tmp_path):
    out = tmp_path / "o.csv.gz"
    cb.from_arrow(make_frame(100)).sink_csv(out).run(progress=False)
    text = gzip.decompress(out.read_bytes()).decode()
    assert text.splitlines()[0] == "id,amount,type"
    assert len(text.splitlines()) == 101


def test_csv_sink_options(tmp_path):
    out = tmp_path / "o.csv"
    cb.from_arrow(make_frame(3)).sink_csv(out, separator=";", include_header=False).run(progress=False)
    assert out.read_text().splitlines()[0].count(";") == 2
    assert not out.read_text().startswith("id")


def test_single_file_sink_on_existing_directory_is_config_error(tmp_path):
    (tmp_path / "x.parquet").mkdir()
    with pytest.raises(cb.ConfigError, match="is a directory"):
        cb.from_arrow(make_frame(3)).sink_parquet(tmp_path / "x.parquet").run(progress=False)


@pytest.mark.parametrize("name", ["rejects.parquet", "rejects.csv"])
def test_rejects_sink_columns(tmp_path, write, name):
    p = write("in.csv", b"id,amount,type\n1,2.5,a\n2,zz,b\n3,1.0\n4,-1,d\n")
    rej = tmp_path / name
    report = (cb.scan_csv(p, schema={"id": "int64", "amount": "float64"})
              .validate("amount > 0", name="positive")
              .sink_parquet(tmp_path / "o.parquet").sink_rejects(rej)
              .run(progress=False, max_error_rate=None))
    assert_accounting(report)
    back = pl.read_parquet(rej) if name.endswith(".parquet") else pl.read_csv(rej, infer_schema=False)
    assert back.columns == ["_source", "_line", "_stage", "_reason", "_raw", "id", "amount", "type"]
    rows = back.sort(pl.col("_line").cast(pl.Int64))
    assert rows["_line"].cast(pl.Int64).to_list() == [3, 4, 5]
    assert rows["_stage"].to_list() == ["cast", "parse", "validate"]
    assert all(s == str(p) for s in rows["_source"])
    assert rows["id"].to_list()[0] == "2" and rows["amount"].to_list()[0] == "zz"
    assert rows["_raw"].to_list()[1] == "3,1.0"
    assert report.rejects_path == str(rej)


def test_rejects_sink_bad_suffix_is_config_error(tmp_path):
    with pytest.raises(cb.ConfigError, match="rejects path"):
        cb.from_arrow(make_frame(3)).sink_rejects(tmp_path / "r.xlsx")


def test_no_sink_is_config_error():
    with pytest.raises(cb.ConfigError, match="no sink"):
        cb.from_arrow(make_frame(3)).run(progress=False)


FORMULAS = ["=1+1", "+cmd", "-2", "@SUM(A1)", "\tx", "\rx", "plain", "a=b", None, ""]


def test_csv_formula_guard_prefixes_dangerous_cells_when_asked(tmp_path):
    df = pl.DataFrame({"s": FORMULAS, "n": list(range(len(FORMULAS)))})
    cb.from_arrow(df).sink_csv(tmp_path / "safe.csv", escape_formulas=True).run(progress=False)
    back = pl.read_csv(tmp_path / "safe.csv", infer_schema=False)["s"].to_list()
    expect = [None if v is None else ("'" + v if v[:1] in ("=", "+", "-", "@", "\t", "\r") else v) for v in FORMULAS]
    assert back == expect


def test_csv_formula_guard_is_off_by_default_and_values_round_trip(tmp_path):
    df = pl.DataFrame({"s": FORMULAS, "n": list(range(len(FORMULAS)))})
    cb.from_arrow(df).sink_csv(tmp_path / "raw.csv").run(progress=False)
    back = pl.read_csv(tmp_path / "raw.csv", infer_schema=False)["s"].to_list()
    assert back[:8] == FORMULAS[:8]
