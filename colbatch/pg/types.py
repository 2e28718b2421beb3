"""Polars/Arrow types ↔ PostgreSQL types: DDL for new tables, and the encoding of existing columns.

Binary COPY is strict: every field must be in exactly the column's binary
format. So the *table's* column type decides how a column is encoded, and a
batch column is first cast to the Polars type that matches it (`PG_TYPES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import polars as pl

from colbatch.errors import SchemaError


@dataclass(frozen=True)
class PgType:
    """How one PostgreSQL type is written: the Polars type to cast to and the encoder kind."""

    name: str
    dtype: pl.DataType
    kind: str  # one of: bool, int, float, numeric, text, bytea, date, timestamp, time, interval, json, jsonb


# PostgreSQL type name (as `pg_type.typname`) → encoding. Text-like types share text's binary format.
PG_TYPES: dict[str, PgType] = {
    "bool": PgType("boolean", pl.Boolean(), "bool"),
    "int2": PgType("smallint", pl.Int16(), "int"),
    "int4": PgType("integer", pl.Int32(), "int"),
    "int8": PgType("bigint", pl.Int64(), "int"),
    "float4": PgType("real", pl.Float32(), "float"),
    "float8": PgType("double precision", pl.Float64(), "float"),
    # Decimal columns keep their own precision and scale; integers go as Decimal(38, 0).
    "numeric": PgType("numeric", pl.Decimal(38, 0), "numeric"),
    "text": PgType("text", pl.String(), "text"),
    "varchar": PgType("character varying", pl.String(), "text"),
    "bpchar": PgType("character", pl.String(), "text"),
    "bytea": PgType("bytea", pl.Binary(), "bytea"),
    "date": PgType("date", pl.Date(), "date"),
    "timestamp": PgType("timestamp", pl.Datetime("us"), "timestamp"),
    "timestamptz": PgType("timestamp with time zone", pl.Datetime("us", "UTC"), "timestamp"),
    "time": PgType("time", pl.Time(), "time"),
    "interval": PgType("interval", pl.Duration("us"), "interval"),
    "json": PgType("json", pl.String(), "json"),
    "jsonb": PgType("jsonb", pl.String(), "jsonb"),
}

SUPPORTED = ("Boolean, Int8-64, UInt8-64, Float32/64, Decimal, String, Categorical, Enum, Binary, Date, Datetime, Time, "
             "Duration, Struct, List, Array, Null")


def pg_type_for(column: str, dtype: pl.DataType) -> str:
    """The PostgreSQL type a new table uses for a Polars column type (a `pg_type.typname`, or `numeric(p,s)`).

    Raises:
        SchemaError: the type has no lossless PostgreSQL counterpart here (e.g. Object); cast it first.
    """
    if dtype == pl.Boolean:
        return "bool"
    if dtype in (pl.Int8, pl.Int16, pl.UInt8):
        return "int2"
    if dtype in (pl.Int32, pl.UInt16):
        return "int4"
    # UInt64 values above 2^63-1 do not fit bigint; they are rejected at load with SQLSTATE 22003.
    if dtype in (pl.Int64, pl.UInt32, pl.UInt64):
        return "int8"
    if dtype == pl.Float32:
        return "float4"
    if dtype == pl.Float64:
        return "float8"
    if isinstance(dtype, pl.Decimal):
        return "numeric" if dtype.precision is None else f"numeric({dtype.precision},{dtype.scale})"
    if dtype in (pl.String, pl.Categorical, pl.Null) or isinstance(dtype, pl.Enum):
        return "text"
    if dtype == pl.Binary:
        return "bytea"
    if dtype == pl.Date:
        return "date"
    if isinstance(dtype, pl.Datetime):
        return "timestamptz" if dtype.time_zone else "timestamp"
    if dtype == pl.Time:
        return "time"
    if isinstance(dtype, pl.Duration):
        return "interval"
    if isinstance(dtype, (pl.Struct, pl.List, pl.Array)):
        return "jsonb"
    raise SchemaError(f"column `{column}` has type {dtype}, which the PostgreSQL sink cannot store; "
                      f"cast it to one of: {SUPPORTED}", column=column, dtype=str(dtype))


def check_compatible(schema: Mapping[str, pl.DataType], table: Mapping[str, str], *, target: str) -> dict[str, PgType]:
    """Match batch columns to an existing table's columns (name → typname); returns each column's encoding.

    Raises:
        SchemaError: a batch column is missing from the table, or its type cannot become the column's type.
    """
    out: dict[str, PgType] = {}
    for column, dtype in schema.items():
        if column not in table:
            raise SchemaError(f"column `{column}` is not in table `{target}`; its columns are: "
                              f"{', '.join(table)}", column=column)
        typname = table[column]
        pg = PG_TYPES.get(typname)
        if pg is None or not _castable(dtype, pg):
            raise SchemaError(f"column `{column}` has type {dtype} but `{target}`.`{column}` is `{typname}`, "
                              f"which it cannot be loaded into", column=column, dtype=str(dtype), pg_type=typname)
        out[column] = pg
    return out


def _castable(dtype: pl.DataType, pg: PgType) -> bool:
    if dtype == pl.Null:
        return True
    if pg.kind in ("json", "jsonb"):
        return dtype == pl.String or isinstance(dtype, (pl.Struct, pl.List, pl.Array))
    if pg.kind == "text":
        return dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)
    if pg.kind == "numeric":
        return isinstance(dtype, pl.Decimal) or dtype.is_integer()
    if pg.kind in ("int", "float"):
        return dtype.is_numeric() and not (pg.kind == "int" and dtype.is_float())
    if pg.kind == "timestamp":
        return isinstance(dtype, pl.Datetime) or dtype == pl.Date
    if pg.kind == "interval":
        return isinstance(dtype, pl.Duration)
    return dtype == pg.dtype or type(dtype) is type(pg.dtype)
