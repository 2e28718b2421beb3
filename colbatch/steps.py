"""Vectorised steps applied to each batch: filter, with_columns, select, rename, cast, validate.

Each step maps a DataFrame to a StepResult: the rows that go on, how many
were filtered (dropped on purpose) and the rows rejected with a reason. Python
users pass Polars expressions; job files pass SQL expression strings, which
are compiled with `pl.sql_expr`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import polars as pl

from colbatch.errors import ConfigError, SchemaError
from colbatch.schema import cast_with_rejects, parse_dtype

ROW_COL = "__cb_row"


def to_expr(value: Any, *, what: str) -> pl.Expr:
    """A Polars expression from an expression or a SQL expression string."""
    if isinstance(value, pl.Expr):
        return value
    if isinstance(value, str):
        try:
            return pl.sql_expr(value)
        except Exception as exc:  # polars raises several error types for bad SQL
            raise ConfigError(f"{what} {value!r} is not a valid SQL expression: {exc}", value=value) from exc
    raise ConfigError(f"{what} must be a Polars expression or a SQL string, got `{type(value).__name__}`", value=value)


@dataclass
class StepResult:
    """Output of one step on one batch."""

    data: pl.DataFrame
    filtered: int = 0
    rejected: pl.DataFrame | None = None
    reasons: pl.Series | None = None


@dataclass
class Step:
    """Base class: a named, vectorised transformation of a batch."""

    name: str = field(default="", kw_only=True)
    kind: str = field(default="step", init=False)
    needs_rows: bool = field(default=False, init=False)

    def apply(self, df: pl.DataFrame) -> StepResult:
        """Transform one batch."""
        raise NotImplementedError

    def output_schema(self, schema: pl.Schema) -> pl.Schema:
        """Schema after this step, computed lazily without data."""
        try:
            return self.apply(pl.DataFrame(schema=schema)).data.schema
        except pl.exceptions.PolarsError as exc:
            raise SchemaError(f"step `{self.name}` does not fit the columns {list(schema)}: {exc}", step=self.name) from exc

    def _fail(self, exc: Exception) -> SchemaError:
        return SchemaError(f"step `{self.name}` failed: {exc}", step=self.name)


@dataclass
class Filter(Step):
    """Keep rows where the predicate is true; the others are counted as filtered."""

    predicate: pl.Expr = field(default_factory=lambda: pl.lit(True))
    kind: str = field(default="filter", init=False)

    def apply(self, df: pl.DataFrame) -> StepResult:
        out = df.filter(self.predicate)
        return StepResult(out, filtered=df.height - out.height)


@dataclass
class WithColumns(Step):
    """Add or replace columns."""

    exprs: list[pl.Expr] = field(default_factory=list)
    kind: str = field(default="with_columns", init=False)

    def apply(self, df: pl.DataFrame) -> StepResult:
        return StepResult(df.with_columns(self.exprs))


@dataclass
class Select(Step):
    """Keep (and compute) only the given columns; the row-position column rides along."""

    exprs: list[pl.Expr] = field(default_factory=list)
    kind: str = field(default="select", init=False)

    def apply(self, df: pl.DataFrame) -> StepResult:
        extra = [pl.col(ROW_COL)] if ROW_COL in df.columns else []
        return StepResult(df.select([*self.exprs, *extra]))


@dataclass
class Rename(Step):
    """Rename columns."""

    mapping: dict[str, str] = field(default_factory=dict)
    kind: str = field(default="rename", init=False)

    def apply(self, df: pl.DataFrame) -> StepResult:
        missing = [c for c in self.mapping if c not in df.columns]
        if missing:
            raise SchemaError(f"rename: column `{missing[0]}` does not exist; columns: {', '.join(df.columns)}",
                              column=missing[0])
        return StepResult(df.rename(self.mapping))


@dataclass
class Cast(Step):
    """Cast columns; values that do not fit are rejected with stage `cast`."""

    dtypes: dict[str, pl.DataType] = field(default_factory=dict)
    kind: str = field(default="cast", init=False)
    needs_rows: bool = field(default=True, init=False)

    def apply(self, df: pl.DataFrame) -> StepResult:
        missing = [c for c in self.dtypes if c not in df.columns]
        if missing:
            raise SchemaError(f"cast: column `{missing[0]}` does not exist; columns: {', '.join(df.columns)}",
                              column=missing[0])
        cast, reasons = cast_with_rejects(df, self.dtypes)
        if reasons is None:
            return StepResult(cast)
        bad = reasons.is_not_null()
        return StepResult(cast.filter(~bad), rejected=df.filter(bad), reasons=reasons.filter(bad))


@dataclass
class Validate(Step):
    """Reject rows for which the rule is false or null, with the rule's name as reason."""

    rule: pl.Expr = field(default_factory=lambda: pl.lit(True))
    text: str = ""
    kind: str = field(default="validate", init=False)
    needs_rows: bool = field(default=True, init=False)

    def apply(self, df: pl.DataFrame) -> StepResult:
        ok = df.select(self.rule.fill_null(False).alias("__ok"))["__ok"]
        if ok.dtype != pl.Boolean:
            raise SchemaError(f"validate `{self.name}`: rule must give true/false, got {ok.dtype}", step=self.name)
        if ok.all():
            return StepResult(df)
        bad = ~ok
        reason = f"failed validation `{self.name}`" + (f": {self.text}" if self.text and self.text != self.name else "")
        rejected = df.filter(bad)
        return StepResult(df.filter(ok), rejected=rejected,
                          reasons=pl.Series("_reason", [reason] * rejected.height, dtype=pl.String))


