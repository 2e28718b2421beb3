"""`python -m colbatch bench agg`: a grouped aggregation through colbatch's stream vs DuckDB and Polars.

The job: read the events CSV, keep ``amount > 0``, group by ``country, type``
and compute count, sum, mean, min and max of ``amount``, write Parquet.
Contenders, each in its own fresh interpreter, interleaved run by run:

- ``colbatch``: ``scan_csv`` → ``filter`` step → DuckDB aggregate stage → Parquet;
- ``duckdb``: DuckDB reading the CSV directly (``COPY (SELECT ...) TO``);
- ``polars``: ``scan_csv`` → ``group_by`` on the streaming engine → Parquet.

Every result is compared with DuckDB's to floating-point tolerance. Then the
high-cardinality case groups a ≥ 10M-row CSV by ``id`` (one group per row)
through colbatch under ``memory_limit = "1GB"``: it must spill, finish, and
stay under 1.5 GB peak RSS.

Example:
    $ python -m colbatch bench agg --rows 5000000 --runs 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_ROWS = 5_000_000
DEFAULT_RUNS = 3
# ≥ 10M distinct keys is the high-cardinality bar; grouping by `id` gives one key per row.
DEFAULT_HIGH_ROWS = 10_000_000
HIGH_MEMORY_LIMIT = "1GB"
HIGH_RSS_BUDGET = int(1.5 * (1 << 30))
DEFAULT_DIR = Path(".bench")
KEYS = ("country", "type")
REL_TOL = 1e-9
CONTENDERS = ("colbatch", "duckdb", "polars")
_CONTENDERS_PY = Path(__file__).with_name("contenders.py")
_SOURCE_ROOT = Path(__file__).resolve().parents[2]
_MB = 1 << 20

SELECT = ("SELECT country, type, count(*) AS n, sum(amount) AS total, avg(amount) AS mean, "
          "min(amount) AS lo, max(amount) AS hi FROM {table} {where} GROUP BY country, type")
HIGH_SELECT = "SELECT id, count(*) AS n, sum(amount) AS total FROM input GROUP BY id"


def _helpers():
    """contenders.py loaded by path, so a child imports only the library it measures."""
    spec = importlib.util.spec_from_file_location("colbatch_bench_contenders", _CONTENDERS_PY)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _job(name: str, source: str, output: str, memory_limit: str | None):
    lit = "'" + source.replace("'", "''") + "'"
    out = "'" + output.replace("'", "''") + "'"
    if name == "colbatch":
        import polars as pl

        import colbatch as cb

        high = memory_limit is not None
        sql = HIGH_SELECT if high else SELECT.format(table="input", where="")
        options = {"memory_limit": _bytes(memory_limit)} if high else {}

        def run() -> int:
            pipeline = cb.scan_csv(source)
            if not high:
                pipeline = pipeline.filter(pl.col("amount") > 0)
            return pipeline.aggregate(sql).sink_parquet(output).run(progress=False, **options).rows_written

        return run
    if name == "duckdb":
        import duckdb

        def run() -> int:
            with duckdb.connect() as con:
                if memory_limit is not None:
                    con.execute(f"SET memory_limit = '{memory_limit}'")
                sql = (HIGH_SELECT.replace("input", f"read_csv({lit})") if memory_limit is not None
                       else SELECT.format(table=f"read_csv({lit})", where="WHERE amount > 0"))
                return int(con.execute(f"COPY ({sql}) TO {out} (FORMAT parquet)").fetchall()[0][0])

        return run
    import polars as pl

    def run() -> None:
        (pl.scan_csv(source).filter(pl.col("amount") > 0).group_by(list(KEYS))
         .agg(pl.len().alias("n"), pl.col("amount").sum().alias("total"), pl.col("amount").mean().alias("mean"),
              pl.col("amount").min().alias("lo"), pl.col("amount").max().alias("hi"))
         .sink_parquet(output, engine="streaming"))

    return run


def _bytes(size: str) -> int:
    from colbatch.config import parse_size

    return parse_size(size, key="memory_limit")


def child(argv: list[str]) -> int:
    """Child side: `agg.py NAME SOURCE OUTPUT [MEMORY_LIMIT]`; prints one result line."""
    helpers = _helpers()
    name, source, output, *rest = argv
    started = time.perf_counter()
    job = _job(name, source, output, rest[0] if rest else None)
    imported = time.perf_counter()
    rows = job()
    finished = time.perf_counter()
    print(helpers.RESULT_PREFIX + json.dumps({
        "import_s": imported - started, "job_s": finished - imported, "rows": rows,
        "peak_rss_bytes": helpers._peak_rss_bytes()}), flush=True)
    return 0


def launch(name: str, source: Path, output: Path, memory_limit: str | None = None) -> dict:
    """Run one contender in a fresh interpreter; returns its figures (`ok` False on failure)."""
    output.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_SOURCE_ROOT), env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-P", str(Path(__file__).resolve()), name, str(source), str(output)]
    command += [memory_limit] if memory_limit else []
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    result = _helpers()._parse_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "wall_s": wall, "error": f"exit {proc.returncode}: {tail}"}
    return {"ok": True, "wall_s": wall, **result}


def compare(output: Path, reference: Path) -> str | None:
    """None when `output` equals `reference` (sorted by the keys) to floating-point tolerance, else why not."""
    import polars as pl

    got, ref = (pl.read_parquet(p).sort(list(KEYS)) for p in (output, reference))
    if got.height != ref.height or got.select(KEYS).rows() != ref.select(KEYS).rows():
        return f"groups differ ({got.height} vs {ref.height})"
    for col in ("n", "total", "mean", "lo", "hi"):
        for a, b in zip(got[col].to_list(), ref[col].to_list()):
            if not math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=1e-9):
                return f"column `{col}` differs: {a!r} vs {b!r}"
    return None


def main(argv: list[str]) -> int:
    """Run the aggregation benchmark and print its tables; 0 when every run succeeded and matched."""
    parser = argparse.ArgumentParser(prog="python -m colbatch bench agg", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows of the events CSV (default %(default)s)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="runs per contender (default %(default)s)")
    parser.add_argument("--high-rows", type=int, default=DEFAULT_HIGH_ROWS,
                        help="rows (= distinct keys) of the high-cardinality case, 0 skips it (default %(default)s)")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="work directory for inputs and outputs")
    args = parser.parse_args(argv)
    work = args.dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    from colbatch.bench.core import _print_machine, machine_info
    from colbatch.bench.generate import generate_events_csv

    _print_machine(machine_info())
    failures: list[str] = []
    source = generate_events_csv(work / f"events_{args.rows}.csv", args.rows)
    runs: dict[str, list[dict]] = {n: [] for n in CONTENDERS}
    for run in range(args.runs):
        for name in CONTENDERS:
            m = launch(name, source, work / f"agg_{name}.parquet")
            runs[name].append(m)
            print(f"  run {run + 1}/{args.runs} {name}: " + (f"{m['job_s']:.2f} s job" if m["ok"] else m["error"]),
                  flush=True)
            if not m["ok"]:
                failures.append(f"{name} run {run + 1}: {m['error']}")
        for name in ("colbatch", "polars"):
            out = work / f"agg_{name}.parquet"
            if out.exists() and (work / "agg_duckdb.parquet").exists():
                why = compare(out, work / "agg_duckdb.parquet")
                if why:
                    failures.append(f"{name} run {run + 1} differs from duckdb: {why}")
    print(f"\naggregation: {args.rows:,} rows ({source.stat().st_size / _MB:,.0f} MB CSV), median of {args.runs} runs")
    print(f"{'contender':<10} {'job s':>8} {'process s':>10} {'peak RSS MB':>12}  colbatch throughput ratio")
    medians = {}
    for name, ms in runs.items():
        good = [m for m in ms if m["ok"]]
        if not good:
            print(f"{name:<10} failed")
            continue
        medians[name] = statistics.median(m["job_s"] for m in good)
        rss = statistics.median(m["peak_rss_bytes"] for m in good) / _MB
        wall = statistics.median(m["wall_s"] for m in good)
        ratio = f"{medians[name] / medians['colbatch']:.2f}x" if "colbatch" in medians and name != "colbatch" else "-"
        print(f"{name:<10} {medians[name]:>8.2f} {wall:>10.2f} {rss:>12.0f}  {ratio}")
    print("ratio: contender job s / colbatch job s (>= 1: colbatch is as fast or faster)")
    if args.high_rows:
        high = generate_events_csv(work / f"events_{args.high_rows}.csv", args.high_rows)
        m = launch("colbatch", high, work / "agg_high.parquet", HIGH_MEMORY_LIMIT)
        print(f"\nhigh cardinality: {args.high_rows:,} rows grouped by id ({args.high_rows:,} keys), "
              f"memory_limit = {HIGH_MEMORY_LIMIT}")
        if m["ok"]:
            print(f"  colbatch: job {m['job_s']:.2f} s, peak RSS {m['peak_rss_bytes'] / _MB:,.0f} MB, "
                  f"{m['rows']:,} groups written")
            if m["peak_rss_bytes"] > HIGH_RSS_BUDGET:
                failures.append(f"high-cardinality peak RSS {m['peak_rss_bytes'] / _MB:,.0f} MB > 1536 MB")
            if m["rows"] != args.high_rows:
                failures.append(f"high-cardinality case wrote {m['rows']:,} groups, expected {args.high_rows:,}")
        else:
            failures.append(f"high-cardinality case failed: {m['error']}")
            print(f"  colbatch failed: {m['error']}")
        (work / "agg_high.parquet").unlink(missing_ok=True)
    for f in failures:
        print(f"FAIL: {f}")
    if not failures:
        print("\nOK: every result equals DuckDB's to floating-point tolerance")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(child(sys.argv[1:]))
