"""In-memory sources: from_batches over every item kind, from_arrow over tables and readers."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

import colbatch as cb
from tests.conftest import assert_accounting

EXPECTED = pl.DataFrame({"id": [1, 2, 3, 4], "amount": [1.5, 2.5, 3.5, 4.5]})


def collect(pipeline: cb.Pipeline, **run) -> tuple[cb.Report, pl.DataFrame]:
    got: list[pl.DataFrame] = []
    report = pipeline.foreach_batch(got.append, retries=0).run(progress=False, max_error_rate=None, **run)
    assert_accounting(report)
    return report, (pl.concat(got) if got else pl.DataFrame())


ITEMS = {
    "dicts": lambda: [{"id": 1, "amount": 1.5}, {"id": 2, "amount": 2.5}, {"id": 3, "amount": 3.5},
                      {"id": 4, "amount": 4.5}],
    "lists_of_dicts": lambda: [[{"id": 1, "amount": 1.5}, {"id": 2, "amount": 2.5}],
                               [{"id": 3, "amount": 3.5}, {"id": 4, "amount": 4.5}]],
    "dict_of_columns": lambda: [{"id": [1, 2], "amount": [1.5, 2.5]}, {"id": [3, 4], "amount": [3.5, 4.5]}],
    "dataframes": lambda: [EXPECTED.slice(0, 3), EXPECTED.slice(3)],
    "arrow_batches": lambda: EXPECTED.to_arrow().to_batches(max_chunksize=1),
    "arrow_tables": lambda: [EXPECTED.slice(0, 2).to_arrow(), EXPECTED.slice(2).to_arrow()],
}


@pytest.mark.parametrize("kind", list(ITEMS))
@pytest.mark.parametrize("declared", [True, False])
def test_from_batches_item_kinds(kind, declared):
    schema = {"id": "int64", "amount": "float64"} if declared else None
    report, out = collect(cb.from_batches(ITEMS[kind], schema=schema))
    assert out.equals(EXPECTED)
    assert report.rows_read == 4


def test_from_batches_generator_object_is_one_shot():
    gen = (d for d in ITEMS["dataframes"]())
    report, out = collect(cb.from_batches(gen))
    assert out.equals(EXPECTED)


def test_declared_schema_rejects_bad_values_with_stage_cast():
    rows = [{"id": "1", "amount": "1.5"}, {"id": "two", "amount": "2.5"}, {"id": "3", "amount": "x"},
            {"id": "4", "amount": "4.5"}]
    report, out = collect(cb.from_batches([rows], schema={"id": "int64", "amount": "float64"}))
    assert out.rows() == [(1, 1.5), (4, 4.5)]
    rej = report.rejects.sort("_line")
    assert rej["_stage"].to_list() == ["cast", "cast"]
    assert rej["_line"].to_list() == [1, 2]  # row index
    assert "`id` value 'two'" in rej["_reason"][0]
    assert "`amount` value 'x'" in rej["_reason"][1]


def test_row_index_of_rejects_counts_across_batches():
    def pages():
        for p in range(3):
            yield [{"id": str(p * 10 + i) if i != 4 else "bad"} for i in range(10)]

    report, out = collect(cb.from_batches(pages, schema={"id": "int64"}), batch_size=3)
    assert sorted(report.rejects["_line"].to_list()) == [4, 14, 24]
    assert out.height == 27


def test_from_arrow_reader():
    table = EXPECTED.to_arrow()
    reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=1))
    report, out = collect(cb.from_arrow(reader))
    assert out.equals(EXPECTED)


def test_from_arrow_polars_frame_and_record_batch():
    for data in (EXPECTED, EXPECTED.to_arrow().to_batches()[0]):
        _, out = collect(cb.from_arrow(data))
        assert out.equals(EXPECTED)


def test_unsupported_item_is_config_error():
    with pytest.raises(cb.ConfigError, match="cannot turn a `int`"):
        collect(cb.from_batches([1, 2, 3], schema={"id": "int64"}))


def test_from_arrow_rejects_unsupported_type():
    with pytest.raises(cb.ConfigError, match="from_arrow"):
        cb.from_arrow([1, 2, 3])  # type: ignore[arg-type]
