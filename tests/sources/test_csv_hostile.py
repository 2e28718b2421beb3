"""CSV source against hostile input: every bad row is rejected with its exact line, stage and reason."""

from __future__ import annotations

import datetime as dt
import gzip
import re
from pathlib import Path

import polars as pl
import pytest
import zstandard

import colbatch as cb
from tests.conftest import assert_accounting

SCHEMA = {"id": "int64", "amount": "float64", "type": "str"}
HEADER = b"id,amount,type\n"


def run_csv(path, **scan) -> tuple[cb.Report, pl.DataFrame]:
    batch_size = scan.pop("batch_size", None)
    got: list[pl.DataFrame] = []
    opts = {"batch_size": batch_size} if batch_size else {}
    report = cb.scan_csv(path, **scan).foreach_batch(got.append, retries=0).run(
        progress=False, max_error_rate=None, **opts)
    assert_accounting(report)
    out = pl.concat(got) if got else pl.DataFrame(schema=dict(report_schema(path, scan)))
    return report, out


def report_schema(path, scan):
    return cb.scan_csv(path, **scan).schema()


def rejects(report: cb.Report) -> list[tuple[int, str, str]]:
    return [(r["_line"], r["_stage"], r["_reason"]) for r in report.rejects.sort("_line").iter_rows(named=True)]


def assert_rejects(report: cb.Report, expected: list[tuple[int, str, str]]) -> None:
    got = rejects(report)
    assert [(line, stage) for line, stage, _ in got] == [(line, stage) for line, stage, _ in expected], got
    for (_, _, reason), (_, _, want) in zip(got, expected):
        assert want in reason, (reason, want)


def test_ragged_short_and_long_rows_rejected_at_their_lines(write):
    p = write("ragged.csv", HEADER + b"1,2.5,a\n2,3.5\n3,4.5,c,extra\n4,1.0,d\n")
    report, out = run_csv(p, schema=SCHEMA)
    assert_rejects(report, [(3, "parse", "expected 3 fields, found 2"), (4, "parse", "expected 3 fields, found 4")])
    assert out["id"].to_list() == [1, 4]
    assert report.rejects_by_stage == {"parse": 2}
    raw = report.rejects.sort("_line")["_raw"].to_list()
    assert raw == ["2,3.5", "3,4.5,c,extra"]


def test_unparsable_values_under_schema_rejected_with_stage_cast(write):
    p = write("bad.csv", HEADER + b"1,2.5,a\nx,3.5,b\n3,abc,c\n4,1.0,d\n")
    report, out = run_csv(p, schema=SCHEMA)
    assert_rejects(report, [(3, "cast", "`id` value 'x' to int64"), (4, "cast", "`amount` value 'abc' to float64")])
    assert out["id"].to_list() == [1, 4]
    # the rejected row's values travel as text
    assert report.rejects.sort("_line")["amount"].to_list() == ["3.5", "abc"]


