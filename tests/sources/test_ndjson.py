"""JSON Lines source: malformed lines rejected with exact line numbers; values that do not fit rejected at cast."""

from __future__ import annotations

import gzip

import polars as pl
import pytest
import zstandard

import colbatch as cb
from tests.conftest import assert_accounting


def run_ndjson(path, **scan) -> tuple[cb.Report, pl.DataFrame]:
    batch_size = scan.pop("batch_size", None)
    got: list[pl.DataFrame] = []
    opts = {"batch_size": batch_size} if batch_size else {}
    report = cb.scan_ndjson(path, **scan).foreach_batch(got.append, retries=0).run(
        progress=False, max_error_rate=None, **opts)
    assert_accounting(report)
    return report, (pl.concat(got) if got else pl.DataFrame())


HOSTILE = (
    b'{"id":1,"amount":2.5,"type":"a"}\n'
    b'{"id":2,"amount":"n/a","type":"b"}\n'
    b'{"id": 3, "amount": 1\n'
    b'"bare"\n'
    b"\n"
    b'{"id":4,"amount":1.0,"type":"c"} x\n'
    b'{"id":5,"amount":1.0,"type":"d","extra":1}\n'
    b"[1,2]\n"
    b'{"id":6,"type":"e"}\n'
)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_malformed_lines_rejected_with_line_and_reason(write, batch_size):
    p = write("a.jsonl", HOSTILE)
    report, out = run_ndjson(p, schema={"id": "int64", "amount": "float64"}, batch_size=batch_size)
    got = sorted((r["_line"], r["_stage"], r["_reason"]) for r in report.rejects.iter_rows(named=True))
    assert [(line, stage) for line, stage, _ in got] == [
        (2, "cast"), (3, "parse"), (4, "parse"), (5, "parse"), (6, "parse"), (8, "parse")]
    reasons = dict((line, reason) for line, _, reason in got)
    assert "'n/a'" in reasons[2]
    assert "malformed JSON" in reasons[3]
    assert "got str" in reasons[4]
    assert "blank line" in reasons[5]
    assert "Extra data" in reasons[6]
    assert "got list" in reasons[8]
    assert out["id"].to_list() == [1, 5, 6]
    assert out.filter(pl.col("id") == 6)["amount"][0] is None
    assert report.rows_read == 9


def test_sample_events_jsonl_rejects(repo_root):
    report, out = run_ndjson(repo_root / "data" / "sample" / "events.jsonl", schema={"amount": "float64"})
    assert report.rows_read == 5010
    assert report.rows_written == 4997
    assert report.rejects_by_stage == {"parse": 10, "cast": 3}
    assert sorted(report.rejects.filter(pl.col("_stage") == "parse")["_line"].to_list()) == [
        3, 401, 999, 1500, 2222, 2800, 3333, 4000, 4500, 5010]
    assert sorted(report.rejects.filter(pl.col("_stage") == "cast")["_line"].to_list()) == [1237, 2350, 4329]
    assert out["text"].str.contains("\n").sum() == 2


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_ndjson(tmp_path, suffix):
    df = pl.DataFrame({"id": list(range(500)), "s": [f"v{i}" for i in range(500)]})
    raw = df.write_ndjson().encode()
    p = tmp_path / f"x{suffix}"
    p.write_bytes(gzip.compress(raw) if suffix.endswith("gz") else zstandard.ZstdCompressor().compress(raw))
    report, out = run_ndjson(p)
    assert out.equals(df)


def test_truncated_gzip_ndjson_fails_naming_file(tmp_path):
    raw = b"".join(f'{{"id": {i}, "s": "value {i}"}}\n'.encode() for i in range(100_000))
    p = tmp_path / "t.jsonl.gz"
    packed = gzip.compress(raw)
    p.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(cb.SourceError, match="t.jsonl.gz"):
        cb.scan_ndjson(p).foreach_batch(lambda d: None).run(progress=False, max_error_rate=None)


def test_schema_drift_across_files_warns(write, tmp_path):
    write("d/a.jsonl", b'{"id":1,"a":"x"}\n')
    write("d/b.jsonl", b'{"id":2,"b":true}\n')
    report, out = run_ndjson(tmp_path / "d")
    assert sorted(out.columns) == ["a", "b", "id"]
    assert {r["id"]: (r["a"], r["b"]) for r in out.iter_rows(named=True)} == {1: ("x", None), 2: (None, True)}
    assert any("schema drift" in w for w in report.warnings)


def test_missing_ndjson_file(tmp_path):
    with pytest.raises(cb.SourceError, match="missing.jsonl"):
        cb.scan_ndjson(tmp_path / "missing.jsonl")
