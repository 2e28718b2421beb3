"""The README's reference sections cannot drift from the code.

- Job-file reference: every key the job-file loader accepts (asked of `colbatch.config` itself,
  by feeding it an unknown key per table and reading the valid keys from its error) has a row
  with a default; where the key maps onto a Python parameter, the documented default is that
  parameter's default.
- Python API reference: every name in `colbatch.__all__` has an entry with a runnable example,
  and every public `Pipeline` method is named in the `cb.Pipeline` entry.
- CLI reference: every subcommand and flag of `python -m colbatch` (and of each `bench` suite)
  is listed, and the exit codes are documented.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import colbatch as cb
from colbatch import config
from colbatch.errors import ConfigError
from colbatch.runner import RunOptions

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str, level: int = 2) -> str:
    """The text of the README section with this heading, up to the next heading of the same level."""
    marks = "#" * level
    m = re.search(rf"^{marks} {re.escape(title)}\s*$", README, re.MULTILINE)
    assert m, f"README has no `{marks} {title}` section"
    end = re.search(rf"^#{{1,{level}}} ", README[m.end():], re.MULTILINE)
    return README[m.end(): m.end() + end.start() if end else len(README)]


def subsections(text: str, level: int = 3) -> dict[str, str]:
    """Heading → body for the headings of this level inside a section."""
    parts = re.split(rf"^{'#' * level} (.+)$", text, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in `text` (header and separator rows included)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.strip().startswith("|")]


# -- the job-file reference ---------------------------------------------------------------------

S = {"path": str(ROOT / "data" / "sample" / "events.csv")}
K = {"path": "out/never-written.parquet"}
PG = "postgresql://user@host.invalid/db"
UNKNOWN = "zz_not_a_key"

# (TOML table, heading variant, a job whose only fault is an unknown key in that table)
PROBES = [
    ("[source]", "files", {"source": {**S, UNKNOWN: 1}, "sink": K}),
    ("[source]", "PostgreSQL", {"source": {"path": PG, UNKNOWN: 1}, "sink": K}),
    *[("[[steps]]", "built-in", {"source": S, "steps": [{kind: "x", UNKNOWN: 1}], "sink": K})
      for kind in config.STEP_KINDS],
    ("[[steps]]", "udf", {"source": S, "steps": [{"udf": "m:f", UNKNOWN: 1}], "sink": K}),
    ("[aggregate]", "", {"source": S, "aggregate": {"sql": "SELECT 1", UNKNOWN: 1}, "sink": K}),
    ("[sink]", "files", {"source": S, "sink": {**K, UNKNOWN: 1}}),
    ("[sink]", "DuckDB", {"source": S, "sink": {"path": "out/x.duckdb", "table": "t", "compression": "zstd"}}),
    ("[sink]", "PostgreSQL", {"source": S, "sink": {"path": PG, UNKNOWN: 1}}),
    ("[rejects]", "", {"source": S, "sink": K, "rejects": {"path": "out/r.parquet", UNKNOWN: 1}}),
    ("[run]", "", {"source": S, "sink": K, "run": {UNKNOWN: 1}}),
]


def accepted_keys(job: dict) -> list[str]:
    """The keys the loader accepts in the table holding the fault, from its own error message."""
    with pytest.raises(ConfigError) as info:
        config.build_job(job)
    m = re.search(r"valid keys: (.+)$", str(info.value))
    assert m, f"unexpected error: {info.value}"
    return [k.strip() for k in m.group(1).split(",")]


def documented() -> dict[str, dict[str, str]]:
    """Heading of each job-file reference subsection → {key: default cell}."""
    out = {}
    for heading, body in subsections(section("Job-file reference")).items():
        rows = table_rows(body)
        if rows and rows[0][:2] == ["key", "default"]:
            out[heading] = {r[0].strip("`"): r[1] for r in rows[2:]}
    return out


def toml_literals(value) -> set[str]:
    """How a Python default is written in TOML (the README puts it in backticks)."""
    if isinstance(value, bool):
        return {"true" if value else "false"}
    if isinstance(value, str):
        return {'"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"', f"'{value}'"}
    return {str(value)}


def sig_default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


def _pg_sink_retries():
    from colbatch.sinks.postgres import PostgresSink

    return sig_default(PostgresSink.__init__, "retries")


# (TOML table, key) → the Python default the job-file key ends up with.
PYTHON_DEFAULTS = {
    ("[source]", "separator"): lambda: sig_default(cb.scan_csv, "separator"),
    ("[source]", "has_header"): lambda: sig_default(cb.scan_csv, "has_header"),
    ("[source]", "quote_char"): lambda: sig_default(cb.scan_csv, "quote_char"),
    ("[source]", "null_values"): lambda: sig_default(cb.scan_csv, "null_values"),
    ("[source]", "schema"): lambda: sig_default(cb.scan_csv, "schema"),
    ("[source]", "partitions"): lambda: sig_default(cb.scan_postgres, "partitions"),
    ("[source]", "partition_on"): lambda: sig_default(cb.scan_postgres, "partition_on"),
    ("[source]", "query"): lambda: sig_default(cb.scan_postgres, "query"),
    **{("[[steps]]", k): (lambda k=k: sig_default(cb.Pipeline.map_batches, k))
       for k in ("workers", "executor", "ordered", "retries", "timeout", "concurrency", "isolate_rows",
                 "schema", "max_in_flight")},
    ("[sink]", "compression"): lambda: sig_default(cb.Pipeline.sink_parquet, "compression"),
    ("[sink]", "compression_level"): lambda: sig_default(cb.Pipeline.sink_parquet, "compression_level"),
    ("[sink]", "row_group_size"): lambda: sig_default(cb.Pipeline.sink_parquet, "row_group_size"),
    ("[sink]", "partition_by"): lambda: sig_default(cb.Pipeline.sink_parquet, "partition_by"),
    ("[sink]", "part_rows"): lambda: sig_default(cb.Pipeline.sink_parquet, "part_rows"),
    ("[sink]", "separator"): lambda: sig_default(cb.Pipeline.sink_csv, "separator"),
    ("[sink]", "escape_formulas"): lambda: sig_default(cb.Pipeline.sink_csv, "escape_formulas"),
    ("[sink]", "mode"): lambda: sig_default(cb.Pipeline.sink_duckdb, "mode"),
    ("[sink]", "key"): lambda: sig_default(cb.Pipeline.sink_postgres, "key"),
    ("[sink]", "retries"): _pg_sink_retries,
    **{("[run]", k): (lambda k=k: RunOptions.__dataclass_fields__[k].default)
       for k in ("batch_size", "max_error_rate", "max_errors", "memory_limit", "progress", "threads",
                 "temp_directory")},
}


def test_every_key_check_in_config_is_probed():
    """A new table (a new `_check_keys` call in config.py) must be added to PROBES and the README."""
    tree = ast.parse(Path(config.__file__).read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "_check_keys"]
    # The top level is probed in its own test; every built-in step kind shares one call site.
    probed_sites = len({(t, v) for t, v, _ in PROBES if v != "DuckDB"}) + 1
    assert len(calls) == probed_sites, (f"config.py checks keys in {len(calls)} places, the test probes "
                                        f"{probed_sites}: add the new table to PROBES and to the README")


def test_top_level_tables_are_documented():
    keys = accepted_keys({"source": S, "sink": K, UNKNOWN: {}})
    headings = " ".join(documented())
    for key in keys:
        assert f"[{key}]" in headings or f"[[{key}]]" in headings, f"README has no reference for `[{key}]`"


@pytest.mark.parametrize(("table", "variant", "job"), PROBES,
                         ids=[f"{t}-{v or 'all'}-{i}" for i, (t, v, _) in enumerate(PROBES)])
def test_every_job_file_key_is_documented_with_its_default(table: str, variant: str, job: dict):
    docs = documented()
    in_table = {h: rows for h, rows in docs.items() if f"`{table}`" in h}
    assert in_table, f"README's job-file reference has no `{table}` subsection"
    for key in accepted_keys(job):
        where = {h: rows for h, rows in in_table.items() if key in rows}
        assert where, f"job-file key `{key}` of `{table}` is missing from the README's job-file reference"
        if variant in ("PostgreSQL", "DuckDB"):
            assert any(variant in h for h in where), f"`{table}` key `{key}` is not under a {variant} heading"
        for heading, rows in where.items():
            cell = rows[key]
            assert cell, f"`{key}` under {heading} has no default"
            if (table, key) not in PYTHON_DEFAULTS or cell.startswith("required") or "required" in cell:
                continue
            default = PYTHON_DEFAULTS[(table, key)]()
            if default is None:
                assert cell.lower().startswith("none"), f"`{key}` under {heading}: default is None, README says {cell!r}"
            else:
                literals = {s.replace("_", "") if re.fullmatch(r"[\d_.]+", s) else s
                            for s in re.findall(r"`([^`]+)`", cell)}
                assert literals & toml_literals(default), (
                    f"`{key}` under {heading}: the code's default is {default!r}, README says {cell!r}")


def test_python_default_mapping_names_real_keys():
    """Every entry of PYTHON_DEFAULTS names a key the loader accepts (so the map cannot go stale)."""
    accepted = {(t, k) for t, _, job in PROBES for k in accepted_keys(job)}
    assert set(PYTHON_DEFAULTS) <= accepted, set(PYTHON_DEFAULTS) - accepted
    for fn in PYTHON_DEFAULTS.values():
        fn()


# -- the Python API reference ----------------------------------------------------------------------


def api_entries() -> dict[str, str]:
    return subsections(section("Python API reference"))


@pytest.mark.parametrize("name", sorted(cb.__all__))
def test_every_export_has_an_api_reference_entry_with_an_example(name: str):
    entries = {h: body for h, body in api_entries().items() if re.search(rf"`cb\.{name}`", h)}
    if not entries:  # the error classes share one entry and its table
        entries = {h: b for h, b in api_entries().items() if "Errors" in h and f"`cb.{name}`" in b}
    assert entries, f"`cb.{name}` has no entry in the README's Python API reference"
    assert any("```python" in body for body in entries.values()), f"the entry of `cb.{name}` has no example"


def test_every_pipeline_method_is_in_the_reference():
    body = next(b for h, b in api_entries().items() if h == "`cb.Pipeline`")
    public = [n for n, v in vars(cb.Pipeline).items() if callable(v) and not n.startswith("_")]
    assert len(public) > 15
    missing = [n for n in public if f".{n}(" not in body]
    assert not missing, f"Pipeline methods missing from the README's `cb.Pipeline` entry: {missing}"


def test_entry_point_signatures_in_the_reference_match_the_code():
    """The signature line of each scan/from entry names every parameter, with the code's default."""
    for name in ("scan_csv", "scan_ndjson", "scan_parquet", "scan_ipc", "scan_postgres", "from_arrow", "from_batches"):
        body = api_entries()[f"`cb.{name}`"]
        line = next(ln for ln in body.splitlines() if ln.startswith(f"`cb.{name}("))
        for p in inspect.signature(getattr(cb, name)).parameters.values():
            shown = {p.name} if p.default is inspect.Parameter.empty else {f"{p.name}={p.default!r}"}
            if isinstance(p.default, str) and '"' not in p.default:
                shown.add(f'{p.name}="{p.default}"')
            assert any(s in line for s in shown), f"`cb.{name}`: README signature lacks `{shown.pop()}`: {line}"