def test_iso_dates_and_datetimes_parse_whatever_else_the_batch_holds(write):
    # ISO 8601 forms are taken in every batch, with or without a bad value beside them (Arrow's parser
    # first, Polars' inferred format for the rest); what is not a date is rejected with its line.
    body = (b"id,ts,d\n"
            b"1,2024-08-21T12:05:01.000,2024-01-02\n"
            b"2,2024-08-21 12:05:01,2024-01-03\n"
            b"3,2024-08-21,\n"
            b"4,not a time,2024-13-01\n"
            b"5, 2024-08-22T00:00:01.5 ,2024-01-05\n"
            b"6,21/08/2024 12:05,2024-01-06\n")
    p = write("dates.csv", body)
    schema = {"id": "int64", "ts": "datetime", "d": "date"}
    for batch_size in (6, 3, 1):  # the bad row alone, with ISO neighbours, and in a batch of all forms
        report, out = run_csv(p, schema=schema, batch_size=batch_size)
        assert_rejects(report, [(5, "cast", "`ts` value 'not a time' to datetime"), (7, "cast", "`ts` value")])
        assert out["id"].to_list() == [1, 2, 3, 5]
        assert out["ts"].to_list() == [dt.datetime(2024, 8, 21, 12, 5, 1), dt.datetime(2024, 8, 21, 12, 5, 1),
                                       dt.datetime(2024, 8, 21), dt.datetime(2024, 8, 22, 0, 0, 1, 500_000)]
        assert out["d"].cast(pl.String).to_list() == ["2024-01-02", "2024-01-03", None, "2024-01-05"]
    # A clean file (the fast path: every value ISO 8601).
    p = write("iso.csv", b"id,ts,d\n1,2024-08-21T12:05:01.000,2024-01-02\n2,2024-08-21 12:05:01,\n")
    report, out = run_csv(p, schema=schema)
    assert report.rows_rejected == 0 and out.schema["ts"] == pl.Datetime("us") and out.schema["d"] == pl.Date
    assert out["ts"].to_list() == [dt.datetime(2024, 8, 21, 12, 5, 1)] * 2
    assert out["d"].to_list() == [dt.date(2024, 1, 2), None]
    # A batch whose first value sets another format for Polars keeps its ISO values, as it would alone.
    p = write("dmy.csv", b"id,ts\n1,21/08/2024 12:05\n2,2024-08-21T12:05:01\n3,22/08/2024 13:00\n")
    for batch_size in (3, 1):
        report, out = run_csv(p, schema={"id": "int64", "ts": "datetime"}, batch_size=batch_size)
        assert report.rows_rejected == 0
        assert out["ts"].to_list() == [dt.datetime(2024, 8, 21, 12, 5), dt.datetime(2024, 8, 21, 12, 5, 1),
                                       dt.datetime(2024, 8, 22, 13)]


def test_invalid_utf8_row_rejected(write):
    p = write("utf.csv", HEADER + b"1,2.5,a\n2,3.5,caf\xe9\xff\n3,1.0,d\n")
    report, out = run_csv(p, schema=SCHEMA)
    assert_rejects(report, [(3, "parse", "invalid UTF-8")])
    assert out["id"].to_list() == [1, 3]


def test_unterminated_quote_rejected(write):
    p = write("unterm.csv", HEADER + b'1,2.5,a\n2,3.5,"open\n3,1.0,d\n')
    report, out = run_csv(p, schema=SCHEMA)
    assert_rejects(report, [(3, "parse", "unterminated quoted field")])
    assert 1 in out["id"].to_list()


def test_empty_file_gives_zero_rows_and_no_error(write):
    p = write("empty.csv", b"")
    report, out = run_csv(p, schema=SCHEMA)
    assert report.status == "succeeded"
    assert (report.rows_read, report.rows_written, report.rows_rejected) == (0, 0, 0)


def test_header_only_file_gives_zero_rows(write):
    p = write("header.csv", HEADER)
    report, out = run_csv(p, schema=SCHEMA)
    assert report.status == "succeeded"
    assert (report.rows_read, report.rows_written) == (0, 0)
    assert list(cb.scan_csv(p, schema=SCHEMA).schema()) == ["id", "amount", "type"]


def test_bom_is_stripped_from_first_column_name(write):
    p = write("bom.csv", b"\xef\xbb\xbf" + HEADER + b"1,2.5,a\n")
    report, out = run_csv(p, schema=SCHEMA)
    assert out.columns == ["id", "amount", "type"]
    assert out.rows() == [(1, 2.5, "a")]


@pytest.mark.parametrize("content", [
    b"id,amount,type\r\n1,2.5,a\r\n2,3.5,b\r\n3,1.0,c\r\n",
    b"id,amount,type\r\n1,2.5,a\n2,3.5,b\r\n3,1.0,c\n",
], ids=["crlf", "mixed"])
def test_crlf_and_mixed_line_endings(write, content):
    p = write("eol.csv", content)
    report, out = run_csv(p, schema=SCHEMA)
    assert report.rows_rejected == 0
    assert out.rows() == [(1, 2.5, "a"), (2, 3.5, "b"), (3, 1.0, "c")]


