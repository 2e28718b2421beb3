"""The tuner: sample runs at several batch sizes, a recommendation, a table, a PNG plot, and JOB.tune.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_recommend_picks_the_smallest_size_within_five_percent_of_the_best():
    pts = [TunePoint(1_000, 50.0, 0.02, 1), TunePoint(10_000, 97.0, 0.01, 2), TunePoint(100_000, 100.0, 0.01, 3)]
    assert recommend(pts) == 10_000
    pts[1].throughput = 90.0
    assert recommend(pts) == 100_000


def test_recommend_skips_sizes_that_do_not_fit_memory():
    pts = [TunePoint(1_000, 80.0, 0.01, 1), TunePoint(10_000, 100.0, 0.01, 9, fits=False)]
    assert recommend(pts) == 1_000


def test_tune_measures_each_size_on_a_sample_and_never_writes_the_sink(csv_path, tmp_path):
    out = tmp_path / "real.parquet"
    pipeline = cb.scan_csv(csv_path, schema=SCHEMA).filter("amount > 0").sink_parquet(out)
    result = cb.tune(pipeline, sizes=[32_768, 2_048, 8_192], sample_rows=20_000, repeats=2, budget=None)
    assert [p.rows for p in result.points] == [2_048, 8_192, 32_768]
    assert all(len(p.runs) == 2 and p.throughput > 0 and p.peak_rss_bytes > 0 for p in result.points)
    assert result.recommended in {2_048, 8_192, 32_768}
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


def test_sample_source_stops_after_the_first_rows_and_restarts_per_run(csv_path):
    from colbatch.tuning import _Head

    head = _Head(cb.scan_csv(csv_path, schema=SCHEMA).source, 5_000)
    for _ in range(2):
        batches = [b for s in head.splits() for b in head.read(s, batch_rows=1_000, on_reject=lambda f: None)]
        total = sum(b.rows_read for b in batches)
        assert 5_000 <= total < 5_000 + max(b.rows_read for b in batches)
        assert batches[0].first_row == 0


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


def test_tune_budget_is_a_share_of_a_full_runs_time(monkeypatch):
    from types import SimpleNamespace

    tune_mod = sys.modules["colbatch.tuning"]
    monkeypatch.setattr(tune_mod, "DEFAULT_MIN_BUDGET_ROWS", 0)
    now = [0.0]
    plan = tune_mod._Budget(1_000_000, 0.1, clock=lambda: now[0])
    assert plan.fits(10**9)  # nothing is known before the first run
    # The first run read 10k rows of 10 bytes at 100k rows/s: the input has ~100k rows, a full
    # run takes ~1 s, so tuning may take 0.1 s in all.
    now[0] = 0.04  # 0.1 s of rows at 100k rows/s, plus 0.01 s of start-up and commit
    plan.spent(SimpleNamespace(rows_read=3_000, stages=[SimpleNamespace(bytes_in=30_000)]), 100_000.0)
    assert plan.input_rows == pytest.approx(100_000)
    assert plan.fits(4_900)  # 0.04 s spent + 0.01 s fixed + 0.049 s
    assert not plan.fits(6_000)  # 0.04 + 0.01 + 0.06 is past 0.1 s
    # A faster size makes the full run, and so the budget, shorter.
    plan.spent(SimpleNamespace(rows_read=4_000, stages=[SimpleNamespace(bytes_in=40_000)]), 200_000.0)
    now[0] = 0.06
    assert not plan.fits(1_000)  # budget now 0.05 s, already spent
    assert tune_mod._Budget(None, 0.1).fits(10**9)  # unknown input size: no limit


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


def test_tune_without_a_budget_measures_every_size(csv_path, tmp_path):
    pipeline = cb.scan_csv(csv_path, schema=SCHEMA).sink_parquet(tmp_path / "o.parquet")
    result = cb.tune(pipeline, sizes=[2_000, 8_000, 40_000], sample_rows=40_000, repeats=1, budget=None)
    assert [p.rows for p in result.points] == [2_000, 8_000, 40_000]
    assert result.rows_read == 3 * 40_000


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
