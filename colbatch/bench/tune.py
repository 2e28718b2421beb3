"""`python -m colbatch bench tune`: adaptive batch sizing against fixed sizes, the tuner's cost, and memory_limit.

Three workloads, each run with `batch_size="auto"` and with every fixed size in
`SIZES`, one fresh interpreter per run, in an order rotated run by run so that
drift on the machine hits all contenders alike:

* `expr`: the events CSV → `with_columns` (expressions only) → zstd Parquet;
* `udf`: a CPU-bound per-row Python UDF (`bench.udfs.cpu_udf`) on 2 worker processes, CSV → Parquet;
* `pg`: the events CSV → PostgreSQL (binary COPY) at `--dsn`.

Throughput is rows read / the run's own elapsed time (interpreter start-up and
imports excluded). The table gives the median, the spread (min–max as a share of
the median: how noisy the machine was) and each contender against the best fixed
size. Then the tuner on a `--tune-rows` input: its time against a full `auto`
run, and its recommendation against the best size it measured and against full
runs at every fixed size. Last, a job whose fixed 1M-row batches need more than
1 GB run with `memory_limit="1GB"`: peak RSS of both.

Example:
    $ python -m colbatch bench tune --rows 2000000 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The grid of fixed sizes.
SIZES = (8_192, 32_768, 131_072, 524_288, 1_048_576)
WORKLOADS = ("expr", "udf", "pg")
SECTIONS = (*WORKLOADS, "tuner", "memory")
# 2M rows (~170 MB of CSV): every fixed size gets at least two batches, a run takes seconds.
DEFAULT_ROWS = 2_000_000
# The CPU-bound UDF is ~10x slower per row than the other workloads: fewer rows keep runs comparable.
DEFAULT_UDF_ROWS = 1_000_000
# The tuner input size.
DEFAULT_TUNE_ROWS = 5_000_000
# Rows of the memory case: 3 batches of 1M rows.
DEFAULT_MEMORY_ROWS = 3_000_000
# Five runs: the median survives two outliers on a shared machine.
DEFAULT_RUNS = 5
DEFAULT_DSN = os.environ.get("COLBATCH_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PG_SCHEMA = "colbatch_bench_tune"
MEMORY_LIMIT = "1GB"
# Wide derived string columns make each 1M-row batch a few hundred MB, so fixed 1M batches need more than 1 GB.
MEMORY_WIDEN = 6
UDF_SCHEMA = {"id": "int64", "name": "str", "x": "float64"}
_MB = 1 << 20


# -- the jobs (run in a child interpreter) -------------------------------------------------------


def _pipeline(spec: dict[str, Any]):
    import polars as pl

    import colbatch as cb

    kind, src, out = spec["workload"], spec["input"], spec["output"]
    if kind == "expr":
        return (cb.scan_csv(src).with_columns((pl.col("amount") * 1.1).alias("value"),
                                              pl.col("type").str.to_uppercase().alias("category"))
                .sink_parquet(out))
    if kind == "udf":
        from colbatch.bench.udfs import cpu_udf

        return (cb.scan_csv(src, schema=UDF_SCHEMA)
                .map_batches(cpu_udf, workers=2, schema={**UDF_SCHEMA, "score": "int64"})
                .sink_parquet(out))
    if kind == "pg":
        from colbatch.bench.pg import CSV_SCHEMA

        return cb.scan_csv(src, schema=CSV_SCHEMA).sink_postgres(spec["dsn"], "events", schema=PG_SCHEMA)
    if kind == "memory":
        wide = [(pl.col("text") + pl.lit(f"-{i}-") + pl.col("country")).alias(f"wide{i}") for i in range(MEMORY_WIDEN)]
        return cb.scan_csv(src).with_columns(*wide).sink_parquet(out)
    raise ValueError(f"unknown workload {kind!r}")


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one job (or the tuner) in this interpreter and return its figures."""
    from colbatch.tuning import tune

    pipeline = _pipeline(spec)
    if spec.get("tune"):
        t0 = time.perf_counter()
        result = tune(pipeline)
        return {"tune_s": time.perf_counter() - t0, "recommended": result.recommended,
                "points": [[p.rows, p.throughput] for p in result.points], "notes": result.notes,
                "sample_rows": result.sample_rows, "repeats": result.repeats}
    opts: dict[str, Any] = {"batch_size": spec["batch_size"], "progress": False, "overwrite": True,
                            "max_error_rate": None}
    if spec.get("memory_limit"):
        opts["memory_limit"] = spec["memory_limit"]
    report = pipeline.run(**opts)
    return {"elapsed_s": report.elapsed_s, "rows_read": report.rows_read, "rows_written": report.rows_written,
            "peak_rss": report.peak_rss_bytes, "batch_sizes": [rows for _, rows in report.batch_sizes],
            "batch_rows": report.batch_rows}


