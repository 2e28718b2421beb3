"""Whole-split tasks on a real Dask LocalCluster (worker processes): same output, rejects and ledger as a local run."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pytest

import colbatch as cb
from colbatch.config import build_job
from colbatch.runner import check_accounting
from tests.conftest import assert_accounting, data_files, make_frame, no_temp_files

distributed = pytest.importorskip("dask.distributed")

REPO = Path(__file__).resolve().parents[1]
FILES = 4
FILE_ROWS = 5_000  # ~80 KB: the CSV reader cuts it into more than one batch
BATCH = 1_000
PART_ROWS = 2_000  # several parts per split, so part numbering is exercised


# -- user functions: module level so that worker processes import them ----------------------------


def _note(kind: str) -> None:
    """Record which process did something, in a file under $CB_TEST_DIR (shared with the workers)."""
    if "CB_TEST_DIR" not in os.environ:
        return
    with open(Path(os.environ["CB_TEST_DIR"]) / f"{kind}-{os.getpid()}", "a") as fh:
        fh.write("x")


def _setenv(key: str, value: str) -> None:
    os.environ[key] = value


def _pids(scratch: Path, kind: str) -> set[int]:
    return {int(p.name.rsplit("-", 1)[1]) for p in scratch.glob(f"{kind}-*")}


def label(df: pl.DataFrame) -> pl.DataFrame:
    """Per-row Python; fails on ids that are multiples of 211 (isolated to those rows)."""
    if df.height:
        _note("label")
    if (df["id"] % 211 == 0).any():
        raise ValueError("id is a multiple of 211")
    tags = [f"{t}-{int(a * 100) % 7}" for t, a in zip(df["type"].to_list(), df["amount"].to_list())]
    return df.with_columns(pl.Series("tag", tags, dtype=pl.String))


class Counter:
    """Stateful UDF: its __init__ is noted once per instance."""

    def __init__(self) -> None:
        _note("init")

    def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(pl.lit(1, dtype=pl.Int64).alias("one"))


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster:
        yield cluster


@pytest.fixture
def client(cluster):
    with distributed.Client(cluster) as client:
        yield client


@pytest.fixture
def scratch(tmp_path, monkeypatch, client) -> Path:
    """A directory the driver and the workers both write notes to."""
    path = tmp_path / "scratch"
    path.mkdir()
    monkeypatch.setenv("CB_TEST_DIR", str(path))
    client.run(_setenv, "CB_TEST_DIR", str(path))
    return path


@pytest.fixture
def inputs(tmp_path) -> Path:
    """Four CSV files (one gzipped) of 5,000 rows, with unparsable and uncastable lines among them."""
    root = tmp_path / "in"
    root.mkdir()
    frame = make_frame(FILES * FILE_ROWS)
    for i in range(FILES):
        text = frame.slice(i * FILE_ROWS, FILE_ROWS).write_csv()
        lines = text.splitlines()
        lines.insert(10 + i, f"{90000 + i},not-a-number,click")  # cast reject
        lines.insert(500, "1,2")  # too few fields: parse reject
        data = ("\n".join(lines) + "\n").encode()
        if i == 2:
            (root / f"events-{i}.csv.gz").write_bytes(gzip.compress(data))
        else:
            (root / f"events-{i}.csv").write_bytes(data)
    return root


def pipeline(inputs: Path, out: Path) -> cb.Pipeline:
    return (cb.scan_csv(str(inputs), schema={"id": "int64", "amount": "float64", "type": "str"})
            .validate("amount > 0", name="positive_amount")
            .map_batches(label, isolate_rows=True,
                         schema={"id": "int64", "amount": "float64", "type": "str", "tag": "str"})
            .with_columns("upper(tag) AS tag_upper")
            .sink_parquet(out, part_rows=PART_ROWS)
            .sink_rejects(str(out) + "-rejects.parquet")
            .with_options(max_error_rate=None))


def except_all_both_ways(a: list[Path] | Path, b: list[Path] | Path) -> tuple[int, int]:
    """Rows of `a` missing from `b` and of `b` missing from `a`, counting duplicates."""
    def files(x):
        return [str(p) for p in x] if isinstance(x, list) else [str(x)]

    con = duckdb.connect()
    q = "SELECT count(*) FROM (SELECT * FROM read_parquet($a) EXCEPT ALL SELECT * FROM read_parquet($b))"
    return (con.execute(q, {"a": files(a), "b": files(b)}).fetchone()[0],
            con.execute(q, {"a": files(b), "b": files(a)}).fetchone()[0])


# -- whole-split tasks ------------------------------------------------------------------------------


def test_split_tasks_give_the_same_parts_rows_and_rejects_as_a_local_run(inputs, tmp_path, client, scratch):
    local = pipeline(inputs, tmp_path / "local").run(progress=False, batch_size=BATCH)
    local_pids = _pids(scratch, "label")
    remote = pipeline(inputs, tmp_path / "dask").run(progress=False, batch_size=BATCH, executor=client)
    for report in (local, remote):
        check_accounting(report)
        assert_accounting(report)

    parts_local, parts_dask = data_files(tmp_path / "local"), data_files(tmp_path / "dask")
    assert [p.name for p in parts_dask] == [p.name for p in parts_local]
    assert len(parts_dask) > FILES  # several parts per split
    assert except_all_both_ways(parts_local, parts_dask) == (0, 0)
    assert except_all_both_ways(tmp_path / "local-rejects.parquet", tmp_path / "dask-rejects.parquet") == (0, 0)
    assert remote.rejects_by_stage == local.rejects_by_stage
    assert set(remote.rejects_by_stage) == {"parse", "cast", "validate", "udf"}
    assert (remote.rows_read, remote.rows_written, remote.rows_rejected) == \
        (local.rows_read, local.rows_written, local.rows_rejected)
    assert [s.name for s in remote.stages] == [s.name for s in local.stages]
    assert [(s.rows_in, s.rows_out, s.rows_rejected) for s in remote.stages] == \
        [(s.rows_in, s.rows_out, s.rows_rejected) for s in local.stages]
    # The UDF ran in the Dask worker processes, and nothing was left staged.
    worker_pids = set(client.run(os.getpid).values())
    assert _pids(scratch, "label") - local_pids == worker_pids
    assert os.getpid() not in worker_pids
    assert not (tmp_path / "dask" / ".colbatch-staging").exists()
    assert no_temp_files(tmp_path) == []
    assert "split task(s)" in remote.bottleneck["executor"]
    assert sorted(remote.outputs) == [str(p) for p in parts_dask]


def test_a_dask_run_and_a_local_run_are_the_same_job(inputs, tmp_path, client):
    out = tmp_path / "out"
    first = pipeline(inputs, out).run(progress=False, batch_size=BATCH, executor=client)
    assert first.succeeded and not first.skipped
    again_locally = pipeline(inputs, out).run(progress=False, batch_size=BATCH)
    assert again_locally.skipped  # the ledger the driver wrote says the job is complete
    rows = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{out}/*.parquet')").fetchone()[0]
    assert rows == first.rows_written


def test_resume_after_a_partial_local_run_commits_only_the_missing_splits(inputs, tmp_path, client):
    out = tmp_path / "out"
    full = pipeline(inputs, tmp_path / "full").run(progress=False, batch_size=BATCH)
    # A run that stopped after its first split: its ledger lists split 0 as complete.
    pipeline(inputs, out).run(progress=False, batch_size=BATCH)
    ledger_path = Path(str(out) + ".colbatch.json")
    ledger = json.loads(ledger_path.read_text())
    keep = {k: v for k, v in ledger["splits"].items() if k.startswith("00000:")}
    ledger["splits"], ledger["finished"] = keep, False
    ledger["units"] = [u for u in ledger["units"] if u["split"] in keep]
    ledger["files"] = [u["file"] for u in ledger["units"]]
    ledger_path.write_text(json.dumps(ledger))
    for part in out.glob("part-0000[1-9]-*"):
        part.unlink()
    resumed = pipeline(inputs, out).run(progress=False, batch_size=BATCH, executor=client, resume=True)
    assert resumed.rows_resumed == FILE_ROWS + 2  # the first file's rows and its cast and parse rejects
    assert except_all_both_ways(data_files(out), data_files(tmp_path / "full")) == (0, 0)
    assert [p.name for p in data_files(out)] == [p.name for p in data_files(tmp_path / "full")]
    assert resumed.rows_read + resumed.rows_resumed == full.rows_read


def test_class_udf_is_instantiated_once_per_worker_not_per_split(inputs, tmp_path, client, scratch):
    report = (cb.scan_csv(str(inputs), schema={"id": "int64", "amount": "float64", "type": "str"})
              .map_batches(Counter, schema={"id": "int64", "amount": "float64", "type": "str", "one": "int64"})
              .sink_parquet(tmp_path / "out")
              .run(progress=False, batch_size=BATCH, executor=client, max_error_rate=None))
    assert report.succeeded
    inits = {p.name: p.stat().st_size for p in scratch.glob("init-*")}
    assert set(inits) <= {f"init-{pid}" for pid in client.run(os.getpid).values()}
    assert all(n == 1 for n in inits.values()), inits


def test_max_errors_stops_a_dask_run_and_keeps_its_rejects(inputs, tmp_path, client):
    with pytest.raises(cb.ErrorThresholdExceeded, match="max_errors=3") as info:
        pipeline(inputs, tmp_path / "out").run(progress=False, batch_size=BATCH, executor=client, max_errors=3)
    report = info.value.report
    assert report.status == "failed"
    rejects = pl.read_parquet(tmp_path / "out-rejects.parquet")
    assert rejects.height == report.rows_rejected > 3
    assert not (tmp_path / "out" / ".colbatch-staging").exists()
    assert no_temp_files(tmp_path) == []


def test_a_corrupt_file_fails_the_dask_run_naming_it(inputs, tmp_path, client):
    bad = inputs / "events-2.csv.gz"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated gzip
    with pytest.raises(cb.SourceError, match="events-2.csv.gz"):
        pipeline(inputs, tmp_path / "out").run(progress=False, batch_size=BATCH, executor=client)
    assert not (tmp_path / "out" / ".colbatch-staging").exists()


def test_single_file_output_falls_back_to_shipping_batches_with_a_note(tmp_path, client, scratch):
    src = tmp_path / "in.csv"
    make_frame().write_csv(src)

    def p():
        return cb.scan_csv(str(src)).map_batches(
            label, isolate_rows=True, schema={"id": "int64", "amount": "float64", "type": "str", "tag": "str"}
        ).sink_parquet(tmp_path / "one.parquet")

    local = p().run(progress=False, batch_size=BATCH)
    local_rows = pl.read_parquet(tmp_path / "one.parquet")
    remote = p().run(progress=False, batch_size=BATCH, executor=client, overwrite=True)
    assert any("shipping map_batches batches" in w and "single file" in w for w in remote.warnings)
    assert pl.read_parquet(tmp_path / "one.parquet").equals(local_rows)
    assert remote.rows_rejected == local.rows_rejected > 0
    assert _pids(scratch, "label") - {os.getpid()} == set(client.run(os.getpid).values())


def test_postgres_table_source_runs_as_split_tasks(pg_dsn, pg_schema, tmp_path, client):
    from tests.pg import pg_query

    pg_query(pg_dsn, f'CREATE TABLE "{pg_schema}".events (id bigint, amount double precision, type text)')
    pg_query(pg_dsn, f'INSERT INTO "{pg_schema}".events SELECT i, (i % 37) - 5, (ARRAY[\'click\', \'view\'])[1 + i % 2] '
                     f"FROM generate_series(1, 3000) i")

    def p(out):
        return (cb.scan_postgres(pg_dsn, table="events", schema=pg_schema, partition_on="id", partitions=3)
                .map_batches(label, isolate_rows=True,
                             schema={"id": "int64", "amount": "float64", "type": "str", "tag": "str"})
                .sink_parquet(out).with_options(max_error_rate=None))

    local = p(tmp_path / "local").run(progress=False)
    remote = p(tmp_path / "dask").run(progress=False, executor=client)
    assert not remote.warnings  # no fallback: the workers read the table themselves
    assert [f.name for f in data_files(tmp_path / "dask")] == [f.name for f in data_files(tmp_path / "local")]
    assert len(data_files(tmp_path / "dask")) == 3
    assert except_all_both_ways(data_files(tmp_path / "local"), data_files(tmp_path / "dask")) == (0, 0)
    assert remote.rows_rejected == local.rows_rejected > 0
    assert_accounting(remote)


# -- addresses and client lifetime ------------------------------------------------------------------


def _clients(client) -> int:
    return len(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.clients)))


def test_address_from_the_job_file_runs_through_the_cli_and_matches_a_local_run(inputs, tmp_path, cluster, client):
    def job(out: Path, run: str) -> Path:
        path = tmp_path / f"{out.name}.toml"
        path.write_text(f"""
