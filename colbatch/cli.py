"""Command line: `python -m colbatch run JOB.toml | tune JOB.toml | demo | query SQL | bench core|udf|agg|pg|tune`."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from colbatch.errors import ColbatchError, ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m colbatch", description="columnar batch jobs with full row accounting")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a TOML job file")
    run.add_argument("job", help="path to the job file")
    run.add_argument("--report", metavar="PATH", help="write the run report as JSON")
    run.add_argument("--html", metavar="PATH", help="write the run report as an HTML page with charts")
    run.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run: skip the work its output's ledger lists as committed")
    run.add_argument("--overwrite", action="store_true",
                     help="run even when the output already holds this job's complete result")
    run.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    demo = sub.add_parser("demo", help="run a job on the bundled sample data and query its output")
    demo.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    demo.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    demo.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    query = sub.add_parser("query", help="run DuckDB SQL over committed outputs (each output is a view)")
    query.add_argument("sql", help="DuckDB SQL; outputs are views named after them (`events` for events.parquet)")
    query.add_argument("--output", action="append", default=[], metavar="PATH", help="an output to query (repeatable)")
    query.add_argument("--as", dest="named", action="append", default=[], metavar="NAME=PATH",
                       help="an output under the view name NAME (repeatable)")
    query.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table",
                       help="result format (default: table)")
    query.add_argument("--to", metavar="FILE", help="write the result to FILE instead of stdout")
    query.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    tune = sub.add_parser("tune", help="measure a job at several batch sizes on a sample and recommend one")
    tune.add_argument("job", help="path to the job file")
    tune.add_argument("--plot", metavar="PNG", help="save throughput and peak RSS by batch size as a PNG")
    tune.add_argument("--write", action="store_true",
                      help="store the recommendation in JOB.tune.json, where batch_size=\"auto\" starts from")
    tune.add_argument("--sample-rows", type=int, default=None, metavar="N", help="most rows tuning reads in all (default: a budget of 10%% of a full run's time)")
    tune.add_argument("--sizes", default=None, metavar="N,N,...", help="batch sizes in rows (default 8k..1M)")
    tune.add_argument("--repeats", type=int, default=None, metavar="N", help="timed batches per size, budget allowing (default 3)")
    tune.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    bench = sub.add_parser("bench", help="benchmarks against Polars, DuckDB, pyarrow and plain Python")
    bench.add_argument("suite", choices=["core", "udf", "agg", "pg", "postgres", "tune"], help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options of the suite (see `bench core --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 job failed, 2 bad usage or config)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="colbatch: %(message)s")
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "tune":
            return _tune(args)
        if args.command == "demo":
            from colbatch.demo import run_demo

            return run_demo(args.out, progress=not args.no_progress)
        if args.command == "query":
            from colbatch.query import query_command

            return query_command(args.sql, outputs=args.output, named=args.named, format=args.format, to=args.to)
        from colbatch.bench import compile_package

        if not {"-h", "--help"} & set(args.args):
            compile_package()
        if args.suite == "agg":
            from colbatch.bench.agg import main as agg_main

            return agg_main(args.args)
        if args.suite in ("pg", "postgres"):
            from colbatch.bench.pg import main as pg_bench_main

            return pg_bench_main(args.args)
        if args.suite == "tune":
            from colbatch.bench.tune import main as bench_tune

            return bench_tune(args.args)
        if args.suite == "udf":
            from colbatch.bench.udf import main as bench_udf

            return bench_udf(args.args)
        from colbatch.bench.core import main as bench_main

        return bench_main(args.args)
    except ConfigError as exc:
        return _fail(exc, debug, EXIT_USAGE)
    except ColbatchError as exc:
        return _fail(exc, debug, EXIT_FAILED)
    except KeyboardInterrupt:
        print("colbatch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected error is still one line without --debug
        return _fail(exc, debug, EXIT_FAILED, prefix="internal error: ")


def _fail(exc: BaseException, debug: bool, code: int, prefix: str = "") -> int:
    if debug:
        traceback.print_exc()
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"colbatch: error: {prefix}{message}", file=sys.stderr)
    if prefix and not debug:
        print("colbatch: run with --debug for details", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    _prestart_workers(args.job)
    from colbatch.config import load_job

    pipeline = load_job(args.job)
    if args.no_progress:
        pipeline = pipeline.with_options(progress=False)
    report = pipeline.run(raise_on_error=False, resume=args.resume, overwrite=args.overwrite)
    if args.report:
        report.save_json(args.report)
    if args.html:
        report.save_html(args.html)
    print(report.summary())
    if not report.succeeded:
        print(f"colbatch: error: {report.error}", file=sys.stderr)
        return EXIT_FAILED if report.error_type != "ConfigError" else EXIT_USAGE
    return EXIT_OK


def _prestart_workers(path: str) -> None:
    """Start the UDF worker zygote now if the job runs a UDF on local worker processes.

    It then loads while this process imports the engine and opens the input,
    not after the first batches arrive. A job file that does not parse is left
    to `load_job` to report.
    """
    import tomllib

    from colbatch.udf import resolve_executor

    try:
        with open(path, "rb") as fh:
            job = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return
    run, steps = job.get("run"), job.get("steps")
    if (isinstance(run, dict) and "executor" in run) or not isinstance(steps, list):
        return  # a Dask cluster runs the UDFs (or there are none)
    for step in steps:
        if isinstance(step, dict) and "udf" in step:
            workers = step.get("workers", 1)
            if isinstance(workers, int) and resolve_executor(step.get("executor", "auto"), workers) == "processes":
                from colbatch.udf.zygote import prestart

                prestart()
                return


def _tune(args: argparse.Namespace) -> int:
    from colbatch.tuning import DEFAULT_REPEATS, DEFAULT_SAMPLE_ROWS, tune_job

    try:
        sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else None
    except ValueError:
        raise ConfigError(f"`--sizes` must be comma-separated row counts, got {args.sizes!r}") from None
    result, written = tune_job(args.job, sizes=sizes, write=args.write,
                               sample_rows=args.sample_rows or DEFAULT_SAMPLE_ROWS,
                               repeats=args.repeats or DEFAULT_REPEATS)
    print(result.table())
    if args.plot:
        result.plot(args.plot)
        print(f"plot: {args.plot}")
    if written is not None:
        print(f"recommendation written to {written}; batch_size = \"auto\" starts from it")
    return EXIT_OK
