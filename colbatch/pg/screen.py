"""Find rows the server will probably refuse before they are sent, so a unit with bad rows loads in one pass.

A COPY that fails on row N rolls back the N-1 rows before it: finding bad rows
one failed COPY at a time costs the server about one unit of wasted work per
bad row's neighbourhood. The table's cheap constraints are checked here first,
in Arrow, on the batch already cast to the table's types:

* `NOT NULL` columns (SQLSTATE 23502),
* `varchar(n)` / `char(n)` lengths (22001),
* `numeric(p, s)` precision (22003),
* `CHECK` constraints, whose definitions (`pg_get_constraintdef`) are evaluated by
  DuckDB, whose SQL reads PostgreSQL's casts and operators. A constraint DuckDB cannot
  bind is simply not screened.

The result is only a list of *suspects*: the loader COPYs the other rows in one
piece and each suspect on its own, so the server still decides (a suspect that
loads is kept; a bad row the screen missed is isolated by the loader as before)
and every reject carries the server's own SQLSTATE and message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

log = logging.getLogger("colbatch")

# Arrow → DuckDB is zero-copy but a query still costs ~0.1 ms; batches below this are not worth screening.
MIN_SCREEN_ROWS = 64


@dataclass(frozen=True)
class Column:
    """What the catalog says about one table column."""

    typname: str
    typmod: int = -1
    not_null: bool = False


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def rules_for(columns: Mapping[str, Column], checks: Sequence[tuple[str, str, Sequence[str]]],
              batch_columns: Sequence[str]) -> list[tuple[str, str, tuple[str, ...]]]:
    """DuckDB boolean expressions, true for a suspect row, as `(name, sql, columns read)`.

    Only rules over columns the batch has are returned.

    Args:
        columns: the table's columns by name.
        checks: `(constraint name, pg_get_constraintdef text, referenced column names)`.
        batch_columns: columns the batch sends (others take their defaults on the server).
    """
    present = set(batch_columns)
    rules: list[tuple[str, str, tuple[str, ...]]] = []
    for name in batch_columns:
        col = columns.get(name)
        if col is None:
            continue
        q = _quote(name)
        if col.not_null:
            rules.append((f"{name} not null", f"{q} IS NULL", (name,)))
        if col.typname in ("varchar", "bpchar") and col.typmod > 4:
            rules.append((f"{name} length", f"length({q}) > {col.typmod - 4}", (name,)))
        if col.typname == "numeric" and col.typmod > 4:
            precision, scale = ((col.typmod - 4) >> 16) & 0xFFFF, (col.typmod - 4) & 0x7FF
            if 0 < precision - scale < 38:
                rules.append((f"{name} precision", f"abs({q}::DOUBLE) >= 1e{precision - scale} - 5e-{scale + 1}",
                              (name,)))
    for conname, definition, refs in checks:
        body = definition.strip()
        if not body.upper().startswith("CHECK") or not set(refs) <= present:
            continue
        rules.append((conname, f"coalesce(NOT ({body[5:].strip()}), false)", tuple(refs)))
    return rules


class Screen:
    """Evaluates a table's cheap constraints on batches with an in-process DuckDB (no file or network access)."""

    def __init__(self, rules: Sequence[tuple[str, str, Sequence[str]]], sample: pl.DataFrame) -> None:
        import duckdb

        self._con = duckdb.connect(config={"threads": 1, "enable_external_access": False,
                                           "autoinstall_known_extensions": False,
                                           "autoload_known_extensions": False})
        self._con.execute("SET lock_configuration = true")
        self.rules: list[tuple[str, str]] = []
        read: set[str] = set()
        for name, rule, columns in rules:  # bind each rule once on an empty frame; drop what DuckDB cannot read
            try:
                self._run(sample.clear(), [rule])
                self.rules.append((name, rule))
                read.update(columns)
            except Exception as exc:  # DuckDB's binder or parser: the server will judge those rows
                log.debug("constraint `%s` is not screened before COPY: %s", name, str(exc).splitlines()[0])
        # Only the columns the rules read go to DuckDB (a tenth of the cost for one CHECK on 7 columns).
        self.columns = [c for c in sample.columns if c in read]

    def __bool__(self) -> bool:
        return bool(self.rules)

    def _run(self, df: pl.DataFrame, rules: Sequence[str]) -> np.ndarray:
        self._con.register("colbatch_rows", df.to_arrow())
        try:
            out = self._con.execute(f"SELECT {' OR '.join(f'({r})' for r in rules)} FROM colbatch_rows").fetchnumpy()
        finally:
            self._con.unregister("colbatch_rows")
        values = next(iter(out.values()))
        return np.asarray(values.filled(False) if hasattr(values, "filled") else values, dtype=bool)

    def suspects(self, df: pl.DataFrame) -> np.ndarray | None:
        """Boolean mask of rows some rule flags, or None (nothing flagged, nothing to screen, or DuckDB failed)."""
        if not self.rules or df.height < MIN_SCREEN_ROWS:
            return None
        try:
            mask = self._run(df.select(self.columns), [r for _, r in self.rules])
        except Exception as exc:  # e.g. a cast inside a CHECK that fails on one value: let the server judge
            log.debug("screening a batch before COPY failed: %s", str(exc).splitlines()[0])
            return None
        return mask if mask.any() else None

    def close(self) -> None:
        """Close the DuckDB connection."""
        try:
            self._con.close()
        except Exception:  # closing an in-memory database cannot lose anything
            pass


def load_catalog(cur: Any, oid: int) -> tuple[dict[str, Column], list[tuple[str, str, list[str]]]]:
    """A table's columns (type, typmod, NOT NULL) and its CHECK constraints with the columns they read."""
    rows = cur.execute("SELECT a.attname, t.typname, a.atttypmod, a.attnotnull FROM pg_attribute a "
                       "JOIN pg_type t ON t.oid = a.atttypid WHERE a.attrelid = %s AND a.attnum > 0 "
                       "AND NOT a.attisdropped ORDER BY a.attnum", (oid,)).fetchall()
    columns = {r[0]: Column(r[1], int(r[2]), bool(r[3])) for r in rows}
    checks = cur.execute("SELECT c.conname, pg_get_constraintdef(c.oid), "
                         "ARRAY(SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.conrelid "
                         "AND a.attnum = ANY(c.conkey)) FROM pg_constraint c "
                         "WHERE c.conrelid = %s AND c.contype = 'c'", (oid,)).fetchall()
    return columns, [(r[0], r[1], list(r[2])) for r in checks]
