"""Job files: TOML that maps one-to-one onto the Python API (see DESIGN.md, "The job file")."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

from colbatch.batching import load_tuned_rows, tune_file
from colbatch.errors import ConfigError
from colbatch.io import scan_csv, scan_ipc, scan_ndjson, scan_parquet
from colbatch.pipeline import Pipeline
from colbatch.sinks.duckdb_table import DUCKDB_SUFFIXES
from colbatch.sinks.files import format_of
from colbatch.sources.files import strip_compression
from colbatch.udf.step import resolve_function

SOURCE_FORMATS = ("csv", "jsonl", "ndjson", "parquet", "ipc")
STEP_KINDS = ("filter", "validate", "with_columns", "select", "rename", "cast")
TOP_KEYS = ("source", "steps", "sink", "rejects", "run", "aggregate")
PG_SCHEMES = ("postgresql://", "postgres://")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)


def parse_size(value: Any, *, key: str) -> int:
    """`"2GB"` / `"512MiB"` / `1048576` → bytes."""
    if isinstance(value, int) and value > 0:
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"`{key}` must be a size like \"2GB\" or a byte count, got {value!r}", key=key, value=value)
    unit = m.group(2).lower().rstrip("b").rstrip("i")
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit]
    return int(float(m.group(1)) * (1024 ** power))


def _check_keys(table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in table if k not in allowed]
    if unknown:
        raise ConfigError(f"unknown key `{unknown[0]}` in {where}; valid keys: {', '.join(allowed)}", key=unknown[0])


def load_job(path: str | os.PathLike) -> Pipeline:
    """Read a TOML job file and build its Pipeline; paths are relative to the current directory."""
    try:
        with open(path, "rb") as fh:
            job = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"job file `{path}` does not exist", path=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"job file `{path}` is not valid TOML: {exc}", path=str(path)) from exc
    pipeline = build_job(job)
    tuned = load_tuned_rows(tune_file(path))
    return pipeline.with_options(tuned_rows=tuned) if tuned else pipeline


def build_job(job: Mapping[str, Any]) -> Pipeline:
    """Build a Pipeline from a parsed job mapping."""
    _check_keys(job, TOP_KEYS, "the job file")
    pipeline = _source(job.get("source"))
    steps = job.get("steps", [])
    if not isinstance(steps, list):
        raise ConfigError("`steps` must be an array of tables ([[steps]])")
    for i, step in enumerate(steps):
        pipeline = _step(pipeline, step, i)
    if "aggregate" in job:
        agg = job["aggregate"]
        if not isinstance(agg, Mapping) or not isinstance(agg.get("sql"), str):
            raise ConfigError("`[aggregate]` needs `sql`, a DuckDB query over the table `input`")
        _check_keys(agg, ("sql",), "[aggregate]")
        pipeline = pipeline.aggregate(agg["sql"])
    pipeline = _sink(pipeline, job.get("sink"))
    if "rejects" in job:
        rej = job["rejects"]
        _check_keys(rej, ("path",), "[rejects]")
        if "path" not in rej:
            raise ConfigError("`[rejects]` needs a `path`")
        pipeline = pipeline.sink_rejects(rej["path"])
    return pipeline.with_options(**_run_options(job.get("run", {})))


def _source(src: Any) -> Pipeline:
    if not isinstance(src, Mapping) or "path" not in src:
        raise ConfigError("the job file needs a `[source]` table with a `path`")
    if str(src["path"]).startswith(PG_SCHEMES):
        _check_keys(src, ("path", "query", "table", "schema", "partition_on", "partitions"), "[source]")
        from colbatch.io import scan_postgres

        return scan_postgres(str(src["path"]), src.get("query"), table=src.get("table"), schema=src.get("schema"),
                             partition_on=src.get("partition_on"), partitions=int(src.get("partitions", 1)))
    _check_keys(src, ("path", "format", "schema", "separator", "has_header", "null_values", "quote_char"), "[source]")
    path = src["path"]
    fmt = src.get("format") or _infer_format(path)
    schema = src.get("schema")
    if fmt == "csv":
        extra = {k: src[k] for k in ("separator", "has_header", "null_values", "quote_char") if k in src}
        return scan_csv(path, schema=schema, **extra)
    if fmt in ("jsonl", "ndjson"):
        return scan_ndjson(path, schema=schema)
    if fmt == "parquet":
        return scan_parquet(path, schema=schema)
    if fmt == "ipc":
        return scan_ipc(path, schema=schema)
    raise ConfigError(f"`source.format` {fmt!r} is not supported; valid formats: {', '.join(SOURCE_FORMATS)}",
                      value=fmt)


def _infer_format(path: str) -> str:
    base = strip_compression(str(path).lower()).rstrip("*")
    for fmt, suffixes in (("csv", (".csv", ".tsv", ".txt")), ("jsonl", (".jsonl", ".ndjson", ".json")),
                          ("parquet", (".parquet", ".pq")), ("ipc", (".arrow", ".ipc", ".feather"))):
        if base.endswith(suffixes):
            return fmt
    raise ConfigError(f"cannot tell the format of `{path}`; set `source.format` to one of {', '.join(SOURCE_FORMATS)}",
                      path=path)


def _step(pipeline: Pipeline, step: Any, i: int) -> Pipeline:
    if not isinstance(step, Mapping):
        raise ConfigError(f"steps[{i}] must be a table")
    kinds = [k for k in step if k in STEP_KINDS]
    if "udf" in step:
        return _udf_step(pipeline, step, i)
    if len(kinds) != 1:
        raise ConfigError(f"steps[{i}] must have exactly one of {', '.join(STEP_KINDS)}; got {sorted(step)}")
    kind = kinds[0]
    _check_keys(step, (kind, "name"), f"steps[{i}]")
    value = step[kind]
    name = step.get("name", "")
    if kind == "filter":
        return pipeline.filter(value, name=name)
    if kind == "validate":
        return pipeline.validate(value, name=name or None)
    if kind == "with_columns":
        return pipeline.with_columns(*([value] if isinstance(value, str) else value))
    if kind == "select":
        return pipeline.select(*([value] if isinstance(value, str) else value))
    if kind == "rename":
        return pipeline.rename(value)
    return pipeline.cast(value)


UDF_KEYS = ("udf", "name", "workers", "executor", "ordered", "retries", "timeout", "concurrency", "isolate_rows",
            "schema", "max_in_flight")


def _udf_step(pipeline: Pipeline, step: Mapping[str, Any], i: int) -> Pipeline:
    _check_keys(step, UDF_KEYS, f"steps[{i}]")
    fn = resolve_function(step["udf"]) if isinstance(step["udf"], str) else None
    if fn is None:
        raise ConfigError(f"steps[{i}].udf must be a string \"package.module:function\", got {step['udf']!r}")
    options = {k: step[k] for k in UDF_KEYS[1:] if k in step}
    return pipeline.map_batches(fn, **options)  # a "tcp://" executor connects when the step starts


def _sink(pipeline: Pipeline, sink: Any) -> Pipeline:
    if not isinstance(sink, Mapping) or "path" not in sink:
        raise ConfigError("the job file needs a `[sink]` table with a `path`")
    path = str(sink["path"])
    if path.startswith(PG_SCHEMES):
        _check_keys(sink, ("path", "table", "mode", "key", "schema", "retries", "streams"), "[sink]")
        if "table" not in sink:
            raise ConfigError("a PostgreSQL `[sink]` needs a `table`")
        opts = {k: sink[k] for k in ("mode", "key", "schema", "retries", "streams") if k in sink}
        return pipeline.sink_postgres(path, sink["table"], **opts)
    _check_keys(sink, ("path", "format", "compression", "compression_level", "row_group_size", "partition_by",
                       "separator", "part_rows", "escape_formulas", "table", "mode"), "[sink]")
    if sink.get("format") == "duckdb" or path.lower().endswith(DUCKDB_SUFFIXES):
        return _duckdb_sink(pipeline, path, sink)
    fmt = sink.get("format") or format_of(path) or "parquet"
    if "part_rows" in sink and not (isinstance(sink["part_rows"], int) and sink["part_rows"] > 0):
        raise ConfigError(f"`sink.part_rows` must be a positive row count, got {sink['part_rows']!r}",
                          value=sink["part_rows"])
    if fmt == "parquet":
        opts = {k: sink[k] for k in ("compression", "compression_level", "row_group_size", "partition_by", "part_rows")
                if k in sink}
        return pipeline.sink_parquet(path, **opts)
    if fmt == "csv":
        opts = {k: sink[k] for k in ("compression", "separator", "part_rows", "escape_formulas") if k in sink}
        return pipeline.sink_csv(path, **opts)
    if fmt in ("jsonl", "ndjson"):
        return pipeline.sink_ndjson(path, **{k: sink[k] for k in ("compression", "part_rows") if k in sink})
    raise ConfigError(f"`sink.format` {fmt!r} is not supported; valid formats: parquet, csv, jsonl, duckdb",
                      value=fmt)


def _duckdb_sink(pipeline: Pipeline, path: str, sink: Mapping[str, Any]) -> Pipeline:
    if "table" not in sink:
        raise ConfigError(f"`[sink]` with DuckDB database `{path}` needs a `table`")
    extra = [k for k in sink if k not in ("path", "format", "table", "mode", "part_rows")]
    if extra:
        raise ConfigError(f"key `{extra[0]}` does not apply to a DuckDB sink; valid keys: path, table, mode, "
                          f"part_rows", key=extra[0])
    opts = {"part_rows": sink["part_rows"]} if "part_rows" in sink else {}
    return pipeline.sink_duckdb(path, str(sink["table"]), mode=sink.get("mode", "append"), **opts)


def _run_options(run: Mapping[str, Any]) -> dict[str, Any]:
    _check_keys(run, ("batch_size", "max_error_rate", "max_errors", "memory_limit", "progress", "threads",
                      "temp_directory", "executor"), "[run]")
    out: dict[str, Any] = {}
    if "executor" in run:
        address = run["executor"]
        if not (isinstance(address, str) and address.startswith(("tcp://", "tls://"))):
            raise ConfigError(f"`run.executor` must be a Dask scheduler address like \"tcp://HOST:8786\", "
                              f"got {address!r}", value=address)
        out["executor"] = address
    if "batch_size" in run:
        bs = run["batch_size"]
        if bs != "auto" and not (isinstance(bs, int) and bs > 0):
            raise ConfigError(f"`run.batch_size` must be \"auto\" or a positive row count, got {bs!r}", value=bs)
        out["batch_size"] = bs
    if "max_error_rate" in run:
        rate = run["max_error_rate"]
        if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ConfigError(f"`run.max_error_rate` must be a number between 0 and 1, got {rate!r}", value=rate)
        out["max_error_rate"] = float(rate)
    if "max_errors" in run:
        n = run["max_errors"]
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"`run.max_errors` must be a non-negative integer, got {n!r}", value=n)
        out["max_errors"] = n
    if "memory_limit" in run:
        out["memory_limit"] = parse_size(run["memory_limit"], key="run.memory_limit")
    if "threads" in run:
        t = run["threads"]
        if not isinstance(t, int) or isinstance(t, bool) or t < 1:
            raise ConfigError(f"`run.threads` must be a positive integer, got {t!r}", value=t)
        out["threads"] = t
    if "temp_directory" in run:
        out["temp_directory"] = str(run["temp_directory"])
    if "progress" in run:
        out["progress"] = bool(run["progress"])
    return out
