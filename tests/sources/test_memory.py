"""In-memory sources: from_batches over every item kind, from_arrow over tables and readers."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

import colbatch as cb
from colbatch.sources.memory import slicer
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


def _many_types(rows: int) -> pl.DataFrame:
    ids = list(range(rows))
    frame = pl.DataFrame({
        "id": ids,
        "text": [None if i % 7 == 0 else f"ü{i}" * (i % 5) for i in ids],
        "amount": [i / 3 for i in ids],
        "flag": [i % 2 == 0 for i in ids],
        "tags": [[i, i + 1] if i % 3 else None for i in ids],
        "point": [{"x": i, "y": str(i)} for i in ids],
        "nothing": [None] * rows,
    }).with_columns(
        kind=pl.col("text").fill_null("none").str.slice(0, 2).cast(pl.Categorical),
        level=pl.when(pl.col("flag")).then(pl.lit("hi")).otherwise(pl.lit("lo")).cast(pl.Enum(["hi", "lo"])),
        price=pl.col("amount").cast(pl.Decimal(12, 3)),
        day=pl.date(2026, 1, 1) + pl.duration(days=pl.col("id")),
    )
    # Several chunks per column, as frames built from appended pages are.
    return pl.concat([frame.slice(0, rows // 3), frame.slice(rows // 3, rows)], rechunk=False)


def test_slices_of_a_frame_in_memory_equal_polars_slices_for_every_column_type_and_edge():
    frame = _many_types(1_000)
    assert frame.n_chunks("all") and max(frame.n_chunks("all")) > 1
    cut = slicer(frame)
    assert cut != frame.slice  # these types take the column-wise cut (frames of objects do not)
    for offset, length in [(0, 100), (300, 100), (330, 10), (950, 100), (999, 5), (1_000, 10), (5_000, 3), (0, 0)]:
        got, expected = cut(offset, length), frame.slice(offset, length)
        assert got.schema == expected.schema
        assert got.equals(expected), (offset, length)
    objects = pl.DataFrame({"o": pl.Series([object(), object(), object()], dtype=pl.Object)})
    assert slicer(objects)(1, 1).height == 1  # whichever way it cuts, a frame of objects slices
    assert slicer(pl.DataFrame())(0, 5).shape == (0, 0)
    wide = pl.DataFrame({f"c{i}": [i, i + 1, i + 2] for i in range(40)})
    assert slicer(wide) == wide.slice  # past 32 columns, cutting column by column costs more than it saves


def test_a_frame_in_memory_of_every_column_type_runs_through_in_batches_unchanged(tmp_path):
    frame = _many_types(2_500)
    seen: list[pl.DataFrame] = []
    report = cb.from_arrow(frame).foreach_batch(seen.append, retries=0).run(progress=False, batch_size=1_000)
    assert_accounting(report)
    assert [df.height for df in seen] == [1_000, 1_000, 500]
    assert pl.concat(seen).equals(frame)


def test_without_polars_internal_frame_constructor_frames_in_memory_are_cut_by_dataframe_slice(monkeypatch):
    import colbatch.sources.memory as memory

    monkeypatch.setattr(memory, "_PyDataFrame", None)  # as on a Polars whose internals moved
    frame = _many_types(300)
    assert memory.slicer(frame) == frame.slice
    seen: list[pl.DataFrame] = []
    report = cb.from_arrow(frame).foreach_batch(seen.append, retries=0).run(progress=False, batch_size=100)
    assert_accounting(report)
    assert pl.concat(seen).equals(frame)