[source]
path = "{inputs}"
format = "csv"
schema = {{ id = "int64", amount = "float64", type = "str" }}

[[steps]]
validate = "amount > 0"
name = "positive_amount"

[[steps]]
udf = "tests.test_dask:label"
isolate_rows = true
schema = {{ id = "int64", amount = "float64", type = "str", tag = "str" }}

[sink]
path = "{out}"
part_rows = {PART_ROWS}

[rejects]
path = "{out}-rejects.parquet"

[run]
batch_size = {BATCH}
max_error_rate = 0.5
{run}
""")
        return path

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "CB_TEST_DIR": str(tmp_path)}
    before = _clients(client)
    for name, run in (("local", ""), ("dask", f'executor = "{cluster.scheduler_address}"')):
        proc = subprocess.run([sys.executable, "-m", "colbatch", "run", str(job(tmp_path / name, run)),
                               "--no-progress", "--report", str(tmp_path / f"{name}.json")],
                              cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
    assert _clients(client) == before
    assert except_all_both_ways(data_files(tmp_path / "local"), data_files(tmp_path / "dask")) == (0, 0)
    assert except_all_both_ways(tmp_path / "local-rejects.parquet", tmp_path / "dask-rejects.parquet") == (0, 0)
    assert [p.name for p in data_files(tmp_path / "dask")] == [p.name for p in data_files(tmp_path / "local")]


def test_a_client_made_from_an_address_is_closed_and_a_passed_client_is_not(inputs, tmp_path, cluster, client):
    before = _clients(client)
    report = pipeline(inputs, tmp_path / "a").run(progress=False, batch_size=BATCH,
                                                  executor=cluster.scheduler_address)
    assert report.succeeded
    assert _clients(client) == before
    pipeline(inputs, tmp_path / "b").run(progress=False, batch_size=BATCH, executor=client)
    assert client.status == "running"
    assert client.submit(sum, [1, 2]).result() == 3


def test_step_level_address_connects_for_the_step_and_closes_after(tmp_path, cluster, client):
    before = _clients(client)
    df = make_frame()
    report = (cb.from_arrow(df.to_arrow())
              .map_batches(Counter, executor=cluster.scheduler_address,
                           schema={"id": "int64", "amount": "float64", "type": "str", "one": "int64"})
              .sink_parquet(tmp_path / "o.parquet")
              .run(progress=False, batch_size=BATCH))
    assert report.rows_written == df.height
    assert _clients(client) == before


@pytest.mark.parametrize("value", ["localhost:8786", 8786, "processes"])
def test_run_executor_must_be_a_scheduler_address(value, tmp_path):
    make_frame().write_csv(tmp_path / "in.csv")
    job = {"source": {"path": str(tmp_path / "in.csv")}, "sink": {"path": str(tmp_path / "o")},
           "run": {"executor": value}}
    with pytest.raises(cb.ConfigError, match="run.executor"):
        build_job(job)
