"""`python -m colbatch demo`: a job on the bundled sample data, then a DuckDB query of its output."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import polars as pl

import colbatch as cb

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"


def demo_pipeline(out_dir: str | os.PathLike, *, data_dir: Path = DATA_DIR) -> cb.Pipeline:
    """The demo job: CSV files with bad rows and schema drift → validate, filter, enrich → Parquet + rejects."""
    out = Path(out_dir)
    return (
        cb.scan_csv([str(data_dir / "events.csv"), str(data_dir / "events_2.csv.gz")])
        .validate("amount > 0", name="positive_amount")
        .filter("country <> 'XX'")
        .with_columns("amount * 1.1 AS value", "upper(type) AS category")
        .select("id", "ts", "user_id", "category", "value", "country", "channel")
        .sink_parquet(out / "events.parquet")
        .sink_rejects(out / "rejects.parquet")
    )


def run_demo(out_dir: str | os.PathLike = "out/demo", *, progress: bool = True) -> int:
    """Run the demo job, print its report, then query the outputs with DuckDB."""
    if not (DATA_DIR / "events.csv").exists():
        raise cb.SourceError(f"sample data not found in `{DATA_DIR}`; run `python data/make_sample.py`")
    report = demo_pipeline(out_dir).run(progress=progress, overwrite=True)  # a demo always runs
    print(report.summary())
    out = Path(out_dir)
    con = duckdb.connect()
    print("\nDuckDB: revenue per category in the output")
    events = str(out / "events.parquet").replace("'", "''")
    print(con.sql(f"SELECT category, count(*) AS events, round(sum(value), 2) AS value "
                  f"FROM read_parquet('{events}') GROUP BY ALL ORDER BY value DESC"))
    print("DuckDB: rejected rows by stage")
    rejects = str(out / "rejects.parquet").replace("'", "''")
    print(con.sql(f"SELECT _stage, count(*) AS n, any_value(_reason) AS example "
                  f"FROM read_parquet('{rejects}') GROUP BY ALL ORDER BY n DESC"))
    with pl.Config(tbl_rows=5, fmt_str_lengths=50):
        print("first rejects:")
        print(report.rejects.select("_source", "_line", "_stage", "_reason").head(5) if report.rejects is not None else "")
    return 0 if report.succeeded else 1
