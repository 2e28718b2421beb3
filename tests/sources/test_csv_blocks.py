"""Cutting a CSV into blocks of whole records: the plain-file path agrees with the buffered one."""

from __future__ import annotations

import io
import random
from pathlib import Path

import polars as pl
import pytest

import colbatch as cb
from colbatch.runner import check_accounting
from colbatch.sources import csv as csv_source

QUOTE = b'"'


def records(seed: int, n: int) -> list[bytes]:
    """Records with quoted separators, quoted newlines, doubled quotes and some very long fields."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        kind = rnd.random()
        if kind < 0.2:
            text = b'"line one\nline ""two""\r\nthree, four"'
        elif kind < 0.25:
            text = b"x" * rnd.randint(300, 1500)  # longer than the test's peek
        elif kind < 0.3:
            text = b'"' + b"y\n" * rnd.randint(50, 300) + b'"'  # a long quoted field full of newlines
        else:
            text = b"plain-%d" % rnd.randint(0, 10**6)
        out.append(b"%d,%s,%d" % (i, text, rnd.randint(-5, 5)))
    return out


def cut(stream, block_bytes: int) -> list[bytes]:
    return [block for block, _quoted in csv_source._blocks(stream, block_bytes, QUOTE)]


@pytest.mark.parametrize("seed", range(6))
# Blocks at least an eighth of the longest record: the buffered path grows a block up to 8 times
# its size to keep a record whole, then cuts at any newline (see `MAX_BLOCK_GROWTH`).
@pytest.mark.parametrize("block_bytes", [200, 1000, 4096])
@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b""])
def test_plain_file_blocks_are_whole_records_and_match_the_buffered_path(tmp_path, monkeypatch, seed, block_bytes,
                                                                          ending):
    monkeypatch.setattr(csv_source, "PEEK_BYTES", 256)
    body = b"\n".join(records(seed, 300)) + ending
    path = tmp_path / "f.csv"
    path.write_bytes(body)
    with open(path, "rb", buffering=0) as fh:
        plain = cut(fh, block_bytes)
    buffered = cut(io.BytesIO(body), block_bytes)  # not a plain file: the buffered path
    assert b"".join(plain) == body == b"".join(buffered)
    for block in plain[:-1]:
        assert block.endswith(b"\n") and csv_source._safe_cut(block, QUOTE) == len(block)
    # Both paths see the same records, whatever the block boundaries.
    assert [r for b in plain for r in b.splitlines()] == [r for b in buffered for r in b.splitlines()]


def test_the_plain_path_reads_each_block_once_into_the_bytes_it_yields(tmp_path, monkeypatch):
    body = b"".join(b"%d,abc\n" % i for i in range(10_000))
    path = tmp_path / "f.csv"
    path.write_bytes(body)
    used = []
    monkeypatch.setattr(csv_source, "_buffered_blocks", lambda *a: used.append(a) or iter(()))
    with open(path, "rb", buffering=0) as fh:
        blocks = cut(fh, 4096)
    assert not used and b"".join(blocks) == body and len(blocks) > 10


def test_scan_csv_with_quoted_newlines_across_small_blocks_gives_polars_rows(tmp_path):
    body = b"id,text,n\n" + b"\n".join(records(7, 2000)) + b"\n"
    path = tmp_path / "q.csv"
    path.write_bytes(body)
    out = tmp_path / "o.parquet"
    report = cb.scan_csv(path).sink_parquet(out).run(progress=False, batch_size=50)
    check_accounting(report)
    expected = pl.read_csv(path, schema={"id": pl.Int64, "text": pl.String, "n": pl.Int64})
    assert report.rows_rejected == 0
    assert pl.read_parquet(out).sort("id").equals(expected.sort("id"))
