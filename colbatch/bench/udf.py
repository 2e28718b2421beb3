"""`python -m colbatch bench udf`: Python UDFs on colbatch's executors against the usual alternatives.

CPU-bound: a pure-Python per-row UDF (string hashing and arithmetic) over
generated rows in 64k-row batches, run by colbatch inline and on 1 and 2
worker processes (with the worker zygote running and, as a process's first
job finds it, not yet started), by Polars `map_batches` and `map_elements` in one process,
and by `multiprocessing.Pool` over pickled pandas chunks. Runs are interleaved
and the table shows medians. The same job then runs as a scheduled job would,
a new process per run reading and writing Parquet: `colbatch run JOB.toml`
against a Polars script. I/O-bound: one HTTP request per batch to a local
server on 127.0.0.1 that answers after ~10 ms, sequential vs 32 threads, with a
keep-alive connection per thread and with a new connection per call.

Example:
    $ python -m colbatch bench udf --rows 2000000 --runs 3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from colbatch.bench.udfs import cpu_udf, score
from colbatch.udf.zygote import ZYGOTE

# The size: start-up costs are small next to 2M rows of per-row Python work.
DEFAULT_ROWS = 2_000_000
DEFAULT_RUNS = 3
BATCH_ROWS = 65_536
# Simulated latency of the HTTP service in the I/O-bound case.
HTTP_LATENCY_S = 0.010
# 20 full waves of 32 calls: the last wave is not a partial one, and start-up is a small share.
HTTP_BATCHES = 640
HTTP_BATCH_ROWS = 1_000
HTTP_THREADS = 32
FLAT_FACTOR = 10
_MB = 1 << 20
NEW_ZYGOTE = "colbatch 2 workers, new zygote"


def _row_score(row: dict) -> int:
    return score(row["name"], row["x"])


def pandas_udf(chunk):
    """The same work on a pandas chunk (the multiprocessing.Pool contender)."""
    chunk = chunk.copy()
    chunk["score"] = [score(n, x) for n, x in zip(chunk["name"], chunk["x"])]
    return chunk


def make_batch(start: int, rows: int) -> pl.DataFrame:
    """Rows `start .. start+rows` of the deterministic input: id, name (8–15 chars), x."""
    ids = np.arange(start, start + rows, dtype=np.int64)
    names = pl.Series("n", ids % 100_003).cast(pl.String)
    return pl.DataFrame({"id": ids, "name": ("user-" + names).alias("name"), "x": (ids % 1000) / 7.0})


def batches(rows: int) -> Iterator[pl.DataFrame]:
    """The input generated batch by batch, so colbatch's memory does not hold it whole."""
    for start in range(0, rows, BATCH_ROWS):
        yield make_batch(start, min(BATCH_ROWS, rows - start))


# -- contenders (each returns the output's row count and checksum) ------------------------------


def run_colbatch(rows: int, *, executor: str, workers: int, frame: pl.DataFrame | None = None) -> tuple[int, int, dict]:
    """colbatch over the pre-built `frame` like the other contenders, or over generated batches (memory check)."""
    import colbatch as cb

    totals = {"rows": 0, "sum": 0}

    def collect(df: pl.DataFrame) -> None:
        totals["rows"] += df.height
        totals["sum"] += int(df["score"].sum())

    # Polars frames, as the other contenders get them: an Arrow round trip per batch here would be
    # the bench's cost, not colbatch's.
    chunks = (lambda: batches(rows)) if frame is None else (lambda: frame.iter_slices(BATCH_ROWS))
    report = (cb.from_batches(chunks, schema={"id": "int64", "name": "str", "x": "float64"})
              .map_batches(cpu_udf, workers=workers, executor=executor,
                           schema={"id": "int64", "name": "str", "x": "float64", "score": "int64"})
              .foreach_batch(collect, retries=0)
              .run(progress=False, batch_size=BATCH_ROWS))
    extra = {"peak_rss_mb": report.peak_rss_bytes / _MB}
    udf = report.stages[1]
    if udf.worker_cpu_s:
        # The workers' own CPU accounting in this run: the IPC reads and writes vs the function.
        extra["transport_share"] = udf.transport_cpu_s / (udf.transport_cpu_s + udf.worker_cpu_s)
    return totals["rows"], totals["sum"], extra


def run_polars_map_batches(frame: pl.DataFrame) -> tuple[int, int, dict]:
    out = frame.lazy().map_batches(cpu_udf, schema={**frame.schema, "score": pl.Int64}).collect()
    return out.height, int(out["score"].sum()), {}


def run_polars_map_elements(frame: pl.DataFrame) -> tuple[int, int, dict]:
    out = frame.with_columns(pl.struct("name", "x").map_elements(_row_score, return_dtype=pl.Int64).alias("score"))
    return out.height, int(out["score"].sum()), {}


