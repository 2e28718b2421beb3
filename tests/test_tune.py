"""The tuner: sample runs at several batch sizes, a recommendation, a table, a PNG plot, and JOB.tune.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import colbatch as cb
from colbatch.cli import main
from colbatch.config import load_job
from colbatch.tuning import TunePoint, recommend
from tests.conftest import SCHEMA, make_frame

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def csv_path(tmp_path: Path) -> Path:
    path = tmp_path / "in.csv"
    make_frame(40_000).write_csv(path)
    return path


@pytest.fixture
def big_csv(tmp_path: Path) -> Path:
    """Room for a few segments of each size: text blocks are cut by bytes, so batches come out near their size."""
    path = tmp_path / "big.csv"
    make_frame(200_000).write_csv(path)
    return path


def test_recommend_picks_the_smallest_size_within_five_percent_of_the_best():
    pts = [TunePoint(1_000, 50.0, 0.02, 1), TunePoint(10_000, 97.0, 0.01, 2), TunePoint(100_000, 100.0, 0.01, 3)]
    assert recommend(pts) == 10_000
    pts[1].throughput = 90.0
    assert recommend(pts) == 100_000


def test_recommend_skips_sizes_that_do_not_fit_memory():
    pts = [TunePoint(1_000, 80.0, 0.01, 1), TunePoint(10_000, 100.0, 0.01, 9, fits=False)]
    assert recommend(pts) == 1_000


def test_tune_measures_each_size_in_one_run_and_never_writes_the_sink(big_csv, tmp_path):
    out = tmp_path / "real.parquet"
    pipeline = cb.scan_csv(big_csv, schema=SCHEMA).filter("amount > 0").sink_parquet(out)
    result = cb.tune(pipeline, sizes=[8_192, 4_096], repeats=2, budget=None)
    assert [p.rows for p in result.points] == [4_096, 8_192]
    assert all(len(p.runs) == 2 and p.throughput > 0 and p.peak_rss_bytes > 0 for p in result.points)
    # One warm-up batch and two timed batches per size, all in one run over the head of the input.
    assert result.runs == 1
    assert 0.8 * (4_096 + 2 * (4_096 + 8_192)) <= result.rows_read < 100_000
    assert result.recommended in {4_096, 8_192}
    best = result.best().throughput
    rec = next(p for p in result.points if p.rows == result.recommended)
    assert rec.throughput >= 0.95 * best
    assert not out.exists()
    assert not list(tmp_path.glob("real*"))
    table = result.table()
    assert "<- recommended" in table and "rows/s" in table
    assert json.loads(json.dumps(result.to_dict()))["batch_rows"] == result.recommended


def test_tune_never_calls_a_non_file_sink_and_says_so(csv_path):
    seen = []
    pipeline = cb.scan_csv(csv_path, schema=SCHEMA).foreach_batch(lambda df: seen.append(df.height), retries=0)
    result = cb.tune(pipeline, sizes=[4_096], sample_rows=5_000, repeats=1)
    assert seen == []  # the sample writes Parquet to a temp dir instead
    assert "cost is not measured" in result.table()


@pytest.mark.parametrize("kind", ["csv", "arrow"])
def test_planned_source_reads_in_the_plans_sizes_and_stops_when_it_is_done(csv_path, kind):
    from colbatch.tuning import _Plan, _Planned

    # CSV asks the plan before each block itself; an in-memory table takes one size per read and is
    # re-opened at the current row when the size changes.
    inner = (cb.scan_csv(csv_path, schema=SCHEMA) if kind == "csv"
             else cb.from_arrow(pl.read_csv(csv_path))).source
    plan = _Plan([4_000, 8_000], 2, share=None, sample_rows=None, memory_limit=None)
    source = _Planned(inner)
    batches = []
    for split in source.splits():
        for batch in source.read(split, batch_rows=plan, on_reject=lambda f: None):
            plan.note_bytes(batch.num_rows, batch.data.estimated_size(), batch.bytes_read)
            batches.append(batch)
    assert plan.done and plan.entries == [4_000, 4_000, 8_000, 4_000, 8_000]
    assert [b.first_row for b in batches] == list(np.cumsum([0] + [b.rows_read for b in batches[:-1]]))
    for batch, size in zip(batches, plan.entries, strict=True):
        assert size / 1.5 <= batch.rows_read <= size * 1.5  # CSV blocks are cut by bytes: near the size
        assert kind == "csv" or batch.rows_read == size


def test_plan_lays_out_what_fits_the_budget_smallest_first(monkeypatch):
    tune_mod = sys.modules["colbatch.tuning"]
    monkeypatch.setattr(tune_mod, "DEFAULT_MIN_BUDGET_ROWS", 0)
    plan = tune_mod._Plan([1_000, 2_000, 4_000], 3, share=0.1, sample_rows=None, memory_limit=None)
    plan.input_bytes = 1_000_000
    assert plan() == 1_000  # the warm-up batch, before anything is known
    plan.note_bytes(1_000, 50_000, source_bytes=10_000)  # 10 bytes a row: the input has ~100k rows
    assert plan.input_rows() == 100_000
    # Batches may read DEFAULT_WORK_SHARE of a tenth of the input: 5,000 rows.
    assert plan.budget() == pytest.approx(tune_mod.DEFAULT_WORK_SHARE * 0.1 * 100_000)
    assert [plan() for _ in range(4)] == [1_000, 2_000, 1_000, 1_000]
    assert plan.done
    assert any("4,000 not measured" in n for n in plan.notes)


def test_tune_reads_a_short_input_again_for_sizes_it_could_not_finish(tmp_path):
    path = tmp_path / "short.csv"
    make_frame(24_000).write_csv(path)
    result = cb.tune(cb.scan_csv(path, schema=SCHEMA).sink_parquet(tmp_path / "o.parquet"), sizes=[4_000, 12_000],
                     repeats=2, budget=None)
    # Warm-up, 4k, 12k, 4k, then the input ends: the second 12k batch is timed in a rerun.
    assert result.runs >= 2
    assert [len(p.runs) for p in result.points] == [2, 2]


def test_tune_times_a_udf_pipeline_without_waiting_for_it_to_drain(big_csv, tmp_path, monkeypatch):
    tune_mod = sys.modules["colbatch.tuning"]
    monkeypatch.setattr(tune_mod, "_DRAIN_STALL_S", 0.5)

    def double(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(pl.col("amount") * 2)

    pipeline = (cb.scan_csv(big_csv, schema=SCHEMA).map_batches(double, executor="threads", concurrency=2)
                .sink_parquet(tmp_path / "o.parquet"))
    result = cb.tune(pipeline, sizes=[4_000, 8_000], repeats=1, budget=None)
    # A UDF stage holds several batches before it answers: a drain between sizes would stall it.
    assert not any("did not drain" in n for n in result.notes)
    assert [p.rows for p in result.points] == [4_000, 8_000]


def test_tune_plot_is_a_png_and_shows_in_a_notebook(csv_path, tmp_path):
    result = cb.tune(cb.scan_csv(csv_path).sink_parquet(tmp_path / "o.parquet"), sizes=[4_096, 16_384],
                     sample_rows=10_000, repeats=1)
    png = tmp_path / "tune.png"
    result.plot(png)
    assert png.read_bytes().startswith(PNG)
    assert result._repr_png_().startswith(PNG)


def test_cli_tune_writes_the_recommendation_that_auto_starts_from(csv_path, tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text(f'[source]\npath = "{csv_path}"\n[sink]\npath = "{tmp_path / "out.parquet"}"\n')
    code = main(["tune", str(job), "--sizes", "2048,8192", "--sample-rows", "10000", "--repeats", "1",
                 "--write", "--plot", str(tmp_path / "t.png")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "recommended batch_size" in printed and "job.tune.json" in printed
    stored = json.loads((tmp_path / "job.tune.json").read_text())
    assert stored["batch_rows"] in (2048, 8192)
    assert (tmp_path / "t.png").read_bytes().startswith(PNG)
    assert not (tmp_path / "out.parquet").exists()
    report = load_job(job).run(progress=False)
    assert report.batch_sizes[0][1] == stored["batch_rows"]
    assert pl.read_parquet(tmp_path / "out.parquet").height == 40_000


def test_cli_tune_bad_sizes_is_a_usage_error(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text('[source]\npath = "x.csv"\n[sink]\npath = "o.parquet"\n')
    make_frame(10).write_csv(tmp_path / "x.csv")
    assert main(["tune", str(job), "--sizes", "lots"]) == 2
    assert "--sizes" in capsys.readouterr().err


def test_python_m_colbatch_tune_help_runs():
    out = subprocess.run([sys.executable, "-m", "colbatch", "tune", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0 and "--write" in out.stdout


def test_tune_notes_every_size_it_left_out(tmp_path, monkeypatch):
    tune_mod = sys.modules["colbatch.tuning"]
    monkeypatch.setattr(tune_mod, "DEFAULT_MIN_BUDGET_ROWS", 0)
    path = tmp_path / "in.csv"
    make_frame(100_000).write_csv(path)
    sizes = [4_096, 16_384, 65_536]
    result = cb.tune(cb.scan_csv(path, schema=SCHEMA).sink_parquet(tmp_path / "o.parquet"), sizes=sizes,
                     budget=0.05)
    measured = [p.rows for p in result.points]
    assert measured and measured[0] == 4_096  # the first size is always measured
    left_out = [s for s in sizes if s not in measured]
    assert 65_536 in left_out  # 2 batches of it are over the whole input's tenth
    for size in left_out:
        assert any(f"{size:,} not measured" in n for n in result.notes)


def test_tune_without_a_budget_measures_every_size(big_csv, tmp_path):
    pipeline = cb.scan_csv(big_csv, schema=SCHEMA).sink_parquet(tmp_path / "o.parquet")
    result = cb.tune(pipeline, sizes=[4_000, 8_000, 16_000, 32_000], repeats=1, budget=None)
    assert [p.rows for p in result.points] == [4_000, 8_000, 16_000, 32_000]
    assert result.runs == 1 and result.rows_read < 100_000


def test_tune_sample_rows_caps_the_rows_read(csv_path, tmp_path):
    pipeline = cb.scan_csv(csv_path, schema=SCHEMA).sink_parquet(tmp_path / "o.parquet")
    result = cb.tune(pipeline, sizes=[4_000, 8_000, 16_000], repeats=1, sample_rows=20_000, budget=None)
    assert [p.rows for p in result.points] == [4_000, 8_000]
    assert any("16,000 not measured: past sample_rows=20,000" in n for n in result.notes)


@pytest.mark.slow
def test_bench_tune_runs_and_prints_auto_against_the_fixed_sizes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "colbatch", "bench", "tune", "--only", "expr", "--rows", "20000",
                           "--runs", "1", "--dir", str(tmp_path), "--json", str(tmp_path / "raw.json")],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "auto / best fixed:" in proc.stdout
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert set(raw["expr"]["rates"]) == {"auto", "8,192", "32,768", "131,072", "524,288", "1,048,576"}
    assert raw["expr"]["failures"] == []
