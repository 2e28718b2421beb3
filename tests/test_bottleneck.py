"""The bottleneck verdict names the resource that bounds a job; the HTML report renders and escapes."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import polars as pl
import pytest

import colbatch as cb
from colbatch.batching import process_rss
from colbatch.diagnose import MemoryFacts, diagnose
from colbatch.metrics import StageMetrics
from tests.conftest import assert_accounting


def _frame(n: int) -> pl.DataFrame:
    return pl.DataFrame({"id": pl.int_range(0, n, eager=True),
                         "x": pl.int_range(0, n, eager=True).cast(pl.Float64) * 0.5,
                         "s": pl.int_range(0, n, eager=True).cast(pl.String) + "_text_padding"})


def burn(df: pl.DataFrame) -> pl.DataFrame:
    """A CPU-bound UDF: a pure-Python loop per batch (about 30 ms)."""
    t_end = time.process_time() + 0.03
    n = 0
    while time.process_time() < t_end:
        n += 1
    return df.with_columns(pl.lit(n).alias("n"))


def test_slow_udf_is_named_as_cpu_bound_with_a_workers_hint():
    report = (cb.from_arrow(_frame(40_000)).map_batches(burn, name="enrich", executor="inline")
              .foreach_batch(lambda df: None).run(progress=False, batch_size=2_000))
    assert_accounting(report)
    b = report.bottleneck
    assert b["resource"] == "cpu", b
    assert "enrich" in b["verdict"]
    assert "workers=" in b["recommendation"]


def test_gzip_input_is_named_as_decompression(tmp_path):
    path = tmp_path / "big.csv.gz"
    path.write_bytes(gzip.compress(_frame(1_500_000).write_csv().encode(), compresslevel=1))
    report = cb.scan_csv(path).foreach_batch(lambda df: None).run(progress=False)
    assert_accounting(report)
    b = report.bottleneck
    assert b["resource"] == "decompression", b
    assert "split the input" in b["recommendation"]


def test_slow_sink_is_named_as_the_sink():
    report = (cb.from_arrow(_frame(20_000)).foreach_batch(lambda df: time.sleep(0.05))
              .run(progress=False, batch_size=1_000))
    assert_accounting(report)
    b = report.bottleneck
    assert b["resource"] == "sink", b
    assert b["stage"] == "write"
    assert "foreach_batch" in b["verdict"]


def test_tight_memory_limit_is_named_as_memory(tmp_path):
    path = tmp_path / "in.csv"
    _frame(300_000).write_csv(path)
    limit = process_rss() + (8 << 20)
    report = cb.scan_csv(path).sink_parquet(tmp_path / "o.parquet").run(progress=False, memory_limit=limit)
    assert_accounting(report)
    b = report.bottleneck
    assert b["resource"] == "memory", b
    assert "memory_limit" in b["verdict"] and "memory_limit" in b["recommendation"]


@pytest.mark.parametrize(("sink", "resource", "words"), [
    ("postgresql table events", "database", "UNLOGGED"),
    ("duckdb o.duckdb table t", "database", "Parquet"),
    ("parquet out.parquet", "sink", "codec"),
])
def test_write_bound_verdict_names_the_kind_of_sink(sink, resource, words):
    stages = [StageMetrics("read", busy_s=0.1), StageMetrics("write", busy_s=0.9)]
    b = diagnose(stages, 1.0, source="csv in.csv", sink=sink)
    assert b["resource"] == resource and words in b["recommendation"]


def test_memory_error_makes_the_verdict_memory():
    stages = [StageMetrics("read", busy_s=0.9)]
    b = diagnose(stages, 1.0, source="csv in.csv", sink="x", memory=MemoryFacts(memory_errors=1))
    assert b["resource"] == "memory" and "MemoryError" in b["verdict"]


def test_no_saturated_stage_says_so():
    b = diagnose([StageMetrics("read", busy_s=0.1)], 1.0, source="csv a.csv", sink="x")
    assert b["resource"] == "none"


def test_report_has_timeline_gc_and_explanation_in_json_and_summary(tmp_path):
    report = (cb.from_arrow(_frame(20_000)).foreach_batch(lambda df: time.sleep(0.1))
              .run(progress=False, batch_size=5_000))
    d = report.to_dict()
    assert d["timeline"] and {"t", "cpu_main", "cpu_children", "queues", "rows", "busy"} <= set(d["timeline"][0])
    assert set(d["timeline"][-1]["queues"]) == {"read→transform", "transform→write"}
    assert {"pause_s", "max_pause_s", "collections"} <= set(d["gc"])
    assert "main_percent" in d["bottleneck"]["cpu"]
    assert "why       :" in report.summary()


HOSTILE = '<script>alert("x")</script>&<img src=x onerror=alert(1)>'


def test_html_report_renders_charts_and_escapes_hostile_column_names(tmp_path):
    path = tmp_path / "in.csv"
    # The same hostile header twice: the source renames the second one and warns, naming both.
    path.write_text(f'id,"{HOSTILE.replace(chr(34), chr(34) * 2)}","{HOSTILE.replace(chr(34), chr(34) * 2)}"\n'
                    + "".join(f"{i},{i},{-i}\n" for i in range(1, 200)))
    pipeline = cb.scan_csv(path).validate(pl.col(HOSTILE) > 2, name=HOSTILE)
    report = pipeline.foreach_batch(lambda df: None).run(progress=False, max_error_rate=None)
    assert report.rows_rejected == 2
    page = report._repr_html_()
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;" in page
    assert "<svg" in page  # charts of throughput, RSS and stage utilisation
    out = tmp_path / "report.html"
    report.save_html(out)
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text
    assert "bottleneck" in text


def test_cli_run_writes_an_html_report(tmp_path):
    from colbatch.cli import main

    _frame(1_000).write_csv(tmp_path / "in.csv")
    job = tmp_path / "job.toml"
    job.write_text(f'[source]\npath = "{tmp_path / "in.csv"}"\n[sink]\npath = "{tmp_path / "o.parquet"}"\n')
    assert main(["run", str(job), "--no-progress", "--html", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "bottleneck" in page and "<svg" in page


def test_aggregate_run_keeps_the_new_verdict_fields(tmp_path):
    report = (cb.from_arrow(_frame(5_000)).aggregate("SELECT count(*) AS n FROM input")
              .sink_parquet(tmp_path / "a.parquet").run(progress=False))
    assert {"resource", "explanation", "recommendation", "busy_share"} <= set(report.bottleneck)
