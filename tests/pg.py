"""The PostgreSQL test server: one fixture decides whether it is there, each test gets its own schema."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import polars as pl
import pytest

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def pg_dsn_value() -> str:
    return os.environ.get("COLBATCH_TEST_PG_DSN", DEFAULT_DSN)


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """The test server's DSN; skips (or fails under COLBATCH_REQUIRE_PG=1) when no server answers."""
    dsn = pg_dsn_value()
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # no driver or no server
        reason = f"no PostgreSQL server at COLBATCH_TEST_PG_DSN ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        if os.environ.get("COLBATCH_REQUIRE_PG") == "1":
            pytest.fail(reason + " and COLBATCH_REQUIRE_PG=1")
        pytest.skip(reason)
    return dsn


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A fresh schema for one test (so test runs can share the server), dropped afterwards."""
    import psycopg
    from psycopg import sql

    name = f"cbtest_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def pg_query(dsn: str, query, params=None) -> list[tuple]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def pg_frame(dsn: str, schema: str, table: str, order_by: str | None = None) -> pl.DataFrame:
    """A table's rows as a DataFrame (empty when the table does not exist)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass(%s)", (sql.Identifier(schema, table).as_string(conn),)).fetchone()[0]
        if exists is None:
            return pl.DataFrame()
        q = sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, table))
        if order_by:
            q = sql.SQL("{} ORDER BY {}").format(q, sql.Identifier(order_by))
        cur = conn.execute(q)
        names = [d.name for d in cur.description]
        rows = cur.fetchall()
    return pl.DataFrame(rows, schema=names, orient="row", infer_schema_length=None)