def test_crlf_line_numbers_of_rejects_exact(write):
    p = write("eol.csv", b"id,amount,type\r\n1,2.5,a\r\n2,zz,b\r\n3,1.0,c\r\n4,1.0\r\n")
    report, _ = run_csv(p, schema=SCHEMA)
    assert_rejects(report, [(3, "cast", "'zz'"), (5, "parse", "expected 3 fields")])


def test_nul_bytes_are_kept_in_text(write):
    p = write("nul.csv", HEADER + b"1,2.5,a\x00b\n2,3.5,b\n")
    report, out = run_csv(p, schema=SCHEMA)
    assert report.rows_rejected == 0
    assert out["type"].to_list() == ["a\x00b", "b"]


def test_multi_megabyte_field(write):
    big = "x" * (5 << 20)
    p = write("big.csv", HEADER + b"1,2.5,a\n" + f'2,3.5,"{big}"\n'.encode() + b"4,1.0,d\n")
    report, out = run_csv(p, schema=SCHEMA, batch_size=2)
    assert report.rows_rejected == 0
    assert out["id"].to_list() == [1, 2, 4]
    assert len(out.filter(pl.col("id") == 2)["type"][0]) == 5 << 20


def test_multi_megabyte_field_next_to_a_bad_row(write):
    big = "x" * (5 << 20)
    p = write("big.csv", HEADER + b"1,2.5,a\n" + f'2,3.5,"{big}"\n'.encode() + b"3,zz,c\n4,1.0,d\n")
    report, out = run_csv(p, schema=SCHEMA, batch_size=2)
    assert_rejects(report, [(4, "cast", "'zz'")])
    assert out["id"].to_list() == [1, 2, 4]


def test_duplicate_column_names_renamed_with_warning(write):
    p = write("dup.csv", b"id,amount,id\n1,2.5,a\n")
    report, out = run_csv(p)
    assert out.columns == ["id", "amount", "id_2"]
    assert any("duplicate column `id`" in w and "id_2" in w for w in report.warnings)


def test_schema_drift_across_glob(write, tmp_path):
    write("in/a.csv", b"id,amount,type\n1,2.5,a\n2,3.5,b\n")
    write("in/b.csv", b"type,id,channel\nc,3,web\n")
    report, out = run_csv(str(tmp_path / "in" / "*.csv"), schema={"id": "int64", "amount": "float64"})
    assert report.rows_written == 3
    assert out.columns == ["id", "amount", "type", "channel"]
    rows = {r["id"]: r for r in out.iter_rows(named=True)}
    assert rows[3]["amount"] is None and rows[3]["type"] == "c" and rows[3]["channel"] == "web"
    assert rows[1]["channel"] is None
    assert any("schema drift" in w for w in report.warnings)


def test_quoted_newlines_keep_later_line_numbers_exact(write):
    p = write("qnl.csv", HEADER + b'1,2.5,"a\nb"\n2,x,c\n3,1,"d\n\ne"\n4,y,f\n5,1\n')
    report, out = run_csv(p, schema=SCHEMA)
    assert_rejects(report, [(4, "cast", "'x'"), (8, "cast", "'y'"), (9, "parse", "expected 3 fields")])
    assert out["type"].to_list() == ["a\nb", "d\n\ne"]


def test_blank_line_rejected(write):
    p = write("blank.csv", HEADER + b"1,2.5,a\n\n2,3.5,b\n")
    report, out = run_csv(p, schema=SCHEMA)
    assert_rejects(report, [(3, "parse", "blank line")])


def _messy(n: int = 300) -> bytes:
    lines = [HEADER.rstrip(b"\n")]
    for i in range(1, n + 1):
        if i % 17 == 0:
            lines.append(f"{i},bad{i},t".encode())
        elif i % 23 == 0:
            lines.append(f"{i},1.0".encode())
        elif i % 29 == 0:
            lines.append(f'{i},2.0,"multi\nline"'.encode())
        else:
            lines.append(f"{i},{i / 4},t{i % 3}".encode())
    return b"\n".join(lines) + b"\n"


