"""Resuming inside a file with bad rows: no reject is counted twice, no row is read twice, none is lost."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import colbatch as cb
from tests.conftest import assert_accounting

SAMPLE = str(Path(__file__).resolve().parents[2] / "data" / "sample" / "events.csv")


def _collect(scan, skip: int, batch_rows: int):
    src = scan.source
    rejects: list[pl.DataFrame] = []
    batches = [b for split in src.splits()
               for b in src.read(split, batch_rows=batch_rows, on_reject=rejects.append, skip_rows=skip)]
    return batches, (pl.concat(rejects, how="diagonal") if rejects else pl.DataFrame({"_line": []}))


@pytest.mark.parametrize("skip", [0, 1, 999, 3_000, 7_777, 12_345])
@pytest.mark.parametrize("batch_rows", [700, 5_000])
def test_csv_skip_rows_inside_a_block_yields_exactly_the_rows_and_rejects_after_it(skip, batch_rows):
    scan = cb.scan_csv(SAMPLE)
    full, full_rej = _collect(scan, 0, 100_000)
    part, part_rej = _collect(scan, skip, batch_rows)
    assert part[0].first_row == skip or skip == 0
    assert sum(b.rows_read for b in part) == sum(b.rows_read for b in full) - skip
    # the records after `skip`, good and bad, are exactly those of a full read past the same point
    full_lines = full_rej["_line"].to_list()
    cut_line = 2 + skip  # header on line 1; one record per line in this sample
    assert sorted(part_rej["_line"].to_list()) == sorted(ln for ln in full_lines if ln >= cut_line)
    good = pl.concat([b.data for b in part])
    assert good.equals(pl.concat([b.data for b in full]).tail(good.height))
    assert good.height == sum(b.rows_read for b in part) - part_rej.height


def test_resumed_job_with_rejects_in_the_committed_part_balances_and_loses_nothing(tmp_path):
    out = tmp_path / "out"
    job = cb.scan_csv(SAMPLE).sink_parquet(out, part_rows=4_000).with_options(batch_size=2_000, progress=False)
    state = {"n": 0}

    def fail_once(s: pl.Series) -> pl.Series:
        state["n"] += 1
        if state["n"] == 6:
            raise RuntimeError("crash")
        return s

    flaky = job.with_columns(pl.col("id").map_batches(fail_once, return_dtype=pl.Int64))
    with pytest.raises(RuntimeError):
        flaky.run()
    report = flaky.run(resume=True)
    assert_accounting(report)
    assert report.rows_resumed > 0
    assert report.rows_read + report.rows_resumed == 20_025
    back = pl.read_parquet(out)
    assert back.height == 20_000 and back["id"].n_unique() == 20_000