def run_mp_pool(frame: pl.DataFrame) -> tuple[int, int, dict]:
    pdf = frame.to_pandas()
    chunks = (pdf.iloc[i:i + BATCH_ROWS] for i in range(0, len(pdf), BATCH_ROWS))
    rows = total = 0
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for out in pool.imap(pandas_udf, chunks):
            rows += len(out)
            total += int(out["score"].sum())
    return rows, total, {}


# -- measurement --------------------------------------------------------------------------------


def _timed(fn: Callable[[], tuple[int, int, dict]]) -> tuple[float, int, int, dict]:
    t0 = time.perf_counter()
    rows, checksum, extra = fn()
    return time.perf_counter() - t0, rows, checksum, extra


def transport_share() -> dict[str, float]:
    """Seconds to move one 64k-row batch through a segment and back vs the UDF's own time on it."""
    from colbatch.udf.transport import Segment, ipc_size, read_ipc, to_arrow, write_ipc

    df = make_batch(0, BATCH_ROWS)
    inp, out = Segment(df.estimated_size() * 2), Segment(df.estimated_size() * 3)
    try:
        moves, fns = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            table = to_arrow(df)
            n = write_ipc(table, inp.shm.buf)  # driver → segment
            got = read_ipc(inp.shm.buf, n, copy=False)  # worker reads zero-copy
            t1 = time.perf_counter()
            res = cpu_udf(got)
            t2 = time.perf_counter()
            rt = to_arrow(res)
            ipc_size(rt)
            m = write_ipc(rt, out.shm.buf)  # worker → segment
            out.read(m)  # driver copies out
            t3 = time.perf_counter()
            moves.append((t1 - t0) + (t3 - t2))
            fns.append(t2 - t1)
            del got, res, rt, table
        move, fn = statistics.median(moves), statistics.median(fns)
        return {"transport_ms": move * 1e3, "udf_ms": fn * 1e3, "share": move / (move + fn)}
    finally:
        inp.release()
        out.release()


def io_bench(runs: int = DEFAULT_RUNS, batches: int = HTTP_BATCHES) -> dict[str, float]:
    """Median seconds, sequential vs threads, for a UDF that makes one ~10 ms HTTP call per batch.

    Two clients: a keep-alive connection per UDF instance (a class UDF, so one per thread, the way
    a real client keeps a session) and `urllib.request.urlopen` opening a new connection per call.
    """
    import http.client

    import colbatch as cb

    # The server runs in its own process, like a real service: in this one it would take the GIL
    # from the very threads being measured.
    server = subprocess.Popen([sys.executable, "-c", _SERVER.format(latency=HTTP_LATENCY_S)], stdout=subprocess.PIPE,
                              text=True)
    port = int(server.stdout.readline())
    url = f"http://127.0.0.1:{port}/"

    class KeepAlive:
        """One keep-alive connection per instance; colbatch makes one instance per thread."""

        def __init__(self) -> None:
            self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

        def __call__(self, df: pl.DataFrame) -> pl.DataFrame:
            self.conn.request("GET", "/")
            value = int(self.conn.getresponse().read())
            return df.with_columns(pl.lit(value, dtype=pl.Int64).alias("api"))

    def urlopen(df: pl.DataFrame) -> pl.DataFrame:
        with urllib.request.urlopen(url, timeout=10) as resp:
            value = int(resp.read())
        return df.with_columns(pl.lit(value, dtype=pl.Int64).alias("api"))

    # Built once, outside the timing, like the CPU-bound contenders' input: the measurement is the
    # UDF's concurrency, not the generator's per-batch cost.
    table = make_batch(0, batches * HTTP_BATCH_ROWS).to_arrow()
    cases = {f"{client}, {label}": (fn, executor) for client, fn in (("keep-alive", KeepAlive), ("urlopen", urlopen))
             for label, executor in (("sequential", "inline"), (f"{HTTP_THREADS} threads", "threads"))}
    times: dict[str, list[float]] = {k: [] for k in [*cases, "keep-alive, plain ThreadPoolExecutor"]}
    frames = [pl.from_arrow(b) for b in table.to_batches(HTTP_BATCH_ROWS)]
    try:
        for _ in range(runs):
            # The same UDF on a bare ThreadPoolExecutor over frames cut in advance: no reading,
            # accounting or writing, the ceiling for an executor in one process.
            local = threading.local()

            def plain(df: pl.DataFrame) -> pl.DataFrame:
                if not hasattr(local, "fn"):
                    local.fn = KeepAlive()
                return local.fn(df)

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(HTTP_THREADS) as pool:
                out = list(pool.map(plain, frames))
            times["keep-alive, plain ThreadPoolExecutor"].append(time.perf_counter() - t0)
            assert sum(f.height for f in out) == batches * HTTP_BATCH_ROWS
            for name, (fn, executor) in cases.items():
                t0 = time.perf_counter()
                report = (cb.from_arrow(table)
                          .map_batches(fn, executor=executor, concurrency=HTTP_THREADS,
                                       schema={"id": "int64", "name": "str", "x": "float64", "api": "int64"})
                          .foreach_batch(lambda df: None, retries=0)
                          .run(progress=False, batch_size=HTTP_BATCH_ROWS))
                times[name].append(time.perf_counter() - t0)
                assert report.rows_written == batches * HTTP_BATCH_ROWS and report.batches == batches
    finally:
        server.kill()
        server.wait()
    return {k: statistics.median(v) for k, v in times.items()}


