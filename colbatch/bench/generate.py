"""Synthetic events CSV for the benchmarks.

The file has the header ``id,ts,user_id,type,amount,country,text`` and about
85 bytes per row (5M rows is about 425 MB). It is generated vectorized with
NumPy and Polars one chunk at a time and appended to the file, so memory stays
bounded by the chunk size whatever the row count. A JSON sidecar next to the
file records how it was made; a later call with the same parameters reuses it.

Example:
    >>> from colbatch.bench.generate import generate_events_csv
    >>> path = generate_events_csv(".bench/events_1000.csv", 1_000)
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

# Bump when the generated content changes, so stale cached files are rebuilt.
GENERATOR_VERSION = 1
# Rows per generated chunk: ~85 MB of CSV, a few hundred MB of peak memory.
CHUNK_ROWS = 1_000_000
EVENT_TYPES = ("click", "view", "purchase", "signup", "logout")
# Skewed like real traffic: views and clicks dominate.
EVENT_TYPE_WEIGHTS = (0.35, 0.40, 0.10, 0.05, 0.10)
COUNTRIES = ("US", "DE", "FR", "GB", "JP", "BR", "IN", "XX")
# "XX" (unknown) is rare, as a filterable oddity.
COUNTRY_WEIGHTS = (0.30, 0.12, 0.10, 0.10, 0.10, 0.10, 0.15, 0.03)
# normal(50, 40) puts about 10% of amounts at or below zero: the rows the job drops.
AMOUNT_MEAN = 50.0
AMOUNT_STD = 40.0
USER_ID_MAX = 1_000_000
# Timestamps fall in 2024; a year of seconds.
TS_START = datetime(2024, 1, 1)
TS_SPAN_S = 366 * 24 * 3600
TS_FORMAT = "%Y-%m-%dT%H:%M:%S%.3f"
# Text is 3-4 words drawn from a fixed vocabulary of random lowercase words;
# word lengths are tuned so that a row averages about 85 bytes.
VOCABULARY_SIZE = 2_000
WORD_LEN_MIN = 4
WORD_LEN_MAX = 12


def generate_events_csv(path: str | os.PathLike[str], rows: int, *, seed: int = 42) -> Path:
    """Write a synthetic events CSV, or reuse one made earlier with the same parameters.

    Args:
        path: Destination file. Its parent directory is created if missing.
        rows: Number of data rows (the header is not counted).
        seed: Seed for the random generator; the same seed gives the same bytes.

    Returns:
        The path of the CSV file.

    Raises:
        ValueError: If ``rows`` is negative.
    """
    if rows < 0:
        raise ValueError(f"`rows` must be zero or more, got {rows}")
    path = Path(path)
    meta_path = _meta_path(path)
    wanted = {"rows": rows, "seed": seed, "version": GENERATOR_VERSION}
    if _is_cached(path, meta_path, wanted):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    # Write under a temporary name so an interrupted run is never mistaken for a cached file.
    tmp_path = path.with_name(path.name + ".tmp")
    vocabulary = _vocabulary(np.random.default_rng([seed, 0]))
    positive = 0
    with tmp_path.open("wb") as out:
        for index, start in enumerate(range(0, max(rows, 1), CHUNK_ROWS)):
            n = min(CHUNK_ROWS, rows - start)
            rng = np.random.default_rng([seed, index + 1])
            chunk = _chunk(rng, start, n, vocabulary)
            positive += int((chunk["amount"] > 0).sum())
            chunk.write_csv(out, include_header=index == 0, float_precision=2)
    os.replace(tmp_path, path)
    meta = {**wanted, "bytes": path.stat().st_size, "positive_amount_rows": positive}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_meta(path: str | os.PathLike[str]) -> dict[str, int]:
    """Return the sidecar written by `generate_events_csv` for ``path``.

    Args:
        path: A CSV file made by `generate_events_csv`.

    Returns:
        The sidecar fields: ``rows``, ``seed``, ``version``, ``bytes`` and
        ``positive_amount_rows`` (the rows with ``amount > 0``, which is the
        expected output row count of the benchmark job).
    """
    return json.loads(_meta_path(Path(path)).read_text())


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def _is_cached(path: Path, meta_path: Path, wanted: dict[str, int]) -> bool:
    if not (path.is_file() and meta_path.is_file()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    same_params = all(meta.get(key) == value for key, value in wanted.items())
    return same_params and meta.get("bytes") == path.stat().st_size


def _vocabulary(rng: np.random.Generator) -> pl.Series:
    lengths = rng.integers(WORD_LEN_MIN, WORD_LEN_MAX + 1, size=VOCABULARY_SIZE)
    letters = rng.integers(ord("a"), ord("z") + 1, size=(VOCABULARY_SIZE, WORD_LEN_MAX), dtype=np.uint8)
    words = [letters[i, :length].tobytes().decode("ascii") for i, length in enumerate(lengths)]
    return pl.Series("word", words, dtype=pl.String)


def _chunk(rng: np.random.Generator, start: int, n: int, vocabulary: pl.Series) -> pl.DataFrame:
    """Return rows ``start .. start + n - 1`` as a DataFrame in the CSV's column order."""
    offsets_ms = rng.integers(0, TS_SPAN_S, size=n, dtype=np.int64) * 1_000
    word_ids = rng.integers(0, len(vocabulary), size=(4, n))
    four_words = rng.random(n) < 0.5
    words = [vocabulary.gather(word_ids[i]) for i in range(4)]
    frame = pl.DataFrame(
        {
            "id": np.arange(start, start + n, dtype=np.int64),
            "ts": pl.Series(offsets_ms).cast(pl.Duration("ms")),
            "user_id": rng.integers(1, USER_ID_MAX + 1, size=n, dtype=np.int64),
            "type": pl.Series(EVENT_TYPES).gather(_choice(rng, EVENT_TYPE_WEIGHTS, n)),
            "amount": np.round(rng.normal(AMOUNT_MEAN, AMOUNT_STD, size=n), 2),
            "country": pl.Series(COUNTRIES).gather(_choice(rng, COUNTRY_WEIGHTS, n)),
            "w0": words[0],
            "w1": words[1],
            "w2": words[2],
            "w3": words[3],
            "four": four_words,
        }
    )
    fourth = pl.when(pl.col("four")).then(pl.lit(" ") + pl.col("w3")).otherwise(pl.lit(""))
    return frame.select(
        "id",
        (pl.lit(TS_START) + pl.col("ts")).dt.strftime(TS_FORMAT).alias("ts"),
        "user_id",
        "type",
        "amount",
        "country",
        pl.concat_str(pl.concat_str("w0", "w1", "w2", separator=" "), fourth).alias("text"),
    )


def _choice(rng: np.random.Generator, weights: tuple[float, ...], n: int) -> np.ndarray:
    return rng.choice(len(weights), size=n, p=np.asarray(weights) / sum(weights))
