"""The command line: exit codes, one-line errors, reports, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # The checkout under test, whatever copy of colbatch is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "colbatch", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("colbatch: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture
def job(tmp_path: Path):
    (tmp_path / "in.csv").write_text("id,amount,country\n1,2.5,US\n2,-1,DE\n3,4.0,XX\n4,x,US\n5,1.0,FR\n")

    def _job(extra: str = "", source: str = 'path = "in.csv"\nschema = { id = "int64", amount = "float64" }') -> Path:
        text = f"""
[source]
{source}

[[steps]]
validate = "amount > 0"
name = "positive_amount"

[[steps]]
filter = "country <> 'XX'"

[[steps]]
with_columns = ["amount * 1.1 AS value"]

[sink]
path = "out/events.parquet"

[rejects]
path = "out/rejects.parquet"
{extra}
"""
        p = tmp_path / "job.toml"
        p.write_text(text)
        return p

    return _job


def test_run_job_ok_writes_report(job, tmp_path):
    job("[run]\nmax_error_rate = 0.5\nbatch_size = 2\n")
    proc = cli("run", "job.toml", "--report", "r.json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["status"] == "succeeded"
    assert (data["rows_read"], data["rows_written"], data["rows_filtered"], data["rows_rejected"]) == (5, 2, 1, 2)
    assert data["rows_read"] == data["rows_written"] + data["rows_filtered"] + data["rows_rejected"]
    assert (tmp_path / "out" / "events.parquet").exists()
    assert (tmp_path / "out" / "rejects.parquet").exists()
    assert "Traceback" not in proc.stderr


def test_failing_job_exits_1_with_one_line(job, tmp_path):
    job("[run]\nmax_errors = 1\n")
    proc = cli("run", "job.toml", "--report", "r.json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert "error threshold exceeded" in line and "max_errors=1" in line and "out/rejects.parquet" in line
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "failed"
    assert not (tmp_path / "out" / "events.parquet").exists()


@pytest.mark.parametrize("extra,needle", [
    ("[run]\nbogus_key = 1\n", "bogus_key"),
    ("[sink2]\npath = 'x'\n", "sink2"),
])
def test_unknown_key_exits_2_naming_it(job, tmp_path, extra, needle):
    job(extra)
    proc = cli("run", "job.toml", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2
    assert needle in one_line_error(proc)


def test_bad_type_name_exits_2_naming_it(job, tmp_path):
    job(source='path = "in.csv"\nschema = { id = "int65" }')
    proc = cli("run", "job.toml", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "int65" in line and "`id`" in line


def test_missing_source_file_fails_naming_it(job, tmp_path):
    job(source='path = "nope.csv"')
    proc = cli("run", "job.toml", "--no-progress", cwd=tmp_path)
    assert proc.returncode in (1, 2)
    assert "nope.csv" in one_line_error(proc)


def test_missing_job_file_exits_2(tmp_path):
    proc = cli("run", "missing.toml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "missing.toml" in one_line_error(proc)


def test_bad_sql_in_job_exits_2(job, tmp_path):
    p = job()
    p.write_text(p.read_text().replace('filter = "country <> \'XX\'"', 'filter = "country <>>> ("'))
    proc = cli("run", "job.toml", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2
    assert "not a valid SQL expression" in one_line_error(proc)


def test_debug_shows_traceback(job, tmp_path):
    job(source='path = "nope.csv"')
    proc = cli("run", "job.toml", "--no-progress", "--debug", cwd=tmp_path)
    assert proc.returncode in (1, 2)
    assert "Traceback" in proc.stderr


def test_usage_error_exits_2(tmp_path):
    proc = cli("frobnicate", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_demo_runs_and_prints_duckdb_output(tmp_path):
    proc = cli("demo", "--out", str(tmp_path / "demo"), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "DuckDB: revenue per category" in proc.stdout
    assert "DuckDB: rejected rows by stage" in proc.stdout
    assert "PURCHASE" in proc.stdout
    assert "validate" in proc.stdout and "parse" in proc.stdout
    assert (tmp_path / "demo" / "events.parquet").exists()


def test_compile_package_gives_every_module_bytecode():
    """What `bench` runs first: every module gets bytecode, even under PYTHONDONTWRITEBYTECODE."""
    import importlib.util

    import colbatch
    from colbatch.bench import compile_package

    root = Path(colbatch.__file__).parent
    sources = sorted(root.rglob("*.py"))
    victim = Path(importlib.util.cache_from_source(str(root / "bench" / "core.py")))
    victim.unlink(missing_ok=True)
    assert compile_package()
    missing = [s for s in sources if not Path(importlib.util.cache_from_source(str(s))).exists()]
    assert not missing and victim.exists()


def test_a_run_ends_with_the_atexit_handlers_threads_and_output_of_the_users_modules(tmp_path):
    # `python -m colbatch` skips the interpreter's module teardown at the end; what user code can
    # see of a normal exit still happens: its atexit handlers, its non-daemon threads, its output;
    # idle thread pools end as the interpreter ends them.
    (tmp_path / "in.csv").write_text("id\n1\n2\n3\n")
    (tmp_path / "shutdown_udf.py").write_text(
        "import atexit, sys, threading, time\n"
        "from pathlib import Path\n"
        "atexit.register(lambda: Path('atexit.txt').write_text('ran'))\n"
        "def late():\n"
        "    time.sleep(0.2)\n"
        "    Path('thread.txt').write_text('joined')\n"
        "threading.Thread(target=late).start()\n"
        "import concurrent.futures\n"
        "idle_pool = concurrent.futures.ThreadPoolExecutor(1)  # never shut down: exit must not wait on it\n"
        "idle_pool.submit(int).result()\n"
        "sys.stdout.write('buffered output')\n"
        "def tag(df):\n"
        "    return df\n")
    (tmp_path / "job.toml").write_text('[source]\npath = "in.csv"\n\n[[steps]]\nudf = "shutdown_udf:tag"\n\n'
                                       '[sink]\npath = "out.parquet"\n')
    env_path = os.pathsep.join([str(tmp_path), str(REPO)])
    proc = subprocess.run([sys.executable, "-m", "colbatch", "run", "job.toml", "--no-progress"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": env_path})
    assert proc.returncode == 0, proc.stderr
    assert "buffered output" in proc.stdout and "3 written" in proc.stdout
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "thread.txt").read_text() == "joined"


def test_parquet_to_parquet_loads_neither_pyarrow_nor_numpy_nor_pandas(tmp_path):
    # Polars reads and writes Parquet itself: the other libraries would cost ~0.3 s of imports.
    import polars as pl

    pl.DataFrame({"id": [1, 2]}).write_parquet(tmp_path / "in.parquet")
    code = ("import sys, colbatch as cb\n"
            "r = cb.scan_parquet('in.parquet').sink_parquet('out.parquet').run(progress=False)\n"
            "print(r.rows_written, *(m in sys.modules for m in ('pyarrow', 'numpy', 'pandas')))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.stdout.split() == ["2", "False", "False", "False"], proc.stderr