def _launch(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "colbatch", "bench", "tune", "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child failed ({spec}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- inputs -----------------------------------------------------------------------------------------


def _udf_csv(path: Path, rows: int) -> Path:
    """The UDF benchmark's rows (id, name, x) as CSV, made once."""
    if path.exists():
        return path
    from colbatch.bench.udf import batches

    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        for i, chunk in enumerate(batches(rows)):
            chunk.write_csv(fh, include_header=i == 0)
    tmp.replace(path)
    return path


def _pg_reset(dsn: str) -> None:
    import psycopg

    from colbatch.bench.pg import DDL

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {PG_SCHEMA}")
        conn.execute(f"DROP TABLE IF EXISTS {PG_SCHEMA}.events; DROP TABLE IF EXISTS {PG_SCHEMA}.colbatch_ledger")
        conn.execute(DDL.format(t=f"{PG_SCHEMA}.events"))


def _pg_drop(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")


# -- measurement ------------------------------------------------------------------------------------


def _label(size: int | str) -> str:
    return "auto" if size == "auto" else f"{size:,}"


def compare(workload: str, src: Path, out: Path, rows: int, runs: int, dsn: str,
            sizes: Sequence[int | str] = ("auto", *SIZES)) -> dict[str, Any]:
    """Run `auto` and every fixed size `runs` times each, rotating the order; rows/s per run."""
    rates: dict[str, list[float]] = {_label(s): [] for s in sizes}
    auto_sizes: list[list[int]] = []
    failures: list[str] = []
    order = list(sizes)
    for run in range(runs):
        rotated = order[run % len(order):] + order[:run % len(order)]
        for size in rotated:
            if workload == "pg":
                _pg_reset(dsn)
            res = _launch({"workload": workload, "input": str(src), "output": str(out), "batch_size": size,
                           "dsn": dsn})
            if res["rows_read"] != rows or res["rows_written"] != rows:
                failures.append(f"{workload} {_label(size)}: read {res['rows_read']:,}, wrote {res['rows_written']:,}, "
                                f"expected {rows:,}")
            rates[_label(size)].append(res["rows_read"] / res["elapsed_s"])
            if size == "auto":
                auto_sizes.append(res["batch_sizes"])
            print(f"  {workload} run {run + 1}/{runs} {_label(size):>10}: {rates[_label(size)][-1]:>12,.0f} rows/s",
                  file=sys.stderr, flush=True)
    return {"rates": rates, "auto_sizes": auto_sizes, "failures": failures}


def _table(title: str, rates: dict[str, list[float]]) -> tuple[str, float]:
    med = {k: statistics.median(v) for k, v in rates.items()}
    fixed = {k: v for k, v in med.items() if k != "auto"}
    best = max(fixed, key=fixed.__getitem__) if fixed else None
    lines = [title, f"{'batch_size':>12}  {'median rows/s':>14}  {'spread':>7}  {'vs best fixed':>13}"]
    for k, v in med.items():
        spread = (max(rates[k]) - min(rates[k])) / v if v else 0.0
        ratio = v / fixed[best] if best else float("nan")
        mark = "  <- best fixed" if k == best else ""
        lines.append(f"{k:>12}  {v:>14,.0f}  {spread:>6.0%}  {ratio:>12.3f}x{mark}")
    ratio = med["auto"] / fixed[best] if best and "auto" in med else float("nan")
    if best and "auto" in rates:
        # Each round ran every contender once, close in time: the per-round ratio cancels slow drift.
        paired = [a / b for a, b in zip(rates["auto"], rates[best])]
        lines.append(f"auto / {best} per round: {', '.join(f'{p:.2f}' for p in paired)} "
                     f"(median {statistics.median(paired):.3f}x)")
    return "\n".join(lines), ratio


def tuner_case(src: Path, out: Path, rows: int, runs: int) -> dict[str, Any]:
    """The tuner's time and recommendation on `src`, against full runs at auto, the recommendation and every size."""
    tune_runs = [_launch({"workload": "expr", "input": str(src), "output": str(out), "tune": True})
                 for _ in range(runs)]
    full = compare("expr", src, out, rows, runs, "", sizes=("auto", *SIZES))
    return {"tune": tune_runs, "full": full}


def memory_case(src: Path, out: Path, rows: int) -> dict[str, Any]:
    """Peak RSS of the wide job with fixed 1M-row batches, and with auto under memory_limit=1GB."""
    from colbatch.config import parse_size

    fixed = _launch({"workload": "memory", "input": str(src), "output": str(out), "batch_size": 1_048_576})
    limited = _launch({"workload": "memory", "input": str(src), "output": str(out), "batch_size": "auto",
                       "memory_limit": parse_size(MEMORY_LIMIT, key="memory_limit")})
    fixed_limited = _launch({"workload": "memory", "input": str(src), "output": str(out), "batch_size": 1_048_576,
                             "memory_limit": parse_size(MEMORY_LIMIT, key="memory_limit")})
    return {"fixed": fixed, "auto_limited": limited, "fixed_limited": fixed_limited,
            "limit": parse_size(MEMORY_LIMIT, key="memory_limit"), "rows": rows}


def main(argv: Sequence[str]) -> int:
    """Run the sections asked for and print their tables; 0 when every run wrote every row."""
    parser = argparse.ArgumentParser(prog="python -m colbatch bench tune", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows of the expr and pg inputs")
    parser.add_argument("--udf-rows", type=int, default=DEFAULT_UDF_ROWS, help="rows of the udf input")
    parser.add_argument("--tune-rows", type=int, default=DEFAULT_TUNE_ROWS, help="rows of the tuner's input")
    parser.add_argument("--memory-rows", type=int, default=DEFAULT_MEMORY_ROWS, help="rows of the memory case")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="runs per contender (default %(default)s)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma list of: " + ",".join(SECTIONS))
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL for the pg workload")
    parser.add_argument("--dir", type=Path, default=Path(".bench"), help="work directory for inputs and outputs")
    parser.add_argument("--json", type=Path, help="write all raw figures to this JSON file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv))
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    from colbatch.bench.generate import generate_events_csv

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        parser.error(f"--only: unknown section(s) {', '.join(bad)}; valid: {', '.join(SECTIONS)}")
    args.dir.mkdir(parents=True, exist_ok=True)
    out = (args.dir / "tune_out.parquet").resolve()
    raw: dict[str, Any] = {"rows": args.rows, "runs": args.runs}
    failures: list[str] = []
    report: list[str] = []
    for workload in (w for w in WORKLOADS if w in only):
        rows = args.udf_rows if workload == "udf" else args.rows
        src = (_udf_csv(args.dir / f"udf_{rows}.csv", rows) if workload == "udf"
               else generate_events_csv(args.dir / f"events_{rows}.csv", rows)).resolve()
        res = compare(workload, src, out, rows, args.runs, args.dsn)
        if workload == "pg":
            _pg_drop(args.dsn)
        failures += res["failures"]
        text, ratio = _table(f"\n{workload}: {rows:,} rows, {args.runs} runs per size, rotated order", res["rates"])
        sizes = "; ".join(" → ".join(f"{r:,}" for r in s) for s in res["auto_sizes"])
        report.append(f"{text}\nauto / best fixed: {ratio:.3f}x   auto's sizes per run: {sizes}")
        raw[workload] = {**res, "auto_vs_best": ratio}
        print(report[-1], flush=True)
    if "tuner" in only:
        src = generate_events_csv(args.dir / f"events_{args.tune_rows}.csv", args.tune_rows).resolve()
        res = tuner_case(src, out, args.tune_rows, args.runs)
        text, ratio = _table(f"\ntuner: expr workload on {args.tune_rows:,} rows; full runs, {args.runs} per size",
                             res["full"]["rates"])
        failures += res["full"]["failures"]
        tune_s = statistics.median(t["tune_s"] for t in res["tune"])
        full_med = {k: statistics.median(v) for k, v in res["full"]["rates"].items()}
        full_s = args.tune_rows / full_med["auto"]
        recs = [t["recommended"] for t in res["tune"]]
        rec = statistics.median_low(recs)
        pts = dict((int(r), t) for r, t in res["tune"][recs.index(rec)]["points"])
        best_fixed = max(v for k, v in full_med.items() if k != "auto")
        lines = [text,
                 f"tuner: median {tune_s:.2f}s over {args.runs} runs vs a full auto run {full_s:.2f}s "
                 f"→ {tune_s / full_s:.1%} of the run",
                 f"recommendations per tuner run: {', '.join(f'{r:,}' for r in recs)}; "
                 f"measured sizes: {', '.join(f'{r:,}' for r in pts)}",
                 f"recommended {rec:,}: {pts[rec] / max(pts.values()):.3f}x of the best size the tuner measured; "
                 f"in full runs {full_med.get(_label(rec), float('nan')) / best_fixed:.3f}x of the best fixed size",
                 *(f"note: {n}" for n in res["tune"][0]["notes"])]
        report.append("\n".join(lines))
        raw["tuner"] = res
        print(report[-1], flush=True)
    if "memory" in only:
        src = generate_events_csv(args.dir / f"events_{args.memory_rows}.csv", args.memory_rows).resolve()
        res = memory_case(src, out, args.memory_rows)
        lim = res["limit"]
        lines = [f"\nmemory: events CSV + {MEMORY_WIDEN} wide string columns, {args.memory_rows:,} rows, one run each",
                 f"{'run':<36}{'peak RSS':>12}{'rows/s':>14}"]
        for label, key in (("fixed 1,048,576 rows, no limit", "fixed"),
                           (f"auto, memory_limit={MEMORY_LIMIT}", "auto_limited"),
                           (f"fixed 1,048,576, memory_limit={MEMORY_LIMIT}", "fixed_limited")):
            r = res[key]
            if r["rows_written"] != args.memory_rows:
                failures.append(f"memory {label}: wrote {r['rows_written']:,}")
            lines.append(f"{label:<36}{r['peak_rss'] / _MB:>8,.0f} MiB{r['rows_read'] / r['elapsed_s']:>14,.0f}"
                         f"   sizes {' → '.join(f'{s:,}' for s in r['batch_sizes'][:6])}")
        held = all(res[k]["peak_rss"] <= lim for k in ("auto_limited", "fixed_limited"))
        lines.append(f"limit {lim / _MB:,.0f} MiB held: {held}; fixed 1M batches without it needed "
                     f"{res['fixed']['peak_rss'] / _MB:,.0f} MiB")
        if not held:
            failures.append("memory_limit was not held")
        report.append("\n".join(lines))
        raw["memory"] = res
        print(report[-1], flush=True)
    for f in failures:
        print("FAILED:", f)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 1 if failures else 0