def test_small_batch_size_gives_same_result_as_large(write):
    p = write("messy.csv", _messy())
    small, out_small = run_csv(p, schema=SCHEMA, batch_size=7)
    large, out_large = run_csv(p, schema=SCHEMA, batch_size=100_000)
    assert out_small.equals(out_large)
    assert rejects(small) == rejects(large)
    assert (small.rows_read, small.rows_written, small.rows_rejected) == (
        large.rows_read, large.rows_written, large.rows_rejected)
    assert small.rows_rejected == 300 // 17 + 300 // 23 - 0  # no overlap below 300 (17*23 = 391)


@pytest.mark.parametrize("suffix", [".csv.gz", ".csv.zst"])
def test_truncated_compressed_file_fails_naming_the_file(tmp_path, suffix):
    body = b"".join(f"{i},{i}.5,t\n".encode() for i in range(200_000))
    data = HEADER + body
    packed = gzip.compress(data) if suffix.endswith(".gz") else zstandard.ZstdCompressor().compress(data)
    p = tmp_path / f"trunc{suffix}"
    p.write_bytes(packed[: len(packed) * 2 // 3])
    with pytest.raises(cb.SourceError, match=re.escape(str(p.name))) as info:
        cb.scan_csv(p, schema=SCHEMA).foreach_batch(lambda df: None).run(progress=False, max_error_rate=None)
    assert str(p) in str(info.value)


def test_missing_file_raises_source_error(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(cb.SourceError, match="nope.csv"):
        cb.scan_csv(missing)


def test_empty_glob_raises_source_error(tmp_path):
    with pytest.raises(cb.SourceError, match="no files match"):
        cb.scan_csv(str(tmp_path / "*.csv"))


# -- the bundled sample ------------------------------------------------------------------------

SAMPLE_BAD_LINES = {
    4: "ragged_short", 254: "bad_amount", 782: "bad_id", 1206: "ragged_long", 2006: "bad_amount",
    2508: "invalid_utf8", 3151: "ragged_short", 4107: "bad_amount", 5012: "blank_line", 5568: "ragged_long",
    6414: "bad_amount", 7315: "bad_id", 8017: "ragged_short", 9019: "bad_amount", 10019: "ragged_long",
    11131: "bad_amount", 12367: "ragged_short", 13023: "bad_amount", 14166: "ragged_long", 15025: "bad_id",
    16026: "bad_amount", 17198: "ragged_short", 18028: "ragged_long", 19029: "ragged_short", 20031: "ragged_long",
}
KIND_STAGE = {"ragged_short": "parse", "ragged_long": "parse", "invalid_utf8": "parse", "blank_line": "parse",
              "bad_amount": "cast", "bad_id": "cast"}
KIND_REASON = {"ragged_short": "expected 7 fields", "ragged_long": "expected 7 fields", "invalid_utf8": "UTF-8",
               "blank_line": "blank line", "bad_amount": "`amount`", "bad_id": "`id`"}


@pytest.mark.parametrize("batch_size", [100_000, 997])
def test_sample_events_csv_has_exactly_the_documented_rejects(repo_root, batch_size):
    path = repo_root / "data" / "sample" / "events.csv"
    report, out = run_csv(path, batch_size=batch_size)
    assert report.rows_rejected == 25
    assert report.rows_written == 20000
    assert report.rows_read == 20025
    assert sorted(out["id"].to_list()) == list(range(1, 20001))
    got = {r["_line"]: r for r in report.rejects.iter_rows(named=True)}
    assert set(got) == set(SAMPLE_BAD_LINES)
    for line, kind in SAMPLE_BAD_LINES.items():
        assert got[line]["_stage"] == KIND_STAGE[kind], (line, got[line])
        assert KIND_REASON[kind] in got[line]["_reason"], (line, got[line])
    assert report.rejects_by_stage == {"parse": 14, "cast": 11}