def make_filter(predicate: Any, name: str = "") -> Filter:
    """Build a Filter from an expression or SQL string."""
    return Filter(predicate=to_expr(predicate, what="filter"), name=name or _label(predicate))


def make_with_columns(exprs: Sequence[Any], named: Mapping[str, Any], name: str = "") -> WithColumns:
    """Build a WithColumns from expressions / SQL strings (`"a * 2 AS b"`) and keyword expressions."""
    items = [to_expr(e, what="with_columns") for e in exprs]
    items += [to_expr(e, what="with_columns").alias(k) if not isinstance(e, (int, float)) else pl.lit(e).alias(k)
              for k, e in named.items()]
    return WithColumns(exprs=items, name=name or "with_columns")


def make_select(exprs: Sequence[Any], name: str = "") -> Select:
    """Build a Select; plain names select columns, other strings are SQL expressions."""
    items = []
    for e in exprs:
        if isinstance(e, str) and e.isidentifier():
            items.append(pl.col(e))
        else:
            items.append(to_expr(e, what="select"))
    return Select(exprs=items, name=name or "select")


def make_validate(rule: Any, name: str | None = None) -> Validate:
    """Build a Validate; the name defaults to the rule's text."""
    text = rule if isinstance(rule, str) else str(rule)
    return Validate(rule=to_expr(rule, what="validate"), text=text, name=name or _label(rule))


def make_cast(dtypes: Mapping[str, Any], name: str = "") -> Cast:
    """Build a Cast from `{column: dtype or dtype name}`."""
    return Cast(dtypes={c: parse_dtype(t, column=c) for c, t in dtypes.items()}, name=name or "cast")


def _label(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def step_definition(step: Step) -> dict[str, Any]:
    """A JSON-able description of a step for job fingerprints (expressions as text, functions by name)."""
    out: dict[str, Any] = {"kind": step.kind}
    for f in fields(step):
        if f.name in ("kind", "needs_rows"):
            continue
        out[f.name] = _definition_of(getattr(step, f.name))
    return out


def _definition_of(value: Any) -> Any:
    if isinstance(value, pl.Expr):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _definition_of(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_definition_of(v) for v in value]
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}:{value.__qualname__}"
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
