"""The benchmark job, written once per contender, and the launcher that runs one in a child process.

The job: read the events CSV, keep ``amount > 0``, add ``value = amount * 1.1``
and ``category = upper(type)``, write zstd Parquet (the pure-Python contender
writes CSV, as the textbook loop does).

Each run is a fresh interpreter, so one contender's imports, caches and heap
never leak into another's figures. The parent starts this file by path with
``python -P`` rather than ``-m colbatch.bench.contenders`` so that the child
imports only the library it benchmarks (``-m`` would import ``colbatch`` for
every contender). The child prints one line, `RESULT_PREFIX` followed by JSON,
with the job time measured inside it and its own peak RSS (see `_peak_rss_bytes`).

Example:
    $ python -P colbatch/bench/contenders.py polars events.csv out.parquet
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RESULT_PREFIX = "COLBATCH_BENCH_RESULT "
VALUE_FACTOR = 1.1
# The textbook loop: 50k-row chunks of dicts on two worker processes.
PYTHON_CHUNK_ROWS = 50_000
PYTHON_WORKERS = 2
# At most this many chunks in flight; `executor.map` would submit the whole file at once.
PYTHON_MAX_PENDING = 2 * PYTHON_WORKERS
# pyarrow's default 1 MB CSV blocks give ~12k-row Parquet row groups; 16 MB is the usual tuning.
PYARROW_BLOCK_BYTES = 16 << 20
# The directory holding the `colbatch` package, so the child imports this checkout.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]

Job = Callable[[], "int | None"]


@dataclass(frozen=True)
class Contender:
    """One way of running the benchmark job.

    Attributes:
        name: Name used on the command line and in the table.
        prepare: Imports the library and returns the job, a callable returning
            the rows written when the library reports them, else None.
        suffix: Output file suffix: ``.parquet`` or ``.csv``.
        note: Caveat printed under the results table, or empty.
    """

    name: str
    prepare: Callable[[str, str], Job]
    suffix: str = ".parquet"
    note: str = ""


@dataclass(frozen=True)
class Measurement:
    """Figures from one run of one contender.

    Attributes:
        contender: Contender name.
        ok: Whether the child exited 0 and reported its figures.
        wall_s: Whole subprocess time seen by the parent: start-up, imports, job, exit.
        import_s: Time the child spent importing its library.
        job_s: Time the child spent on the job itself.
        peak_rss_bytes: The child's own peak resident set size.
        workers_peak_rss_bytes: Peak RSS of the largest process the child started and waited for
            (0 if none), from ``ru_maxrss`` of RUSAGE_CHILDREN; not included in ``peak_rss_bytes``.
        rows_reported: Rows written as reported by the library, or None if it does not say.
        output_rows: Rows found in the output file (Parquet metadata, or CSV lines minus the header).
        error: When the child failed, a one-line summary then the tail of its stderr; else empty.
    """

    contender: str
    ok: bool
    wall_s: float
    import_s: float = 0.0
    job_s: float = 0.0
    peak_rss_bytes: int = 0
    workers_peak_rss_bytes: int = 0
    rows_reported: int | None = None
    output_rows: int | None = None
    error: str = ""


def launch(contender: Contender, source: Path, output: Path) -> Measurement:
    """Run ``contender`` on ``source`` in a fresh interpreter, count its output, then delete it.

    Args:
        contender: The contender to run.
        source: Input CSV.
        output: Output file; removed before and after the run.

    Returns:
        The run's figures; ``ok`` is False if the child failed.
    """
    output.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_SOURCE_ROOT), env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-P", str(Path(__file__).resolve()), contender.name, str(source), str(output)]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall_s = time.perf_counter() - started
    try:
        result = _parse_result(proc.stdout)
        if proc.returncode != 0 or result is None:
            lines = proc.stderr.strip().splitlines() or ["no result line and nothing on stderr"]
            summary = f"exit code {proc.returncode}: {lines[-1]}"
            return Measurement(contender.name, False, wall_s, error="\n".join([summary, *lines[-15:]]))
        return Measurement(
            contender.name,
            True,
            wall_s,
            import_s=result["import_s"],
            job_s=result["job_s"],
            peak_rss_bytes=result["peak_rss_bytes"],
            workers_peak_rss_bytes=result["workers_peak_rss_bytes"],
            rows_reported=result["rows"],
            output_rows=count_rows(output),
        )
    finally:
        output.unlink(missing_ok=True)


def count_rows(path: Path) -> int:
    """Return the data rows in a Parquet file (from its metadata) or a CSV file (lines minus the header)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    lines = 0
    with path.open("rb") as handle:
        while block := handle.read(16 << 20):
            lines += block.count(b"\n")
    return max(lines - 1, 0)


