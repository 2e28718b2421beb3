"""Property: what a sink writes, colbatch's own scan reads back unchanged (hostile text included).

For CSV, colbatch (Polars' writer) writes null as an empty field and the empty
string as `""`, and the CSV reader maps them back, so null and "" stay distinct.
Leading `= + - @` are written verbatim (no spreadsheet-formula escaping).
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import colbatch as cb
from tests.conftest import assert_accounting

HOSTILE_TEXT = st.one_of(
    st.none(),
    st.just(""),
    st.sampled_from(['"', '""', ",", "\n", "\r\n", "a,b", 'say "hi"', "=SUM(A1)", "+1", "-1", "@cmd", " ", "\t",
                     "NULL", "null", "NaN", "ünïcödé ✓ 🦆", "line1\nline2", "\\", "{}", '{"a": 1}']),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20),
)

ROWS = st.lists(st.tuples(HOSTILE_TEXT, HOSTILE_TEXT, st.one_of(st.none(), st.floats(allow_nan=False,
                                                                                      allow_infinity=False))),
                min_size=0, max_size=30)
SCHEMA = {"id": "int64", "a": "str", "b": "str", "x": "float64"}
_counter = itertools.count()


def _frame(rows) -> pl.DataFrame:
    return pl.DataFrame(
        {"id": list(range(len(rows))), "a": [r[0] for r in rows], "b": [r[1] for r in rows], "x": [r[2] for r in rows]},
        schema={"id": pl.Int64, "a": pl.String, "b": pl.String, "x": pl.Float64},
    )


def _roundtrip(df: pl.DataFrame, suffix: str, scan) -> pl.DataFrame:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"rt{next(_counter)}{suffix}"
        w = getattr(cb.from_arrow(df), {"csv": "sink_csv", "jsonl": "sink_ndjson", "parquet": "sink_parquet"}[
            suffix.split(".")[1]])(path).run(progress=False)
        assert_accounting(w)
        got: list[pl.DataFrame] = []
        report = scan(path).foreach_batch(got.append, retries=0).run(progress=False, max_error_rate=None)
        assert_accounting(report)
        assert report.rows_rejected == 0, report.rejects.rows()
        assert report.rows_read == df.height
        out = pl.concat(got) if got else pl.DataFrame(schema=df.schema)
        return out.select(df.columns)


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(ROWS)
def test_csv_roundtrip_preserves_text_nulls_and_empty_strings(rows):
    df = _frame(rows)
    out = _roundtrip(df, ".csv", lambda p: cb.scan_csv(p, schema=SCHEMA))
    assert out.equals(df), (df, out)


@SETTINGS
@given(ROWS)
def test_jsonl_roundtrip(rows):
    df = _frame(rows)
    out = _roundtrip(df, ".jsonl", lambda p: cb.scan_ndjson(p, schema=SCHEMA))
    assert out.equals(df), (df, out)


@SETTINGS
@given(ROWS)
def test_parquet_roundtrip(rows):
    df = _frame(rows)
    out = _roundtrip(df, ".parquet", cb.scan_parquet)
    assert out.equals(df), (df, out)


def test_csv_formula_prefixes_are_written_verbatim(tmp_path):
    df = _frame([("=1+1", "+x", None), ("-2", "@a", None)])
    cb.from_arrow(df).sink_csv(tmp_path / "f.csv").run(progress=False)
    assert tmp_path.joinpath("f.csv").read_text().splitlines()[1:] == ["0,=1+1,+x,", "1,-2,@a,"]


def test_csv_null_and_empty_string_are_distinct_on_disk(tmp_path):
    df = _frame([(None, "", None)])
    cb.from_arrow(df).sink_csv(tmp_path / "n.csv").run(progress=False)
    assert tmp_path.joinpath("n.csv").read_text().splitlines()[1] == '0,,"",'