# The service: one asyncio loop answering every request `latency` seconds after it arrived (keep-alive,
# HTTP/1.1). A remote service's CPU is not on the client's cores, and this one should take as little
# of them as it can: a `ThreadingHTTPServer` (a thread per connection) used ~0.27 ms of CPU per
# request, 40% of what the 32-thread client used on a 2-core machine; this loop uses ~0.12 ms.
_SERVER = r"""
import asyncio

LATENCY = {latency}
# No Nagle delay to wait out: asyncio sets TCP_NODELAY, and the answer is one write.
REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n7"


class Slow(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.pending = transport, b""

    def data_received(self, data):
        self.pending += data
        while b"\r\n\r\n" in self.pending:
            head, self.pending = self.pending.split(b"\r\n\r\n", 1)
            asyncio.get_running_loop().call_later(LATENCY, self.reply, b"connection: close" in head.lower())

    def reply(self, close):
        if not self.transport.is_closing():
            self.transport.write(REPLY)
            if close:
                self.transport.close()


async def main():
    server = await asyncio.get_running_loop().create_server(Slow, "127.0.0.1", 0, backlog=256)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


# -- a job's first run: a new process per run ----------------------------------------------------

_SCHEMA_TOML = '{ id = "int64", name = "str", x = "float64", score = "int64" }'
_JOB = """\
[source]
path = "{src}"

[[steps]]
udf = "colbatch.bench.udfs:cpu_udf"
workers = 2
schema = {schema}

