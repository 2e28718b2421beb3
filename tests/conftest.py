"""Shared fixtures: one logical dataset through every source kind, and every sink kind with a reader."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import zstandard

import colbatch as cb
from tests.pg import pg_dsn, pg_frame, pg_schema  # noqa: F401  (fixtures)

N_ROWS = 1000
TYPES = ["click", "view", "purchase", "signup"]


def assert_accounting(report: cb.Report) -> None:
    """Totals and every stage balance: in = out + filtered + rejected."""
    assert report.rows_read == report.rows_written + report.rows_filtered + report.rows_rejected, report.summary()
    assert report.stages, "report has no stages"
    for stage in report.stages:
        assert stage.rows_in == stage.rows_out + stage.rows_filtered + stage.rows_rejected, (stage.name, stage)


def no_temp_files(root: Path) -> list[str]:
    """Leftover colbatch temp files anywhere under `root`."""
    return [str(p) for p in root.rglob("*") if p.name.endswith(".colbatch-tmp")]


def is_bookkeeping(path: Path) -> bool:
    """colbatch's own ledger and lock files, which are not output data."""
    return path.name.endswith((".colbatch.json", "colbatch-lock", ".manifest.json"))


def data_files(root: Path) -> list[Path]:
    """Output data files under `root` (no temp, ledger or lock files)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and not is_bookkeeping(p))


def make_frame(n: int = N_ROWS) -> pl.DataFrame:
    """The logical dataset: id int64, amount float64 (some <= 0), type str."""
    ids = list(range(1, n + 1))
    return pl.DataFrame(
        {
            "id": pl.Series(ids, dtype=pl.Int64),
            "amount": pl.Series([round((i % 37) - 5 + (i % 7) * 0.25, 2) for i in ids], dtype=pl.Float64),
            "type": pl.Series([TYPES[i % len(TYPES)] for i in ids], dtype=pl.String),
        }
    )


SCHEMA = {"id": "int64", "amount": "float64", "type": "str"}


@pytest.fixture
def frame() -> pl.DataFrame:
    return make_frame()


SOURCE_KINDS = ["csv", "csv.gz", "csv.zst", "ndjson", "parquet", "ipc", "from_arrow", "from_batches", "postgres"]


@dataclass
class SourceCase:
    kind: str
    make: Callable[[], cb.Pipeline]
    expected: pl.DataFrame


@pytest.fixture(params=SOURCE_KINDS)
def source_case(request, tmp_path: Path) -> SourceCase:
    """The same 1,000 rows through every source kind."""
    kind = request.param
    df = make_frame()
    csv_bytes = df.write_csv().encode()
    if kind == "csv":
        p = tmp_path / "in.csv"
        p.write_bytes(csv_bytes)
        make = lambda: cb.scan_csv(p, schema=SCHEMA)  # noqa: E731
    elif kind == "csv.gz":
        p = tmp_path / "in.csv.gz"
        p.write_bytes(gzip.compress(csv_bytes))
        make = lambda: cb.scan_csv(p, schema=SCHEMA)  # noqa: E731
    elif kind == "csv.zst":
        p = tmp_path / "in.csv.zst"
        p.write_bytes(zstandard.ZstdCompressor().compress(csv_bytes))
        make = lambda: cb.scan_csv(p, schema=SCHEMA)  # noqa: E731
    elif kind == "ndjson":
        p = tmp_path / "in.jsonl"
        df.write_ndjson(p)
        make = lambda: cb.scan_ndjson(p, schema=SCHEMA)  # noqa: E731
    elif kind == "parquet":
        p = tmp_path / "in.parquet"
        pq.write_table(df.to_arrow(), p, row_group_size=300)
        make = lambda: cb.scan_parquet(p)  # noqa: E731
    elif kind == "ipc":
        p = tmp_path / "in.arrow"
        table = df.to_arrow()
        with ipc.new_file(str(p), table.schema) as w:
            for rb in table.to_batches(max_chunksize=300):
                w.write_batch(rb)
        make = lambda: cb.scan_ipc(p)  # noqa: E731
    elif kind == "from_arrow":
        table = df.to_arrow()
        make = lambda: cb.from_arrow(table)  # noqa: E731
    elif kind == "from_batches":
        def gen():
            for start in range(0, df.height, 250):
                yield df.slice(start, 250).to_arrow().to_batches()[0]

        make = lambda: cb.from_batches(gen, schema=SCHEMA)  # noqa: E731
    elif kind == "postgres":
        dsn, schema = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema")
        cb.from_arrow(df).sink_postgres(dsn, "events", schema=schema, mode="create").run(progress=False)
        make = lambda: cb.scan_postgres(dsn, table="events", schema=schema, partition_on="id", partitions=3)  # noqa: E731
    else:  # pragma: no cover
        raise AssertionError(kind)
    return SourceCase(kind, make, df)


SINK_KINDS = ["parquet_file", "parquet_dir", "parquet_partitioned", "csv", "csv_gz", "jsonl", "foreach_batch", "duckdb",
              "postgres"]


@dataclass
class SinkCase:
    kind: str
    target: Path
    attach: Callable[[cb.Pipeline], cb.Pipeline]
    read: Callable[[], pl.DataFrame]
    collected: list = field(default_factory=list)


def _read_partitioned(root: Path) -> pl.DataFrame:
    import duckdb

    files = sorted(str(p) for p in root.rglob("*.parquet"))
    if not files:
        return pl.DataFrame()
    glob = str(root).replace("'", "''") + "/**/*.parquet"
    return duckdb.sql(f"SELECT * FROM read_parquet('{glob}', hive_partitioning=true)").pl()


@pytest.fixture(params=SINK_KINDS)
def sink_case(request, tmp_path: Path) -> SinkCase:
    """Every sink kind, with a reader returning what it wrote as a DataFrame."""
    kind = request.param
    out = tmp_path / "out"
    out.mkdir()
    if kind == "parquet_file":
        target = out / "events.parquet"
        return SinkCase(kind, out, lambda p: p.sink_parquet(target), lambda: pl.read_parquet(target))
    if kind == "parquet_dir":
        target = out / "events"
        return SinkCase(kind, out, lambda p: p.sink_parquet(target),
                        lambda: pl.read_parquet(sorted(target.glob("part-*.parquet"))))
    if kind == "parquet_partitioned":
        target = out / "events"

        def read_part() -> pl.DataFrame:
            df = _read_partitioned(target)
            return df.with_columns(pl.col("type").cast(pl.String)) if "type" in df.columns else df

        return SinkCase(kind, out, lambda p: p.sink_parquet(target, partition_by="type"), read_part)
    if kind == "csv":
        target = out / "events.csv"
        return SinkCase(kind, out, lambda p: p.sink_csv(target),
                        lambda: pl.read_csv(target, schema_overrides={"id": pl.Int64, "amount": pl.Float64}))
    if kind == "csv_gz":
        target = out / "events.csv.gz"
        return SinkCase(kind, out, lambda p: p.sink_csv(target),
                        lambda: pl.read_csv(gzip.decompress(target.read_bytes()),
                                            schema_overrides={"id": pl.Int64, "amount": pl.Float64}))
    if kind == "jsonl":
        target = out / "events.jsonl"
        return SinkCase(kind, out, lambda p: p.sink_ndjson(target), lambda: pl.read_ndjson(target))
    if kind == "foreach_batch":
        collected: list[pl.DataFrame] = []
        case = SinkCase(kind, out, lambda p: p.foreach_batch(collected.append, retries=0),
                        lambda: pl.concat(collected) if collected else pl.DataFrame(), collected)
        return case
    if kind == "duckdb":
        target = out / "events.duckdb"

        def read_table() -> pl.DataFrame:
            import duckdb

            if not target.exists():
                return pl.DataFrame()
            with duckdb.connect(str(target), read_only=True) as con:
                try:
                    return con.sql('SELECT * FROM "we""ird; table"').pl()
                except duckdb.CatalogException:  # an aborted first run leaves no table
                    return pl.DataFrame()

        return SinkCase(kind, out, lambda p: p.sink_duckdb(target, 'we"ird; table'), read_table)
    if kind == "postgres":
        # `replace` publishes the table at commit only, like the file sinks publish their files.
        dsn, schema = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema")
        return SinkCase(kind, out, lambda p: p.sink_postgres(dsn, "events", schema=schema, mode="replace"),
                        lambda: pg_frame(dsn, schema, "events"))
    raise AssertionError(kind)  # pragma: no cover


def sorted_rows(df: pl.DataFrame, columns=("id", "amount", "type")) -> pl.DataFrame:
    return df.select(list(columns)).sort("id")


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    """Write bytes or text to a file under tmp_path and return its path."""

    def _write(name: str, content: bytes | str) -> Path:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return p

    return _write


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _quiet_cwd(tmp_path: Path, monkeypatch):
    """Run each test from its tmp dir so stray relative outputs never land in the repo."""
    monkeypatch.chdir(tmp_path)
