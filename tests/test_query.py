"""Querying outputs: manifests list only committed files, open_output, and the `query` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import colbatch as cb
from colbatch.manifest import manifest_path, read_manifest
from tests.conftest import make_frame

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "colbatch", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def _partitioned(tmp_path: Path) -> Path:
    out = tmp_path / "events"
    df = make_frame(200).with_columns(pl.col("id").mod(3).cast(pl.Int64).alias("bucket"))
    cb.from_arrow(df).sink_parquet(out, partition_by=["type", "bucket"]).run(progress=False)
    return out


def test_manifest_lists_only_committed_files(tmp_path):
    out = tmp_path / "events"
    cb.from_arrow(make_frame(100)).sink_parquet(out).run(progress=False)
    (out / ".part-00007.parquet.colbatch-tmp").write_bytes(b"half a file")
    (out / "part-00099.parquet").write_bytes(b"not ours")
    manifest = read_manifest(out)
    assert manifest.paths() == [str(out / "part-00000-0000.parquet")]
    assert cb.open_output(out).to_polars().sort("id").equals(make_frame(100))


def test_manifest_readers_ignore_unknown_keys(tmp_path):
    out = tmp_path / "e.parquet"
    cb.from_arrow(make_frame(10)).sink_parquet(out).run(progress=False)
    body = json.loads(Path(manifest_path(out)).read_text())
    body["ledger"] = {"splits": [1, 2]}
    Path(manifest_path(out)).write_text(json.dumps(body))
    assert read_manifest(out).extra["ledger"] == {"splits": [1, 2]}
    assert cb.open_output(out).to_polars().height == 10


def test_aborted_run_keeps_previous_manifest(tmp_path):
    out = tmp_path / "e.parquet"
    cb.from_arrow(make_frame(10)).sink_parquet(out).run(progress=False)
    with pytest.raises(cb.ErrorThresholdExceeded):
        cb.from_arrow(make_frame(100)).validate("amount > 100").sink_parquet(out).run(progress=False)
    assert read_manifest(out).rows == 10
    assert cb.open_output(out).to_polars().height == 10


def test_open_output_without_manifest_is_config_error(tmp_path):
    make_frame(5).write_parquet(tmp_path / "foreign.parquet")
    with pytest.raises(cb.ConfigError, match="no committed output"):
        cb.open_output(tmp_path / "foreign.parquet")


def test_open_output_reads_hive_partition_values(tmp_path):
    out = _partitioned(tmp_path)
    got = cb.open_output(out).to_polars()
    expected = make_frame(200).with_columns(pl.col("id").mod(3).cast(pl.Int64).alias("bucket"))
    assert got.select(expected.columns).sort("id").equals(expected)


def test_open_output_sql_returns_duckdb_relation(tmp_path):
    out = tmp_path / "e.csv"
    cb.from_arrow(make_frame(50)).sink_csv(out).run(progress=False)
    with cb.open_output(out) as o:
        assert o.views == ["e"]
        assert o.sql("SELECT count(*) FROM e").fetchall() == [(50,)]
        assert o.sql("SELECT count(*) FROM output").fetchall() == [(50,)]
        with pytest.raises(cb.ColbatchError, match="query failed"):
            o.sql("SELECT nope FROM e")


def test_open_output_duckdb_database_exposes_tables(tmp_path):
    db = tmp_path / "out.duckdb"
    cb.from_arrow(make_frame(20)).sink_duckdb(db, 'we"ird').run(progress=False)
    with cb.open_output(db) as o:
        assert o.views == ['we"ird']
        assert o.to_polars().height == 20


def test_query_cli_over_partitioned_parquet(tmp_path):
    out = _partitioned(tmp_path)
    proc = cli("query", "SELECT type, bucket, count(*) AS n FROM events GROUP BY ALL ORDER BY type, bucket",
               "--output", str(out), "--format", "csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = pl.read_csv(proc.stdout.encode())
    expected = (make_frame(200).with_columns(pl.col("id").mod(3).alias("bucket"))
                .group_by("type", "bucket").agg(pl.len().alias("n")).sort("type", "bucket"))
    assert got.rows() == expected.rows()


def test_query_cli_formats_and_names(tmp_path):
    out = tmp_path / "e.parquet"
    cb.from_arrow(make_frame(30)).sink_parquet(out).run(progress=False)
    proc = cli("query", "SELECT count(*) AS n FROM x", "--as", f"x={out}", "--format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"n": 30}]
    proc = cli("query", "SELECT * FROM e WHERE id <= 3", "--output", str(out), "--format", "parquet",
               "--to", str(tmp_path / "r.parquet"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert pl.read_parquet(tmp_path / "r.parquet")["id"].to_list() == [1, 2, 3]
    proc = cli("query", "SELECT max(id) AS m FROM e", "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0 and "30" in proc.stdout


@pytest.mark.parametrize("args, code, message", [
    (["SELECT nope FROM e"], 1, "query failed"),
    (["SELECT 1/0::INTEGER AS x FROM e WHERE CAST(type AS INTEGER) > 0"], 1, "query failed"),
    (["SELECT 1", "--format", "xml"], 2, None),
    (["SELECT 1", "--as", "novalue"], 2, "NAME=PATH"),
    (["SELECT 1", "--output", "missing.parquet"], 2, "no committed output"),
])
def test_query_cli_exit_codes(tmp_path, args, code, message):
    out = tmp_path / "e.parquet"
    cb.from_arrow(make_frame(10)).sink_parquet(out).run(progress=False)
    proc = cli("query", *args, "--output", str(out), cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    if message is not None:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("colbatch: error:")]
        assert len(errors) == 1 and message in errors[0], proc.stderr
