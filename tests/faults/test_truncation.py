"""Compressed inputs cut at random offsets: every read fails naming the file, none is a short success."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import polars as pl
import pytest

import colbatch as cb

OFFSETS = 200


def _payload(kind: str) -> bytes:
    df = pl.DataFrame({"id": range(60_000), "text": [f"row {i} with some text, \"quoted\"" for i in range(60_000)]})
    raw = df.write_csv().encode() if kind == "csv" else df.write_ndjson().encode()
    return gzip.compress(raw, compresslevel=6)


@pytest.mark.parametrize("declared", [False, True], ids=["inferred", "declared"])
@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_gzip_cut_at_200_random_offsets_always_fails_naming_the_file(tmp_path, kind, declared):
    schema = {"id": "int64", "text": "str"} if declared else None
    blob = _payload(kind)
    rng = random.Random(11)
    offsets = sorted(rng.sample(range(1, len(blob)), OFFSETS))
    detected = 0
    for off in offsets:
        path = tmp_path / f"cut-{off}.{kind}.gz"
        path.write_bytes(blob[:off])
        with pytest.raises(cb.SourceError) as err:  # at planning (schema sniffing) or while reading
            scan = cb.scan_csv(path, schema=schema) if kind == "csv" else cb.scan_ndjson(path, schema=schema)
            scan.foreach_batch(lambda df: None).run(progress=False, max_error_rate=None)
        assert path.name in str(err.value)
        detected += 1
        path.unlink()
    assert detected == OFFSETS
