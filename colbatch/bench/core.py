"""`python -m colbatch bench core`: colbatch against Polars, DuckDB, PyArrow and plain Python.

Every contender runs the same job (read the events CSV, keep ``amount > 0``,
add ``value`` and ``category``, write zstd Parquet) in its own fresh
interpreter, interleaved run by run so that drift on the machine hits all of
them alike. The table shows medians; every output's row count is checked
against the count the generator recorded.

This module never imports colbatch's engine: the colbatch contender runs in a
child process like the others.

Example:
    $ python -m colbatch bench core --rows 1000000 --runs 3 --only colbatch,polars
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import psutil

from colbatch.bench.contenders import CONTENDERS, Contender, Measurement, launch
from colbatch.bench.generate import generate_events_csv, read_meta

# ~425 MB of CSV: start-up is noise at this size, yet it fits a laptop's disk and page cache.
DEFAULT_ROWS = 5_000_000
# The median of three hides one outlier run.
DEFAULT_RUNS = 3
# ~10 MB: small enough that interpreter start-up and imports dominate.
DEFAULT_SMALL_ROWS = 120_000
DEFAULT_DIR = Path(".bench")
DEFAULT_SEED = 42
# Memory flatness: peak RSS at FLAT_FACTOR times the rows should stay about the same.
FLAT_FACTOR = 10
SMALL_CONTENDERS = ("colbatch", "polars")
REFERENCE = "colbatch"
_MB = 1 << 20


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line of `main`.

    Args:
        argv: Arguments after ``bench core``.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(prog="python -m colbatch bench core", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--rows", type=_count, default=DEFAULT_ROWS, help="rows of input CSV (default %(default)s)")
    add("--runs", type=_positive, default=DEFAULT_RUNS, help="runs per contender (default %(default)s)")
    add("--dir", type=Path, default=DEFAULT_DIR, help="work directory for inputs and outputs")
    add("--only", type=_names, default=tuple(CONTENDERS), help="comma list of: " + ",".join(CONTENDERS))
    add("--small-rows", type=_count, default=DEFAULT_SMALL_ROWS, help="rows of the small case, 0 skips it")
    add("--flat", action="store_true", help=f"also run colbatch on {FLAT_FACTOR}x rows, compare peak RSS")
    add("--seed", type=int, default=DEFAULT_SEED, help="seed of the generated input")
    add("--json", type=Path, help="write all raw figures to this JSON file")
    return parser.parse_args(list(argv))


def main(argv: list[str]) -> int:
    """Run the core benchmark and print its tables.

    Args:
        argv: Command-line arguments, e.g. ``["--rows", "300000", "--runs", "1"]``.

    Returns:
        0 if every contender ran and all outputs have the expected row count, else 1.
    """
    args = parse_args(argv)
    work = args.dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    _print_machine(machine)
    figures: dict[str, object] = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}}
    failures: list[str] = []

    source = _input(work, args.rows, args.seed)
    core = _series(args.only, source, work, args.runs)
    failures += _check(core, source)
    print(f"\ncore: {args.rows:,} rows, {args.runs} run(s), {source.stat().st_size / _MB:,.0f} MB of CSV")
    figures["core"] = _summarise(core, args.rows)
    _print_core(figures["core"], [CONTENDERS[n] for n in args.only])

    small_names = [n for n in args.only if n in SMALL_CONTENDERS]
    if args.small_rows and small_names:
        small_source = _input(work, args.small_rows, args.seed)
        small = _series(small_names, small_source, work, args.runs)
        failures += _check(small, small_source)
        figures["small"] = _summarise(small, args.small_rows)
        _print_small(figures["small"], args.small_rows)

    if args.flat and args.rows:
        flat: dict[int, Measurement] = {}
        for rows in (args.rows, args.rows * FLAT_FACTOR):
            flat_source = _input(work, rows, args.seed)
            runs = _series([REFERENCE], flat_source, work, 1)
            failures += _check(runs, flat_source)
            flat[rows] = runs[REFERENCE][0]
        figures["flat"] = {str(rows): asdict(m) for rows, m in flat.items()}
        _print_flat(flat)

    figures["failures"] = failures
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"\nraw figures written to {args.json}")
    for failure in failures:
        print(f"FAIL: {failure}")
    if failures:
        where = "is in the --json figures" if args.json else "is kept with --json PATH"
        print(f"(the stderr of failed runs {where})")
    if not failures:
        print("\nOK: every output has the expected row count")
    return 1 if failures else 0


def machine_info() -> dict[str, object]:
    """Return what the figures depend on: CPUs, memory, and library versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {}
    for package in ("polars", "duckdb", "pyarrow", "colbatch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


def _count(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a row count of zero or more, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a count of one or more, got {text!r}")
    return value


def _names(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown or not names:
        bad = ", ".join(f"`{n}`" for n in unknown) or repr(text)
        raise argparse.ArgumentTypeError(f"unknown contender {bad}; valid: {', '.join(CONTENDERS)}")
    return names


def _input(work: Path, rows: int, seed: int) -> Path:
    path = generate_events_csv(work / f"events_{rows}.csv", rows, seed=seed)
    _warm_page_cache(path)
    return path


def _warm_page_cache(path: Path) -> None:
    """Read ``path`` once so the first contender does not pay for cold disk reads the others skip."""
    with path.open("rb") as handle:
        while handle.read(16 * _MB):
            pass


def _series(names: Sequence[str], source: Path, work: Path, runs: int) -> dict[str, list[Measurement]]:
    """Run each contender ``runs`` times, interleaved, and return the measurements by contender."""
    results: dict[str, list[Measurement]] = {name: [] for name in names}
    for run in range(runs):
        for name in names:
            contender = CONTENDERS[name]
            measurement = launch(contender, source, work / f"out_{name}{contender.suffix}")
            results[name].append(measurement)
            status = f"{measurement.job_s:.2f} s job" if measurement.ok else "FAILED"
            progress = f"  [{source.name}] run {run + 1}/{runs} {name}: {measurement.wall_s:.2f} s total, {status}"
            print(progress, flush=True)
    return results


def _check(results: dict[str, list[Measurement]], source: Path) -> list[str]:
    """Return one line per failed run or wrong row count on ``source``; empty when all is well."""
    expected = read_meta(source)["positive_amount_rows"]
    failures = []
    for name, runs in results.items():
        for index, m in enumerate(runs, 1):
            label = f"{name} on {source.name} run {index}"
            if not m.ok:
                failures.append(f"{label} failed: {m.error.splitlines()[0]}")
            elif m.output_rows != expected:
                failures.append(f"{label} wrote {m.output_rows:,} rows, expected {expected:,}")
            elif m.rows_reported is not None and m.rows_reported != expected:
                failures.append(f"{label} reported {m.rows_reported:,} rows written, expected {expected:,}")
    return failures


def _summarise(results: dict[str, list[Measurement]], rows: int) -> dict[str, dict[str, object]]:
    """Return medians per contender over its successful runs, with the raw runs."""
    summary: dict[str, dict[str, object]] = {}
    for name, runs in results.items():
        good = [m for m in runs if m.ok]
        entry: dict[str, object] = {"runs": [asdict(m) for m in runs], "ok_runs": len(good)}
        if good:
            job_s = statistics.median(m.job_s for m in good)
            entry |= {
                "job_s": job_s,
                "wall_s": statistics.median(m.wall_s for m in good),
                "import_s": statistics.median(m.import_s for m in good),
                "peak_rss_mb": statistics.median(m.peak_rss_bytes for m in good) / _MB,
                "workers_peak_rss_mb": statistics.median(m.workers_peak_rss_bytes for m in good) / _MB,
                "rows_per_s": rows / job_s if job_s > 0 else float("inf"),
                "wall_rows_per_s": rows / statistics.median(m.wall_s for m in good),
                "output_rows": good[0].output_rows,
            }
        summary[name] = entry
    return summary


def _ratio(summary: dict[str, dict[str, object]], name: str, key: str) -> str:
    reference, other = summary.get(REFERENCE, {}), summary[name]
    if name == REFERENCE or key not in reference or key not in other:
        return "-"
    return f"{REFERENCE}/{name} = {reference[key] / other[key]:.2f}x"


def _print_machine(machine: dict[str, object]) -> None:
    memory_gb = int(machine["memory_total_bytes"]) / (1 << 30)
    print(
        f"machine: {machine['nproc']} CPUs usable ({machine['cpu_count']} online), {memory_gb:.1f} GB RAM, "
        f"{machine['platform']}, Python {machine['python']}"
    )
    print(
        f"versions: polars {machine['polars']}, duckdb {machine['duckdb']}, "
        f"pyarrow {machine['pyarrow']}, colbatch {machine['colbatch']}"
    )


def _print_core(summary: dict[str, dict[str, object]], contenders: list[Contender]) -> None:
    header = (
        f"{'contender':<10} {'job s':>8} {'process s':>10} {'peak RSS MB':>12} {'workers MB':>11} "
        f"{'rows/s':>12}  throughput ratio"
    )
    print(header)
    print("-" * len(header))
    for contender in contenders:
        s = summary[contender.name]
        if "job_s" not in s:
            print(f"{contender.name:<10} {'failed':>8}")
            continue
        workers = f"{s['workers_peak_rss_mb']:.0f}" if s["workers_peak_rss_mb"] else "-"
        print(
            f"{contender.name:<10} {s['job_s']:>8.2f} {s['wall_s']:>10.2f} {s['peak_rss_mb']:>12.0f} "
            f"{workers:>11} {s['rows_per_s']:>12,.0f}  {_ratio(summary, contender.name, 'rows_per_s')}"
        )
    print("job s: median job time inside the child; process s: whole subprocess incl. start-up and imports;")
    print("rows/s: input rows / job s; ratio: colbatch rows/s over the contender's (>1: colbatch is faster);")
    print("MB: 2**20 bytes; peak RSS: the child's VmHWM; workers: largest worker process, not included")
    for contender in contenders:
        if contender.note:
            print(f"note: {contender.name}: {contender.note}")


def _print_small(summary: dict[str, dict[str, object]], rows: int) -> None:
    print(f"\nsmall input: {rows:,} rows, end to end (interpreter start-up and imports included)")
    for name, s in summary.items():
        if "wall_s" not in s:
            print(f"  {name:<10} failed")
            continue
        print(
            f"  {name:<10} process {s['wall_s']:.3f} s "
            f"(imports {s['import_s']:.3f} s, job {s['job_s']:.3f} s)  "
            f"{_ratio(summary, name, 'wall_rows_per_s')}"
        )


def _print_flat(flat: dict[int, Measurement]) -> None:
    (small_rows, small), (big_rows, big) = flat.items()
    print(f"\nmemory flatness: {REFERENCE} on {small_rows:,} and {big_rows:,} rows (one run each)")
    for rows, m in flat.items():
        detail = f"peak RSS {m.peak_rss_bytes / _MB:,.0f} MB, job {m.job_s:.2f} s" if m.ok else "failed"
        print(f"  {rows:>13,} rows: {detail}")
    if small.ok and big.ok:
        ratio = big.peak_rss_bytes / small.peak_rss_bytes
        print(f"  peak RSS ratio {FLAT_FACTOR}x rows / 1x rows = {ratio:.2f} (1.00 is perfectly flat)")
    else:
        print("  peak RSS ratio unavailable: a run failed")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