def _parse_result(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return None


def _prepare_colbatch(source: str, output: str) -> Job:
    import colbatch as cb  # before Polars, as `python -m colbatch` does: it sets Polars' allocator up
    import polars as pl

    # `import colbatch` loads the engine's modules on first use (so that UDF workers need not); load
    # them here, with the other imports, as `import polars` loads Polars' before its job is timed.
    scan_csv = cb.scan_csv

    def job() -> int:
        report = (
            scan_csv(source)
            .filter(pl.col("amount") > 0)
            .with_columns(
                (pl.col("amount") * VALUE_FACTOR).alias("value"),
                pl.col("type").str.to_uppercase().alias("category"),
            )
            .sink_parquet(output, compression="zstd")
            .run(progress=False)
        )
        return int(report.rows_written)

    return job


def _prepare_polars(source: str, output: str) -> Job:
    import polars as pl

    def job() -> None:
        (
            pl.scan_csv(source)
            .filter(pl.col("amount") > 0)
            .with_columns(
                (pl.col("amount") * VALUE_FACTOR).alias("value"),
                pl.col("type").str.to_uppercase().alias("category"),
            )
            .sink_parquet(output, compression="zstd")
        )

    return job


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _prepare_duckdb(source: str, output: str) -> Job:
    import duckdb

    query = (
        f"COPY (SELECT *, amount * {VALUE_FACTOR} AS value, upper(type) AS category "
        f"FROM read_csv({_sql_string(source)}) WHERE amount > 0) "
        f"TO {_sql_string(output)} (FORMAT parquet, COMPRESSION zstd)"
    )

    def job() -> int:
        with duckdb.connect() as con:
            return int(con.execute(query).fetchone()[0])

    return job


def _prepare_pyarrow(source: str, output: str) -> Job:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pv
    import pyarrow.parquet as pq

    def job() -> int:
        reader = pv.open_csv(source, read_options=pv.ReadOptions(block_size=PYARROW_BLOCK_BYTES))
        schema = pa.schema([*reader.schema, pa.field("value", pa.float64()), pa.field("category", pa.string())])
        rows = 0
        with pq.ParquetWriter(output, schema, compression="zstd") as writer:
            for batch in reader:
                kept = batch.filter(pc.greater(batch["amount"], 0))
                value = pc.multiply(kept["amount"], VALUE_FACTOR)
                category = pc.utf8_upper(kept["type"])
                columns = [*kept.columns, value, category]
                writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
                rows += kept.num_rows
        return rows

    return job


def _python_transform(rows: list[dict[str, str]]) -> list[dict[str, object]]:
    kept: list[dict[str, object]] = []
    for row in rows:
        amount = float(row["amount"])
        if amount > 0:
            kept.append({**row, "value": amount * VALUE_FACTOR, "category": row["type"].upper()})
    return kept


def _prepare_python(source: str, output: str) -> Job:
    import csv
    import itertools
    from collections import deque
    from concurrent.futures import Future, ProcessPoolExecutor

    def job() -> int:
        written = 0
        pending: deque[Future[list[dict[str, object]]]] = deque()
        with (
            open(source, newline="") as src,
            open(output, "w", newline="") as dst,
            ProcessPoolExecutor(max_workers=PYTHON_WORKERS) as pool,
        ):
            reader = csv.DictReader(src)
            writer = csv.DictWriter(dst, fieldnames=[*(reader.fieldnames or []), "value", "category"])
            writer.writeheader()
            while chunk := list(itertools.islice(reader, PYTHON_CHUNK_ROWS)):
                pending.append(pool.submit(_python_transform, chunk))
                while len(pending) >= PYTHON_MAX_PENDING or (pending and pending[0].done()):
                    rows = pending.popleft().result()
                    writer.writerows(rows)
                    written += len(rows)
            for future in pending:
                rows = future.result()
                writer.writerows(rows)
                written += len(rows)
        return written

    return job


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("colbatch", _prepare_colbatch),
        Contender("polars", _prepare_polars),
        Contender("duckdb", _prepare_duckdb),
        Contender(
            "pyarrow",
            _prepare_pyarrow,
            note=f"open_csv with {PYARROW_BLOCK_BYTES >> 20} MB blocks, one ParquetWriter",
        ),
        Contender(
            "python",
            _prepare_python,
            suffix=".csv",
            note=(
                f"csv.DictReader, {PYTHON_CHUNK_ROWS:,}-row chunks on a {PYTHON_WORKERS}-process pool, "
                "writes CSV not Parquet; workers share pages with the parent"
            ),
        ),
    )
}


def _peak_rss_bytes() -> int:
    """Return this process's peak RSS since it started its current program.

    On Linux, ``ru_maxrss`` of RUSAGE_SELF is wrong here: exec keeps the high-water
    mark of the image it replaces, and subprocess forks (or vforks) the parent, so
    the child would report at least the parent's peak RSS (the parent has just
    generated the input). ``VmHWM`` belongs to the new address space only.
    """
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return _max_rss_bytes(resource.RUSAGE_SELF)


def _max_rss_bytes(who: int) -> int:
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(who).ru_maxrss * scale


def main(argv: list[str]) -> int:
    """Run one contender in this process and print its figures; the child side of `launch`.

    Args:
        argv: ``[NAME, SOURCE_CSV, OUTPUT]``.

    Returns:
        The exit code: 0 on success, 2 on bad usage.
    """
    if len(argv) != 3 or argv[0] not in CONTENDERS:
        print(f"usage: contenders.py {{{'|'.join(CONTENDERS)}}} SOURCE_CSV OUTPUT", file=sys.stderr)
        return 2
    name, source, output = argv
    started = time.perf_counter()
    job = CONTENDERS[name].prepare(source, output)
    imported = time.perf_counter()
    rows = job()
    finished = time.perf_counter()
    result = {
        "contender": name,
        "import_s": imported - started,
        "job_s": finished - imported,
        "rows": rows,
        "peak_rss_bytes": _peak_rss_bytes(),
        "workers_peak_rss_bytes": _max_rss_bytes(resource.RUSAGE_CHILDREN),
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
