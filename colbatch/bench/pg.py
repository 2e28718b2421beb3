"""`python -m colbatch bench pg`: loading the events CSV into PostgreSQL, colbatch against the usual ways.

Every method loads the same CSV into an identical fresh table (same DDL, a
CHECK constraint that clean data never violates) on the same server:

* colbatch end to end: `scan_csv(...).sink_postgres(...)` (CSV parsing included);
* colbatch with 0.1% bad rows (violating the CHECK), isolated to rejects;
* `psql \\copy` of the CSV file;
* psycopg `COPY ... FROM STDIN (FORMAT csv)` of the raw CSV bytes;
* ADBC `adbc_ingest` of an in-memory Arrow table (CSV parsed beforehand, not timed), when installed;
* ADBC end to end: colbatch reads the CSV and `foreach_batch` calls `adbc_ingest` per batch, one
  transaction at the end (what the sink would be on ADBC, without its ledger, screen or rejects);
* psycopg `executemany` INSERT on a subset (`--insert-rows`), extrapolated to rows/s;
* the sink's encoder and COPY through a `psycopg_pool` pool with 1 and with 2 parallel streams
  (one transaction per batch, no ledger), to decide whether parallel streams pay on this machine.

Runs are interleaved method by method; the table shows medians and the ratio to `psql \\copy`.
With `--flat`, colbatch CSV -> table also runs once at `--rows` and at `--flat-factor` times as many
rows, each in a fresh process, and the peak RSS of both is printed.

Example:
    $ python -m colbatch bench pg --rows 1000000 --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

from colbatch.bench.generate import generate_events_csv

DEFAULT_DSN = os.environ.get("COLBATCH_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
# 1M rows (~84 MB of CSV): the reference size.
DEFAULT_ROWS = 1_000_000
DEFAULT_RUNS = 3
# executemany is ~10x slower than COPY: a subset keeps the benchmark short. 100,000 rows take ~1 s: a
# 20,000-row subset (0.15 s) scaled by 50 moved with every hiccup of the server.
DEFAULT_INSERT_ROWS = 100_000
BAD_FRACTION = 0.001
SCHEMA = "colbatch_bench"
DDL = ("CREATE TABLE {t} (id bigint, ts timestamp, user_id bigint, type text, amount double precision "
       "CHECK (amount > -1e9), country text, text text)")
CSV_SCHEMA = {"ts": "datetime"}


def _sql(dsn: str, statement: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def _fresh(dsn: str, table: str) -> str:
    qualified = f"{SCHEMA}.{table}"
    _sql(dsn, f"DROP TABLE IF EXISTS {qualified}; DROP TABLE IF EXISTS {SCHEMA}.colbatch_ledger; "
              + DDL.format(t=qualified))
    _checkpoint(dsn)
    return qualified


def _checkpoint(dsn: str) -> None:
    """Flush the server's dirty pages before a timed load, so no method pays for the WAL of the one before."""
    import psycopg

    try:
        _sql(dsn, "CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:  # not a superuser: the runs are noisier, not wrong
        print("note: CHECKPOINT needs a superuser; timed loads may pay for earlier ones' WAL", file=sys.stderr)


def _count(dsn: str, qualified: str) -> int:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT count(*) FROM {qualified}").fetchone()[0]


def colbatch_load(dsn: str, csv: Path, table: str) -> int:
    import colbatch as cb

    _fresh(dsn, table)
    report = (cb.scan_csv(csv, schema=CSV_SCHEMA).sink_postgres(dsn, table, schema=SCHEMA)
              .run(progress=False, max_error_rate=None))
    return report.rows_written


def psql_copy(dsn: str, csv: Path, table: str) -> int:
    qualified = _fresh(dsn, table)
    subprocess.run(["psql", dsn, "-q", "-v", "ON_ERROR_STOP=1", "-c",
                    f"\\copy {qualified} FROM '{csv}' WITH (FORMAT csv, HEADER true)"], check=True)
    return _count(dsn, qualified)


def psycopg_csv(dsn: str, csv: Path, table: str) -> int:
    import psycopg

    qualified = _fresh(dsn, table)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur, open(csv, "rb") as fh:
        with cur.copy(f"COPY {qualified} FROM STDIN (FORMAT csv, HEADER true)") as copy:
            while chunk := fh.read(1 << 20):
                copy.write(chunk)
    return _count(dsn, qualified)


def adbc_ingest(dsn: str, table_data, table: str) -> int:
    import adbc_driver_postgresql.dbapi as adbc

    qualified = _fresh(dsn, table)
    with adbc.connect(dsn) as conn, conn.cursor() as cur:
        cur.adbc_ingest(table, table_data, mode="append", db_schema_name=SCHEMA)
        conn.commit()
    return _count(dsn, qualified)


def adbc_end_to_end(dsn: str, csv: Path, table: str) -> int:
    """CSV -> table with colbatch's reader and ADBC's ingest of each batch, committed once at the end."""
    import adbc_driver_postgresql.dbapi as adbc

    import colbatch as cb

    qualified = _fresh(dsn, table)
    with adbc.connect(dsn) as conn, conn.cursor() as cur:
        def ingest(df: pl.DataFrame) -> None:
            cur.adbc_ingest(table, df.to_arrow(), mode="append", db_schema_name=SCHEMA)

        cb.scan_csv(csv, schema=CSV_SCHEMA).foreach_batch(ingest, retries=0).run(progress=False)
        conn.commit()
    return _count(dsn, qualified)


def executemany(dsn: str, rows: list[tuple], table: str) -> int:
    import psycopg

    qualified = _fresh(dsn, table)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {qualified} VALUES (%s, %s, %s, %s, %s, %s, %s)", rows)
    return _count(dsn, qualified)


def colbatch_streams(dsn: str, csv: Path, table: str, streams: int) -> int:
    """CSV -> table with the sink's encoder, each batch COPYed in its own transaction on one of `streams` pooled connections."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from psycopg_pool import ConnectionPool

    import colbatch as cb
    from colbatch.pg.copy import HEADER, TRAILER, conform, encode
    from colbatch.sinks.postgres import PostgresSink

    qualified = _fresh(dsn, table)
    pipeline = cb.scan_csv(csv, schema=CSV_SCHEMA)
    probe = PostgresSink(dsn, table, schema=SCHEMA)
    probe.open(pipeline.source.schema)
    types, typnames, copy_sql = probe._types, probe._typnames, probe._copy_sql()
    probe.abort(None)

    def unit(df: pl.DataFrame) -> None:
        cast, _ = conform(df, types)
        rows = encode(cast, types, typnames)
        with pool.connection() as conn, conn.cursor() as cur, cur.copy(copy_sql) as copy:
            copy.write(HEADER)
            for piece in rows.payload(0, len(rows)):
                copy.write(piece)
            copy.write(TRAILER)

    inflight: list[Future] = []

    def send(df: pl.DataFrame) -> None:
        inflight.append(executor.submit(unit, df))
        while len(inflight) > streams:  # at most one batch waiting per stream: memory stays bounded
            inflight.pop(0).result()

    with ConnectionPool(dsn, min_size=streams, max_size=streams, open=True) as pool, \
            ThreadPoolExecutor(streams) as executor:
        pipeline.foreach_batch(send, retries=0).run(progress=False)
        for f in inflight:
            f.result()
    return _count(dsn, qualified)


# VmHWM, not getrusage's ru_maxrss: Linux carries the parent's high-water mark across fork + exec into ru_maxrss.
RSS_CHILD = """
import sys
import colbatch as cb
from colbatch.bench.pg import CSV_SCHEMA, SCHEMA, _fresh
dsn, csv, table, size = sys.argv[1:5]
_fresh(dsn, table)
report = (cb.scan_csv(csv, schema=CSV_SCHEMA).sink_postgres(dsn, table, schema=SCHEMA)
          .run(progress=False, batch_size=size if size == "auto" else int(size)))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
print(report.rows_written, report.peak_rss_bytes, int(hwm) * 1024, report.batch_sizes[-1][1])
"""


def peak_rss(dsn: str, csv: Path, table: str, batch_size: str) -> tuple[int, int, int, int]:
    """Rows written, the report's peak RSS, the kernel's peak RSS and the last batch size of a fresh process."""
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, dsn, str(csv), table, batch_size], check=True,
                         capture_output=True,
                         text=True).stdout.split()
    return int(out[0]), int(out[1]), int(out[2]), int(out[3])


def _bad_copy(csv: Path, out: Path) -> int:
    """The same CSV with 0.1% of amounts set below the CHECK's bound; returns how many."""
    if not out.exists():
        df = pl.read_csv(csv)
        bad = (pl.int_range(0, pl.len()) % int(1 / BAD_FRACTION)) == 500
        df.with_columns(amount=pl.when(bad).then(-1e12).otherwise(pl.col("amount"))).write_csv(out)
    return pl.scan_csv(out).filter(pl.col("amount") < -1e9).select(pl.len()).collect().item()


METHOD_KEYS = ("cb", "cb_bad", "psql", "pcsv", "ins", "adbc", "adbc_cb", "s1", "s2")
# 5x the rows: enough growth that memory proportional to input would show.
DEFAULT_FLAT_FACTOR = 5


def _key(method: str) -> str:
    # First match wins: a longer prefix ("ADBC end") stands before the one it extends ("ADBC").
    prefixes = {"colbatch (CSV": "cb", "colbatch, 0.1%": "cb_bad", "psql": "psql", "psycopg COPY": "pcsv",
                "executemany": "ins", "ADBC end": "adbc_cb", "ADBC": "adbc", "sink encoder, 1": "s1", "sink encoder, 2": "s2"}
    return next(k for p, k in prefixes.items() if method.startswith(p))


def main(argv: list[str]) -> int:
    """Run the benchmark and print rows/s per method; 0 when every load has the expected row count."""
    parser = argparse.ArgumentParser(prog="python -m colbatch bench pg")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    parser.add_argument("--insert-rows", type=int, default=DEFAULT_INSERT_ROWS)
    parser.add_argument("--dsn", default=DEFAULT_DSN)
    parser.add_argument("--dir", type=Path, default=Path(".bench"))
    parser.add_argument("--flat", action="store_true", help="also measure peak RSS at --rows and more rows")
    parser.add_argument("--flat-factor", type=int, default=DEFAULT_FLAT_FACTOR)
    parser.add_argument("--flat-batch-size", default="auto", help="batch size of the --flat runs (auto or rows)")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset of: " + ", ".join(METHOD_KEYS) + " (psql is always run: the baseline)")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    csv = generate_events_csv(args.dir / f"events_{args.rows}.csv", args.rows).resolve()
    bad_csv = (args.dir / f"events_{args.rows}_bad.csv").resolve()
    n_bad = _bad_copy(csv, bad_csv)
    _sql(args.dsn, f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    sample = pl.read_csv(csv, n_rows=args.insert_rows, try_parse_dates=True).rows()
    methods: dict[str, tuple[Callable[[], int], int, int]] = {
        "colbatch (CSV file -> table)": (lambda: colbatch_load(args.dsn, csv, "cb"), args.rows, args.rows),
        "colbatch, 0.1% bad rows": (lambda: colbatch_load(args.dsn, bad_csv, "cb_bad"), args.rows, args.rows - n_bad),
        "psql \\copy (CSV)": (lambda: psql_copy(args.dsn, csv, "psql"), args.rows, args.rows),
        "psycopg COPY of raw CSV": (lambda: psycopg_csv(args.dsn, csv, "pcsv"), args.rows, args.rows),
        f"executemany ({args.insert_rows:,} rows, scaled)": (lambda: executemany(args.dsn, sample, "ins"),
                                                             len(sample), len(sample)),
        "sink encoder, 1 pooled COPY stream": (lambda: colbatch_streams(args.dsn, csv, "s1", 1), args.rows, args.rows),
        "sink encoder, 2 pooled COPY streams": (lambda: colbatch_streams(args.dsn, csv, "s2", 2), args.rows, args.rows),
    }
    try:
        import adbc_driver_postgresql.dbapi  # noqa: F401
        import pyarrow.csv as pacsv

        arrow = pacsv.read_csv(csv)
        methods["ADBC adbc_ingest (from Arrow)"] = (lambda: adbc_ingest(args.dsn, arrow, "adbc"), args.rows, args.rows)
        methods["ADBC end to end (CSV, per batch)"] = (lambda: adbc_end_to_end(args.dsn, csv, "adbc_cb"), args.rows,
                                                       args.rows)
    except ImportError:
        print("ADBC driver not installed; skipping adbc_ingest")
    if args.only:
        keep = {k.strip() for k in args.only.split(",")} | {"psql"}
        unknown = keep - set(METHOD_KEYS)
        if unknown:
            parser.error(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHOD_KEYS)}")
        methods = {m: v for m, v in methods.items() if _key(m) in keep}
    times: dict[str, list[float]] = {m: [] for m in methods}
    failures = []
    for _ in range(args.runs):
        for name, (fn, _n, expect) in methods.items():
            t0 = time.perf_counter()
            got = fn()
            times[name].append(time.perf_counter() - t0)
            if got != expect:
                failures.append(f"{name}: {got:,} rows, expected {expect:,}")
    rss = []
    if args.flat:
        big = generate_events_csv(args.dir / f"events_{args.rows * args.flat_factor}.csv",
                                  args.rows * args.flat_factor).resolve()
        for path, n in ((csv, args.rows), (big, args.rows * args.flat_factor)):
            got, report_rss, max_rss, last_batch = peak_rss(args.dsn, path, "flat", args.flat_batch_size)
            rss.append((n, report_rss, max_rss, last_batch))
            if got != n:
                failures.append(f"peak RSS run: {got:,} rows, expected {n:,}")
    _sql(args.dsn, f"DROP SCHEMA {SCHEMA} CASCADE")
    rate = {m: methods[m][1] / statistics.median(t) for m, t in times.items()}
    base = rate["psql \\copy (CSV)"]
    print(f"\n{args.rows:,} rows x 7 columns ({csv.stat().st_size / 1e6:,.0f} MB CSV), {args.runs} run(s), medians; "
          f"bad-row input has {n_bad:,} rows violating a CHECK")
    print(f"{'method':<42} {'median s':>9} {'rows/s':>12} {'vs psql':>8}")
    for m in methods:
        secs = statistics.median(times[m]) * args.rows / methods[m][1]
        print(f"{m:<42} {secs:>9.2f} {rate[m]:>12,.0f} {rate[m] / base:>7.2f}x")
    for n, report_rss, max_rss, last_batch in rss:
        print(f"peak RSS, colbatch CSV -> table, {n:,} rows: {report_rss / 2**20:,.0f} MiB (report), "
              f"{max_rss / 2**20:,.0f} MiB (kernel VmHWM); last auto batch size {last_batch:,} rows")
    if len(rss) == 2:
        print(f"peak RSS ratio {rss[1][0] // rss[0][0]}x rows: {rss[1][2] / rss[0][2]:.2f}x")
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0
