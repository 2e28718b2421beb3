"""PostgreSQL source: a query's (or table's) rows as Arrow batches, streamed with `COPY (query) TO STDOUT`.

The server writes CSV (cheap for it), Polars parses each batch in Rust with
every column read as text, and each column is then cast to the Polars type of
its PostgreSQL type, so nothing is converted row by row in Python. With
`partition_on`, the rows are split into key ranges of that column; each range
is a split read in key order, so `(split, first row)` names the same rows on
every run and a resumed run skips committed rows with `OFFSET`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import polars as pl

from colbatch.batch import Batch, Split
from colbatch.errors import ConfigError, SourceError
from colbatch.pg import connect, mask_dsn, psycopg, scrub
from colbatch.rejects import cast_or_reject
from colbatch.sinks.postgres import check_identifier
from colbatch.sources.base import ReadNotes, RejectFn, Source

# pg_type.typname → Polars type for the columns colbatch converts; any other type arrives as text
# (and `numeric(p, s)` with p <= 38 as Decimal(p, s); unconstrained `numeric` has no fixed scale, so text).
PG_TO_POLARS: dict[str, pl.DataType] = {
    "bool": pl.Boolean(), "int2": pl.Int16(), "int4": pl.Int32(), "int8": pl.Int64(), "oid": pl.Int64(),
    "float4": pl.Float32(), "float8": pl.Float64(), "text": pl.String(), "varchar": pl.String(),
    "bpchar": pl.String(), "name": pl.String(), "bytea": pl.Binary(), "date": pl.Date(),
    "timestamp": pl.Datetime("us"), "timestamptz": pl.Datetime("us", "UTC"), "time": pl.Time(),
}
# Arrow's decimal128 holds at most 38 digits.
MAX_DECIMAL_PRECISION = 38
# Session settings that make the server's text output unambiguous for the parser below.
SESSION = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET bytea_output = 'hex'; SET extra_float_digits = 3"


class PostgresSource(Source):
    """Rows of `query` (or all rows of `table`), optionally split into `partitions` ranges of `partition_on`."""

    name = "postgresql"

    def __init__(self, dsn: str, *, query: str | None = None, table: str | None = None, schema: str | None = None,
                 partition_on: str | None = None, partitions: int = 1) -> None:
        psycopg()
        from psycopg import sql

        if (query is None) == (table is None):
            raise ConfigError("`scan_postgres` needs exactly one of `query` or `table`")
        if partitions < 1:
            raise ConfigError(f"`partitions` must be a positive count, got {partitions!r}", value=partitions)
        self._dsn = dsn
        self.notes = ReadNotes()
        if table is not None:
            check_identifier(table, "table name")
            ident = sql.Identifier(schema, table) if schema else sql.Identifier(table)
            self._base = sql.SQL("SELECT * FROM {}").format(ident)
            self._label = f"{schema}.{table}" if schema else table
        else:
            # The query is the user's own SQL, like a DuckDB or psql query; it is not built from data.
            self._base = sql.SQL(query)  # type: ignore[arg-type]
            self._label = "query"
        self.partition_on = check_identifier(partition_on, "partition column") if partition_on else None
        self.partitions = partitions
        self._columns, self._types, self._numeric = self._describe()
        self._schema = pl.Schema({c: self._numeric.get(c) or PG_TO_POLARS.get(t, pl.String())
                                  for c, t in zip(self._columns, self._types)})
        if self.partition_on is not None and self.partition_on not in self._columns:
            raise ConfigError(f"`partition_on` column `{self.partition_on}` is not in the result; columns: "
                              f"{', '.join(self._columns)}")
        self._splits: list[Split] | None = None

    def describe(self) -> str:
        """One-line description (the DSN's password masked)."""
        part = f" partitioned on {self.partition_on} x{self.partitions}" if self.partition_on else ""
        return f"postgresql {mask_dsn(self._dsn)} {self._label}{part}"

    def __repr__(self) -> str:
        return f"PostgresSource({self.describe()!r})"

    @property
    def schema(self) -> pl.Schema:
        """Columns of the result with their Polars types."""
        return self._schema

    def _connect(self) -> Any:
        conn = connect(self._dsn, autocommit=True)
        conn.execute(SESSION)
        return conn

    def _fail(self, exc: BaseException, what: str) -> SourceError:
        return SourceError(f"PostgreSQL source `{self._label}` failed while {what}: {scrub(str(exc), self._dsn)}",
                           sqlstate=getattr(exc, "sqlstate", None))

    def _describe(self) -> tuple[list[str], list[str], dict[str, pl.Decimal]]:
        from psycopg import sql

        try:
            with self._connect() as conn:
                cur = conn.execute(sql.SQL("SELECT * FROM ({}) AS colbatch_q LIMIT 0").format(self._base))
                oids = [d.type_code for d in cur.description]
                names = dict(conn.execute("SELECT oid::int8, typname FROM pg_type WHERE oid = ANY(%s)",
                                          ([int(o) for o in oids],)).fetchall())
                types = [names.get(int(o), "text") for o in oids]
                numeric = {d.name: pl.Decimal(d.precision, d.scale) for d, t in zip(cur.description, types)
                           if t == "numeric" and d.precision and d.precision <= MAX_DECIMAL_PRECISION}
                return [d.name for d in cur.description], types, numeric
        except psycopg().Error as exc:
            raise self._fail(exc, "describing its columns") from None

    def splits(self) -> list[Split]:
        """One split, or `partitions` key ranges of `partition_on` (bounds computed once, from min and max)."""
        if self._splits is not None:
            return self._splits
        if self.partition_on is None or self.partitions == 1:
            self._splits = [Split(0, f"00000:{self._label}", None, None)]
            return self._splits
        from psycopg import sql

        col = sql.Identifier(self.partition_on)
        try:
            with self._connect() as conn:
                lo, hi = conn.execute(sql.SQL("SELECT min({}), max({}) FROM ({}) AS colbatch_q").format(
                    col, col, self._base)).fetchone()
        except psycopg().Error as exc:
            raise self._fail(exc, "computing partition bounds") from None
        if lo is None:
            self._splits = [Split(0, f"00000:{self._label}", None, None)]
            return self._splits
        step = max(1, -(-(int(hi) - int(lo) + 1) // self.partitions))
        bounds = [(int(lo) + i * step, int(lo) + (i + 1) * step) for i in range(self.partitions) if int(lo) + i * step <= int(hi)]
        self._splits = [Split(i, f"{i:05d}:{self._label}:{self.partition_on}[{a},{b})", None, None)
                        for i, (a, b) in enumerate(bounds)]
        return self._splits

    def _split_query(self, split: Split, skip_rows: int) -> Any:
        from psycopg import sql

        q = sql.SQL("SELECT * FROM ({}) AS colbatch_q").format(self._base)
        if self.partition_on is not None:
            col = sql.Identifier(self.partition_on)
            if "[" in split.id:
                a, b = split.id.rsplit("[", 1)[1].rstrip(")").split(",")
                q = sql.SQL("{} WHERE {} >= {} AND {} < {}").format(q, col, sql.Literal(int(a)), col, sql.Literal(int(b)))
            q = sql.SQL("{} ORDER BY {}").format(q, col)
        if skip_rows:
            q = sql.SQL("{} OFFSET {}").format(q, sql.Literal(int(skip_rows)))
        return q

    def read(self, split: Split, *, batch_rows: int, on_reject: RejectFn, skip_rows: int = 0) -> Iterator[Batch]:
        """Stream the split's rows in batches of `batch_rows` (libpq hands over one row per COPY chunk)."""
        from psycopg import sql

        row = skip_rows
        try:
            with self._connect() as conn, conn.cursor() as cur:
                copy_sql = sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(self._split_query(split, skip_rows))
                with cur.copy(copy_sql) as copy:
                    chunks: list[bytes] = []
                    for chunk in copy:
                        chunks.append(bytes(chunk))
                        if len(chunks) >= batch_rows:
                            yield self._batch(chunks, split, row, on_reject)
                            row += len(chunks)
                            chunks = []
                    if chunks:
                        yield self._batch(chunks, split, row, on_reject)
        except psycopg().Error as exc:
            raise self._fail(exc, f"reading split `{split.id}`") from None

    def _batch(self, chunks: list[bytes], split: Split, first_row: int, on_reject: RejectFn) -> Batch:
        data = b"".join(chunks)
        names = [f"c{i}" for i in range(len(self._columns))]  # real names may repeat or be hostile to the parser
        text = pl.read_csv(io.BytesIO(data), has_header=False, new_columns=names, infer_schema=False,
                           schema=pl.Schema({n: pl.String() for n in names}))
        frame = text.select([(pl.col(n) if c in self._numeric else _convert(pl.col(n), t)).alias(c)
                             for n, t, c in zip(names, self._types, self._columns)])
        if not self._numeric:
            return Batch(frame, split, first_row=first_row, rows_read=len(chunks), bytes_read=len(data))
        # numeric(p, s) may hold NaN, which Decimal cannot: such rows become `cast` rejects, not nulls.
        rows = np.arange(first_row, first_row + frame.height, dtype=np.int64)
        frame, kept = cast_or_reject(frame, self._schema, source=self._label, lines=rows, on_reject=on_reject)
        return Batch(frame, split, first_row=first_row, rows_read=len(chunks), bytes_read=len(data),
                     line_fn=None if len(kept) == len(rows) else (lambda pos, kept=kept: kept[pos]))


def _convert(col: pl.Expr, typname: str) -> pl.Expr:
    """Text of a PostgreSQL value (CSV output, session settings above) → the Polars type of PG_TO_POLARS."""
    target = PG_TO_POLARS.get(typname)
    if target is None or target == pl.String:
        return col
    if typname == "bool":
        return col == "t"
    if typname == "bytea":
        return col.str.slice(2).str.decode("hex")
    if typname == "date":
        return col.str.to_date("%Y-%m-%d")
    if typname == "timestamp":
        return col.str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="us")
    if typname == "timestamptz":
        return col.str.replace(r"\+00$", "").str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="us",
                                                              time_zone="UTC")
    if typname == "time":
        return col.str.to_time("%H:%M:%S%.f")
    return col.cast(target)