# -- the CLI reference -----------------------------------------------------------------------------


def cli_flags() -> dict[str, list[str]]:
    """Subcommand → its option strings (for `bench`, one entry per suite, from the suite's own parser)."""
    from colbatch import cli

    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out: dict[str, list[str]] = {}
    for name, p in sub.choices.items():
        opts = [s for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
        if name != "bench":
            out[name] = opts
            continue
        suites = next(a for a in p._actions if a.dest == "suite").choices
        for suite in suites:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
                cli.main(["bench", suite, "--help"])
            flags = sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", buf.getvalue())) - {"--help"})
            out[f"bench {suite}"] = flags
    return out


def test_every_cli_subcommand_and_flag_is_in_the_reference():
    text = section("CLI reference")
    rows = table_rows(text)
    current, documented_flags = None, {}
    for cells in rows[2:]:
        if cells[0]:
            current = cells[0].strip("`").split()[0] if not cells[0].startswith("`bench") else \
                " ".join(cells[0].strip("`").split()[:2])
            documented_flags.setdefault(current, [])
        if len(cells) > 1 and cells[1]:
            documented_flags[current].append(cells[1].strip("`").split()[0])
    flags = cli_flags()
    assert "bench core" in flags and "run" in flags
    for command, opts in flags.items():
        if command == "bench postgres":  # an alias of `bench pg`
            assert "`bench postgres` is the same" in text
            continue
        assert command in documented_flags, f"`{command}` is missing from the README's CLI reference"
        synopsis = [ln for ln in text.splitlines() if ln.startswith(f"python -m colbatch {command} ")]
        assert synopsis, f"`{command}` has no synopsis line"
        for opt in opts:
            if opt == "--debug":
                assert "--debug" in synopsis[0]
                continue
            assert opt in documented_flags[command], f"`{command} {opt}` is missing from the README's CLI reference"
            assert opt in synopsis[0], f"`{command} {opt}` is missing from its synopsis line"


def test_cli_exit_codes_are_documented():
    from colbatch import cli

    text = section("CLI reference")
    for code in (cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_USAGE, 130):
        assert f"`{code}`" in text, f"exit code {code} is not documented"


@pytest.mark.parametrize("cls", [c for c in vars(cb).values()
                                 if isinstance(c, type) and issubclass(c, cb.ColbatchError)], ids=lambda c: c.__name__)
def test_every_error_class_appears_in_troubleshooting_or_the_reference(cls):
    errors = next(b for h, b in api_entries().items() if h.startswith("Errors"))
    assert f"`cb.{cls.__name__}`" in errors
    if cls is not cb.ColbatchError:
        assert cls.__name__ in section("Troubleshooting"), f"{cls.__name__} is not mentioned in Troubleshooting"


# -- the sample data -------------------------------------------------------------------------------


def test_sample_data_regenerates_byte_for_byte(tmp_path: Path):
    """`python data/make_sample.py` rebuilds exactly the committed files and data/README.md."""
    shutil.copy(ROOT / "data" / "make_sample.py", tmp_path / "make_sample.py")
    proc = subprocess.run([sys.executable, "make_sample.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    committed = sorted(p.relative_to(ROOT / "data") for p in (ROOT / "data" / "sample").iterdir())
    assert [str(p) for p in committed] == ["sample/events.csv", "sample/events.jsonl", "sample/events_2.csv.gz"]
    for rel in [*committed, Path("README.md")]:
        assert (tmp_path / rel).read_bytes() == (ROOT / "data" / rel).read_bytes(), f"data/{rel} differs when regenerated"