[sink]
path = "{out}"
"""
# The same work as a plain Polars script: read, the UDF in-process, write.
_POLARS_SCRIPT = """\
import polars as pl
from colbatch.bench.udfs import cpu_udf
df = pl.read_parquet({src!r})
df.lazy().map_batches(cpu_udf, schema={{**df.schema, "score": pl.Int64}}).collect().write_parquet({out!r})
"""
FRESH = {"colbatch run JOB.toml, 2 workers": "cli", "python script with Polars map_batches": "polars"}


def fresh_process_bench(frame: pl.DataFrame, runs: int, work: Path, expected: tuple[int, int]) -> dict[str, list[float]]:
    """Wall seconds of the UDF job run the way a scheduled job runs: a new process each time.

    Input and output are Parquet files; every run pays its interpreter, its imports
    and, for colbatch, its worker zygote, which the job file lets it start while
    the driver is still importing.
    """
    src = work / "in.parquet"
    frame.write_parquet(src)
    job = work / "job.toml"
    job.write_text(_JOB.format(src=src, out=work / "cli.parquet", schema=_SCHEMA_TOML))
    commands = {
        "cli": [sys.executable, "-m", "colbatch", "run", str(job), "--no-progress", "--overwrite"],
        "polars": [sys.executable, "-c", _POLARS_SCRIPT.format(src=str(src), out=str(work / "polars.parquet"))],
    }
    times: dict[str, list[float]] = {name: [] for name in FRESH}
    for _ in range(runs):
        for name, key in FRESH.items():
            t0 = time.perf_counter()
            subprocess.run(commands[key], check=True, capture_output=True)
            times[name].append(time.perf_counter() - t0)
            got = pl.scan_parquet(work / f"{key}.parquet").select(pl.len(), pl.col("score").sum()).collect().row(0)
            if got != expected:
                raise AssertionError(f"{name}: output has (rows, checksum) {got}, expected {expected}")
    return times


def _flat_child(rows: int) -> None:
    _, n, _, extra = _timed(lambda: run_colbatch(rows, executor="processes", workers=2))
    print(json.dumps({"rows": n, **extra}))


def main(argv: Sequence[str]) -> int:
    """Run the UDF benchmark and print its tables; returns 0 when every contender's output checks out."""
    parser = argparse.ArgumentParser(prog="python -m colbatch bench udf", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows of input (default %(default)s)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="runs per contender (default %(default)s)")
    parser.add_argument("--http-batches", type=int, default=HTTP_BATCHES,
                        help="batches (HTTP calls) of the I/O-bound case (default %(default)s)")
    parser.add_argument("--flat", action="store_true", help=f"peak RSS of colbatch at 1x and {FLAT_FACTOR}x rows")
    parser.add_argument("--flat-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv))
    if args.flat_child:
        _flat_child(args.flat_child)
        return 0
    frame = pl.concat(list(batches(args.rows))).rechunk()
    contenders: dict[str, Callable[[], tuple[int, int, dict]]] = {
        # A process's first job starts the zygote its workers fork from; later jobs find it running.
        NEW_ZYGOTE: lambda: run_colbatch(args.rows, executor="processes", workers=2, frame=frame),
        "colbatch 2 workers": lambda: run_colbatch(args.rows, executor="processes", workers=2, frame=frame),
        "colbatch 1 worker": lambda: run_colbatch(args.rows, executor="processes", workers=1, frame=frame),
        "colbatch inline": lambda: run_colbatch(args.rows, executor="inline", workers=1, frame=frame),
        "polars map_batches": lambda: run_polars_map_batches(frame),
        "polars map_elements": lambda: run_polars_map_elements(frame),
        "multiprocessing.Pool (pandas, 2)": lambda: run_mp_pool(frame),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    checks: dict[str, tuple[int, int]] = {}
    shares: list[float] = []
    for _ in range(args.runs):
        for name, fn in contenders.items():
            if name == NEW_ZYGOTE:
                ZYGOTE.stop()  # outside the timing: this run starts a new one, as a process's first job does
            elapsed, rows, checksum, extra = _timed(fn)
            times[name].append(elapsed)
            checks[name] = (rows, checksum)
            if name == "colbatch 2 workers":
                shares.append(extra["transport_share"])
    ok = len(set(checks.values())) == 1 and next(iter(checks.values()))[0] == args.rows
    ref = statistics.median(times["colbatch 2 workers"])
    print(f"\nCPU-bound UDF: {args.rows:,} rows in {BATCH_ROWS:,}-row batches, median of {args.runs} run(s)")
    print(f"{'contender':<34}{'median s':>10}{'rows/s':>14}{'time / colbatch 2w':>22}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<34}{med:>10.2f}{args.rows / med:>14,.0f}{med / ref:>21.2f}x")
    print("(worker processes fork from a zygote process that the first job in a process starts and later jobs reuse;\n"
          " `new zygote` stops it before each of its runs, so that row is what a first job pays)")
    print(f"outputs agree (rows, checksum): {ok}")
    with tempfile.TemporaryDirectory(prefix="colbatch-bench-udf-") as work:
        fresh = fresh_process_bench(frame, args.runs, Path(work), next(iter(checks.values())))
    cli, script = (statistics.median(fresh[name]) for name in FRESH)
    print(f"\nthe same job's first run, a new process each (Parquet in and out, imports included), "
          f"median of {args.runs} run(s)")
    for name, ts in fresh.items():
        print(f"{name:<42}{statistics.median(ts):>8.2f} s")
    print(f"→ colbatch {script / cli:.2f}x the Polars script")
    share = transport_share()
    print(f"\ntransport of one 64k batch (IPC into shared memory and back): {share['transport_ms']:.2f} ms vs "
          f"UDF {share['udf_ms']:.2f} ms → {share['share']:.1%} of worker time")
    print(f"in the 2-worker runs, the workers' CPU reading and writing batches: {statistics.median(shares):.1%} "
          f"of their CPU (median of {len(shares)} runs; the rest is the function)")
    io = io_bench(args.runs, args.http_batches)
    print(f"\nI/O-bound UDF: {args.http_batches} batches, one ~{HTTP_LATENCY_S * 1e3:.0f} ms HTTP call each (127.0.0.1), "
          f"median of {args.runs} run(s)")
    for client in ("keep-alive", "urlopen"):
        seq, thr = io[f"{client}, sequential"], io[f"{client}, {HTTP_THREADS} threads"]
        print(f"{client:<11} sequential {seq:.2f} s, {HTTP_THREADS} threads {thr:.3f} s → {seq / thr:.1f}x")
    plain = io["keep-alive, plain ThreadPoolExecutor"]
    print(f"keep-alive on a plain ThreadPoolExecutor({HTTP_THREADS}) over pre-cut frames: {plain:.3f} s → "
          f"{io['keep-alive, sequential'] / plain:.1f}x colbatch's sequential run")
    if args.flat:
        print("\npeak RSS, colbatch 2 workers (driver + workers), fresh process per size:")
        for rows in (args.rows, args.rows * FLAT_FACTOR):
            res = subprocess.run([sys.executable, "-m", "colbatch", "bench", "udf", "--flat-child", str(rows)],
                                 capture_output=True, text=True, check=True)
            info = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{rows:>12,} rows: {info['peak_rss_mb']:,.0f} MiB")
    return 0 if ok else 1
