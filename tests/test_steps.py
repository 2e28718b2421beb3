"""Steps: filter, with_columns, select, rename, cast, validate — counts, rejects and SQL/expr equivalence."""

from __future__ import annotations

import polars as pl
import pytest

import colbatch as cb
from tests.conftest import assert_accounting, make_frame

DF = pl.DataFrame({"id": [1, 2, 3, 4, 5, 6], "amount": [10.0, -1.0, None, 0.0, 5.5, 7.0],
                   "type": ["a", "b", "c", None, "e", "f"], "n": ["1", "2", "x", "4", "", "6"]})


def collect(pipeline: cb.Pipeline, **run) -> tuple[cb.Report, pl.DataFrame]:
    got: list[pl.DataFrame] = []
    report = pipeline.foreach_batch(got.append, retries=0).run(progress=False, max_error_rate=None, **run)
    assert_accounting(report)
    return report, (pl.concat(got) if got else pl.DataFrame())


def stage(report: cb.Report, prefix: str):
    return next(s for s in report.stages if s.name.startswith(prefix))


def test_validate_rejects_with_name_and_counts():
    report, out = collect(cb.from_arrow(DF).validate(pl.col("amount") > 0, name="positive_amount"))
    assert out["id"].to_list() == [1, 5, 6]
    assert report.rows_rejected == 3
    assert report.rejects_by_stage == {"validate": 3}
    rej = report.rejects.sort("_line")
    assert rej["_line"].to_list() == [1, 2, 3]  # row index of the in-memory source
    assert all("positive_amount" in r for r in rej["_reason"])
    st = stage(report, "validate")
    assert (st.rows_in, st.rows_out, st.rows_rejected) == (6, 3, 3)


def test_null_fails_validation():
    report, out = collect(cb.from_arrow(DF).validate("type IS NOT NULL AND amount IS NOT NULL", name="present"))
    assert sorted(report.rejects["id"].to_list()) == ["3", "4"]
    report, out = collect(cb.from_arrow(DF).validate(pl.col("amount") >= 0, name="nonneg"))
    assert sorted(report.rejects["id"].cast(pl.Int64).to_list()) == [2, 3]


def test_validate_default_name_is_rule_text():
    report, _ = collect(cb.from_arrow(DF).validate("amount > 0"))
    assert all("amount > 0" in r for r in report.rejects["_reason"])


def test_validate_non_boolean_rule_is_schema_error():
    with pytest.raises(cb.SchemaError):
        collect(cb.from_arrow(DF).validate(pl.col("amount") + 1, name="bad"))


def test_filter_counts_filtered_not_rejected():
    report, out = collect(cb.from_arrow(DF).filter(pl.col("amount") > 0))
    assert report.rows_filtered == 3
    assert report.rows_rejected == 0
    assert stage(report, "filter").rows_filtered == 3
    assert out["id"].to_list() == [1, 5, 6]


def test_cast_rejects_values_that_do_not_fit():
    report, out = collect(cb.from_arrow(DF).cast({"n": "int64"}))
    assert out.schema["n"] == pl.Int64
    # an empty string is a value, not a null: it does not fit int64 either
    assert out["id"].to_list() == [1, 2, 4, 6]
    assert report.rejects_by_stage == {"cast": 2}
    rej = report.rejects.sort("_line")
    assert rej["_line"].to_list() == [2, 4]
    assert "could not cast `n` value 'x' to int64" in rej["_reason"][0]
    assert "could not cast `n` value '' to int64" in rej["_reason"][1]


def test_cast_unknown_type_is_config_error():
    with pytest.raises(cb.ConfigError, match="unknown type 'int65'"):
        cb.from_arrow(DF).cast({"n": "int65"})


def test_rename_and_select():
    report, out = collect(cb.from_arrow(DF).rename({"amount": "value"}).select("id", "value"))
    assert out.columns == ["id", "value"]
    assert out.equals(DF.rename({"amount": "value"}).select("id", "value"))


def test_rename_missing_column_is_schema_error():
    with pytest.raises(cb.SchemaError, match="nope"):
        collect(cb.from_arrow(DF).rename({"nope": "x"}))


def test_select_missing_column_is_schema_error():
    with pytest.raises(cb.SchemaError):
        collect(cb.from_arrow(DF).select("id", "nope"))


def test_sql_steps_equal_polars_expression_steps():
    df = make_frame()
    sql = (cb.from_arrow(df).validate("amount > -3", name="v").filter("type <> 'view'")
           .with_columns("amount * 1.1 AS value", "upper(type) AS category").select("id", "value", "category"))
    expr = (cb.from_arrow(df).validate(pl.col("amount") > -3, name="v").filter(pl.col("type") != "view")
            .with_columns((pl.col("amount") * 1.1).alias("value"), pl.col("type").str.to_uppercase().alias("category"))
            .select("id", "value", "category"))
    r1, out1 = collect(sql)
    r2, out2 = collect(expr)
    assert out1.equals(out2)
    assert (r1.rows_filtered, r1.rows_rejected, r1.rows_written) == (r2.rows_filtered, r2.rows_rejected, r2.rows_written)
    assert r1.rows_filtered > 0 and r1.rows_rejected > 0


def test_with_columns_keyword_form():
    _, out = collect(cb.from_arrow(DF).with_columns(double="amount * 2"))
    assert out["double"].to_list() == [20.0, -2.0, None, 0.0, 11.0, 14.0]


@pytest.mark.parametrize("method,arg", [("filter", "amount >>> 3"), ("with_columns", "amount * ("),
                                        ("validate", "SELECT FROM"), ("select", "1 +")])
def test_bad_sql_is_config_error(method, arg):
    with pytest.raises(cb.ConfigError, match="not a valid SQL expression"):
        getattr(cb.from_arrow(DF), method)(arg)


def test_step_referencing_unknown_column_fails_before_writing(tmp_path):
    out = tmp_path / "o.parquet"
    with pytest.raises(cb.SchemaError):
        cb.from_arrow(DF).filter("nope > 1").sink_parquet(out).run(progress=False)
    assert not out.exists()


def test_pipeline_schema_without_running():
    p = cb.from_arrow(DF).with_columns("amount * 2 AS v").select("id", "v")
    assert dict(p.schema()) == {"id": pl.Int64, "v": pl.Float64}
